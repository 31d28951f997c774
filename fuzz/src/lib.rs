//! Shared fixtures for the fuzz targets: the region table every decoder is checked against.

use migrate_core::protocol::{RegionInfo, RegionTable};

/// Two regions with different host page sizes, so alignment and range checks of both kinds are
/// exercised: "ram" (4 KiB pages, 1 MiB) and "huge" (2 MiB pages, 8 MiB).
pub fn table() -> RegionTable {
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
    .expect("valid table")
}

/// `[offset, offset+len)` lies inside region `region` of `table`, host-page aligned, non-empty.
pub fn in_range(table: &RegionTable, region: u16, offset: u64, len: u64) -> bool {
    let Ok(info) = table.get(region) else {
        return false;
    };
    let page = info.host_page_size as u64;
    len > 0
        && offset.is_multiple_of(page)
        && len.is_multiple_of(page)
        && offset.checked_add(len).is_some_and(|end| end <= info.len)
}
