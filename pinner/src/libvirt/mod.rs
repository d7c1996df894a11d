//! The real [`Hypervisor`]: libvirt through the `virt` crate, and libvirt's
//! own events (`events`).

pub mod events;

use crate::engine::cpuset::CpuSet;
use crate::engine::domain::DomainSpec;
use crate::engine::hypervisor::{HvError, Hypervisor, Listed, Listing, Unreadable};
use crate::libvirt::events::{EventsError, Sink, Subscription};
use pinner_shared::paths::{METADATA_KEY, METADATA_URI};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

/// libvirt through the `virt` crate. Only live state is changed: pins and
/// metadata vanish with the guest, and the persistent definition is the
/// operator's.
pub struct Libvirt {
    conn: Connect,
    cpumap_width: u32,
    events: Option<Subscription>,
    /// Calls made on this connection (round trips to libvirtd).
    calls: std::cell::Cell<u64>,
    /// VIR_DOMAIN_AFFECT_LIVE, except on libvirt's test driver, which
    /// refuses it: there CURRENT (0), the same for a running domain.
    affect: u32,
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        if let Some(events) = self.events.take() {
            events.cancel();
        }
    }
}

impl Libvirt {
    pub fn connect(uri: &str, cpumap_width: u32) -> Result<Libvirt, HvError> {
        // Without this libvirt prints every error to stderr on its own.
        virt::error::clear_error_callback();
        let conn =
            Connect::open(Some(uri)).map_err(|e| HvError::Unreachable(e.message().to_string()))?;
        Ok(Libvirt::wrap(conn, uri, cpumap_width))
    }

    /// An open connection to `uri` (the scale bench shares one with
    /// libvirt's test driver, whose state is per connection). The driver is
    /// told by the URI's scheme, not asked: no call at connect.
    pub fn wrap(conn: Connect, uri: &str, cpumap_width: u32) -> Libvirt {
        let test_driver = uri.starts_with("test:") || uri.starts_with("test+");
        Libvirt {
            conn,
            cpumap_width,
            events: None,
            calls: std::cell::Cell::new(0),
            affect: if test_driver {
                0
            } else {
                sys::VIR_DOMAIN_AFFECT_LIVE
            },
        }
    }

    /// Hands libvirt's pin-change and connection-closed events to `sink`
    /// (needs [`crate::libvirt::events::start_event_loop`] before connecting).
    pub fn subscribe(&mut self, sink: Sink) -> Result<(), EventsError> {
        if let Some(old) = self.events.take() {
            old.cancel();
        }
        self.events = Some(crate::libvirt::events::subscribe(&self.conn, sink)?);
        Ok(())
    }

    /// A read-only connection (`pinner plan --connect`): it can list, never change.
    pub fn connect_read_only(uri: &str) -> Result<Libvirt, HvError> {
        virt::error::clear_error_callback();
        let conn = Connect::open_read_only(Some(uri))
            .map_err(|e| HvError::Unreachable(e.message().to_string()))?;
        Ok(Libvirt::wrap(conn, uri, 0))
    }

    /// Lists the running domains and reads the live XML of those `read`
    /// picks; those that cannot be read (other than having stopped
    /// meanwhile) go in the second list.
    pub fn running_xml(&self, read: &dyn Fn(&Listed) -> bool) -> Result<Listing<LiveXml>, HvError> {
        let domains = self.call(|| {
            self.conn
                .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        })?;
        let mut listed = Vec::with_capacity(domains.len());
        let mut xmls = Vec::new();
        let mut unreadable = Vec::new();
        for dom in domains {
            // The id and UUID come with the listing: no call.
            let entry = Listed {
                uuid: dom.uuid_string().unwrap_or_default(),
                id: dom.id().unwrap_or(0),
            };
            if read(&entry) {
                match self.call(|| dom.xml_desc(0)) {
                    Ok(xml) => xmls.push(LiveXml {
                        name: dom.name().unwrap_or_default(),
                        xml,
                    }),
                    Err(HvError::Gone(_)) => continue,
                    Err(HvError::Disconnected(m)) => return Err(HvError::Disconnected(m)),
                    Err(error) => unreadable.push(Unreadable::Xml {
                        domain: dom.name().unwrap_or_else(|_| "(unknown)".into()),
                        error,
                    }),
                }
            }
            listed.push(entry);
        }
        Ok(Listing {
            listed,
            read: xmls,
            unreadable,
        })
    }

    /// One round trip to libvirtd: counted, its error sorted.
    fn call<T>(&self, f: impl FnOnce() -> Result<T, virt::error::Error>) -> Result<T, HvError> {
        self.calls.set(self.calls.get() + 1);
        f().map_err(|e| self.classify(e))
    }

    fn domain(&self, uuid: &str) -> Result<Domain, HvError> {
        self.call(|| self.conn.lookup_domain_by_uuid_string(uuid))
    }

