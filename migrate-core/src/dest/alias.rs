//! Placement into shared regions ([`Backing::Shared`], [`Backing::SharedHugeTlb`]): a page is
//! written into the region's file through its alias mapping, then mapped into the guest's view
//! with `UFFDIO_CONTINUE`, which wakes the vCPUs waiting on it.
//!
//! Unlike `UFFDIO_COPY`, writing through the alias is not atomic against the guest, so every
//! write is guarded by a **claim** (one bit per host page): a page is written only by the
//! receiver that claimed it, and never once it is in place, since from then on the guest may
//! be writing it through its own view and a late second copy would undo that.
//!
//! - The urgent receiver claims a record's pages *before* reading its payload, and reads it
//!   straight into the file: one copy, on the latency path. Its payloads are small and its
//!   channel is never congested by bulk.
//! - The bulk receiver reads the payload into staging first and claims only then, so a page
//!   whose bulk copy is still on its way (behind a congested bulk channel) can still be taken
//!   by its urgent copy: the destination keeps whichever copy *arrives* first.
//! - A copy cut short (the connection broke) gives its claims back.

use std::sync::atomic::Ordering::Relaxed;

use uring_net::FrameReader;

use super::state::{DestShared, Staging};
use crate::error::MigrateError;
use crate::memory::{Backing, GuestRegion};
use crate::stats::Lane;

impl DestShared {
    /// Takes the sole right to write host page `hp` of shared region `r` through the alias.
    /// Refused for a page in place, or claimed by the other receiver.
    pub fn claim(&self, r: usize, hp: usize) -> bool {
        !self.received[r].test(hp) && !self.claimed[r].set(hp)
    }

    /// Gives up a claim whose page was not written completely: a later copy may take it.
    pub fn unclaim(&self, r: usize, hp: usize) {
        self.claimed[r].clear(hp);
    }

    /// Maps the host pages `first + i` with `mine[i]` set (claimed and written through the
    /// alias by this thread) into the guest's view and marks them received.
    fn map_claimed(
        &self,
        region: &GuestRegion,
        first: usize,
        mine: &[bool],
    ) -> Result<(), MigrateError> {
        let uffd = self.uffd.get().ok_or_else(|| {
            MigrateError::Internal("placement before userfaultfd was armed".into())
        })?;
        let (r, page) = (region.id() as usize, region.host_page_size());
        let mut i = 0;
        while i < mine.len() {
            if !mine[i] {
                i += 1;
                continue;
            }
            let run = mine[i..].iter().take_while(|&&c| c).count();
            let addr = region.base_addr() + (first + i) * page;
            let mapped = uffd.continue_range(addr, run * page, page, true)?;
            if mapped != run * page {
                // A claimed page is never in place, so nothing can have mapped it: if the
                // guest's view has it, the guest may have seen (or written) it mid-copy.
                return Err(MigrateError::Internal(format!(
                    "region {r}: host pages {}..{} were already mapped in the guest's view \
                     while claimed for placement",
                    first + i,
                    first + i + run
                )));
            }
            self.mark_received(r, first + i, run);
            i += run;
        }
        Ok(())
    }
}

/// Places a page record of a shared region (the payload follows in `reader`).
pub(crate) fn place_record(
    shared: &DestShared,
    reader: &mut FrameReader,
    staging: &mut Staging,
    reg: &GuestRegion,
    offset: usize,
    len: u32,
    lane: Lane,
) -> Result<(), MigrateError> {
    let len = len as usize;
    let (r, page) = (reg.id() as usize, reg.host_page_size());
    let first = offset / page;
    let alias = reg.alias_ptr_at(offset, len)?;
    let mut mine = std::mem::take(&mut staging.claims);
    mine.clear();
    let result = match lane {
        Lane::Urgent => {
            mine.extend((first..first + len / page).map(|hp| shared.claim(r, hp)));
            let read = if mine.iter().all(|&c| c) {
                // SAFETY: `alias_ptr_at` checked the range lies in the alias mapping, alive
                // while `reg` is. Every host page of it is claimed by this thread: no other
                // thread writes it, and the guest cannot see it until `map_claimed` maps it.
                unsafe { reader.read_exact_raw(alias, len) }.map_err(MigrateError::from)
            } else {
                staging.get(len, Backing::Anonymous).and_then(|buf| {
                    reader.read_exact(buf)?;
                    copy_claimed(buf, alias, &mine, page);
                    Ok(())
                })
            };
            if read.is_err() {
                for (i, _) in mine.iter().enumerate().filter(|(_, &c)| c) {
                    shared.unclaim(r, first + i);
                }
            }
            read
        }
        Lane::Bulk => staging.get(len, Backing::Anonymous).and_then(|buf| {
            reader.read_exact(buf)?;
            mine.extend((first..first + len / page).map(|hp| shared.claim(r, hp)));
            copy_claimed(buf, alias, &mine, page);
            Ok(())
        }),
    }
    .and_then(|()| shared.map_claimed(reg, first, &mine))
    .map(|()| {
        let (pages, placed) = (mine.len(), mine.iter().filter(|&&c| c).count());
        if placed < pages {
            shared
                .counters
                .duplicate_pages
                .fetch_add((pages - placed) as u64, Relaxed);
        }
        shared.counters.add_pages(lane, pages as u64, len as u64);
    });
    staging.claims = mine;
    result
}

