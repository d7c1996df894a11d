//! What pinner reads from and writes to the host outside libvirt: sysfs
//! topology, /proc, /proc/irq, cgroupfs, guest statistics, nova.conf, sd_notify, and
//! bounded reads of files that may have been replaced by something hostile.
//! Every reader takes a root path, so it runs against fixture trees.

pub mod cgroupfs;
pub mod file;
pub mod guest_ram;
pub mod guest_stats;
pub mod irq;
pub mod notify;
pub mod nova;
pub mod procs;
pub mod snapshot;
pub mod sysfs;
