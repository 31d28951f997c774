//! Sequential-stream detection for page requests.
//!
//! A guest that walks memory sequentially faults on page after page; each fault costs a round
//! trip. When requests from one region arrive in ascending order close to each other, the
//! source pushes the pages right after the requested one on the urgent channel too, so the
//! next faults never happen. Several streams (one per vCPU walking its own range) are tracked.

/// How far past the last request a request still counts as "the next one" (host pages).
const NEAR: usize = 4;
/// Requests in a row that make a stream sequential.
const CONFIRM: u32 = 2;
const STREAMS: usize = 8;

#[derive(Clone, Copy, Default)]
struct Stream {
    region: u16,
    last: usize,
    hits: u32,
    /// Pages up to here were already pushed ahead.
    ahead_until: usize,
    age: u64,
}

/// Tracks recent request streams.
#[derive(Default)]
pub(crate) struct SeqDetector {
    streams: [Stream; STREAMS],
    clock: u64,
}

impl SeqDetector {
    /// Records a request for host page `hp` of `region`; returns the range of host pages to
    /// push ahead (`window` pages past it, minus what was pushed before) if the request
    /// continues a sequential stream.
    pub fn on_request(
        &mut self,
        region: u16,
        hp: usize,
        window: usize,
    ) -> Option<std::ops::Range<usize>> {
        self.clock += 1;
        let now = self.clock;
        if let Some(s) = self.streams.iter_mut().find(|s| {
            s.hits > 0
                && s.region == region
                && hp > s.last
                && hp <= s.last + NEAR.max(s.ahead_until.saturating_sub(s.last))
        }) {
            s.last = hp;
            s.hits = (s.hits + 1).min(CONFIRM);
            s.age = now;
            if s.hits < CONFIRM || window == 0 {
                return None;
            }
            let from = (hp + 1).max(s.ahead_until);
            let to = hp.saturating_add(1).saturating_add(window);
            s.ahead_until = to;
            return (from < to).then_some(from..to);
        }
        let slot = self
            .streams
            .iter_mut()
            .min_by_key(|s| s.age)
            .expect("STREAMS > 0");
        *slot = Stream {
            region,
            last: hp,
            hits: 1,
            ahead_until: hp + 1,
            age: now,
        };
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_requests_push_ahead_once() {
        let mut d = SeqDetector::default();
        assert_eq!(d.on_request(0, 100, 8), None);
        assert_eq!(d.on_request(0, 101, 8), Some(102..110));
        // The pushed-ahead pages don't fault; the next request lands past them.
        assert_eq!(d.on_request(0, 110, 8), Some(111..119));
        assert_eq!(d.on_request(0, 112, 8), Some(119..121));
    }

    #[test]
    fn random_requests_push_nothing() {
        let mut d = SeqDetector::default();
        for hp in [500, 17, 9000, 3, 12_000, 640, 77, 4096] {
            assert_eq!(d.on_request(0, hp, 8), None);
        }
        assert_eq!(
            d.on_request(1, 501, 8),
            None,
            "another region is another stream"
        );
    }

    #[test]
    fn interleaved_streams_are_tracked_apart() {
        let mut d = SeqDetector::default();
        assert_eq!(d.on_request(0, 10, 4), None);
        assert_eq!(d.on_request(0, 5000, 4), None);
        assert_eq!(d.on_request(0, 11, 4), Some(12..16));
        assert_eq!(d.on_request(0, 5001, 4), Some(5002..5006));
        assert_eq!(d.on_request(0, 7, 0), None, "window 0 turns it off");
    }
}
