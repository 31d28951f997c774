//! The RAM scanner: precopy passes over the dirty log, switchover, then the background postcopy
//! stream. It owns the bulk sender (and, in preempt mode, the urgent sender).

use std::sync::atomic::Ordering::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

use uring_net::FrameSender;

use super::pages::{push_run, BulkOffsets, Run};
use super::shared::{Claims, Finish, Progress, RequestQueue, Requested, SourcePhase};
use super::SourceControl;
use crate::bitmap::AtomicBitmap;
use crate::config::{Mode, SourceConfig};
use crate::dirty::DirtyLog;
use crate::error::MigrateError;
use crate::memory::GuestMemory;
use crate::protocol::{DiscardEntry, Record, MAX_DISCARD_PAYLOAD};
use crate::stats::Lane;
use crate::verify::region_digests;

pub(crate) struct Scanner {
    pub memory: Arc<GuestMemory>,
    pub config: SourceConfig,
    pub claims: Arc<Claims>,
    pub bulk: FrameSender,
    /// The urgent sender, in preempt mode only.
    pub urgent: Option<FrameSender>,
    pub requests: Arc<RequestQueue>,
    pub progress: Arc<Progress>,
    pub finish: Arc<Finish>,
    /// Scan cursor per region (moved by the page hint).
    pub cursor: Vec<usize>,
    /// Host page just after the last served request, per region (page hint).
    pub hint: Arc<Vec<std::sync::atomic::AtomicUsize>>,
    pub scratch: Vec<(u16, usize, usize)>,
    pub last_ping: Instant,
    /// Sends requested pages urgently (preempt mode).
    pub server: super::serve::UrgentServer,
    pub pacer: Arc<super::pacing::Pacer>,
    /// Set once the guest was paused: from then on a broken connection pauses the migration
    /// instead of cancelling it (once the destination may run the guest, see `dest_may_run`).
    pub switched: bool,
    /// Bulk stream offset at the end of the `Postcopy` record, once it was pushed.
    pub postcopy_end: Option<u64>,
    /// Latched once the destination may run the guest (see `dest_may_run`): offsets restart on
    /// a new connection, the point of no return does not.
    pub past_no_return: bool,
}

/// What the precopy phase measured.
#[derive(Debug, Default, Clone)]
pub(crate) struct PrecopyOutcome {
    pub passes: u32,
    pub bytes: u64,
    pub elapsed: Duration,
    pub downtime: Duration,
}

