//! `ReturnMsg::decode` on arbitrary 16-byte headers: never panics; requests are in range, error
//! messages bounded, bitmaps sized for their region, and accepted headers round-trip.
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
        match m {
            ReturnMsg::Request {
                region,
                offset,
                len,
            } => assert!(in_range(&t, region, offset, len as u64), "{m:?}"),
            ReturnMsg::Error { len } => assert!(len <= MAX_ERROR_MESSAGE),
            ReturnMsg::Bitmap { region, len } => {
                // One bit per host page of the region, rounded up to whole bytes.
                let info = t.get(region).expect("bitmap for a known region");
                let pages = info.len / info.host_page_size as u64;
                assert!(len as u64 >= pages.div_ceil(8) && len as u64 <= pages.div_ceil(8) + 7);
            }
            ReturnMsg::Done { .. } | ReturnMsg::Pong => assert_eq!(m.payload_len(), 0),
        }
        assert_eq!(ReturnMsg::decode(&m.encode(), &t), Ok(m));
    }
});