    /// Maps a libvirt error to what the reconciler does about it.
    fn classify(&self, e: virt::error::Error) -> HvError {
        let message = e.message().to_string();
        match e.code().to_raw() {
            sys::VIR_ERR_OPERATION_TIMEOUT | sys::VIR_ERR_RESOURCE_BUSY => HvError::Busy(message),
            sys::VIR_ERR_NO_DOMAIN | sys::VIR_ERR_OPERATION_INVALID => HvError::Gone(message),
            _ if !self.conn.is_alive().unwrap_or(false) => HvError::Disconnected(message),
            _ => HvError::Other(message),
        }
    }
}

/// A raw libvirt call's return code as a result (its error is libvirt's
/// last one).
fn checked(rc: std::os::raw::c_int) -> Result<(), virt::error::Error> {
    match rc {
        ..0 => Err(virt::error::Error::last_error()),
        _ => Ok(()),
    }
}

/// A running domain as libvirt describes it.
pub struct LiveXml {
    /// The name as libvirt holds it. Taken from libvirt itself, not the
    /// XML: libvirt writes a carriage return in a name as it is, and an XML
    /// reader gives it back as a newline (a name libvirt does not know,
    /// and a forged line in a report). Empty when libvirt would not say.
    pub name: String,
    pub xml: String,
}

impl Hypervisor for Libvirt {
    fn list_running(&mut self, read: &dyn Fn(&Listed) -> bool) -> Result<Listing, HvError> {
        let Listing {
            listed,
            read: xmls,
            mut unreadable,
        } = self.running_xml(read)?;
        let mut specs = Vec::with_capacity(xmls.len());
        for LiveXml { name, xml } in xmls {
            match DomainSpec::parse(&xml) {
                Ok(spec) if name.is_empty() => specs.push(spec),
                Ok(spec) => specs.push(DomainSpec { name, ..spec }),
                Err(e) => unreadable.push(e.into()),
            }
        }
        Ok(Listing {
            listed,
            read: specs,
            unreadable,
        })
    }

    fn calls_made(&self) -> u64 {
        self.calls.get()
    }

    fn set_metadata(&mut self, uuid: &str, element: &str, persistent: bool) -> Result<(), HvError> {
        let domain = self.domain(uuid)?;
        let flags = match persistent {
            true => self.affect | sys::VIR_DOMAIN_AFFECT_CONFIG,
            false => self.affect,
        };
        self.call(|| {
            domain.set_metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(element),
                Some(METADATA_KEY),
                Some(METADATA_URI),
                flags,
            )
        })
        .map(drop)
    }

    fn pin_vcpu(&mut self, uuid: &str, vcpu: u32, cpus: &CpuSet) -> Result<(), HvError> {
        let domain = self.domain(uuid)?;
        let map = cpus.to_cpumap(self.cpumap_width);
        self.call(|| domain.pin_vcpu_flags(vcpu, &map, self.affect))
            .map(drop)
    }

    fn pin_emulator(&mut self, uuid: &str, cpus: &CpuSet) -> Result<(), HvError> {
        let domain = self.domain(uuid)?;
        let map = cpus.to_cpumap(self.cpumap_width);
        self.call(|| domain.pin_emulator(&map, self.affect))
            .map(drop)
    }

    fn pin_iothread(&mut self, uuid: &str, iothread: u32, cpus: &CpuSet) -> Result<(), HvError> {
        let domain = self.domain(uuid)?;
        let mut map = cpus.to_cpumap(self.cpumap_width);
        // SAFETY: the domain pointer is valid while `domain` lives; the map
        // is a live buffer of the length passed. `virt` 0.5 has no wrapper.
        self.call(|| {
            checked(unsafe {
                sys::virDomainPinIOThread(
                    domain.as_ptr(),
                    iothread,
                    map.as_mut_ptr(),
                    map.len() as std::os::raw::c_int,
                    self.affect,
                )
            })
        })
    }

    fn job_active(&mut self, uuid: &str) -> Result<bool, HvError> {
        let domain = self.domain(uuid)?;
        let mut info = sys::virDomainControlInfo {
            state: 0,
            details: 0,
            stateTime: 0,
        };
        // SAFETY: the domain pointer is valid while `domain` lives; `info`
        // is a live struct of the type libvirt fills. No job is needed for
        // this call, so it never waits behind one. `virt` 0.5 has no wrapper.
        self.call(|| {
            checked(unsafe { sys::virDomainGetControlInfo(domain.as_ptr(), &mut info, 0) })
        })?;
        Ok(info.state == sys::VIR_DOMAIN_CONTROL_JOB)
    }

    fn set_memory_nodes(
        &mut self,
        uuid: &str,
        nodes: &CpuSet,
        restrictive: bool,
    ) -> Result<(), HvError> {
        let domain = self.domain(uuid)?;
        let params = |mode| virt::domain::NUMAParameters {
            node_set: Some(nodes.to_string()),
            mode,
        };
        let restrictive_mode = sys::VIR_DOMAIN_NUMATUNE_MEM_RESTRICTIVE as i32;
        let mode = restrictive.then_some(restrictive_mode);
        match self.call(|| domain.set_numa_parameters(params(mode), self.affect)) {
            // libvirt before 7.3 has no restrictive mode; its strict
            // nodeset still changes live there.
            Err(_) if restrictive => {
                self.call(|| domain.set_numa_parameters(params(None), self.affect))
            }
            result => result,
        }
        .map(drop)
    }
}
