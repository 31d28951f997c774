//! End-to-end verification: the source sends one xxh3 digest per host page (taken after the
//! guest was paused, so it is the content as of switchover); the destination compares every page
//! with it. Pages the destination guest has written since are compared through the digest the
//! guest took just before its first write (see [`crate::workload::DestWorkload`]), so one wrong,
//! stale or missing page is always detected.

use serde::Serialize;

use crate::memory::{GuestMemory, GuestRegion};
use crate::protocol::RegionTable;

/// Digests received from the source, one per host page.
#[derive(Debug, Default)]
pub struct DigestTable {
    regions: Vec<Vec<u64>>,
    present: Vec<Vec<bool>>,
    missing: usize,
}

impl DigestTable {
    pub fn new(table: &RegionTable) -> Self {
        let pages: Vec<usize> = table
            .regions()
            .iter()
            .map(|r| (r.len / r.host_page_size as u64) as usize)
            .collect();
        Self {
            regions: pages.iter().map(|&n| vec![0; n]).collect(),
            present: pages.iter().map(|&n| vec![false; n]).collect(),
            missing: pages.iter().sum(),
        }
    }

    /// Stores `digests` for host pages `first..first+digests.len()` of `region`. The caller has
    /// validated the range against the region table; out-of-range input is ignored, not a panic.
    pub fn store(&mut self, region: u16, first: usize, digests: &[u64]) {
        let (Some(vals), Some(present)) = (
            self.regions.get_mut(region as usize),
            self.present.get_mut(region as usize),
        ) else {
            return;
        };
        for (i, &d) in digests.iter().enumerate() {
            let hp = first + i;
            if hp < vals.len() {
                vals[hp] = d;
                if !present[hp] {
                    present[hp] = true;
                    self.missing -= 1;
                }
            }
        }
    }

    /// Has every host page's digest arrived?
    pub fn is_complete(&self) -> bool {
        self.missing == 0
    }

    pub fn get(&self, region: u16, hp: usize) -> Option<u64> {
        let present = *self.present.get(region as usize)?.get(hp)?;
        present.then(|| self.regions[region as usize][hp])
    }
}

/// Digests of `count` host pages of `region` starting at host page `first`.
pub fn region_digests(region: &GuestRegion, first: usize, count: usize) -> Vec<u64> {
    let page = region.host_page_size();
    (first..first + count)
        .map(|hp| region.digest(hp * page, page))
        .collect()
}

/// Result of a verification.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub pages_checked: u64,
    /// Pages compared through the destination guest's pre-write digest.
    pub pages_written_by_guest: u64,
    pub mismatches: u64,
    pub missing_digests: u64,
    /// Up to 16 mismatching pages as `region:offset`.
    pub first_mismatches: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.mismatches == 0 && self.missing_digests == 0 && self.pages_checked > 0
    }
}

/// Something that knows the content a page had before the destination guest first wrote it.
pub trait PreWriteDigests: Send + Sync {
    fn pre_write_digest(&self, region: u16, host_page: usize) -> Option<u64>;
}

/// Compares every host page of `memory` with the source's digests.
pub fn verify(
    memory: &GuestMemory,
    digests: &DigestTable,
    guest: Option<&dyn PreWriteDigests>,
) -> VerifyReport {
    let mut report = VerifyReport::default();
    let pre = |r: u16, hp: usize| guest.and_then(|g| g.pre_write_digest(r, hp));
    for region in memory.regions() {
        let page = region.host_page_size();
        for hp in 0..region.host_pages() {
            report.pages_checked += 1;
            let Some(expected) = digests.get(region.id(), hp) else {
                report.missing_digests += 1;
                continue;
            };
            let actual = match pre(region.id(), hp) {
                Some(d) => {
                    report.pages_written_by_guest += 1;
                    d
                }
                None => {
                    let d = region.digest(hp * page, page);
                    // The guest records its digest before its first write, so a page whose
                    // content changed under us has a recorded digest by now.
                    match (d != expected).then(|| pre(region.id(), hp)).flatten() {
                        Some(recorded) => {
                            report.pages_written_by_guest += 1;
                            recorded
                        }
                        None => d,
                    }
                }
            };
            if actual != expected {
                report.mismatches += 1;
                if report.first_mismatches.len() < 16 {
                    report
                        .first_mismatches
                        .push(format!("{}:{:#x}", region.name(), hp * page));
                }
            }
        }
    }
    report
}
