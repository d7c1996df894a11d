//! When to run a reconcile pass for the events that asked for one.
//!
//! A pass reads every running guest from libvirt, so one per event would make
//! a burst of starts cost a pass per guest. Instead: a guest whose start is
//! the only one under way is placed at once; while other starts are under
//! way (their `prepare` seen, their `started` not yet), the pass waits for
//! them, so concurrent starts share one pass. No guest waits longer than
//! `max_wait` for it, and a start that never reports back stops counting
//! after `STALE_START`.

use pinner_shared::protocol::HookOp;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A `prepare` not followed by `started`, `stopped` or `release` within this
/// is a start that failed without telling; it no longer holds passes back.
const STALE_START: Duration = Duration::from_secs(30);

pub struct Coalescer {
    max_wait: Duration,
    /// Guests being started (by UUID, else name) → when `prepare` came.
    starting: HashMap<String, Instant>,
    /// The first event still waiting for a pass.
    pending_since: Option<Instant>,
    /// A pass must not run before this (a busy guest's retry).
    not_before: Option<Instant>,
    /// Events served by the next pass.
    pending_events: u32,
}

impl Coalescer {
    pub fn new(max_wait: Duration) -> Coalescer {
        Coalescer {
            max_wait,
            starting: HashMap::new(),
            pending_since: None,
            not_before: None,
            pending_events: 0,
        }
    }

    /// Notes a hook event about guest `key` (its UUID, else its name).
    pub fn hook_event(&mut self, op: HookOp, key: &str, now: Instant) {
        match op {
            HookOp::Prepare => {
                self.starting.insert(key.to_string(), now);
            }
            HookOp::Started | HookOp::Stopped | HookOp::Release => {
                self.starting.remove(key);
            }
            _ => {}
        }
        if op.changes_placement() {
            self.changed(now);
        }
    }

    /// Notes anything else that needs a pass (a pin changed behind pinner's
    /// back, say).
    pub fn changed(&mut self, now: Instant) {
        self.pending_since.get_or_insert(now);
        self.pending_events += 1;
    }

    /// Asks for a pass no earlier than `at` (retrying a guest libvirt is
    /// busy with), still joined with whatever else is pending.
    pub fn retry_at(&mut self, at: Instant, now: Instant) {
        self.pending_since.get_or_insert(now);
        self.not_before = Some(self.not_before.map_or(at, |t| t.min(at)));
    }

    /// When the pending pass is due, if one is.
    pub fn due(&self, now: Instant) -> Option<Instant> {
        let since = self.pending_since?;
        let starts_under_way = self
            .starting
            .values()
            .any(|&t| now.saturating_duration_since(t) < STALE_START);
        let due = if starts_under_way {
            since + self.max_wait
        } else {
            since
        };
        Some(self.not_before.map_or(due, |t| due.max(t)))
    }

    /// Notes that a pass ran (whatever caused it): everything noted so far is
    /// served. Returns how many events it served.
    pub fn ran(&mut self, now: Instant) -> u32 {
        self.starting
            .retain(|_, t| now.saturating_duration_since(*t) < STALE_START);
        self.pending_since = None;
        self.not_before = None;
        std::mem::take(&mut self.pending_events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(2);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_lone_start_is_served_at_once() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(WAIT);
        assert_eq!(c.due(t0), None);
        c.hook_event(HookOp::Prepare, "a", t0);
        c.hook_event(HookOp::Start, "a", t0 + ms(5));
        assert_eq!(c.due(t0 + ms(5)), None, "nothing to place before started");
        c.hook_event(HookOp::Started, "a", t0 + ms(300));
        assert_eq!(c.due(t0 + ms(300)), Some(t0 + ms(300)));
        assert_eq!(c.ran(t0 + ms(301)), 1);
        assert_eq!(c.due(t0 + ms(301)), None);
    }

    #[test]
    fn concurrent_starts_share_one_pass() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(WAIT);
        for guest in ["a", "b", "c"] {
            c.hook_event(HookOp::Prepare, guest, t0);
        }
        c.hook_event(HookOp::Started, "a", t0 + ms(100));
        assert_eq!(c.due(t0 + ms(100)), Some(t0 + ms(100) + WAIT));
        c.hook_event(HookOp::Started, "b", t0 + ms(200));
        assert_eq!(c.due(t0 + ms(200)), Some(t0 + ms(100) + WAIT));
        // The last start reports: the pass runs now, for all three.
        c.hook_event(HookOp::Started, "c", t0 + ms(300));
        assert_eq!(c.due(t0 + ms(300)), Some(t0 + ms(100)));
        assert_eq!(c.ran(t0 + ms(300)), 3);
    }

    #[test]
    fn a_failed_start_releases_the_wait_and_a_silent_one_goes_stale() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(WAIT);
        c.hook_event(HookOp::Prepare, "a", t0);
        c.hook_event(HookOp::Prepare, "b", t0);
        c.hook_event(HookOp::Started, "a", t0 + ms(10));
        c.hook_event(HookOp::Release, "b", t0 + ms(20));
        assert_eq!(c.due(t0 + ms(20)), Some(t0 + ms(10)));
        c.ran(t0 + ms(20));

        c.hook_event(HookOp::Prepare, "lost", t0);
        c.hook_event(HookOp::Started, "d", t0 + ms(30));
        assert_eq!(c.due(t0 + ms(30)), Some(t0 + ms(30) + WAIT));
        let later = t0 + STALE_START + ms(1);
        assert_eq!(c.due(later), Some(t0 + ms(30)));
    }

    #[test]
    fn a_retry_waits_its_time_and_joins_pending_events() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(WAIT);
        c.retry_at(t0 + ms(100), t0);
        assert_eq!(c.due(t0), Some(t0 + ms(100)));
        c.changed(t0 + ms(50));
        assert_eq!(c.due(t0 + ms(50)), Some(t0 + ms(100)));
        assert_eq!(c.ran(t0 + ms(100)), 1);
        assert_eq!(c.due(t0 + ms(100)), None);
    }
}
