//! `Hello::body_len` + `Hello::decode` with arbitrary header/body splits: never panics; a decoded
//! hello re-encodes to bytes that decode to the same hello.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrate_core::protocol::handshake::{HELLO_HEADER_LEN, MAX_HELLO_BODY};
use migrate_core::protocol::Hello;

fuzz_target!(|data: &[u8]| {
    if data.len() < HELLO_HEADER_LEN {
        return;
    }
    let hdr: [u8; HELLO_HEADER_LEN] = data[..HELLO_HEADER_LEN].try_into().unwrap();
    let rest = &data[HELLO_HEADER_LEN..];
    // What a receiver does: trust body_len only after it validated the header.
    let announced = match Hello::body_len(&hdr) {
        Ok(n) => {
            assert!(n <= MAX_HELLO_BODY);
            Some(n)
        }
        Err(_) => None,
    };
    // The whole remainder as the body (usually a length mismatch), and the announced prefix.
    let mut bodies = vec![rest];
    if let Some(n) = announced {
        if n <= rest.len() {
            bodies.push(&rest[..n]);
        }
    }
    for body in bodies {
        let Ok(h) = Hello::decode(&hdr, body) else {
            continue;
        };
        assert_eq!(announced, Some(body.len()));
        let bytes = h.encode();
        let hdr2: [u8; HELLO_HEADER_LEN] = bytes[..HELLO_HEADER_LEN].try_into().unwrap();
        assert_eq!(
            Hello::body_len(&hdr2).ok(),
            Some(bytes.len() - HELLO_HEADER_LEN)
        );
        assert_eq!(Hello::decode(&hdr2, &bytes[HELLO_HEADER_LEN..]), Ok(h));
    }
});
