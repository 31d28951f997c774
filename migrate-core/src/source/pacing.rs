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
    window: Mutex<(Instant, u64)>,
    /// When the current cap was set.
    paced_since: Mutex<Instant>,
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
            window: Mutex::new((Instant::now(), 0)),
            paced_since: Mutex::new(Instant::now()),
        }
    }

    /// A new bulk connection (or none: pacing off).
    pub fn attach(&self, bulk: Option<Stream>) {
        *self.bulk.lock().unwrap_or_else(|p| p.into_inner()) = bulk;
        self.paced.store(false, Release);
        *self.window.lock().unwrap_or_else(|p| p.into_inner()) = (Instant::now(), 0);
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
        self.last_request_ns
            .store(self.epoch.elapsed().as_nanos() as u64, Release);
        let rate = self.rate.load(Acquire);
        if rate > 0 && !self.paced.swap(true, AcqRel) {
            *self.paced_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            self.set(Some((rate as f64 * self.headroom) as u64));
        }
    }

    /// Called by the scanner with its bulk sender's accepted-bytes counter, often.
    pub fn tick(&self, accepted: u64) {
        let paced = self.paced.load(Acquire);
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = w.0.elapsed();
        if elapsed >= WINDOW {
            // Only unpaced, busy windows measure what the path can carry.
            let bytes = accepted.saturating_sub(w.1);
            if !paced && bytes >= MIN_WINDOW_BYTES {
                let now_rate = (bytes as f64 / elapsed.as_secs_f64()) as u64;
                let old = self.rate.load(Relaxed);
                let ewma = if old == 0 {
                    now_rate
                } else {
                    (old + now_rate) / 2
                };
                self.rate.store(ewma, Release);
            }
            *w = (Instant::now(), accepted);
        }
        drop(w);
        if !paced {
            return;
        }
        let now = self.epoch.elapsed().as_nanos() as u64;
        let idle = now.saturating_sub(self.last_request_ns.load(Acquire)) > HOLD.as_nanos() as u64;
        let probe = self
            .paced_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
            > PROBE_EVERY;
        if (idle || probe) && self.paced.swap(false, AcqRel) {
            // Lifted: the next window measures the path again; the next request re-caps.
            *self.window.lock().unwrap_or_else(|p| p.into_inner()) = (Instant::now(), accepted);
            self.set(None);
        }
    }
}
