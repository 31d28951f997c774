//! Shared fixtures for the fuzz targets: the region table every decoder is checked against.

use migrate_core::protocol::RegionTable;

pub use migrate_core::protocol::fixtures::{sample_records, sample_table as table};

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
