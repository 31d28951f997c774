//! Serving a page request on the urgent channel (preempt and preempt-full): the same policy
//! whether the return-path thread sends the pages itself (preempt-full) or the scanner does
//! (preempt).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use uring_net::FrameSender;

use super::pages::{push_ahead, push_run, Run};
use super::prefetch::SeqDetector;
use super::shared::{Claims, Requested};
use crate::error::MigrateError;
use crate::memory::GuestRegion;
use crate::stats::{Counters, Lane};

/// Sends requested pages urgently and pushes ahead of sequential request streams.
pub(crate) struct UrgentServer {
    /// Largest page record (bytes).
    pub max_record: usize,
    /// Bytes pushed ahead of a sequential request stream (0: off).
    pub prefetch_bytes: usize,
    /// How long the requested pages may take to reach the kernel before a push-ahead.
    pub timeout: Duration,
    pub seq: SeqDetector,
}

impl UrgentServer {
    pub fn new(config: &crate::config::SourceConfig) -> Self {
        UrgentServer {
            max_record: config.max_record_bytes,
            prefetch_bytes: config.prefetch_bytes,
            timeout: config.link_timeout,
            seq: SeqDetector::default(),
        }
    }

    /// Serves a request for host pages `pages` of `region`: queues on `urgent` each page that
    /// nobody sent, or that the bulk stream still carries behind bulk data (a rescue; the
    /// destination keeps whichever copy arrives first), but not a page already sent urgently
    /// (see `Claims::claim_requested`; `accepted`: bytes of the bulk stream the kernel took).
    /// If the request continues a sequential stream, the requested pages go out first, in a
    /// send of their own, then the next `prefetch_bytes` are queued behind them.
    pub fn serve(
        &mut self,
        urgent: &mut FrameSender,
        claims: &Claims,
        region: &GuestRegion,
        pages: std::ops::Range<usize>,
        accepted: u64,
        counters: &Counters,
    ) -> Result<(), MigrateError> {
        let r = region.id() as usize;
        let last = pages.end.saturating_sub(1);
        for hp in pages {
            match claims.claim_requested(r, hp, accepted, counters) {
                Requested::Claimed => {}
                Requested::InBulkStream => {
                    counters.rescued_pages.fetch_add(1, Relaxed);
                }
                Requested::SentUrgently => continue,
            }
            let run = Run {
                region,
                first: hp,
                n: 1,
            };
            push_run(urgent, run, self.max_record, counters, Lane::Urgent, None)?;
        }
        let window = self.prefetch_bytes / region.host_page_size();
        if let Some(ahead) = self.seq.on_request(region.id(), last, window) {
            urgent.flush()?;
            urgent.drain(Some(self.timeout))?;
            let pushed = push_ahead(urgent, claims, region, ahead, self.max_record, counters)?;
            counters.prefetched_pages.fetch_add(pushed as u64, Relaxed);
        }
        Ok(())
    }
}
