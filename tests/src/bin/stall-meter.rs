//! How long a guest was stopped, seen from its serial port:
//!
//!     stall-meter SOCKET SECONDS
//!
//! connects to the unix socket of a guest's serial port (libvirt's
//! `<serial type='unix'>`), reads for SECONDS, and prints one JSON line: the
//! bytes read, and the gaps between reads (the longest, the 99.9th
//! percentile, the median, how many over 10 and 100 ms). The guest must
//! write all the time (tests/lab/touch.S writes a byte per MiB of memory it
//! touches): its longest gap is its longest stall.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, seconds] = args.as_slice() else {
        eprintln!("usage: stall-meter SOCKET SECONDS");
        std::process::exit(2);
    };
    let Ok(seconds) = seconds.parse::<f64>() else {
        eprintln!("stall-meter: {seconds:?} is not a number of seconds");
        std::process::exit(2);
    };
    let mut stream = UnixStream::connect(socket).unwrap_or_else(|e| {
        eprintln!("stall-meter: {socket}: {e}");
        std::process::exit(1);
    });
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut buffer = [0u8; 65536];
    let (mut bytes, mut last, mut gaps) = (0u64, None::<Instant>, Vec::new());
    while Instant::now() < end {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                let now = Instant::now();
                if let Some(before) = last {
                    gaps.push(now.duration_since(before).as_secs_f64() * 1000.0);
                }
                last = Some(now);
                bytes += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => {
                eprintln!("stall-meter: {e}");
                break;
            }
        }
    }
    // A read that timed out is no gap of its own: the next read's gap
    // spans it, measured from the last byte.
    gaps.sort_by(f64::total_cmp);
    let at = |q: f64| {
        gaps.get(((gaps.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    println!(
        "{{\"bytes\": {bytes}, \"reads\": {}, \"max_gap_ms\": {:.1}, \"p999_gap_ms\": {:.1}, \"median_gap_ms\": {:.2}, \"gaps_over_10ms\": {}, \"gaps_over_100ms\": {}}}",
        gaps.len() + usize::from(last.is_some()),
        at(1.0),
        at(0.999),
        at(0.5),
        gaps.iter().filter(|&&g| g > 10.0).count(),
        gaps.iter().filter(|&&g| g > 100.0).count()
    );
}
