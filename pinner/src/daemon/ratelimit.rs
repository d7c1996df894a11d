//! Repeated log lines, rate-limited per kind: a flood of refused
//! connections must not flood the journal. Each kind logs up to
//! `PER_WINDOW` lines per `WINDOW`; the first line after a window that
//! suppressed some says how many.

use pinner_shared::log::{Level, Logger};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(10);
const PER_WINDOW: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// Log it; the previous window suppressed this many of its kind.
    Log {
        suppressed: u64,
    },
    Suppress,
}

struct Window {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

#[derive(Default)]
pub struct LogLimiter {
    kinds: Mutex<HashMap<&'static str, Window>>,
}

impl LogLimiter {
    /// Logs `message` at `level` unless its `kind` has logged enough lately.
    pub fn log(&self, logger: &Logger, level: Level, kind: &'static str, message: &str) {
        match self.admit(kind, Instant::now()) {
            Admit::Suppress => {}
            Admit::Log { suppressed } => {
                if suppressed > 0 {
                    logger.log(
                        level,
                        &format!(
                            "{suppressed} more \"{kind}\" messages were suppressed in {WINDOW:?}"
                        ),
                        &[],
                    );
                }
                logger.log(level, message, &[]);
            }
        }
    }

    fn admit(&self, kind: &'static str, now: Instant) -> Admit {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let window = kinds.entry(kind).or_insert(Window {
            started: now,
            logged: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(window.started) >= WINDOW {
            let suppressed = std::mem::take(&mut window.suppressed);
            window.started = now;
            window.logged = 1;
            return Admit::Log { suppressed };
        }
        if window.logged < PER_WINDOW {
            window.logged += 1;
            Admit::Log { suppressed: 0 }
        } else {
            window.suppressed += 1;
            Admit::Suppress
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_logs_a_few_per_window_then_counts_what_it_suppressed() {
        let limiter = LogLimiter::default();
        let t0 = Instant::now();
        let admitted: Vec<Admit> = (0..1000).map(|_| limiter.admit("refused", t0)).collect();
        let logged = admitted.iter().filter(|a| **a != Admit::Suppress).count();
        assert_eq!(logged, PER_WINDOW as usize);
        // Another kind has its own budget.
        assert_eq!(limiter.admit("bad frame", t0), Admit::Log { suppressed: 0 });
        // The next window's first line carries the count.
        assert_eq!(
            limiter.admit("refused", t0 + WINDOW),
            Admit::Log {
                suppressed: 1000 - u64::from(PER_WINDOW)
            }
        );
        assert_eq!(
            limiter.admit("refused", t0 + WINDOW),
            Admit::Log { suppressed: 0 }
        );
    }
}
