//! `HelloReply::message_len` + `HelloReply::decode`: never panics; the message length is bounded
//! and a decoded reply round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrate_core::protocol::handshake::{MAX_REPLY_MESSAGE, REPLY_HEADER_LEN};
use migrate_core::protocol::HelloReply;

fuzz_target!(|data: &[u8]| {
    if data.len() < REPLY_HEADER_LEN {
        return;
    }
    let hdr: [u8; REPLY_HEADER_LEN] = data[..REPLY_HEADER_LEN].try_into().unwrap();
    let rest = &data[REPLY_HEADER_LEN..];
    let announced = HelloReply::message_len(&hdr).ok();
    if let Some(n) = announced {
        assert!(n <= MAX_REPLY_MESSAGE);
    }
    let mut msgs = vec![rest];
    if let Some(n) = announced.filter(|&n| n <= rest.len()) {
        msgs.push(&rest[..n]);
    }
    for msg in msgs {
        let Ok(r) = HelloReply::decode(&hdr, msg) else {
            continue;
        };
        assert_eq!(announced, Some(msg.len()));
        let bytes = r.encode();
        let hdr2: [u8; REPLY_HEADER_LEN] = bytes[..REPLY_HEADER_LEN].try_into().unwrap();
        let back = HelloReply::decode(&hdr2, &bytes[REPLY_HEADER_LEN..]).expect("re-decode");
        assert_eq!(back.status, r.status);
        // Invalid UTF-8 was replaced on the first decode; the replacement is stable.
        assert_eq!(back.message, r.message);
        let _ = r.into_result();
    }
});
