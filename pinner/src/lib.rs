//! pinner: keeps libvirt/KVM guests' vCPUs on the right physical CPUs.
//!
//! One module per concern. `placement` is pure (no I/O); everything that
//! touches the system (`topology` reads sysfs, `hypervisor` talks to libvirt,
//! `daemon` owns the socket) sits behind small types so the logic between
//! can be driven against fixtures.

pub mod cgroupfs;
pub mod cli;
pub mod coalesce;
pub mod config;
pub mod cpuset;
pub mod daemon;
pub mod doctor;
pub mod domain;
pub mod guest_stats;
pub mod hypervisor;
pub mod isolation;
pub mod libvirt_events;
pub mod metrics;
pub mod notify;
pub mod nova;
pub mod placement;
pub mod procs;
pub mod reconcile;
pub mod report;
#[cfg(test)]
mod test_support;
pub mod topology;
