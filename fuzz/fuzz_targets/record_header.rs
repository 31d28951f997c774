//! `Record::decode` on arbitrary 16-byte headers: never panics; whatever it accepts is in range,
//! has a bounded payload, and survives an encode/decode round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrate_core::protocol::{Record, MAX_DISCARD_PAYLOAD, MAX_PAGES_PAYLOAD, RECORD_HEADER_LEN};
use migrate_fuzz::{in_range, table};

fuzz_target!(|data: &[u8]| {
    let t = table();
    for chunk in data.chunks_exact(RECORD_HEADER_LEN) {
        let hdr: [u8; RECORD_HEADER_LEN] = chunk.try_into().unwrap();
        let Ok(r) = Record::decode(&hdr, &t) else {
            continue;
        };
        match r {
            Record::Pages {
                region,
                offset,
                len,
            } => {
                assert!(len <= MAX_PAGES_PAYLOAD);
                assert!(in_range(&t, region, offset, len as u64), "{r:?}");
            }
            Record::Zero {
                region,
                offset,
                len,
            } => assert!(in_range(&t, region, offset, len as u64), "{r:?}"),
            Record::Digests {
                region,
                offset,
                count,
            } => {
                let page = t.get(region).unwrap().host_page_size as u64;
                assert!(in_range(&t, region, offset, count as u64 * page), "{r:?}");
                assert!(r.payload_len() as u64 <= MAX_PAGES_PAYLOAD as u64);
            }
            Record::Discard { count } => {
                assert!(count > 0);
                assert!(r.payload_len() as u64 <= MAX_DISCARD_PAYLOAD as u64);
            }
            _ => assert_eq!(r.payload_len(), 0),
        }
        assert_eq!(r.encode(), hdr, "accepted headers are canonical");
        assert_eq!(Record::decode(&r.encode(), &t), Ok(r));
    }
});
