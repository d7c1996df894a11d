//! libvirt's own events, for what no hook announces: pins changed behind
//! pinner's back (the `tunable` event) and the connection closing (libvirtd
//! stopped or its keepalive failed). A vCPU hot-added with `virsh setvcpus
//! --live` has no event at all (libvirt 9); the periodic reconcile is what
//! catches it.
//!
//! The `virt` crate has no domain-event API, so this is the few FFI calls it
//! needs. Callbacks run on libvirt's event-loop thread and only hand the
//! event to a sink; all libvirt work stays on the daemon's main thread.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::{Arc, Once};
use virt::connect::Connect;
use virt::sys;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LibvirtEvent {
    /// Pins of a running guest changed: (`cputune.vcpupin0`, `"2-3"`), ... as
    /// libvirt reports them. pinner's own changes come back this way too.
    PinsChanged {
        uuid: String,
        name: String,
        pins: Vec<(String, String)>,
    },
    /// The connection closed; the reason as libvirt gives it.
    ConnectionClosed(&'static str),
}

pub type Sink = Arc<dyn Fn(LibvirtEvent) + Send + Sync>;

/// Why libvirt's events are not coming; the daemon then relies on the
/// periodic reconcile alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventsError {
    #[error("cannot start libvirt's event loop: {0}")]
    Loop(String),
    #[error("cannot start libvirt's event thread: {0}")]
    Thread(String),
    #[error("cannot watch the libvirt connection: {0}")]
    CloseCallback(String),
    #[error("cannot subscribe to libvirt's domain events: {0}")]
    Subscribe(String),
}