impl Scanner {
    fn check_failed(&self) -> Result<(), MigrateError> {
        match self.finish.take_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Whether the destination may have the `Postcopy` record (and so may run the guest):
    /// once the kernel accepted all of it, the source can no longer tell, and must not run
    /// the guest itself again.
    pub fn dest_may_run(&mut self) -> bool {
        if !self.past_no_return {
            if let Some(end) = self.postcopy_end {
                // Let the kernel finish what it holds first; if it does not say in time, the
                // record may be out: assume the destination has it.
                let settled = self.bulk.settle(Duration::from_secs(1));
                self.past_no_return = !settled || self.bulk.accepted_bytes() >= end;
            }
        }
        self.past_no_return
    }

    /// Queues a payload-less record (command) on the bulk stream.
    fn push_command(&mut self, rec: Record) -> Result<(), MigrateError> {
        Ok(self.bulk.push(&rec.encode(), &[])?)
    }

    /// Sends a ping when the last one is older than the heartbeat interval; the destination
    /// answers on the return path, so both sides see traffic even when no pages flow.
    fn heartbeat(&mut self) -> Result<(), MigrateError> {
        if self.last_ping.elapsed() >= self.config.heartbeat {
            self.last_ping = Instant::now();
            self.push_command(Record::Ping)?;
            self.bulk.flush()?;
        }
        Ok(())
    }

    /// Waits while the bulk sender holds more than the allowed backlog, serving requests.
    fn backpressure(&mut self) -> Result<(), MigrateError> {
        let mut stalled = Instant::now();
        let mut last_backlog = usize::MAX;
        loop {
            self.heartbeat()?;
            self.pacer.tick(self.bulk.accepted_bytes());
            self.serve_requests()?;
            if let Some(u) = self.urgent.as_mut() {
                u.poll()?;
            }
            self.bulk.poll()?;
            if self.bulk.backlog_bytes() <= self.config.bulk_backlog {
                return Ok(());
            }
            if self.bulk.backlog_bytes() < last_backlog {
                last_backlog = self.bulk.backlog_bytes();
                stalled = Instant::now();
            } else if stalled.elapsed() > self.config.link_timeout {
                return Err(MigrateError::Link(format!(
                    "the bulk channel made no progress for {:?}",
                    self.config.link_timeout
                )));
            }
            // Everything queued must be on its way before we sleep on its completion; a send
            // that completed inline during the flush leaves nothing to wait for (waiting
            // anyway slept the full timeout once per record when the limit was below one
            // record: 50 ms stalls).
            self.bulk.flush()?;
            if self.bulk.backlog_bytes() > self.config.bulk_backlog {
                self.bulk.wait(Some(Duration::from_millis(50)))?;
            }
            self.check_failed()?;
        }
    }

    /// Vanilla and preempt: send what the return-path thread queued.
    fn serve_requests(&mut self) -> Result<(), MigrateError> {
        if self.config.mode == Mode::PreemptFull {
            return Ok(());
        }
        let mut reqs = std::mem::take(&mut self.scratch);
        self.requests.take(&mut reqs);
        if reqs.is_empty() {
            self.scratch = reqs;
            return Ok(());
        }
        let counters = &self.progress.counters;
        let accepted = self.bulk.accepted_bytes();
        for &(r, first, n) in &reqs {
            let region = &self.memory.regions()[r as usize];
            match self.urgent.as_mut() {
                // Preempt: on the urgent channel, like preempt-full's return path.
                Some(u) => {
                    let pages = first..first + n;
                    self.server
                        .serve(u, &self.claims, region, pages, accepted, counters)?;
                }
                // Vanilla: next on the bulk stream (a page it already took stays there).
                None => {
                    for hp in first..first + n {
                        if self
                            .claims
                            .claim_requested(r as usize, hp, accepted, counters)
                            == Requested::Claimed
                        {
                            let run = Run {
                                region,
                                first: hp,
                                n: 1,
                            };
                            let ends = BulkOffsets(&self.claims.bulk_end[r as usize]);
                            let max = self.config.max_record_bytes;
                            push_run(&mut self.bulk, run, max, counters, Lane::Bulk, Some(ends))?;
                        }
                    }
                }
            }
        }
        match self.urgent.as_mut() {
            Some(u) => {
                u.flush()?;
                u.poll()?;
                // Pacing the bulk socket may take its lock: only once the pages are out.
                self.pacer.on_request();
            }
            None => self.bulk.flush()?,
        }
        reqs.clear();
        self.scratch = reqs;
        Ok(())
    }

    /// Should precopy end now (time limit or the VMM's "go postcopy")?
    fn precopy_over(&self, start: Instant) -> bool {
        start.elapsed() >= self.config.precopy.max_time || self.progress.go_postcopy.load(Relaxed)
    }

    /// Claims and sends every page whose bit is set, one sweep over all regions.
    /// In precopy (`sent_once` given) the sweep stops early when precopy is over, and marks
    /// what it sent in `sent_once`. Returns the number of host pages this sweep sent.
    fn sweep(
        &mut self,
        sent_once: Option<(&[AtomicBitmap], Instant)>,
    ) -> Result<u64, MigrateError> {
        let postcopy = sent_once.is_none();
        let max_record = self.config.max_record_bytes;
        let mut sent = 0u64;
        for r in 0..self.memory.regions().len() {
            let region = self.memory.regions()[r].clone();
            let max_pages = (max_record / region.host_page_size()).max(1);
            let pages = region.host_pages();
            let mut hp = if postcopy { self.cursor[r] } else { 0 };
            let mut wrapped = !postcopy;
            loop {
                if postcopy && self.config.page_hint {
                    let h = self.hint[r].swap(usize::MAX, AcqRel);
                    if h != usize::MAX && h < pages {
                        hp = h;
                        wrapped = false;
                    }
                }
                let bits = &self.claims.to_send[r];
                let next = match bits.next_set(hp) {
                    Some(i) => Some(i),
                    None if !wrapped => {
                        wrapped = true;
                        bits.next_set(0)
                    }
                    None => None,
                };
                let Some(i) = next else { break };
                let mut n = 0;
                let ends = &self.claims.bulk_end[r];
                while n < max_pages && i + n < pages && bits.clear(i + n) {
                    ends[i + n].store(u64::MAX, Release);
                    n += 1;
                }
                if n > 0 {
                    if let Some((sent, _)) = sent_once {
                        sent[r].set_range(i, n);
                    }
                    push_run(
                        &mut self.bulk,
                        Run {
                            region: &region,
                            first: i,
                            n,
                        },
                        max_record,
                        &self.progress.counters,
                        Lane::Bulk,
                        Some(BulkOffsets(ends)),
                    )?;
                    sent += n as u64;
                    if postcopy {
                        self.progress.pages_left.fetch_sub(
                            (n as u64).min(self.progress.pages_left.load(Relaxed)),
                            Relaxed,
                        );
                    }
                }
                hp = i + n.max(1);
                self.cursor[r] = hp;
                self.backpressure()?;
                if let Some((_, start)) = sent_once {
                    if self.precopy_over(start) {
                        break;
                    }
                }
            }
        }
        self.bulk.flush()?;
        Ok(sent)
    }

    /// Precopy passes, then switchover. On return the destination runs the guest.
    pub fn precopy_and_switch(
        &mut self,
        dirty: &mut dyn DirtyLog,
        control: &mut dyn SourceControl,
    ) -> Result<PrecopyOutcome, MigrateError> {
        let start = Instant::now();
        let limits = self.config.precopy.clone();
        let sent_once: Vec<AtomicBitmap> = self
            .memory
            .regions()
            .iter()
            .map(|r| AtomicBitmap::new(r.host_pages()))
            .collect();
        dirty.start(&self.memory)?;
        self.progress.set_phase(SourcePhase::Precopy);
        let mut passes = 0;
        while passes < limits.max_passes {
            passes += 1;
            self.progress.pass.store(passes as u64, Relaxed);
            self.progress
                .counters
                .precopy_passes
                .store(passes as u64, Relaxed);
            self.sweep(Some((&sent_once, start)))?;
            for (r, region) in self.memory.regions().iter().enumerate() {
                dirty.collect(region, &self.claims.to_send[r])?;
            }
            let left = self.claims.remaining();
            self.progress.pages_left.store(left, Relaxed);
            tracing::debug!(pass = passes, dirty_left = left, "precopy pass done");
            if left <= limits.dirty_threshold
                || passes >= limits.max_passes
                || self.precopy_over(start)
            {
                break;
            }
        }
        // Switchover: pause, final sync, discard, postcopy, run.
        self.progress.set_phase(SourcePhase::Switchover);
        let pause_at = Instant::now();
        control.pause().map_err(MigrateError::Pause)?;
        self.switched = true;
        let paused_in = pause_at.elapsed();
        for (r, region) in self.memory.regions().iter().enumerate() {
            dirty.collect(region, &self.claims.to_send[r])?;
        }
        let synced_in = pause_at.elapsed();
        self.send_discards(&sent_once)?;
        self.push_command(Record::Postcopy)?;
        self.postcopy_end = Some(self.bulk.pushed_bytes());
        self.push_command(Record::Run)?;
        self.bulk.flush()?;
        let downtime = pause_at.elapsed();
        // The guest no longer writes: tracking can stop after the destination may run.
        dirty.stop(&self.memory)?;
        tracing::debug!(?paused_in, ?synced_in, ?downtime, "switchover");
        let left = self.claims.remaining();
        self.progress.pages_left.store(left, Relaxed);
        self.progress.set_phase(SourcePhase::Postcopy);
        let bulk_stats = self.bulk.stats().snapshot();
        Ok(PrecopyOutcome {
            passes,
            bytes: bulk_stats.bytes,
            elapsed: pause_at - start,
            downtime,
        })
    }

    /// Pages sent before but dirtied since: the destination drops them so they fault.
    fn send_discards(&mut self, sent_once: &[AtomicBitmap]) -> Result<(), MigrateError> {
        let max_entries = MAX_DISCARD_PAYLOAD as usize / crate::protocol::record::DISCARD_ENTRY_LEN;
        let mut entries: Vec<DiscardEntry> = Vec::new();
        let mut discarded = 0u64;
        for (r, region) in self.memory.regions().iter().enumerate() {
            let (dirty, sent) = (&self.claims.to_send[r], &sent_once[r]);
            let page = region.host_page_size() as u64;
            // Walk whichever set is smaller (pure postcopy: nothing was sent; after precopy:
            // little is dirty); a page is discarded if it is in both.
            let (walk, other) = if sent.count_ones() < dirty.count_ones() {
                (sent, dirty)
            } else {
                (dirty, sent)
            };
            let mut hp = 0;
            while let Some(i) = walk.next_set(hp) {
                if !other.test(i) {
                    hp = i + 1;
                    continue;
                }
                let mut j = i + 1;
                while j < region.host_pages()
                    && dirty.test(j)
                    && sent.test(j)
                    && j - i < u32::MAX as usize
                {
                    j += 1;
                }
                entries.push(DiscardEntry {
                    region: r as u16,
                    pages: (j - i) as u32,
                    offset: i as u64 * page,
                });
                discarded += (j - i) as u64;
                hp = j;
            }
        }
        for chunk in entries.chunks(max_entries) {
            let rec = Record::Discard {
                count: chunk.len() as u32,
            };
            let payload = uring_net::BufRef::from_vec(DiscardEntry::encode_all(chunk));
            self.bulk.push(&rec.encode(), &[payload])?;
        }
        self.progress
            .counters
            .discarded_pages
            .store(discarded, Relaxed);
        Ok(())
    }

    /// Postcopy: stream everything still unsent, then digests and end, then wait for the
    /// destination to report completion.
    pub fn postcopy(&mut self) -> Result<(), MigrateError> {
        while self.claims.remaining() > 0 {
            self.sweep(None)?;
        }
        self.progress.pages_left.store(0, Relaxed);
        self.progress.set_phase(SourcePhase::Finishing);
        if self.config.verify {
            self.send_digests()?;
        }
        self.push_command(Record::End)?;
        self.bulk.flush()?;
        while !self.finish.done.load(Acquire) {
            self.check_failed()?;
            self.heartbeat()?;
            self.serve_requests()?;
            if let Some(u) = self.urgent.as_mut() {
                u.poll()?;
            }
            self.bulk.wait(Some(Duration::from_millis(20)))?;
        }
        self.bulk.drain(Some(self.config.link_timeout))?;
        Ok(())
    }

    fn send_digests(&mut self) -> Result<(), MigrateError> {
        const PER_RECORD: usize = 64 << 10;
        for region in self.memory.regions().to_vec() {
            let page = region.host_page_size() as u64;
            let mut first = 0;
            while first < region.host_pages() {
                let n = PER_RECORD.min(region.host_pages() - first);
                let digests = region_digests(&region, first, n);
                let bytes: Vec<u8> = digests.iter().flat_map(|d| d.to_le_bytes()).collect();
                let rec = Record::Digests {
                    region: region.id(),
                    offset: first as u64 * page,
                    count: n as u32,
                };
                self.bulk
                    .push(&rec.encode(), &[uring_net::BufRef::from_vec(bytes)])?;
                first += n;
                self.backpressure()?;
            }
        }
        Ok(())
    }
}
