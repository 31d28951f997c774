//! State the source's threads share: claim bits, the request queue, progress.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::*};
use std::sync::Mutex;

use crate::bitmap::AtomicBitmap;
use crate::memory::GuestMemory;
use crate::stats::Counters;

/// Phases the source reports through [`Progress`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourcePhase {
    Connecting = 0,
    Precopy = 1,
    Switchover = 2,
    Postcopy = 3,
    Finishing = 4,
    Done = 5,
    Failed = 6,
    /// Postcopy lost its connection; reconnecting.
    Paused = 7,
}

impl SourcePhase {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Connecting,
            1 => Self::Precopy,
            2 => Self::Switchover,
            3 => Self::Postcopy,
            4 => Self::Finishing,
            5 => Self::Done,
            7 => Self::Paused,
            _ => Self::Failed,
        }
    }
}

/// Live progress of a source, readable from any thread (progress bars, a VMM's monitor).
#[derive(Debug)]
pub struct Progress {
    phase: AtomicU8,
    pub pass: AtomicU64,
    /// Host pages still to send (as of the last pass boundary or postcopy scan step).
    pub pages_left: AtomicU64,
    pub total_pages: AtomicU64,
    /// Set by the VMM to end precopy at the next opportunity.
    pub go_postcopy: AtomicBool,
    pub counters: Counters,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            phase: AtomicU8::new(0),
            pass: AtomicU64::new(0),
            pages_left: AtomicU64::new(0),
            total_pages: AtomicU64::new(0),
            go_postcopy: AtomicBool::new(false),
            counters: Counters::default(),
        }
    }
}

impl Progress {
    pub fn phase(&self) -> SourcePhase {
        SourcePhase::from_u8(self.phase.load(Relaxed))
    }

    pub(crate) fn set_phase(&self, p: SourcePhase) {
        self.phase.store(p as u8, Relaxed);
    }
}

/// What a request finds when it claims its page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Requested {
    /// Nobody had sent it: the request's sender sends it now.
    Claimed,
    /// The bulk stream took it first and it is still on its way behind bulk data (in the
    /// sender's queue, the kernel's, or the destination's receive buffer): an urgent channel
    /// sends it again (a rescue; the destination keeps whichever copy arrives first).
    InBulkStream,
    /// Already sent on the urgent channel (an earlier request or a push-ahead): a second copy
    /// would only queue behind the first.
    SentUrgently,
}

/// Claim bits: bit set = the host page still has to be sent. Whoever clears it sends it.
pub(crate) struct Claims {
    pub to_send: Vec<AtomicBitmap>,
    /// Per host page claimed by the bulk stream: the bulk stream offset (header and payload
    /// bytes pushed on this connection) at which its record ends; `u64::MAX` from the claim
    /// until the record is queued. Compared with the bytes the kernel has accepted, it tells
    /// whether a requested page is still waiting in the sender's queue.
    pub bulk_end: Vec<Box<[AtomicU64]>>,
}

impl Claims {
    /// Claims host page `hp` of region `r` for the urgent channel (false: someone else has).
    pub fn claim_for_urgent(&self, r: usize, hp: usize) -> bool {
        let claimed = self.to_send[r].clear(hp);
        if claimed {
            // An offset left from an earlier bulk send of this page is not this copy.
            self.bulk_end[r][hp].store(0, Release);
        }
        claimed
    }

    /// Whether the bulk stream took host page `hp` of region `r` on this connection (as
    /// opposed to an urgent send, or a connection before a reconnect).
    pub fn taken_by_bulk(&self, r: usize, hp: usize) -> bool {
        self.bulk_end[r][hp].load(Acquire) != 0
    }

    /// Who sends a requested host page (the kernel has accepted `accepted` bytes of the bulk
    /// stream so far). Counts requests for pages already handed to the kernel.
    pub fn claim_requested(
        &self,
        r: usize,
        hp: usize,
        accepted: u64,
        counters: &crate::stats::Counters,
    ) -> Requested {
        if self.claim_for_urgent(r, hp) {
            return Requested::Claimed;
        }
        if !self.stuck_in_bulk_queue(r, hp, accepted) {
            counters.requests_already_sent.fetch_add(1, Relaxed);
        }
        if self.taken_by_bulk(r, hp) {
            Requested::InBulkStream
        } else {
            Requested::SentUrgently
        }
    }

    /// Is host page `hp` of region `r`, claimed by the bulk stream, still queued in user space
    /// (not yet accepted by the kernel, which has accepted `accepted` bytes of this connection)?
    pub fn stuck_in_bulk_queue(&self, r: usize, hp: usize, accepted: u64) -> bool {
        self.bulk_end[r][hp].load(Acquire) > accepted
    }

