//! What pinner reads from and writes to the host outside libvirt: sysfs
//! topology, /proc, cgroupfs, guest statistics, nova.conf and sd_notify.
//! Every reader takes a root path, so it runs against fixture trees.

pub mod cgroupfs;
pub mod guest_stats;
pub mod notify;
pub mod nova;
pub mod procs;
pub mod sysfs;
