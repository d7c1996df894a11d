//! libvirt's own events, for what no hook announces: pins changed behind
//! pinner's back (the `tunable` event), a guest's description changed
//! (lifecycle, metadata, devices: its XML is read again at the next pass)
//! and the connection closing (libvirtd stopped or its keepalive failed). A
//! vCPU hot-added with `virsh setvcpus --live` has no event at all (libvirt
//! 9); the full re-read on its own interval is what catches it.
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
    /// Something in a running guest's description may have changed: its
    /// XML is to be read again.
    Changed { uuid: String, what: Change },
    /// The connection closed; the reason as libvirt gives it.
    ConnectionClosed(&'static str),
}

/// What a domain event said changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Started, stopped, paused, resumed, ...
    Lifecycle,
    Metadata,
    DeviceAdded,
    DeviceRemoved,
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
    /// The domain-event registrations, by callback id.
    callback_ids: Vec<c_int>,
}

// SAFETY: libvirt connections are thread-safe; the pointer is only used to
// deregister, from whichever thread drops the connection.
unsafe impl Send for Subscription {}

/// Subscribes `sink` to pin changes, description changes and the
/// connection closing.
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
    let mut subscription = Subscription {
        conn: ptr,
        callback_ids: Vec::new(),
    };
    let callbacks = [
        (
            sys::VIR_DOMAIN_EVENT_ID_TUNABLE,
            generic(on_tunable as TunableFn),
        ),
        (
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE,
            generic(on_lifecycle as LifecycleFn),
        ),
        (
            sys::VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,
            generic(on_metadata as MetadataFn),
        ),
        (
            sys::VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
            generic(on_device::<true> as DeviceFn),
        ),
        (
            sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
            generic(on_device::<false> as DeviceFn),
        ),
    ];
    for (event, callback) in callbacks {
        let opaque = Box::into_raw(Box::new(sink.clone())) as *mut c_void;
        // SAFETY: a live connection, a callback of the event's signature,
        // and an opaque libvirt frees through `free_sink`.
        let id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                ptr,
                std::ptr::null_mut(),
                event as c_int,
                callback,
                opaque,
                Some(free_sink),
            )
        };
        if id < 0 {
            let error = EventsError::Subscribe(last_error());
            // SAFETY: not registered, so still ours to free; the others
            // are deregistered by `cancel`.
            unsafe { free_sink(opaque) };
            subscription.cancel();
            return Err(error);
        }
        subscription.callback_ids.push(id);
    }
    Ok(subscription)
}

/// libvirt takes every domain-event callback as the generic type and calls
/// it with its event's own signature (its VIR_DOMAIN_EVENT_CALLBACK cast):
/// `callback` must be a function pointer of the event it is registered for.
fn generic<F: Copy>(callback: F) -> sys::virConnectDomainEventGenericCallback {
    assert_eq!(
        std::mem::size_of::<F>(),
        std::mem::size_of::<sys::virConnectDomainEventGenericCallback>()
    );
    // SAFETY: both are one non-null function pointer (the Option's niche);
    // libvirt alone calls it, with the event's real arguments.
    unsafe { std::mem::transmute_copy::<F, sys::virConnectDomainEventGenericCallback>(&callback) }
}

type TunableFn = unsafe extern "C" fn(
    sys::virConnectPtr,
    sys::virDomainPtr,
    sys::virTypedParameterPtr,
    c_int,
    *mut c_void,
);
type LifecycleFn =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void);
type MetadataFn =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, *const c_char, *mut c_void);
type DeviceFn =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *const c_char, *mut c_void);

impl Subscription {
    /// Deregisters; failures (a dead connection) leave nothing to undo.
    pub fn cancel(self) {
        // SAFETY: all were registered on this still-open connection.
        unsafe {
            for id in &self.callback_ids {
                sys::virConnectDomainEventDeregisterAny(self.conn, *id);
            }
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
    let uuid = uuid_of(dom);
    let name = sys::virDomainGetName(dom);
    let name = if name.is_null() {
        String::new()
    } else {
        CStr::from_ptr(name).to_string_lossy().into_owned()
    };
    sink(LibvirtEvent::PinsChanged { uuid, name, pins });
}

/// The domain's UUID as libvirt holds it ("" when it would not say).
unsafe fn uuid_of(dom: sys::virDomainPtr) -> String {
    let mut uuid = [0 as c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
    if sys::virDomainGetUUIDString(dom, uuid.as_mut_ptr()) == 0 {
        CStr::from_ptr(uuid.as_ptr()).to_string_lossy().into_owned()
    } else {
        String::new()
    }
}

unsafe fn changed(dom: sys::virDomainPtr, opaque: *mut c_void, what: Change) {
    let sink = &*(opaque as *const Sink);
    sink(LibvirtEvent::Changed {
        uuid: uuid_of(dom),
        what,
    });
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) {
    changed(dom, opaque, Change::Lifecycle);
}

unsafe extern "C" fn on_metadata(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _kind: c_int,
    _nsuri: *const c_char,
    opaque: *mut c_void,
) {
    changed(dom, opaque, Change::Metadata);
}

/// Device added (`ADDED`) or removed: both events have this signature.
unsafe extern "C" fn on_device<const ADDED: bool>(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _alias: *const c_char,
    opaque: *mut c_void,
) {
    let what = match ADDED {
        true => Change::DeviceAdded,
        false => Change::DeviceRemoved,
    };
    changed(dom, opaque, what);
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
