//! Framing: a 4-byte big-endian length, then a version byte, then a postcard
//! payload. The length counts the version byte and the payload and is capped,
//! so a peer can never make the reader allocate more than [`MAX_FRAME`].

use serde::{de::DeserializeOwned, Serialize};
use std::fmt;
use std::io::{self, Read, Write};

pub const PROTOCOL_VERSION: u8 = 1;
/// Largest frame accepted or sent (version byte + payload).
pub const MAX_FRAME: usize = 64 * 1024;

#[derive(Debug)]
pub enum WireError {
    Io(io::Error),
    /// The peer closed the connection before a whole frame arrived.
    Truncated,
    TooLarge(usize),
    Empty,
    Version(u8),
    Malformed(String),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Io(e) => write!(f, "i/o error: {e}"),
            WireError::Truncated => write!(f, "connection closed mid-frame"),
            WireError::TooLarge(n) => {
                write!(f, "frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
            }
            WireError::Empty => write!(f, "empty frame"),
            WireError::Version(v) => write!(
                f,
                "protocol version {v} not supported (this build speaks {PROTOCOL_VERSION})"
            ),
            WireError::Malformed(e) => write!(f, "malformed message: {e}"),
        }
    }
}

impl std::error::Error for WireError {}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            WireError::Truncated
        } else {
            WireError::Io(e)
        }
    }
}

/// Serializes `msg` into one complete frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let payload = postcard::to_stdvec(msg).map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = payload.len() + 1;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let mut frame = Vec::with_capacity(4 + len);
    frame.extend_from_slice(&(len as u32).to_be_bytes());
    frame.push(PROTOCOL_VERSION);
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Decodes the body of a frame (version byte and payload, no length).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    let (&version, payload) = body.split_first().ok_or(WireError::Empty)?;
    if version != PROTOCOL_VERSION {
        return Err(WireError::Version(version));
    }
    let (msg, rest) =
        postcard::take_from_bytes(payload).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(msg)
}

/// Reads one frame's body, refusing oversized lengths before allocating.
pub fn read_frame(reader: &mut impl Read) -> Result<Vec<u8>, WireError> {
    let mut len = [0u8; 4];
    reader.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 {
        return Err(WireError::Empty);
    }
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    Ok(body)
}

pub fn read_message<T: DeserializeOwned>(reader: &mut impl Read) -> Result<T, WireError> {
    decode(&read_frame(reader)?)
}

pub fn write_message<T: Serialize>(writer: &mut impl Write, msg: &T) -> Result<(), WireError> {
    writer.write_all(&encode(msg)?)?;
    writer.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{HookEvent, HookOp, Request, Response, StatusReport};

    fn event() -> Request {
        Request::Event(HookEvent {
            op: HookOp::Started,
            sub_op: "begin".into(),
            name: "vm1".into(),
            uuid: "c7a5fdbd-edaf-9455-926a-d65c16db1809".into(),
            vcpus: 4,
            sent_at_unix_ns: 1_700_000_000_000_000_000,
        })
    }

    #[test]
    fn round_trips_every_message_kind() {
        for msg in [event(), Request::Status, Request::Reconcile] {
            let frame = encode(&msg).unwrap();
            let back: Request = read_message(&mut &frame[..]).unwrap();
            assert_eq!(back, msg);
        }
        let resp = Response::Status(Box::new(StatusReport {
            mode: "shared".into(),
            pool: vec![2, 3],
            ..Default::default()
        }));
        let back: Response = read_message(&mut &encode(&resp).unwrap()[..]).unwrap();
        assert_eq!(back, resp);
    }

    #[test]
    fn length_prefix_counts_version_and_payload() {
        let frame = encode(&Request::Status).unwrap();
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        assert_eq!(frame[4], PROTOCOL_VERSION);
    }

    #[test]
    fn refuses_oversized_length_without_reading_it() {
        let mut frame = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        frame.push(PROTOCOL_VERSION);
        match read_frame(&mut &frame[..]) {
            Err(WireError::TooLarge(n)) => assert_eq!(n, MAX_FRAME + 1),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn refuses_other_versions() {
        let mut frame = encode(&Request::Status).unwrap();
        frame[4] = 9;
        match read_message::<Request>(&mut &frame[..]) {
            Err(WireError::Version(9)) => {}
            other => panic!("expected Version(9), got {other:?}"),
        }
    }

    #[test]
    fn refuses_garbage_truncation_and_trailing_bytes() {
        assert!(matches!(
            decode::<Request>(&[PROTOCOL_VERSION, 0xff, 0xff]),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(decode::<Request>(&[]), Err(WireError::Empty)));
        let frame = encode(&event()).unwrap();
        assert!(matches!(
            read_message::<Request>(&mut &frame[..frame.len() - 3]),
            Err(WireError::Truncated)
        ));
        let mut body = frame[4..].to_vec();
        body.push(0);
        assert!(matches!(
            decode::<Request>(&body),
            Err(WireError::Malformed(_))
        ));
    }
}
