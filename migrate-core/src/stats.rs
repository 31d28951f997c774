//! Counters and page-request latency histograms, shared by the engine's threads.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Which sender channel a page travelled on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    Bulk,
    Urgent,
}

/// Atomic counters of one side of a migration. Cheap to update from any thread.
#[derive(Debug, Default)]
pub struct Counters {
    pub pages_bulk: AtomicU64,
    pub pages_urgent: AtomicU64,
    pub bytes_bulk: AtomicU64,
    pub bytes_urgent: AtomicU64,
    pub zero_pages: AtomicU64,
    /// Page requests sent (destination) or received (source).
    pub requests: AtomicU64,
    /// Faults that found a request for their host page already in flight.
    pub duplicate_requests: AtomicU64,
    /// Requests for pages a sender had already handed to the kernel (vanilla leaves them to
    /// the bulk stream; the preempt modes send bulk ones urgently too, as rescues).
    pub requests_already_sent: AtomicU64,
    /// Pages that arrived although they were already in place (skipped, harmless).
    pub duplicate_pages: AtomicU64,
    /// Faults resolved locally (a page received as zero during precopy and never populated).
    pub local_zero_faults: AtomicU64,
    pub precopy_passes: AtomicU64,
    pub discarded_pages: AtomicU64,
    /// Pages the source pushed ahead on the urgent channel for a sequential fault stream.
    pub prefetched_pages: AtomicU64,
    /// Requested pages sent on the urgent channel although the bulk stream had taken them
    /// first (still in its queue, the kernel's, or the destination's receive buffer).
    pub rescued_pages: AtomicU64,
}

impl Counters {
    pub fn add_pages(&self, lane: Lane, pages: u64, bytes: u64) {
        match lane {
            Lane::Bulk => {
                self.pages_bulk.fetch_add(pages, Relaxed);
                self.bytes_bulk.fetch_add(bytes, Relaxed);
            }
            Lane::Urgent => {
                self.pages_urgent.fetch_add(pages, Relaxed);
                self.bytes_urgent.fetch_add(bytes, Relaxed);
            }
        }
    }

    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            pages_bulk: self.pages_bulk.load(Relaxed),
            pages_urgent: self.pages_urgent.load(Relaxed),
            bytes_bulk: self.bytes_bulk.load(Relaxed),
            bytes_urgent: self.bytes_urgent.load(Relaxed),
            zero_pages: self.zero_pages.load(Relaxed),
            requests: self.requests.load(Relaxed),
            duplicate_requests: self.duplicate_requests.load(Relaxed),
            requests_already_sent: self.requests_already_sent.load(Relaxed),
            duplicate_pages: self.duplicate_pages.load(Relaxed),
            local_zero_faults: self.local_zero_faults.load(Relaxed),
            precopy_passes: self.precopy_passes.load(Relaxed),
            discarded_pages: self.discarded_pages.load(Relaxed),
            prefetched_pages: self.prefetched_pages.load(Relaxed),
            rescued_pages: self.rescued_pages.load(Relaxed),
        }
    }
}

/// Plain copy of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CountersSnapshot {
    pub pages_bulk: u64,
    pub pages_urgent: u64,
    pub bytes_bulk: u64,
    pub bytes_urgent: u64,
    pub zero_pages: u64,
    pub requests: u64,
    pub duplicate_requests: u64,
    pub requests_already_sent: u64,
    pub duplicate_pages: u64,
    pub local_zero_faults: u64,
    pub precopy_passes: u64,
    pub discarded_pages: u64,
    pub prefetched_pages: u64,
    pub rescued_pages: u64,
}

/// A thread-safe latency histogram (nanosecond resolution, 3 significant digits).
pub struct LatencyHistogram {
    inner: Mutex<Histogram<u64>>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.summary().count)
            .finish()
    }
}

const MAX_TRACKED_NS: u64 = 600_000_000_000;

impl LatencyHistogram {
    pub fn new() -> Self {
        let h = Histogram::new_with_bounds(1, MAX_TRACKED_NS, 3)
            .expect("static histogram bounds are valid");
        Self {
            inner: Mutex::new(h),
        }
    }

    pub fn record(&self, d: Duration) {
        let ns = (d.as_nanos() as u64).clamp(1, MAX_TRACKED_NS);
        self.lock().saturating_record(ns);
    }

    pub fn merge(&self, other: &LatencyHistogram) {
        let o = other.lock().clone();
        // Same bounds on both sides: adding cannot fail.
        let _ = self.lock().add(&o);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Histogram<u64>> {
        // A poisoned lock only means a recorder panicked mid-record; the counts stay usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn summary(&self) -> LatencySummary {
        LatencySummary::from_histogram(&self.lock())
    }
}

/// One log2 bucket `[lo, hi)` in microseconds (`lo == hi` for the `[0]` and `[1]` rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Bucket {
    pub lo_us: u64,
    pub hi_us: u64,
    pub count: u64,
}

