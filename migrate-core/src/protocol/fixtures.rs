//! Sample protocol values for tests and fuzzing (feature `fixtures`, and this crate's tests):
//! one region table and one record of every kind, so the codec tests and the fuzz corpus agree.

use super::handshake::{RegionInfo, RegionTable};
use super::record::Record;

/// Two regions with different host page sizes, so alignment and range checks of both kinds are
/// exercised: "ram" (4 KiB pages, 1 MiB) and "huge" (2 MiB pages, 8 MiB).
pub fn sample_table() -> RegionTable {
    RegionTable::new(vec![
        RegionInfo {
            id: 0,
            name: "ram".into(),
            host_page_size: 4096,
            len: 1 << 20,
        },
        RegionInfo {
            id: 1,
            name: "huge".into(),
            host_page_size: 2 << 20,
            len: 8 << 20,
        },
    ])
    .expect("a valid table")
}

/// One valid record of every kind for [`sample_table`].
pub fn sample_records() -> Vec<Record> {
    vec![
        Record::Pages {
            region: 0,
            offset: 4096,
            len: 8192,
        },
        Record::Pages {
            region: 1,
            offset: 2 << 20,
            len: 2 << 20,
        },
        Record::Zero {
            region: 0,
            offset: 0,
            len: 1 << 20,
        },
        Record::Discard { count: 3 },
        Record::Postcopy,
        Record::Run,
        Record::Digests {
            region: 1,
            offset: 0,
            count: 4,
        },
        Record::End,
        Record::Ping,
    ]
}