/// Copies the claimed host pages of a staged payload into the file.
fn copy_claimed(buf: &[u8], alias: *mut u8, mine: &[bool], page: usize) {
    for (i, _) in mine.iter().enumerate().filter(|(_, &c)| c) {
        let src = &buf[i * page..(i + 1) * page];
        // SAFETY: `alias` points at the record's range in the alias mapping (checked by
        // `alias_ptr_at`, alive while the region is); host page `i` of it is claimed by this
        // thread, so no other thread writes it and the guest cannot see it yet.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), alias.add(i * page), page) };
    }
}

/// Places zero pages of a shared region: the file's pages exist and may hold an unfinished
/// earlier copy, so the claimed ones are zeroed through the alias, then mapped.
pub(crate) fn place_zero(
    shared: &DestShared,
    region: &GuestRegion,
    offset: usize,
    len: usize,
    staging: &mut Staging,
) -> Result<(), MigrateError> {
    let (r, page) = (region.id() as usize, region.host_page_size());
    let first = offset / page;
    let alias = region.alias_ptr_at(offset, len)?;
    let mut mine = std::mem::take(&mut staging.claims);
    mine.clear();
    mine.extend((first..first + len / page).map(|hp| shared.claim(r, hp)));
    for (i, _) in mine.iter().enumerate().filter(|(_, &c)| c) {
        // SAFETY: as in `copy_claimed`: inside the checked range, claimed by this thread.
        unsafe { std::ptr::write_bytes(alias.add(i * page), 0, page) };
    }
    let result = shared.map_claimed(region, first, &mine).map(|()| {
        let placed = mine.iter().filter(|&&c| c).count() as u64;
        shared.counters.zero_pages.fetch_add(placed, Relaxed);
        shared
            .counters
            .duplicate_pages
            .fetch_add(mine.len() as u64 - placed, Relaxed);
    });
    staging.claims = mine;
    result
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use super::*;
    use crate::memory::{GuestMemory, RegionSpec, PAGE_SIZE};
    use crate::uffd::{feature, RegisterMode, Userfaultfd};

    /// A shared region armed for minor faults.
    fn armed_shared(pages: usize) -> (Arc<GuestMemory>, DestShared) {
        let mem = Arc::new(
            GuestMemory::allocate(&[RegionSpec {
                name: "shared".into(),
                size: pages * PAGE_SIZE,
                backing: Backing::Shared,
            }])
            .unwrap(),
        );
        let shared = DestShared::new(mem.clone());
        let uffd = Userfaultfd::open(feature::MINOR_SHMEM).unwrap();
        let reg = &mem.regions()[0];
        let minor = RegisterMode {
            minor: true,
            ..RegisterMode::default()
        };
        uffd.register(reg.base_addr(), reg.len(), minor).unwrap();
        assert!(shared.uffd.set(uffd).is_ok());
        (mem, shared)
    }

    /// A socket feeding a receiver.
    fn channel() -> (UnixStream, FrameReader) {
        let (tx, rx) = UnixStream::pair().unwrap();
        (tx, FrameReader::new(rx.into(), 64 << 10))
    }

    fn page_of(mem: &GuestMemory, hp: usize) -> Vec<u8> {
        let mut b = vec![0; PAGE_SIZE];
        mem.regions()[0].read_into(hp * PAGE_SIZE, &mut b).unwrap();
        b
    }

    fn place(
        shared: &DestShared,
        rx: &mut FrameReader,
        first: usize,
        pages: usize,
        lane: Lane,
    ) -> Result<(), MigrateError> {
        let reg = shared.memory.regions()[0].clone();
        let (off, len) = (first * PAGE_SIZE, (pages * PAGE_SIZE) as u32);
        place_record(shared, rx, &mut Staging::new(), &reg, off, len, lane)
    }

    /// The guest may write a page as soon as it is mapped: a second copy of it (the urgent
    /// and the bulk stream both carried it) must never be written through the alias again.
    #[test]
    fn a_late_copy_never_overwrites_a_page_in_place() {
        let (mem, shared) = armed_shared(4);
        let (mut tx, mut rx) = channel();
        tx.write_all(&[0x11; 2 * PAGE_SIZE]).unwrap();
        place(&shared, &mut rx, 0, 2, Lane::Urgent).unwrap();
        // The guest writes page 0 (mapped now: no fault).
        mem.regions()[0].write_from(0, &[0x22; PAGE_SIZE]).unwrap();

        // The bulk copy of pages 0..3 arrives late; page 2 is new.
        tx.write_all(&[0x33; 3 * PAGE_SIZE]).unwrap();
        place(&shared, &mut rx, 0, 3, Lane::Bulk).unwrap();
        assert_eq!(
            page_of(&mem, 0),
            vec![0x22; PAGE_SIZE],
            "the guest's write survives"
        );
        assert_eq!(page_of(&mem, 1), vec![0x11; PAGE_SIZE]);
        assert_eq!(
            page_of(&mem, 2),
            vec![0x33; PAGE_SIZE],
            "a new page is mapped"
        );
        assert_eq!(shared.received_count.load(Relaxed), 3);
        assert_eq!(shared.counters.duplicate_pages.load(Relaxed), 2);

        // The same for zero records: a page in place is not zeroed.
        place_zero(
            &shared,
            &mem.regions()[0],
            0,
            4 * PAGE_SIZE,
            &mut Staging::new(),
        )
        .unwrap();
        assert_eq!(page_of(&mem, 0), vec![0x22; PAGE_SIZE]);
        assert_eq!(page_of(&mem, 3), vec![0; PAGE_SIZE]);
        assert_eq!(shared.received_count.load(Relaxed), 4);
        assert_eq!(shared.counters.zero_pages.load(Relaxed), 1);
    }

    /// An urgent copy cut short by a broken connection gives its claims back, so the pages can
    /// arrive again after a reconnect; they are neither received nor mapped.
    #[test]
    fn a_copy_cut_short_gives_its_claim_back() {
        let (_mem, shared) = armed_shared(4);
        let (mut tx, mut rx) = channel();
        tx.write_all(&[0x44; 100]).unwrap();
        drop(tx);
        assert!(place(&shared, &mut rx, 2, 2, Lane::Urgent).is_err());
        assert_eq!(shared.received_count.load(Relaxed), 0);
        assert!(
            shared.claim(0, 2) && shared.claim(0, 3),
            "claims given back"
        );
        assert!(!shared.claim(0, 2), "a claim is exclusive");
    }

    /// While a bulk record's payload is still on its way, its pages are not claimed: the
    /// urgent copy of one of them (the rescue) is placed at once, and the bulk copy of it is
    /// dropped when it lands.
    #[test]
    fn a_bulk_copy_in_flight_does_not_hold_back_the_urgent_copy() {
        let (mem, shared) = armed_shared(4);
        let (mut bulk_tx, mut bulk_rx) = channel();
        let (mut urgent_tx, mut urgent_rx) = channel();
        std::thread::scope(|s| {
            let bulk = s.spawn(|| place(&shared, &mut bulk_rx, 0, 4, Lane::Bulk));
            // The bulk receiver is blocked in the middle of the payload.
            bulk_tx.write_all(&[0x55; PAGE_SIZE]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            urgent_tx.write_all(&[0x66; PAGE_SIZE]).unwrap();
            let urgent = place(&shared, &mut urgent_rx, 2, 1, Lane::Urgent);
            let placed_at_once = shared.received[0].test(2);
            bulk_tx.write_all(&[0x55; 3 * PAGE_SIZE]).unwrap();
            bulk.join().unwrap().unwrap();
            urgent.expect("urgent copy");
            assert!(placed_at_once, "the urgent copy waited for the bulk copy");
        });
        assert_eq!(page_of(&mem, 2), vec![0x66; PAGE_SIZE]);
        assert_eq!(page_of(&mem, 3), vec![0x55; PAGE_SIZE]);
        assert_eq!(shared.received_count.load(Relaxed), 4);
        assert_eq!(shared.counters.duplicate_pages.load(Relaxed), 1);
    }
}
