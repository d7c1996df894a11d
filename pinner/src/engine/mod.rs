//! The pure core: no file, clock or socket is touched here, so everything
//! in it runs against fixtures and synthetic hosts.
//!
//! `topology` and `domain` model the host and its guests, `policy` says
//! which guests pinner places and how, `placement` decides where each vCPU
//! goes, `reconcile` turns a plan into the changes
//! libvirt must make (through [`hypervisor::Hypervisor`]), and `coalesce`
//! decides when a pass runs for the events that asked for one.

pub mod coalesce;
pub mod cpuset;
pub mod domain;
pub mod hypervisor;
pub mod memory;
pub mod placement;
pub mod policy;
pub mod rebalance;
pub mod reconcile;
pub mod release;
pub mod topology;
