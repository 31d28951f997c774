//! Turning claimed host pages into records: zero detection and coalescing of contiguous pages.

use std::sync::atomic::{AtomicU64, Ordering::*};

use uring_net::FrameSender;

use crate::error::MigrateError;
use crate::memory::GuestRegion;
use crate::protocol::Record;
use crate::stats::{Counters, Lane};

/// Per host page of the region being pushed on the bulk stream: where its record ends in the
/// stream (see `Claims::bulk_end`).
pub(crate) struct BulkOffsets<'a>(pub &'a [AtomicU64]);

/// Host pages `first..first+n` of `region`.
pub(crate) struct Run<'a> {
    pub region: &'a GuestRegion,
    pub first: usize,
    pub n: usize,
}

/// Pushes a run of host pages (already claimed by the caller) as records: runs of zero pages
/// become one zero record, runs of data pages one page record of at most `max_record` bytes
/// whose payload points straight into guest memory.
pub(crate) fn push_run(
    sender: &mut FrameSender,
    Run { region, first, n }: Run<'_>,
    max_record: usize,
    counters: &Counters,
    lane: Lane,
    offsets: Option<BulkOffsets<'_>>,
) -> Result<(), MigrateError> {
    let page = region.host_page_size();
    let max_pages = (max_record / page).max(1);
    let mut i = first;
    let end = first + n;
    while i < end {
        let zero = region.is_zero(i * page, page);
        let mut j = i + 1;
        while j < end && j - i < max_pages && region.is_zero(j * page, page) == zero {
            j += 1;
        }
        let (offset, len) = ((i * page) as u64, ((j - i) * page) as u32);
        if zero {
            let rec = Record::Zero {
                region: region.id(),
                offset,
                len,
            };
            sender.push(&rec.encode(), &[])?;
            counters.zero_pages.fetch_add((j - i) as u64, Relaxed);
        } else {
            let rec = Record::Pages {
                region: region.id(),
                offset,
                len,
            };
            let payload = region.buf_ref(i * page, len as usize)?;
            sender.push(&rec.encode(), &[payload])?;
            counters.add_pages(lane, (j - i) as u64, len as u64);
        }
        if let Some(BulkOffsets(ends)) = &offsets {
            let end = sender.pushed_bytes();
            for e in &ends[i..j] {
                e.store(end, Release);
            }
        }
        i = j;
    }
    Ok(())
}

/// Claims and pushes every still-unsent host page of `range` (clipped to the region) on
/// `sender`, coalescing contiguous claims. Returns how many pages it pushed.
pub(crate) fn push_ahead(
    sender: &mut FrameSender,
    claims: &super::shared::Claims,
    region: &GuestRegion,
    range: std::ops::Range<usize>,
    max_record: usize,
    counters: &Counters,
) -> Result<usize, MigrateError> {
    let end = range.end.min(region.host_pages());
    let r = region.id() as usize;
    let mut hp = range.start;
    let mut pushed = 0;
    while hp < end {
        if !claims.claim_for_urgent(r, hp) {
            hp += 1;
            continue;
        }
        let mut n = 1;
        while hp + n < end && claims.claim_for_urgent(r, hp + n) {
            n += 1;
        }
        push_run(
            sender,
            Run {
                region,
                first: hp,
                n,
            },
            max_record,
            counters,
            Lane::Urgent,
            None,
        )?;
        pushed += n;
        hp += n + 1;
    }
    Ok(pushed)
}
