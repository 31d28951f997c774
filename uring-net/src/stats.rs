//! Send-side counters, readable from other threads.

use std::sync::atomic::{AtomicU64, Ordering};

/// Atomic counters updated by one [`FrameSender`](crate::FrameSender) and readable anywhere.
#[derive(Debug, Default)]
pub struct SendStats {
    /// Frames pushed.
    pub frames: AtomicU64,
    /// Bytes the kernel accepted (sum of positive send results).
    pub bytes: AtomicU64,
    /// Data send SQEs submitted (including short-send resubmissions).
    pub sends: AtomicU64,
    /// `io_uring_enter` calls made by the sender.
    pub submits: AtomicU64,
    /// Zero-copy send SQEs submitted.
    pub zc_sends: AtomicU64,
    /// Zero-copy notifications reporting `IORING_NOTIF_USAGE_ZC_COPIED` (kernel copied anyway;
    /// always the case on loopback).
    pub zc_copied: AtomicU64,
    /// Send completions that transferred fewer bytes than requested.
    pub short_sends: AtomicU64,
    /// Data send completions reaped (not counting notifications).
    pub completions: AtomicU64,
    /// Zero-copy notifications reaped.
    pub notifications: AtomicU64,
}

/// A plain copy of [`SendStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendStatsSnapshot {
    /// See [`SendStats::frames`].
    pub frames: u64,
    /// See [`SendStats::bytes`].
    pub bytes: u64,
    /// See [`SendStats::sends`].
    pub sends: u64,
    /// See [`SendStats::submits`].
    pub submits: u64,
    /// See [`SendStats::zc_sends`].
    pub zc_sends: u64,
    /// See [`SendStats::zc_copied`].
    pub zc_copied: u64,
    /// See [`SendStats::short_sends`].
    pub short_sends: u64,
    /// See [`SendStats::completions`].
    pub completions: u64,
    /// See [`SendStats::notifications`].
    pub notifications: u64,
}

impl SendStats {
    /// Read every counter (each individually atomic; the set is not a consistent cut).
    pub fn snapshot(&self) -> SendStatsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SendStatsSnapshot {
            frames: r(&self.frames),
            bytes: r(&self.bytes),
            sends: r(&self.sends),
            submits: r(&self.submits),
            zc_sends: r(&self.zc_sends),
            zc_copied: r(&self.zc_copied),
            short_sends: r(&self.short_sends),
            completions: r(&self.completions),
            notifications: r(&self.notifications),
        }
    }

    pub(crate) fn load(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reads_counters() {
        let s = SendStats::default();
        SendStats::add(&s.frames, 3);
        SendStats::add(&s.bytes, 100);
        SendStats::add(&s.zc_copied, 1);
        let snap = s.snapshot();
        assert_eq!(snap.frames, 3);
        assert_eq!(snap.bytes, 100);
        assert_eq!(snap.zc_copied, 1);
        assert_eq!(snap.sends, 0);
    }
}
