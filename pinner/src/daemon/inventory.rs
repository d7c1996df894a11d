//! What the daemon knows of the running guests between passes, so a pass
//! costs what changed: one listing (ids and UUIDs, one libvirt call), and
//! the live XML of only the guests that are new, started anew (a new id) or
//! said to have changed (libvirt's events, pinner's own changes). A full
//! re-read of every guest stays as the net under a missed event: on its own
//! interval, on every new connection (events may have been lost meanwhile)
//! and on every pass while libvirt's events are not coming.

use crate::engine::domain::DomainSpec;
use crate::engine::hypervisor::{HvError, Hypervisor, Listed, Unreadable};
use std::collections::{HashMap, HashSet};

/// The guests as last read, and which of them must be read again.
#[derive(Default)]
pub struct Inventory {
    /// By UUID: the domain id it was read under, and what was read.
    known: HashMap<String, (u32, DomainSpec)>,
    /// Guests to read again at the next refresh.
    stale: HashSet<String>,
}

/// One refresh: the running guests, and what it cost.
#[derive(Debug, Default)]
pub struct Refreshed {
    pub specs: Vec<DomainSpec>,
    pub unreadable: Vec<Unreadable>,
    /// Guests whose XML was read.
    pub read: u32,
    /// Guests a full re-read found changed though nothing had said so (a
    /// missed or missing event): their names.
    pub changed_unannounced: Vec<String>,
}

impl Inventory {
    /// `uuid`'s XML is read again at the next refresh.
    pub fn mark_stale(&mut self, uuid: &str) {
        if self.known.contains_key(uuid) {
            self.stale.insert(uuid.to_string());
        }
    }

    /// Every guest known, as last read (no call).
    pub fn known(&self) -> impl Iterator<Item = &DomainSpec> {
        self.known.values().map(|(_, spec)| spec)
    }

    /// Lists the running guests and reads those that need it (all of them
    /// when `full`); the others are as last read.
    pub fn refresh(&mut self, hv: &mut dyn Hypervisor, full: bool) -> Result<Refreshed, HvError> {
        let needs_read = |listed: &Listed| {
            full || self.stale.contains(&listed.uuid)
                || self
                    .known
                    .get(&listed.uuid)
                    .is_none_or(|(id, _)| *id != listed.id)
        };
        let listing = hv.list_running(&needs_read)?;
        let asked: Vec<bool> = listing.listed.iter().map(needs_read).collect();
        let mut read: HashMap<String, DomainSpec> = listing
            .read
            .into_iter()
            .map(|spec| (spec.uuid.clone(), spec))
            .collect();
        let mut refreshed = Refreshed {
            read: (read.len() + listing.unreadable.len()) as u32,
            unreadable: listing.unreadable,
            ..Refreshed::default()
        };
        let mut known = HashMap::with_capacity(listing.listed.len());
        for (Listed { uuid, id }, asked) in listing.listed.into_iter().zip(asked) {
            let before = self.known.remove(&uuid);
            let spec = match (read.remove(&uuid), before) {
                (Some(spec), Some((old_id, old))) => {
                    if old_id == id && !self.stale.contains(&uuid) && old != spec {
                        refreshed.changed_unannounced.push(spec.name.clone());
                    }
                    spec
                }
                (Some(spec), None) => spec,
                // Not asked for: known, under the same id, as last read.
                (None, Some((_, old))) if !asked => old,
                // Asked for but not read (unreadable, or gone meanwhile).
                _ => continue,
            };
            refreshed.specs.push(spec.clone());
            known.insert(uuid, (id, spec));
        }
        self.known = known;
        self.stale.clear();
        Ok(refreshed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpuset::CpuSet;
    use crate::engine::hypervisor::fake::FakeHypervisor;

    fn guest(hv: &mut FakeHypervisor, name: &str, uuid: &str) {
        hv.add(&format!(
            "<domain><name>{name}</name><uuid>{uuid}</uuid><vcpu>1</vcpu></domain>"
        ));
    }

    /// Guests a and b, and an inventory that has read neither.
    fn two_guests() -> (FakeHypervisor, Inventory) {
        let mut hv = FakeHypervisor::default();
        guest(&mut hv, "a", "u-a");
        guest(&mut hv, "b", "u-b");
        (hv, Inventory::default())
    }

    fn names(refreshed: &Refreshed) -> Vec<&str> {
        refreshed.specs.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn steady_refresh_reads_nothing_and_new_or_restarted_guests_are_read() {
        let (mut hv, mut inventory) = two_guests();
        let first = inventory.refresh(&mut hv, false).unwrap();
        assert_eq!((first.read, names(&first)), (2, vec!["a", "b"]));
        let steady = inventory.refresh(&mut hv, false).unwrap();
        assert_eq!((steady.read, names(&steady)), (0, vec!["a", "b"]));

        guest(&mut hv, "c", "u-c");
        // b restarted: a new id, read again though nothing said so.
        hv.ids.insert("u-b".into(), 7);
        let reads = hv.reads;
        let next = inventory.refresh(&mut hv, false).unwrap();
        assert_eq!((next.read, names(&next)), (2, vec!["a", "b", "c"]));
        assert_eq!(hv.reads - reads, 2);
        assert!(next.changed_unannounced.is_empty());

        hv.domains.remove("u-a");
        let gone = inventory.refresh(&mut hv, false).unwrap();
        assert_eq!((gone.read, names(&gone)), (0, vec!["b", "c"]));
        assert_eq!(inventory.known().count(), 2);
    }

    #[test]
    fn a_stale_guest_is_read_again_and_a_full_read_finds_unannounced_changes() {
        let (mut hv, mut inventory) = two_guests();
        inventory.refresh(&mut hv, false).unwrap();
        let pin = CpuSet::parse("1").unwrap();

        // An event said a changed: read again, and its change is no surprise.
        hv.domains
            .get_mut("u-a")
            .unwrap()
            .vcpu_pins
            .insert(0, pin.clone());
        inventory.mark_stale("u-a");
        let announced = inventory.refresh(&mut hv, false).unwrap();
        assert_eq!(announced.read, 1);
        assert_eq!(announced.specs[0].vcpu_pins[&0], pin);
        assert!(announced.changed_unannounced.is_empty());

        // b changed with no event: an incremental refresh does not see it...
        hv.domains.get_mut("u-b").unwrap().vcpus = 2;
        let missed = inventory.refresh(&mut hv, false).unwrap();
        assert_eq!(missed.specs[1].vcpus, 1);
        // ...the full one does, and says so.
        let full = inventory.refresh(&mut hv, true).unwrap();
        assert_eq!(full.read, 2);
        assert_eq!(full.specs[1].vcpus, 2);
        assert_eq!(full.changed_unannounced, ["b"]);
    }
}
