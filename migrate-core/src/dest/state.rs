//! State the destination's threads share: what is in place, which requests are in flight,
//! placement itself, completion and failure.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use crate::bitmap::AtomicBitmap;
use crate::error::MigrateError;
use crate::memory::{Backing, GuestMemory, GuestRegion, Mapping, HUGE_PAGE_SIZE};
use crate::protocol::DestPhase;
use crate::stats::{Counters, Lane, LatencyHistogram};
use crate::uffd::Userfaultfd;

pub(crate) struct DestShared {
    pub memory: Arc<GuestMemory>,
    /// Host pages in place (precopy write, postcopy placement, or received as zero).
    pub received: Vec<AtomicBitmap>,
    /// Shared regions in postcopy: host pages a receiver took the right to write through the
    /// alias mapping (see `alias.rs`).
    pub(super) claimed: Vec<AtomicBitmap>,
    /// Request time (ns since `epoch`, | 1) per host page with a request in flight; 0 = none.
    pub pending: Vec<Box<[AtomicU64]>>,
    pub received_count: AtomicUsize,
    pub total: usize,
    pub uffd: OnceLock<Userfaultfd>,
    phase: AtomicU8,
    pub counters: Counters,
    pub latency: LatencyHistogram,
    pub epoch: Instant,
    state: Mutex<Outcome>,
    changed: Condvar,
    /// The connection broke in postcopy; waiting for the source to reconnect.
    pub paused: AtomicBool,
}

#[derive(Default)]
struct Outcome {
    complete: bool,
    ended: bool,
    error: Option<MigrateError>,
    link_error: Option<MigrateError>,
}

/// What the coordinating thread wakes up for.
pub(crate) enum Event {
    /// Every page is in place and the source has sent everything.
    Complete,
    /// The connection broke (or went silent).
    LinkFailed(MigrateError),
    /// The migration cannot continue.
    Fatal(MigrateError),
    /// Completed and reported to the source (with the verification result, if verified).
    Done(Option<crate::verify::VerifyReport>),
}

