//! What the reconciler asks of a hypervisor, behind a small trait so the
//! reconcile logic runs against a fake in unit tests; `crate::libvirt` has
//! the real one.

use crate::engine::cpuset::CpuSet;
use crate::engine::domain::{DomainError, DomainSpec};

/// What a hypervisor call can fail with, sorted by what the reconciler
/// does about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HvError {
    /// No connection could be opened (libvirtd not running, no socket).
    #[error("cannot connect to libvirt: {0}")]
    Unreachable(String),
    /// The connection is gone (libvirtd stopped or restarted): reconnect.
    #[error("libvirt connection lost: {0}")]
    Disconnected(String),
    /// "cannot acquire state change lock": another job holds the domain.
    #[error("domain busy: {0}")]
    Busy(String),
    /// The domain stopped or vanished meanwhile.
    #[error("domain gone: {0}")]
    Gone(String),
    #[error("{0}")]
    Other(String),
}

/// A running domain whose XML could not be read or taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    /// libvirt would not give its XML; its name, or "(unknown)".
    #[error("{domain}: {error}")]
    Xml { domain: String, error: HvError },
    #[error(transparent)]
    Parse(#[from] DomainError),
}

/// The running domains, and those that could not be read.
pub type Running = (Vec<DomainSpec>, Vec<Unreadable>);

/// A running domain as the listing names it, before any XML is read: what
/// tells a guest known from one started anew (a new `id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub uuid: String,
    /// libvirt's domain id: a new one each time the domain starts.
    pub id: u32,
}

/// One listing: every running domain, the live XML of those asked for (as
/// parsed, or as the text libvirt gave).
#[derive(Debug)]
pub struct Listing<T = DomainSpec> {
    /// Every running domain, in libvirt's order.
    pub listed: Vec<Listed>,
    /// The domains read, by the same order.
    pub read: Vec<T>,
    /// Domains asked for whose XML could not be read or taken.
    pub unreadable: Vec<Unreadable>,
}

pub trait Hypervisor {
    /// Lists the running domains (one call) and reads the live XML of
    /// those `read` picks (one call each).
    fn list_running(&mut self, read: &dyn Fn(&Listed) -> bool) -> Result<Listing, HvError>;
    /// Every running domain with its live XML facts. Domains whose XML cannot
    /// be read are reported in the second list (name or uuid, reason).
    fn running_domains(&mut self) -> Result<Running, HvError> {
        let listing = self.list_running(&|_| true)?;
        Ok((listing.read, listing.unreadable))
    }
    /// The calls made to the hypervisor on this connection so far (each a
    /// round trip to libvirtd): what a pass costs it.
    fn calls_made(&self) -> u64 {
        0
    }
    /// Sets pinner's metadata element on the running guest, and on its
    /// persistent definition too when `persistent`.
    fn set_metadata(&mut self, uuid: &str, element: &str, persistent: bool) -> Result<(), HvError>;
    fn pin_vcpu(&mut self, uuid: &str, vcpu: u32, cpus: &CpuSet) -> Result<(), HvError>;
    fn pin_emulator(&mut self, uuid: &str, cpus: &CpuSet) -> Result<(), HvError>;
    fn pin_iothread(&mut self, uuid: &str, iothread: u32, cpus: &CpuSet) -> Result<(), HvError>;
    /// Binds memory to NUMA `nodes` (the numatune nodeset), in mode
    /// `restrictive` when asked (a guest without a binding), else in the
    /// mode it has.
    fn set_memory_nodes(
        &mut self,
        uuid: &str,
        nodes: &CpuSet,
        restrictive: bool,
    ) -> Result<(), HvError>;
    /// Whether libvirt is in the middle of a job on the domain (starting it,
    /// say). A change then waits for the job, so it is tried later instead
    /// of stalling changes to every other guest.
    fn job_active(&mut self, uuid: &str) -> Result<bool, HvError>;
}

/// An in-memory hypervisor for unit tests.
#[cfg(test)]
pub mod fake {
    use super::*;
    use std::collections::BTreeMap;

