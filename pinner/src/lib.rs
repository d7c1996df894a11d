//! pinner: keeps libvirt/KVM guests' vCPUs on the right physical CPUs.
//!
//! Folders by concern. `engine` is pure: CPU sets, the topology and domain
//! models, placement, and the reconcile core (plan → diff → apply through
//! the `Hypervisor` trait); it reads no file, clock or socket. Around it
//! the shells that touch the system: `libvirt` (the real hypervisor and its
//! events), `host` (sysfs, /proc, cgroupfs, nova.conf, sd_notify),
//! `isolation` (host daemons on the reserved CPUs), `daemon` (intake,
//! control loop, libvirt session, passes, observation), `doctor`, `config`
//! and `cli`.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod engine;
pub mod host;
pub mod isolation;
pub mod libvirt;
#[cfg(test)]
mod test_support;
