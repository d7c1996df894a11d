//! The daemon's libvirt session: connecting through a [`Connector`] (the
//! real one opens libvirt; unit tests hand in a fake), reconnecting with
//! backoff, logging an outage once, counting reconnects.

use crate::engine::hypervisor::{HvError, Hypervisor};
use crate::libvirt::events::{EventsError, Sink};
use crate::libvirt::Libvirt;
use pinner_shared::log::Logger;
use std::time::{Duration, Instant};

const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// A live connection: a [`Hypervisor`] that can also report libvirt's own
/// events (pins changed behind pinner's back, the connection closing).
pub trait Connection: Hypervisor {
    fn subscribe(&mut self, sink: Sink) -> Result<(), EventsError>;
}

/// Opens connections.
pub trait Connector {
    fn connect(&mut self, uri: &str, cpumap_width: u32) -> Result<Box<dyn Connection>, HvError>;
}

/// The real thing: libvirt through the `virt` crate.
pub struct LibvirtConnector;

impl Connector for LibvirtConnector {
    fn connect(&mut self, uri: &str, cpumap_width: u32) -> Result<Box<dyn Connection>, HvError> {
        Ok(Box::new(Libvirt::connect(uri, cpumap_width)?))
    }
}

impl Connection for Libvirt {
    fn subscribe(&mut self, sink: Sink) -> Result<(), EventsError> {
        Libvirt::subscribe(self, sink)
    }
}

/// libvirt cannot be reached now; try again at `retry_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreachable {
    pub retry_at: Instant,
}

pub struct Session {
    connector: Box<dyn Connector>,
    pub uri: String,
    cpumap_width: u32,
    current: Option<Box<dyn Connection>>,
    reconnect_delay: Duration,
    next_connect: Instant,
    /// Set while libvirt is unreachable, so the outage is logged once.
    outage_logged: bool,
    ever_connected: bool,
    /// Connections made after the first.
    pub reconnects: u64,
    /// Counts connections: what was read on an earlier one may have
    /// changed unannounced (events are lost while none is open).
    pub serial: u64,
    /// Whether the connection delivers libvirt's events.
    pub events_live: bool,
    /// Calls made on connections since dropped.
    calls_before: u64,
}

impl Session {
    pub fn new(connector: Box<dyn Connector>, uri: &str, cpumap_width: u32) -> Session {
        Session {
            connector,
            uri: uri.to_string(),
            cpumap_width,
            current: None,
            reconnect_delay: RECONNECT_MIN,
            next_connect: Instant::now(),
            outage_logged: false,
            ever_connected: false,
            reconnects: 0,
            serial: 0,
            events_live: false,
            calls_before: 0,
        }
    }

    /// The connection, (re)connecting with backoff. A new connection hands
    /// its events to `sink`.
    pub fn get(
        &mut self,
        logger: &Logger,
        sink: impl FnOnce() -> Sink,
    ) -> Result<&mut dyn Connection, Unreachable> {
        if self.current.is_none() {
            let now = Instant::now();
            if now < self.next_connect {
                return Err(Unreachable {
                    retry_at: self.next_connect,
                });
            }
            match self.connector.connect(&self.uri, self.cpumap_width) {
                Ok(conn) => self.connected(conn, logger, sink()),
                Err(e) => return Err(self.failed(&e, now, logger)),
            }
        }
        Ok(self.current().expect("connected above"))
    }

    fn connected(&mut self, mut conn: Box<dyn Connection>, logger: &Logger, sink: Sink) {
        if self.ever_connected {
            self.reconnects += 1;
        }
        logger.info(&format!("connected to libvirt at {}", self.uri), &[]);
        self.ever_connected = true;
        self.outage_logged = false;
        self.reconnect_delay = RECONNECT_MIN;
        self.serial += 1;
        self.events_live = match conn.subscribe(sink) {
            Ok(()) => true,
            Err(e) => {
                logger.warn(
                    &format!(
                        "{e}; every pass reads every guest, and hand-made pin changes wait for the periodic reconcile"
                    ),
                    &[],
                );
                false
            }
        };
        self.current = Some(conn);
    }

    fn failed(&mut self, error: &HvError, now: Instant, logger: &Logger) -> Unreachable {
        let message = format!(
            "cannot reach libvirt at {} ({error}); retrying in {:?}",
            self.uri, self.reconnect_delay
        );
        if self.outage_logged {
            logger.debug(&message, &[]);
        } else {
            logger.warn(&message, &[]);
            self.outage_logged = true;
        }
        self.next_connect = now + self.reconnect_delay;
        self.reconnect_delay = (self.reconnect_delay * 2).min(RECONNECT_MAX);
        Unreachable {
            retry_at: self.next_connect,
        }
    }

    /// The connection if one is open, without connecting.
    pub fn current(&mut self) -> Option<&mut dyn Connection> {
        self.current
            .as_mut()
            .map(|c| c.as_mut() as &mut dyn Connection)
    }

    /// Drops the connection (found dead); returns whether one was open.
    pub fn drop_connection(&mut self) -> bool {
        let dropped = self.current.take();
        self.calls_before += dropped.as_ref().map_or(0, |c| c.calls_made());
        dropped.is_some()
    }

    /// Calls made to libvirt, on every connection so far.
    pub fn calls(&self) -> u64 {
        self.calls_before + self.current.as_ref().map_or(0, |c| c.calls_made())
    }

    /// A new URI takes effect at the next connect.
    pub fn set_uri(&mut self, uri: &str) {
        if uri != self.uri {
            self.uri = uri.to_string();
            self.drop_connection();
        }
    }

    /// How long a pass waits before it tries again after a failure.
    pub fn retry_delay(&self) -> Duration {
        self.reconnect_delay
    }
}