    /// In-memory libvirt: domains by uuid, with a switch to fail calls.
    #[derive(Default)]
    pub struct FakeHypervisor {
        pub domains: BTreeMap<String, DomainSpec>,
        pub fail_with: Option<HvError>,
        pub refuse_memory: Option<String>,
        pub calls: u32,
        /// XML reads, and libvirt's domain ids (0 unless set).
        pub reads: u32,
        pub ids: BTreeMap<String, u32>,
        /// Domains libvirt is busy with (a job in progress).
        pub in_job: Vec<String>,
        /// Metadata elements written to persistent definitions, by uuid.
        pub persistent_metadata: BTreeMap<String, String>,
    }

    impl Hypervisor for FakeHypervisor {
        fn list_running(&mut self, read: &dyn Fn(&Listed) -> bool) -> Result<Listing, HvError> {
            let mut listing = Listing {
                listed: Vec::new(),
                read: Vec::new(),
                unreadable: Vec::new(),
            };
            for (uuid, spec) in &self.domains {
                let listed = Listed {
                    uuid: uuid.clone(),
                    id: self.ids.get(uuid).copied().unwrap_or(0),
                };
                if read(&listed) {
                    self.reads += 1;
                    listing.read.push(spec.clone());
                }
                listing.listed.push(listed);
            }
            Ok(listing)
        }
        fn set_metadata(
            &mut self,
            uuid: &str,
            element: &str,
            persistent: bool,
        ) -> Result<(), HvError> {
            self.call()?;
            if persistent {
                self.persistent_metadata
                    .insert(uuid.to_string(), element.to_string());
            }
            let d = self.domains.get_mut(uuid).unwrap();
            let probe = format!(
                "<domain><name>x</name><vcpu>1</vcpu><metadata>{}</metadata></domain>",
                element.replace("<state ", "<p:state xmlns:p=\"urn:pinner:1\" ")
            );
            let parsed = DomainSpec::parse(&probe).unwrap();
            d.metadata = parsed.metadata;
            Ok(())
        }
        fn pin_vcpu(&mut self, uuid: &str, vcpu: u32, cpus: &CpuSet) -> Result<(), HvError> {
            self.call()?;
            self.domains
                .get_mut(uuid)
                .unwrap()
                .vcpu_pins
                .insert(vcpu, cpus.clone());
            Ok(())
        }
        fn pin_emulator(&mut self, uuid: &str, cpus: &CpuSet) -> Result<(), HvError> {
            self.call()?;
            self.domains.get_mut(uuid).unwrap().emulator_pin = Some(cpus.clone());
            Ok(())
        }
        fn pin_iothread(
            &mut self,
            uuid: &str,
            iothread: u32,
            cpus: &CpuSet,
        ) -> Result<(), HvError> {
            self.call()?;
            self.domains
                .get_mut(uuid)
                .unwrap()
                .iothread_pins
                .insert(iothread, cpus.clone());
            Ok(())
        }
        fn job_active(&mut self, uuid: &str) -> Result<bool, HvError> {
            Ok(self.in_job.iter().any(|u| u == uuid))
        }
        fn set_memory_nodes(
            &mut self,
            uuid: &str,
            nodes: &CpuSet,
            restrictive: bool,
        ) -> Result<(), HvError> {
            if let Some(reason) = &self.refuse_memory {
                return Err(HvError::Other(reason.clone()));
            }
            self.call()?;
            let domain = self.domains.get_mut(uuid).unwrap();
            domain.memory_nodes = Some(nodes.clone());
            if restrictive {
                domain.memory_mode = Some("restrictive".into());
            }
            Ok(())
        }
    }

    impl FakeHypervisor {
        pub fn call(&mut self) -> Result<(), HvError> {
            self.calls += 1;
            self.fail_with.clone().map_or(Ok(()), Err)
        }
        pub fn add(&mut self, xml: &str) {
            let spec = DomainSpec::parse(xml).unwrap();
            self.domains.insert(spec.uuid.clone(), spec);
        }
    }
}