/// Percentiles and log2 buckets of a latency histogram, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub avg: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub buckets: Vec<Bucket>,
}

fn bucket_index(us: u64) -> usize {
    // [0] → 0, [1] → 1, [2,4) → 2, [4,8) → 3, ...
    if us == 0 {
        0
    } else {
        64 - us.leading_zeros() as usize
    }
}

fn bucket_bounds(i: usize) -> (u64, u64) {
    match i {
        0 => (0, 0),
        1 => (1, 1),
        i => (1 << (i - 1), 1 << i),
    }
}

impl LatencySummary {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        let mut counts = [0u64; 64];
        for v in h.iter_recorded() {
            let value_us = h.median_equivalent(v.value_iterated_to()) / 1000;
            counts[bucket_index(value_us)] += v.count_at_value();
        }
        let first = counts.iter().position(|&c| c > 0).unwrap_or(0);
        let last = counts.iter().rposition(|&c| c > 0).unwrap_or(0);
        let buckets = (first..=last)
            .map(|i| {
                let (lo_us, hi_us) = bucket_bounds(i);
                Bucket {
                    lo_us,
                    hi_us,
                    count: counts[i],
                }
            })
            .collect();
        Self {
            count: h.len(),
            avg: h.mean() / 1000.0,
            p50: us(h.value_at_quantile(0.50)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            buckets,
        }
    }

    /// The histogram in the reference's format: `Average: N (us)`, `@delay_us:` and one row per
    /// log2 bucket with a bar of up to 52 `@`s.
    pub fn render(&self) -> String {
        let mut out = format!("Average: {:.0} (us)\n@delay_us:\n", self.avg);
        let peak = self
            .buckets
            .iter()
            .map(|b| b.count)
            .max()
            .unwrap_or(0)
            .max(1);
        for b in &self.buckets {
            let label = if b.lo_us == b.hi_us {
                format!("[{}]", human(b.lo_us))
            } else {
                format!("[{}, {})", human(b.lo_us), human(b.hi_us))
            };
            let width = (b.count * 52).div_ceil(peak) as usize;
            let width = if b.count == 0 { 0 } else { width };
            out.push_str(&format!(
                "{label:<14} {:>8} |{:<52}|\n",
                b.count,
                "@".repeat(width)
            ));
        }
        out
    }
}

fn human(v: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
    for (size, suffix) in UNITS {
        if v >= size && v.is_multiple_of(size) {
            return format!("{}{suffix}", v / size);
        }
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_percentiles() {
        let h = LatencyHistogram::new();
        for _ in 0..90 {
            h.record(Duration::from_micros(150));
        }
        for _ in 0..10 {
            h.record(Duration::from_micros(9000));
        }
        h.record(Duration::from_nanos(300));
        let s = h.summary();
        assert_eq!(s.count, 101);
        assert!((149.0..151.0).contains(&s.p50), "{s:?}");
        assert!(s.p99 > 8900.0, "{s:?}");
        let b128 = s.buckets.iter().find(|b| b.lo_us == 128).unwrap();
        assert_eq!((b128.hi_us, b128.count), (256, 90));
        let b8k = s.buckets.iter().find(|b| b.lo_us == 8192).unwrap();
        assert_eq!(b8k.count, 10);
        assert_eq!(
            s.buckets[0],
            Bucket {
                lo_us: 0,
                hi_us: 0,
                count: 1
            }
        );
        let text = s.render();
        assert!(text.starts_with("Average: "), "{text}");
        assert!(text.contains("[128, 256)"), "{text}");
        assert!(text.contains("[8K, 16K)"), "{text}");
        assert!(text.contains(&format!("|{}|", "@".repeat(52))), "{text}");
    }

    #[test]
    fn empty_and_merge() {
        let a = LatencyHistogram::new();
        assert_eq!(a.summary().count, 0);
        assert_eq!(a.summary().render(), "Average: 0 (us)\n@delay_us:\n");
        let b = LatencyHistogram::new();
        b.record(Duration::from_micros(20));
        a.merge(&b);
        assert_eq!(a.summary().count, 1);
        assert_eq!(bucket_index(20), 5);
        assert_eq!(bucket_bounds(5), (16, 32));
    }
}

/// Transport counters of one sender channel, as reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChannelStats {
    pub frames: u64,
    pub bytes: u64,
    /// Send SQEs (each may carry many frames).
    pub sends: u64,
    /// `io_uring_enter` calls made by the sender.
    pub submits: u64,
    pub zc_sends: u64,
    /// Zero-copy sends the kernel reported as copied (always, on loopback and veth).
    pub zc_copied: u64,
    pub short_sends: u64,
}

impl From<uring_net::SendStatsSnapshot> for ChannelStats {
    fn from(s: uring_net::SendStatsSnapshot) -> Self {
        Self {
            frames: s.frames,
            bytes: s.bytes,
            sends: s.sends,
            submits: s.submits,
            zc_sends: s.zc_sends,
            zc_copied: s.zc_copied,
            short_sends: s.short_sends,
        }
    }
}
