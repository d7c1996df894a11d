//! A stand-in host daemon for the isolation tests: sleeps with as many
//! extra threads as its first argument asks for. Copied under other names
//! (e.g. ovs-vswitchd) to play other daemons.

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    for _ in 0..threads {
        std::thread::spawn(|| loop {
            std::thread::park();
        });
    }
    loop {
        std::thread::park();
    }
}
