//! Turning claimed host pages into records: zero detection and coalescing of contiguous pages.

use uring_net::FrameSender;

use crate::error::MigrateError;
use crate::memory::GuestRegion;
use crate::protocol::Record;
use crate::stats::{Counters, Lane};

/// Pushes host pages `first..first+n` of `region` (already claimed by the caller) as records:
/// runs of zero pages become one zero record, runs of data pages one page record of at most
/// `max_record` bytes whose payload points straight into guest memory.
pub(crate) fn push_run(
    sender: &mut FrameSender,
    region: &GuestRegion,
    first: usize,
    n: usize,
    max_record: usize,
    counters: &Counters,
    lane: Lane,
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
            counters
                .zero_pages
                .fetch_add((j - i) as u64, std::sync::atomic::Ordering::Relaxed);
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
        i = j;
    }
    Ok(())
}
