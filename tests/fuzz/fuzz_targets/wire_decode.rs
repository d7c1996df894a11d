//! Whatever arrives on the daemon socket: decoding never panics, and what
//! decodes re-encodes to a frame that decodes to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pinner_shared::protocol::{Request, Response};
use pinner_shared::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = wire::decode::<Request>(data) {
        let frame = wire::encode(&request).expect("a decoded request encodes");
        let again: Request = wire::decode(&frame[4..]).expect("and decodes again");
        assert_eq!(again, request);
    }
    let _ = wire::decode::<Response>(data);
});