    /// A new connection starts its stream offsets at zero.
    pub fn reset_bulk_offsets(&self) {
        for ends in &self.bulk_end {
            for e in ends.iter() {
                e.store(0, Relaxed);
            }
        }
    }

    /// After a broken connection: everything the destination does not have must be sent.
    pub fn rebuild_from_received(&self, region: usize, received: &AtomicBitmap) {
        let bits = &self.to_send[region];
        bits.set_all();
        for hp in received.iter_ones() {
            bits.clear(hp);
        }
    }
}

impl Claims {
    pub fn new(memory: &GuestMemory) -> Self {
        Self {
            to_send: memory
                .regions()
                .iter()
                .map(|r| AtomicBitmap::new_full(r.host_pages()))
                .collect(),
            bulk_end: memory
                .regions()
                .iter()
                .map(|r| (0..r.host_pages()).map(|_| AtomicU64::new(0)).collect())
                .collect(),
        }
    }

    pub fn remaining(&self) -> u64 {
        self.to_send.iter().map(|b| b.count_ones() as u64).sum()
    }
}

/// Requests handed from the return-path thread to the scanner (vanilla and preempt).
#[derive(Default)]
pub(crate) struct RequestQueue {
    queue: Mutex<VecDeque<(u16, usize, usize)>>,
    pending: AtomicBool,
}

impl RequestQueue {
    pub fn push(&self, region: u16, first_hp: usize, pages: usize) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((region, first_hp, pages));
        self.pending.store(true, Release);
    }

    /// Takes everything queued; cheap when empty.
    pub fn take(&self, out: &mut Vec<(u16, usize, usize)>) {
        if !self.pending.swap(false, Acquire) {
            return;
        }
        out.extend(
            self.queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..),
        );
    }
}

/// How the return path ended.
#[derive(Debug, Default)]
pub(crate) struct Finish {
    pub done: AtomicBool,
    /// 0 = no verification, 1 = failed, 2 = passed.
    pub verified: AtomicU8,
    pub error: Mutex<Option<crate::error::MigrateError>>,
}

impl Finish {
    /// Takes the return-path thread's error, if it stopped with one.
    pub fn take_error(&self) -> Option<crate::error::MigrateError> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    pub fn verified(&self) -> Option<bool> {
        match self.verified.load(Acquire) {
            1 => Some(false),
            2 => Some(true),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Backing, RegionSpec};

    #[test]
    fn who_took_a_page_decides_whether_a_request_rescues_it() {
        let mem = GuestMemory::allocate(&[RegionSpec {
            name: "ram".into(),
            size: 16 * 4096,
            backing: Backing::Anonymous,
        }])
        .unwrap();
        let c = Claims::new(&mem);
        // The bulk stream claims page 1 (u64::MAX until queued, then its record's end).
        assert!(c.to_send[0].clear(1));
        c.bulk_end[0][1].store(u64::MAX, Release);
        assert!(c.taken_by_bulk(0, 1) && c.stuck_in_bulk_queue(0, 1, 0));
        c.bulk_end[0][1].store(8192, Release);
        assert!(c.stuck_in_bulk_queue(0, 1, 4096) && !c.stuck_in_bulk_queue(0, 1, 8192));
        assert!(
            c.taken_by_bulk(0, 1),
            "still on its way behind bulk data: rescue"
        );
        assert!(!c.claim_for_urgent(0, 1), "claimed once only");

        // An urgent claim (a request or a push-ahead) forgets an older bulk send of the page.
        c.to_send[0].set(2);
        c.bulk_end[0][2].store(4096, Release);
        assert!(c.claim_for_urgent(0, 2));
        assert!(
            !c.taken_by_bulk(0, 2),
            "already sent urgently: no second copy"
        );
        assert!(!c.claim_for_urgent(0, 2));

        // A request sorts pages the same way, counting those the kernel already had.
        let counters = crate::stats::Counters::default();
        c.to_send[0].set(3);
        assert_eq!(c.claim_requested(0, 3, 0, &counters), Requested::Claimed);
        assert_eq!(
            c.claim_requested(0, 3, 0, &counters),
            Requested::SentUrgently
        );
        assert_eq!(
            c.claim_requested(0, 1, 4096, &counters),
            Requested::InBulkStream
        );
        assert_eq!(
            counters.requests_already_sent.load(Relaxed),
            1,
            "page 3 only"
        );
        assert_eq!(
            c.claim_requested(0, 1, 8192, &counters),
            Requested::InBulkStream
        );
        assert_eq!(counters.requests_already_sent.load(Relaxed), 2);

        // After a reconnect nothing counts as taken by this connection's bulk stream.
        c.reset_bulk_offsets();
        assert!(!c.taken_by_bulk(0, 1));
        assert_eq!(
            c.claim_requested(0, 1, 0, &counters),
            Requested::SentUrgently
        );
    }
}
