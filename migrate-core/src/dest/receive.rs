//! Receivers: the main channel (precopy writes, commands, bulk postcopy pages) and the urgent
//! channel (requested pages, placed by the receiving thread itself).

use uring_net::FrameReader;

use super::state::{DestShared, Staging};
use crate::error::MigrateError;
use crate::memory::{Backing, GuestRegion};
use crate::protocol::{PhaseAction, Record, RegionTable, RECORD_HEADER_LEN};
use crate::stats::Lane;

/// Reads the payload of a page record and places it atomically.
pub(crate) fn place_record(
    shared: &DestShared,
    reader: &mut FrameReader,
    staging: &mut Staging,
    region: u16,
    offset: u64,
    len: u32,
    lane: Lane,
) -> Result<(), MigrateError> {
    let reg = shared.memory.regions()[region as usize].clone();
    if reg.backing().is_shared() {
        return place_shared_record(shared, reader, staging, &reg, offset as usize, len, lane);
    }
    let buf = staging.get(len as usize, reg.backing())?;
    reader.read_exact(buf)?;
    shared.place(&reg, offset as usize, buf, lane)?;
    staging.restock(reg.backing());
    Ok(())
}

/// A page record of a shared region: claims its host pages, reads the payload straight into
/// the alias mapping (the only copy), then maps the pages into the guest's view. Pages the
/// other receiver claimed, or already in place, are read past and dropped.
fn place_shared_record(
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
    mine.extend((first..first + len / page).map(|hp| shared.claim(r, hp)));
    let read = if mine.iter().all(|&c| c) {
        // SAFETY: `alias_ptr_at` checked the range lies in the alias mapping, alive while
        // `reg` is. Every host page of it is claimed by this thread: no other thread writes
        // it, and the guest cannot see it until `map_claimed` maps it.
        unsafe { reader.read_exact_raw(alias, len) }.map_err(MigrateError::from)
    } else {
        staging.get(len, Backing::Anonymous).and_then(|buf| {
            reader.read_exact(buf)?;
            for (i, _) in mine.iter().enumerate().filter(|(_, &c)| c) {
                let src = &buf[i * page..(i + 1) * page];
                // SAFETY: as above, for the claimed host page `i` of the range.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), alias.add(i * page), page) };
            }
            Ok(())
        })
    };
    let result = match read {
        Ok(()) => shared.map_claimed(reg, first, &mine).map(|mapped| {
            let pages = mine.len();
            if mapped < pages {
                shared.counters.duplicate_pages.fetch_add(
                    (pages - mapped) as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            shared.counters.add_pages(lane, pages as u64, len as u64);
        }),
        Err(e) => {
            // Cut short: the pages were not (fully) written; a later copy may claim them.
            for (i, _) in mine.iter().enumerate().filter(|(_, &c)| c) {
                shared.unclaim(r, first + i);
            }
            Err(e)
        }
    };
    staging.claims = mine;
    result
}

/// The urgent receiver: only page and zero records, only once userfaultfd is armed. Runs until
/// the connection ends; reports failures to the coordinator.
pub(crate) fn urgent_loop(shared: &DestShared, mut reader: FrameReader, table: &RegionTable) {
    let mut staging = Staging::new();
    // Map and fault in the staging buffer before the first request needs it.
    if let Ok(buf) = staging.get(64 << 10, crate::memory::Backing::Anonymous) {
        buf.fill(0);
    }
    let result = (|| -> Result<(), MigrateError> {
        loop {
            let Some(hdr) = reader.read_header::<RECORD_HEADER_LEN>()? else {
                return Err(MigrateError::Link(
                    "the source closed the urgent channel".into(),
                ));
            };
            let rec = Record::decode(&hdr, table)?;
            match (shared.phase().on_urgent(&rec)?, rec) {
                (
                    PhaseAction::Place,
                    Record::Pages {
                        region,
                        offset,
                        len,
                    },
                ) => place_record(
                    shared,
                    &mut reader,
                    &mut staging,
                    region,
                    offset,
                    len,
                    Lane::Urgent,
                )?,
                (
                    PhaseAction::PlaceZero,
                    Record::Zero {
                        region,
                        offset,
                        len,
                    },
                ) => {
                    let reg = shared.memory.regions()[region as usize].clone();
                    shared.place_zero(&reg, offset as usize, len as usize, &mut staging)?
                }
                _ => {}
            }
        }
    })();
    if let Err(e) = result {
        shared.report(e);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;

    use super::*;
    use crate::memory::{GuestMemory, RegionSpec, PAGE_SIZE};
    use crate::uffd::{feature, RegisterMode, Userfaultfd};

    /// A shared region armed for minor faults, and a socket feeding its receiver.
    fn armed_shared(pages: usize) -> (Arc<GuestMemory>, DestShared, UnixStream, FrameReader) {
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
        let (tx, rx) = UnixStream::pair().unwrap();
        (mem, shared, tx, FrameReader::new(rx.into(), 64 << 10))
    }

    fn page_of(mem: &GuestMemory, hp: usize) -> Vec<u8> {
        let mut b = vec![0; PAGE_SIZE];
        mem.regions()[0].read_into(hp * PAGE_SIZE, &mut b).unwrap();
        b
    }

    /// The guest may write a page as soon as it is mapped: a second copy of it (the urgent
    /// and the bulk stream both carried it) must never be written through the alias again.
    #[test]
    fn a_late_copy_never_overwrites_a_page_in_place() {
        let (mem, shared, mut tx, mut rx) = armed_shared(4);
        let mut staging = Staging::new();
        tx.write_all(&[0x11; 2 * PAGE_SIZE]).unwrap();
        let len = 2 * PAGE_SIZE as u32;
        place_record(&shared, &mut rx, &mut staging, 0, 0, len, Lane::Urgent).unwrap();
        // The guest writes page 0 (mapped now: no fault).
        mem.regions()[0].write_from(0, &[0x22; PAGE_SIZE]).unwrap();

        // The bulk copy of pages 0..3 arrives late; page 2 is new.
        tx.write_all(&[0x33; 3 * PAGE_SIZE]).unwrap();
        let len = 3 * PAGE_SIZE as u32;
        place_record(&shared, &mut rx, &mut staging, 0, 0, len, Lane::Bulk).unwrap();
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
    }

    /// A copy cut short by a broken connection gives its claim back, so the page can arrive
    /// again after a reconnect; the page is neither received nor mapped.
    #[test]
    fn a_copy_cut_short_gives_its_claim_back() {
        let (_mem, shared, mut tx, mut rx) = armed_shared(4);
        let mut staging = Staging::new();
        tx.write_all(&[0x44; 100]).unwrap();
        drop(tx);
        let len = 2 * PAGE_SIZE as u32;
        let off = 2 * PAGE_SIZE as u64;
        assert!(place_record(&shared, &mut rx, &mut staging, 0, off, len, Lane::Bulk).is_err());
        assert_eq!(shared.received_count.load(Relaxed), 0);
        assert!(
            shared.claim(0, 2) && shared.claim(0, 3),
            "claims given back"
        );
        assert!(!shared.claim(0, 2), "a claim is exclusive");
    }
}
