//! Adaptive pacing of the bulk stream while page requests are being served.
//!
//! On a shared bottleneck (one queue for both connections, e.g. a shaped link) urgent pages
//! wait behind whatever the bulk stream has queued there. While requests keep coming, the bulk
//! socket is paced (`SO_MAX_PACING_RATE`) a little below the rate it was achieving on its own,
//! so the bottleneck queue drains and urgent pages meet an empty queue; once requests stop,
//! the cap is lifted. No fixed throttle: the cap follows the measured rate.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uring_net::{set_pacing_rate, Stream};

/// Requests this recent keep the cap on.
const HOLD: Duration = Duration::from_millis(20);
/// Rate measurement window.
const WINDOW: Duration = Duration::from_millis(10);
/// A window must carry at least this much to count (startup and idle windows don't).
const MIN_WINDOW_BYTES: u64 = 1 << 20;
/// The cap is lifted for one window this often, to measure what the path carries now.
const PROBE_EVERY: Duration = Duration::from_millis(200);

pub(crate) struct Pacer {
    /// The bulk connection (a clone), to set the cap on; `None` when pacing is off.
    bulk: Mutex<Option<Stream>>,
    /// Fraction of the measured rate the bulk stream keeps while requests are served.
    headroom: f64,
    epoch: Instant,
    last_request_ns: AtomicU64,
    /// Unpaced bulk rate, bytes/s (EWMA).
    rate: AtomicU64,
    paced: AtomicBool,
    /// When the current cap was set (ns since `epoch`).
    paced_since_ns: AtomicU64,
    /// A probe (the cap lifted to measure the path) runs until then (ns since `epoch`):
    /// requests do not cap again before its window is measured.
    probe_until_ns: AtomicU64,
    /// The current measurement window: start (ns since `epoch`) and accepted bytes then.
    /// Only the scanner moves it.
    window_start_ns: AtomicU64,
    window_bytes: AtomicU64,
}

impl Pacer {
    pub fn new(headroom: f64) -> Self {
        Self {
            bulk: Mutex::new(None),
            headroom,
            epoch: Instant::now(),
            last_request_ns: AtomicU64::new(0),
            rate: AtomicU64::new(0),
            paced: AtomicBool::new(false),
            paced_since_ns: AtomicU64::new(0),
            probe_until_ns: AtomicU64::new(0),
            window_start_ns: AtomicU64::new(0),
            window_bytes: AtomicU64::new(0),
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn restart_window(&self, accepted: u64) {
        self.window_start_ns.store(self.now_ns(), Relaxed);
        self.window_bytes.store(accepted, Relaxed);
    }

    /// A new bulk connection (or none: pacing off).
    pub fn attach(&self, bulk: Option<Stream>) {
        *self.bulk.lock().unwrap_or_else(|p| p.into_inner()) = bulk;
        self.paced.store(false, Release);
        self.restart_window(0);
    }

    fn set(&self, rate: Option<u64>) {
        if let Some(s) = self.bulk.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            if let Err(e) = set_pacing_rate(s, rate) {
                tracing::debug!(error = %e, "could not set the bulk pacing rate");
            }
        }
    }

    /// Called by whoever serves a request on the urgent channel.
    pub fn on_request(&self) {
        let now = self.now_ns();
        self.last_request_ns.store(now, Release);
        if self.paced.load(Acquire) || now < self.probe_until_ns.load(Acquire) {
            return;
        }
        let rate = self.rate.load(Acquire);
        if rate > 0 && !self.paced.swap(true, AcqRel) {
            self.paced_since_ns.store(now, Release);
            self.set(Some((rate as f64 * self.headroom) as u64));
        }
    }

    /// Called by the scanner with its bulk sender's accepted-bytes counter, after every
    /// record: lock-free unless a window ends or the cap changes.
    pub fn tick(&self, accepted: u64) {
        let paced = self.paced.load(Acquire);
        let now = self.now_ns();
        let elapsed = now.saturating_sub(self.window_start_ns.load(Relaxed));
        if elapsed >= WINDOW.as_nanos() as u64 {
            // Only unpaced, busy windows measure what the path can carry.
            let bytes = accepted.saturating_sub(self.window_bytes.load(Relaxed));
            if !paced && bytes >= MIN_WINDOW_BYTES {
                let now_rate = (bytes as f64 * 1e9 / elapsed as f64) as u64;
                let old = self.rate.load(Relaxed);
                let ewma = if old == 0 {
                    now_rate
                } else {
                    (old + now_rate) / 2
                };
                self.rate.store(ewma, Release);
            }
            self.restart_window(accepted);
        }
        if !paced {
            return;
        }
        let idle = now.saturating_sub(self.last_request_ns.load(Acquire)) > HOLD.as_nanos() as u64;
        let probe =
            now.saturating_sub(self.paced_since_ns.load(Acquire)) > PROBE_EVERY.as_nanos() as u64;
        if (idle || probe) && self.paced.swap(false, AcqRel) {
            // Lifted: the next window measures the path again; requests re-cap once it has.
            if probe {
                let until = now + (WINDOW + WINDOW / 2).as_nanos() as u64;
                self.probe_until_ns.store(until, Release);
            }
            self.restart_window(accepted);
            self.set(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_while_requests_flow_and_lifts_when_they_stop() {
        let p = Pacer::new(0.9);
        p.attach(None);
        // No measurement yet: a request cannot cap anything.
        p.on_request();
        assert!(!p.paced.load(Acquire));
        // A busy unpaced window measures the rate.
        std::thread::sleep(WINDOW + Duration::from_millis(2));
        p.tick(64 << 20);
        let rate = p.rate.load(Acquire);
        assert!(rate > 0, "rate measured");
        // A small window does not count.
        std::thread::sleep(WINDOW + Duration::from_millis(2));
        p.tick((64 << 20) + 10);
        assert_eq!(p.rate.load(Acquire), rate);
        // Requests cap; no requests for HOLD lifts the cap.
        p.on_request();
        assert!(p.paced.load(Acquire));
        p.tick(64 << 20);
        assert!(p.paced.load(Acquire), "requests are recent");
        std::thread::sleep(HOLD + Duration::from_millis(5));
        p.tick(64 << 20);
        assert!(!p.paced.load(Acquire), "idle: cap lifted");
    }

    /// While requests keep coming, the periodic probe lifts the cap for one window and the
    /// next cap uses what that window measured, not the first estimate forever.
    #[test]
    fn the_probe_remeasures_while_requests_flow() {
        let p = Pacer::new(0.9);
        p.attach(None);
        std::thread::sleep(WINDOW + Duration::from_millis(2));
        p.tick(16 << 20);
        let first = p.rate.load(Acquire);
        p.on_request();
        assert!(p.paced.load(Acquire));
        // Requests flow, the probe period passes: the cap is lifted to measure.
        std::thread::sleep(PROBE_EVERY + Duration::from_millis(2));
        p.on_request();
        p.tick(16 << 20);
        assert!(!p.paced.load(Acquire), "probe: cap lifted");
        p.on_request();
        assert!(
            !p.paced.load(Acquire),
            "a request does not re-cap during the probe"
        );
        // The probe window carries much more: the rate follows.
        std::thread::sleep(WINDOW + Duration::from_millis(2));
        p.tick((16 << 20) + (256 << 20));
        assert!(
            p.rate.load(Acquire) > first,
            "the probe re-measured the rate"
        );
        std::thread::sleep(WINDOW / 2 + Duration::from_millis(2));
        p.on_request();
        assert!(p.paced.load(Acquire), "capped again after the probe");
    }
}