/// Starts libvirt's default event loop on a thread of its own, once per
/// process. It must run before the connection that subscribes is opened.
pub fn start_event_loop() -> Result<(), EventsError> {
    static START: Once = Once::new();
    let mut result = Ok(());
    START.call_once(|| {
        if let Err(e) = virt::event::event_register_default_impl() {
            result = Err(EventsError::Loop(e.to_string()));
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| loop {
                if virt::event::event_run_default_impl().is_err() {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            });
        if let Err(e) = spawned {
            result = Err(EventsError::Thread(e.to_string()));
        }
    });
    result
}

/// Live registrations on one connection; cancelled before it closes.
pub struct Subscription {
    conn: sys::virConnectPtr,
    tunable_id: c_int,
}

// SAFETY: libvirt connections are thread-safe; the pointer is only used to
// deregister, from whichever thread drops the connection.
unsafe impl Send for Subscription {}

/// Subscribes `sink` to pin changes and to the connection closing.
pub fn subscribe(conn: &Connect, sink: Sink) -> Result<Subscription, EventsError> {
    // SAFETY: the pointer stays valid while `conn` lives; the subscription is
    // cancelled before `conn` is dropped (see `Libvirt`'s Drop).
    let ptr = unsafe { conn.as_ptr() };
    let close_opaque = Box::into_raw(Box::new(sink.clone())) as *mut c_void;
    // SAFETY: the callback matches virConnectCloseFunc; libvirt frees the
    // opaque through `free_sink` when the callback is unregistered.
    let rc = unsafe {
        sys::virConnectRegisterCloseCallback(ptr, Some(on_close), close_opaque, Some(free_sink))
    };
    if rc < 0 {
        // SAFETY: not registered, so still ours to free.
        unsafe { free_sink(close_opaque) };
        return Err(EventsError::CloseCallback(last_error()));
    }
    let tunable_opaque = Box::into_raw(Box::new(sink)) as *mut c_void;
    // SAFETY: libvirt calls the generic callback with the tunable event's
    // real signature, as its VIR_DOMAIN_EVENT_CALLBACK cast intends.
    let tunable_id = unsafe {
        let callback: sys::virConnectDomainEventTunableCallback = Some(on_tunable);
        sys::virConnectDomainEventRegisterAny(
            ptr,
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_TUNABLE as c_int,
            std::mem::transmute::<
                sys::virConnectDomainEventTunableCallback,
                sys::virConnectDomainEventGenericCallback,
            >(callback),
            tunable_opaque,
            Some(free_sink),
        )
    };
    if tunable_id < 0 {
        let error = EventsError::Subscribe(last_error());
        // SAFETY: as above; the close callback is unregistered (and its
        // opaque freed by libvirt).
        unsafe {
            free_sink(tunable_opaque);
            sys::virConnectUnregisterCloseCallback(ptr, Some(on_close));
        }
        return Err(error);
    }
    Ok(Subscription {
        conn: ptr,
        tunable_id,
    })
}

impl Subscription {
    /// Deregisters; failures (a dead connection) leave nothing to undo.
    pub fn cancel(self) {
        // SAFETY: both were registered on this still-open connection.
        unsafe {
            sys::virConnectDomainEventDeregisterAny(self.conn, self.tunable_id);
            sys::virConnectUnregisterCloseCallback(self.conn, Some(on_close));
        }
    }
}

fn last_error() -> String {
    virt::error::Error::last_error().message().to_string()
}

unsafe extern "C" fn free_sink(opaque: *mut c_void) {
    drop(Box::from_raw(opaque as *mut Sink));
}

unsafe extern "C" fn on_close(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    let sink = &*(opaque as *const Sink);
    let reason = match reason as c_uint {
        sys::VIR_CONNECT_CLOSE_REASON_EOF => "libvirtd closed the connection",
        sys::VIR_CONNECT_CLOSE_REASON_KEEPALIVE => "libvirtd stopped answering keepalives",
        sys::VIR_CONNECT_CLOSE_REASON_CLIENT => "closed by pinner",
        _ => "connection error",
    };
    sink(LibvirtEvent::ConnectionClosed(reason));
}

unsafe extern "C" fn on_tunable(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    params: sys::virTypedParameterPtr,
    nparams: c_int,
    opaque: *mut c_void,
) {
    let sink = &*(opaque as *const Sink);
    let params = if params.is_null() || nparams <= 0 {
        &[][..]
    } else {
        std::slice::from_raw_parts(params, nparams as usize)
    };
    let pins: Vec<(String, String)> = params
        .iter()
        .filter(|p| p.type_ as c_uint == sys::VIR_TYPED_PARAM_STRING)
        .filter_map(|p| {
            let field = CStr::from_ptr(p.field.as_ptr()).to_string_lossy();
            if !is_pin_field(&field) || p.value.s.is_null() {
                return None;
            }
            let value = CStr::from_ptr(p.value.s).to_string_lossy().into_owned();
            Some((field.into_owned(), value))
        })
        .collect();
    if pins.is_empty() {
        return;
    }
    let mut uuid = [0 as c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
    let uuid = if sys::virDomainGetUUIDString(dom, uuid.as_mut_ptr()) == 0 {
        CStr::from_ptr(uuid.as_ptr()).to_string_lossy().into_owned()
    } else {
        String::new()
    };
    let name = sys::virDomainGetName(dom);
    let name = if name.is_null() {
        String::new()
    } else {
        CStr::from_ptr(name).to_string_lossy().into_owned()
    };
    sink(LibvirtEvent::PinsChanged { uuid, name, pins });
}

/// The tunable fields that are CPU pins (not shares, quotas or I/O tuning).
fn is_pin_field(field: &str) -> bool {
    field == "cputune.emulatorpin"
        || field.starts_with("cputune.vcpupin")
        || field.starts_with("cputune.iothreadpin")
}

#[cfg(test)]
mod tests {
    use super::is_pin_field;

    #[test]
    fn only_pins_are_pin_fields() {
        for field in [
            "cputune.vcpupin0",
            "cputune.vcpupin12",
            "cputune.emulatorpin",
            "cputune.iothreadpin1",
        ] {
            assert!(is_pin_field(field), "{field}");
        }
        for field in ["cputune.shares", "cputune.vcpu_quota", "blkdeviotune.disk"] {
            assert!(!is_pin_field(field), "{field}");
        }
    }
}
