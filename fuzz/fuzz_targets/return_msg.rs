//! `ReturnMsg::decode` on arbitrary 16-byte headers: never panics; requests are in range, error
//! messages bounded, and accepted headers round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrate_core::protocol::{ReturnMsg, MAX_ERROR_MESSAGE, RETURN_HEADER_LEN};
use migrate_fuzz::{in_range, table};

fuzz_target!(|data: &[u8]| {
    let t = table();
    for chunk in data.chunks_exact(RETURN_HEADER_LEN) {
        let hdr: [u8; RETURN_HEADER_LEN] = chunk.try_into().unwrap();
        let Ok(m) = ReturnMsg::decode(&hdr, &t) else {
            continue;
        };
        if let ReturnMsg::Request {
            region,
            offset,
            len,
        } = m
        {
            assert!(in_range(&t, region, offset, len as u64), "{m:?}");
        }
        assert!(m.payload_len() <= MAX_ERROR_MESSAGE as usize);
        assert_eq!(ReturnMsg::decode(&m.encode(), &t), Ok(m));
    }
});