impl DestShared {
    pub fn new(memory: Arc<GuestMemory>) -> Self {
        let regions = memory.regions();
        Self {
            received: regions
                .iter()
                .map(|r| AtomicBitmap::new(r.host_pages()))
                .collect(),
            claimed: regions
                .iter()
                .map(|r| {
                    AtomicBitmap::new(if r.backing().is_shared() {
                        r.host_pages()
                    } else {
                        0
                    })
                })
                .collect(),
            pending: regions
                .iter()
                .map(|r| (0..r.host_pages()).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            received_count: AtomicUsize::new(0),
            total: memory.total_host_pages(),
            uffd: OnceLock::new(),
            phase: AtomicU8::new(DestPhase::Precopy as u8),
            counters: Counters::default(),
            latency: LatencyHistogram::new(),
            epoch: Instant::now(),
            state: Mutex::new(Outcome::default()),
            changed: Condvar::new(),
            paused: AtomicBool::new(false),
            memory,
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 | 1
    }

    pub fn phase(&self) -> DestPhase {
        match self.phase.load(Acquire) {
            0 => DestPhase::Precopy,
            1 => DestPhase::Armed,
            2 => DestPhase::Running,
            _ => DestPhase::Ended,
        }
    }

    pub fn set_phase(&self, p: DestPhase) {
        self.phase.store(p as u8, Release);
        if p == DestPhase::Ended {
            self.lock().ended = true;
            self.changed.notify_all();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outcome> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a failure the migration cannot survive and wakes the coordinator.
    pub fn fail(&self, e: MigrateError) {
        let mut s = self.lock();
        if s.error.is_none() {
            tracing::warn!(error = %e, "destination failed");
            s.error = Some(e);
        }
        self.changed.notify_all();
    }

    /// Takes a failure recorded by [`fail`](Self::fail) that no event has reported yet.
    pub fn take_fatal(&self) -> Option<MigrateError> {
        self.lock().error.take()
    }

    /// Records a broken connection and wakes the coordinator.
    pub fn link_failed(&self, e: MigrateError) {
        let mut s = self.lock();
        if s.link_error.is_none() {
            tracing::info!(error = %e, "connection lost");
            s.link_error = Some(e);
        }
        self.changed.notify_all();
    }

    /// Routes a receiver's error: broken connections pause, everything else fails.
    pub fn report(&self, e: MigrateError) {
        if e.is_link_failure() {
            self.link_failed(e)
        } else {
            self.fail(e)
        }
    }

    /// Starts a new connection: forget the previous one's failure; an ended stream restarts.
    pub fn new_link(&self) {
        let mut s = self.lock();
        s.link_error = None;
        if s.ended && !s.complete {
            s.ended = false;
            self.phase.store(DestPhase::Running as u8, Release);
        }
    }

    /// Blocks until something the coordinator must act on happens.
    pub fn wait_event(&self) -> Event {
        let mut s = self.lock();
        loop {
            if let Some(e) = s.error.take() {
                return Event::Fatal(e);
            }
            if s.complete && s.ended {
                return Event::Complete;
            }
            if let Some(e) = s.link_error.take() {
                return Event::LinkFailed(e);
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Marks host pages `first..first+n` of region `r` as in place; records request latencies.
    pub fn mark_received(&self, r: usize, first: usize, n: usize) {
        let mut newly = 0;
        for hp in first..first + n {
            if !self.received[r].set(hp) {
                newly += 1;
            }
            let t = self.pending[r][hp].swap(0, AcqRel);
            if t != 0 {
                let now = self.now_ns();
                self.latency
                    .record(std::time::Duration::from_nanos(now.saturating_sub(t)));
            }
        }
        if newly > 0 {
            let count = self.received_count.fetch_add(newly, AcqRel) + newly;
            if count == self.total {
                let mut s = self.lock();
                s.complete = true;
                self.changed.notify_all();
            }
        }
    }

    /// Marks pages dropped (discard): they must arrive again.
    pub fn mark_discarded(&self, r: usize, first: usize, n: usize) {
        let mut dropped = 0;
        for hp in first..first + n {
            if self.received[r].clear(hp) {
                dropped += 1;
            }
        }
        self.received_count.fetch_sub(dropped, AcqRel);
    }

    /// Places `data` (whole host pages, page-aligned) at `offset` of `region` with one atomic
    /// userfaultfd copy per missing host page; pages already present are skipped.
    pub fn place(
        &self,
        region: &GuestRegion,
        offset: usize,
        data: &[u8],
        lane: Lane,
    ) -> Result<(), MigrateError> {
        let uffd = self.uffd.get().ok_or_else(|| {
            MigrateError::Internal("placement before userfaultfd was armed".into())
        })?;
        let page = region.host_page_size();
        let dst = region.base_addr() + offset;
        let placed = if region.backing() == Backing::TransparentHuge {
            // `data` is a THP staging buffer (see Staging): its pages move, whole.
            uffd.move_pages(dst, data.as_ptr() as usize, data.len(), page, true)?
        } else {
            uffd.copy(dst, data, page, true)?
        };
        let pages = data.len() / page;
        let skipped = pages - placed / page;
        if skipped > 0 {
            self.counters
                .duplicate_pages
                .fetch_add(skipped as u64, Relaxed);
        }
        self.counters
            .add_pages(lane, pages as u64, data.len() as u64);
        self.mark_received(region.id() as usize, offset / page, pages);
        Ok(())
    }

    /// Maps zero pages over the still-missing host pages of `[offset, offset+len)` of a
    /// private region atomically, waking faulting vCPUs; returns the bytes newly mapped.
    fn fill_zero(
        &self,
        region: &GuestRegion,
        offset: usize,
        len: usize,
        staging: &mut Staging,
    ) -> Result<usize, MigrateError> {
        let uffd = self.uffd.get().ok_or_else(|| {
            MigrateError::Internal("placement before userfaultfd was armed".into())
        })?;
        let page = region.host_page_size();
        let dst = region.base_addr() + offset;
        if region.backing() != Backing::TransparentHuge {
            return Ok(uffd.zeropage(dst, len, page, true)?);
        }
        // `UFFDIO_ZEROPAGE` (or a copy of zeros) would map 4 KiB pages and the range would
        // never be huge again: move freshly zeroed huge pages in instead (the kernel's zeroing
        // costs what the guest's first write fault would have).
        let mut placed = 0;
        for chunk in (0..len).step_by(page) {
            let buf = staging.zeroed(page)?;
            placed += uffd.move_pages(dst + chunk, buf.as_ptr() as usize, page, page, true)?;
        }
        staging.restock(Backing::TransparentHuge);
        Ok(placed)
    }

    /// A vCPU faulted on host page `hp` of `region`, which is in place as far as the source
    /// is concerned (received as zero during precopy and never populated, or placed just now):
    /// makes it present without the network (a shared region maps its file page; others get
    /// zero pages, whole huge pages for THP) and wakes the vCPU. Returns the bytes newly
    /// mapped (0: it was present already).
    pub fn install_local(
        &self,
        region: &GuestRegion,
        hp: usize,
        staging: &mut Staging,
    ) -> Result<usize, MigrateError> {
        let page = region.host_page_size();
        if region.backing().is_shared() {
            let uffd = self.uffd.get().ok_or_else(|| {
                MigrateError::Internal("placement before userfaultfd was armed".into())
            })?;
            let addr = region.base_addr() + hp * page;
            return Ok(uffd.continue_range(addr, page, page, true)?);
        }
        self.fill_zero(region, hp * page, page, staging)
    }

    /// Places zero pages atomically.
    pub fn place_zero(
        &self,
        region: &GuestRegion,
        offset: usize,
        len: usize,
        staging: &mut Staging,
    ) -> Result<(), MigrateError> {
        if region.backing().is_shared() {
            return super::alias::place_zero(self, region, offset, len, staging);
        }
        let placed = self.fill_zero(region, offset, len, staging)?;
        let page = region.host_page_size();
        // As for data pages: a page the other receiver placed first is a duplicate.
        self.counters
            .zero_pages
            .fetch_add((placed / page) as u64, Relaxed);
        self.counters
            .duplicate_pages
            .fetch_add(((len - placed) / page) as u64, Relaxed);
        self.mark_received(region.id() as usize, offset / page, len / page);
        Ok(())
    }
}

/// Page-aligned buffers a receiver reads payloads into before placing them: a plain one for
/// `UFFDIO_COPY`, and a THP-aligned one for `UFFDIO_MOVE` into transparent-huge-page regions
/// (moving a whole 2 MiB page keeps it huge; copying would split it into 512 small pages).
///
/// A move takes the THP buffer's pages away, so the next record needs fresh huge pages, and
/// allocating (zeroing, sometimes compacting for) one costs 0.1 to several milliseconds.
/// [`Staging::restock`] pays that right after a placement, off the next request's path.
pub(crate) struct Staging {
    copy: Option<Mapping>,
    thp: Option<Mapping>,
    /// How much of the THP buffer (from its start) was handed out, or never populated, since
    /// it was last restocked: that prefix may be written or missing (0: all fresh zero pages).
    thp_dirty: usize,
    /// Which host pages of the record being placed this receiver claimed (shared regions).
    pub claims: Vec<bool>,
}

impl Staging {
    pub fn new() -> Self {
        Self {
            copy: None,
            thp: None,
            thp_dirty: 0,
            claims: Vec::new(),
        }
    }

    /// A THP buffer of `len` bytes of fresh zeroed (and present) huge pages, to move in as
    /// zero pages.
    pub fn zeroed(&mut self, len: usize) -> Result<&mut [u8], MigrateError> {
        let stocked = self.thp_dirty == 0 && self.thp.as_ref().is_some_and(|m| m.len() >= len);
        self.get(len, Backing::TransparentHuge)?;
        if !stocked {
            self.thp
                .as_ref()
                .expect("get allocated it")
                .fresh_zeroed(len)?;
        }
        self.get(len, Backing::TransparentHuge)
    }

    /// After the THP buffer's pages were moved away: allocate fresh zeroed huge pages for the
    /// next record now, for the part used since the last restock only. A no-op for other
    /// backings (their buffer keeps its pages). Failing (out of memory) is not an error: the
    /// next record then allocates as it is read.
    pub fn restock(&mut self, backing: Backing) {
        if backing != Backing::TransparentHuge || self.thp_dirty == 0 {
            return;
        }
        if let Some(m) = &self.thp {
            match m.fresh_zeroed(self.thp_dirty) {
                Ok(()) => self.thp_dirty = 0,
                Err(e) => tracing::debug!(error = %e, "restocking the THP staging buffer"),
            }
        }
    }

    /// A buffer of exactly `len` bytes for a record of a region with `backing`.
    pub fn get(&mut self, len: usize, backing: Backing) -> Result<&mut [u8], MigrateError> {
        let thp = backing == Backing::TransparentHuge;
        let (slot, kind) = if thp {
            (&mut self.thp, Backing::TransparentHuge)
        } else {
            (&mut self.copy, Backing::Anonymous)
        };
        if slot.as_ref().is_none_or(|m| m.len() < len) {
            let size = len.next_power_of_two().max(HUGE_PAGE_SIZE);
            *slot = Some(Mapping::new("staging", size, kind)?);
            if thp {
                // A new mapping's pages are not there yet.
                self.thp_dirty = size;
            }
        }
        if thp {
            // The caller writes into it or moves its pages away.
            self.thp_dirty = self.thp_dirty.max(len);
        }
        let m = slot.as_ref().expect("just allocated");
        // SAFETY: the mapping is private to this Staging, at least `len` bytes long and mapped
        // read/write for as long as `self` lives; `&mut self` makes this the only reference.
        Ok(unsafe { std::slice::from_raw_parts_mut(m.as_ptr(), len) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the page at `addr` is resident (`mincore`).
    fn resident(addr: usize) -> bool {
        let mut v = 0u8;
        // SAFETY: `addr` is page-aligned inside a live mapping owned by the test; mincore writes
        // one byte for one page.
        let r = unsafe { libc::mincore(addr as *mut libc::c_void, 4096, &mut v) };
        assert_eq!(r, 0);
        v & 1 != 0
    }

    #[test]
    fn thp_staging_is_restocked_with_zero_pages_after_a_move() {
        let mut st = Staging::new();
        let len = HUGE_PAGE_SIZE;
        let buf = st.get(len, Backing::TransparentHuge).unwrap();
        buf.fill(0xAB);
        let addr = buf.as_ptr() as usize;
        // What a UFFDIO_MOVE leaves behind: the pages are gone.
        // SAFETY: `addr..addr+len` is the staging mapping, alive while `st` is.
        assert_eq!(
            unsafe { libc::madvise(addr as *mut _, len, libc::MADV_DONTNEED) },
            0
        );
        assert!(!resident(addr));

        st.restock(Backing::TransparentHuge);
        assert!(
            resident(addr) && resident(addr + len - 4096),
            "restock allocates now"
        );
        let z = st.zeroed(len).unwrap();
        assert!(z.iter().all(|&b| b == 0), "restocked pages read as zero");
        // Written data must never be passed off as zero: without a restock, `zeroed` zeroes.
        z.fill(0xCD);
        assert!(
            st.thp_dirty > 0,
            "handing the buffer out consumes the stock"
        );
        let z = st.zeroed(len).unwrap();
        assert!(z.iter().all(|&b| b == 0));

        // Restocking other backings is a no-op.
        st.restock(Backing::Anonymous);
        assert!(st.copy.is_none());
    }
}
