//! `DiscardEntry::decode` on arbitrary slices: never panics; an accepted entry lies inside its
//! region and reports the right byte length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrate_core::protocol::record::DISCARD_ENTRY_LEN;
use migrate_core::protocol::DiscardEntry;
use migrate_fuzz::{in_range, table};

fuzz_target!(|data: &[u8]| {
    let t = table();
    // The whole input (any length), then every entry of it read as a discard payload.
    let whole = DiscardEntry::decode(data, &t);
    assert!(whole.is_err() || data.len() == DISCARD_ENTRY_LEN);
    for chunk in data.chunks(DISCARD_ENTRY_LEN) {
        let Ok((e, len)) = DiscardEntry::decode(chunk, &t) else {
            continue;
        };
        let page = t.get(e.region).unwrap().host_page_size as u64;
        assert_eq!(len, e.pages as u64 * page);
        assert!(in_range(&t, e.region, e.offset, len), "{e:?}");
        assert_eq!(&e.encode()[..], chunk, "accepted entries are canonical");
    }
});
