//! Fixed-size atomic bitmap: one bit per host page.
//!
//! Every operation is a single atomic word operation with `SeqCst` ordering, so any number of
//! threads may set, clear and claim bits concurrently. `clear` is test-and-clear: exactly one
//! caller observes `true` for a set bit, which is how senders claim a host page.
//!
//! Out-of-range indices never panic in release builds (they may come from the network): `test`,
//! `set` and `clear` return `false` and do nothing; debug builds assert so bugs surface in tests.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

const WORD_BITS: usize = 64;

/// A bitmap of `len()` bits backed by atomic 64-bit words.
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    bits: usize,
}

impl std::fmt::Debug for AtomicBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtomicBitmap")
            .field("bits", &self.bits)
            .field("ones", &self.count_ones())
            .finish()
    }
}

fn words_for(bits: usize) -> usize {
    bits.div_ceil(WORD_BITS)
}

/// Mask of the bits of word `w` that lie inside `[start, end)`.
fn range_mask(w: usize, start: usize, end: usize) -> u64 {
    let word_start = w * WORD_BITS;
    let lo = start.saturating_sub(word_start).min(WORD_BITS);
    let hi = end.saturating_sub(word_start).min(WORD_BITS);
    if hi <= lo {
        return 0;
    }
    let upper = if hi == WORD_BITS {
        u64::MAX
    } else {
        (1u64 << hi) - 1
    };
    let lower = (1u64 << lo) - 1;
    upper & !lower
}

impl AtomicBitmap {
    /// A bitmap of `bits` bits, all clear.
    pub fn new(bits: usize) -> Self {
        let words = (0..words_for(bits)).map(|_| AtomicU64::new(0)).collect();
        AtomicBitmap { words, bits }
    }

    /// A bitmap of `bits` bits, all set (bits past `bits` stay clear).
    pub fn new_full(bits: usize) -> Self {
        let b = Self::new(bits);
        b.set_all();
        b
    }

    /// Number of bits.
    pub fn len(&self) -> usize {
        self.bits
    }

    /// True if the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    fn in_range(&self, i: usize) -> bool {
        debug_assert!(i < self.bits, "bit {i} out of range (len {})", self.bits);
        i < self.bits
    }

    /// Value of bit `i` (`false` if out of range).
    pub fn test(&self, i: usize) -> bool {
        if !self.in_range(i) {
            return false;
        }
        self.words[i / WORD_BITS].load(SeqCst) & (1u64 << (i % WORD_BITS)) != 0
    }

    /// Set bit `i`; returns its previous value (`false`, and no change, if out of range).
    pub fn set(&self, i: usize) -> bool {
        if !self.in_range(i) {
            return false;
        }
        let m = 1u64 << (i % WORD_BITS);
        self.words[i / WORD_BITS].fetch_or(m, SeqCst) & m != 0
    }

    /// Clear bit `i`; returns its previous value. Exactly one of several concurrent callers
    /// sees `true` for a set bit (the claim operation). Out of range: `false`, no change.
    pub fn clear(&self, i: usize) -> bool {
        if !self.in_range(i) {
            return false;
        }
        let m = 1u64 << (i % WORD_BITS);
        self.words[i / WORD_BITS].fetch_and(!m, SeqCst) & m != 0
    }

    /// Set every bit.
    pub fn set_all(&self) {
        self.set_range(0, self.bits);
    }

    /// Clear every bit.
    pub fn clear_all(&self) {
        for w in self.words.iter() {
            w.store(0, SeqCst);
        }
    }

    /// Clamp `[start, start+n)` to the bitmap; returns the end.
    fn clamp_end(&self, start: usize, n: usize) -> usize {
        start.saturating_add(n).min(self.bits)
    }

    /// Set bits `[start, start+n)`, clamped to the bitmap.
    pub fn set_range(&self, start: usize, n: usize) {
        let end = self.clamp_end(start, n);
        if start >= end {
            return;
        }
        for w in start / WORD_BITS..=(end - 1) / WORD_BITS {
            self.words[w].fetch_or(range_mask(w, start, end), SeqCst);
        }
    }

    /// Clear bits `[start, start+n)`, clamped to the bitmap.
    pub fn clear_range(&self, start: usize, n: usize) {
        let end = self.clamp_end(start, n);
        if start >= end {
            return;
        }
        for w in start / WORD_BITS..=(end - 1) / WORD_BITS {
            self.words[w].fetch_and(!range_mask(w, start, end), SeqCst);
        }
    }

    /// Number of set bits (a racy sum if others write concurrently).
    pub fn count_ones(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.load(SeqCst).count_ones() as usize)
            .sum()
    }

    /// First set bit at index `>= from`, scanning a word at a time.
    pub fn next_set(&self, from: usize) -> Option<usize> {
        if from >= self.bits {
            return None;
        }
        let mut w = from / WORD_BITS;
        let mut word = self.words[w].load(SeqCst) & (u64::MAX << (from % WORD_BITS));
        loop {
            if word != 0 {
                let i = w * WORD_BITS + word.trailing_zeros() as usize;
                return (i < self.bits).then_some(i);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            word = self.words[w].load(SeqCst);
        }
    }

    /// Snapshot as little-endian 64-bit words (`8 * ceil(len/64)` bytes), for the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.words.len() * 8);
        for w in self.words.iter() {
            out.extend_from_slice(&w.load(SeqCst).to_le_bytes());
        }
        out
    }

    /// Parse what [`to_bytes`](Self::to_bytes) produced. `None` if `bytes` has the wrong length
    /// for `bits` or sets a bit past `bits`.
    pub fn from_bytes(bits: usize, bytes: &[u8]) -> Option<Self> {
        let n = words_for(bits);
        if bytes.len() != n.checked_mul(8)? {
            return None;
        }
        let words: Box<[AtomicU64]> = bytes
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                AtomicU64::new(u64::from_le_bytes(a))
            })
            .collect();
        if let Some(last) = words.last() {
            let valid = bits - (n - 1) * WORD_BITS;
            if valid < WORD_BITS && last.load(SeqCst) >> valid != 0 {
                return None;
            }
        }
        Some(AtomicBitmap { words, bits })
    }

    /// `self |= other`. Lengths must match (debug-asserted); extra words of a longer `other`
    /// are ignored and bits past `self.len()` are never set.
    pub fn or_from(&self, other: &AtomicBitmap) {
        debug_assert_eq!(
            self.bits, other.bits,
            "or_from on bitmaps of different length"
        );
        let n = self.words.len().min(other.words.len());
        for w in 0..n {
            let m = other.words[w].load(SeqCst) & range_mask(w, 0, self.bits);
            if m != 0 {
                self.words[w].fetch_or(m, SeqCst);
            }
        }
    }

    /// Atomically move every set bit of `self` into `dst` (`dst |= self; self = 0`, word by
    /// word) and return how many bits were moved. A bit set concurrently is either moved now
    /// or stays for the next call; it is never lost.
    pub fn drain_into(&self, dst: &AtomicBitmap) -> usize {
        debug_assert_eq!(
            self.bits, dst.bits,
            "drain_into on bitmaps of different length"
        );
        let n = self.words.len().min(dst.words.len());
        let mut moved = 0;
        for w in 0..n {
            if self.words[w].load(SeqCst) == 0 {
                continue;
            }
            let v = self.words[w].swap(0, SeqCst) & range_mask(w, 0, dst.bits);
            if v != 0 {
                dst.words[w].fetch_or(v, SeqCst);
                moved += v.count_ones() as usize;
            }
        }
        moved
    }

    /// Iterator over set bits (racy snapshot semantics, in increasing order).
    pub fn iter_ones(&self) -> impl Iterator<Item = usize> + '_ {
        let mut next = 0usize;
        std::iter::from_fn(move || {
            let i = self.next_set(next)?;
            next = i + 1;
            Some(i)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Set(usize),
        Clear(usize),
        SetRange(usize, usize),
        ClearRange(usize, usize),
        SetAll,
        ClearAll,
    }

    fn op(bits: usize) -> impl Strategy<Value = Op> {
        let b = bits + 70; // also exercise clamping past the end (ranges only)
        let idx = 0..bits.max(1);
        prop_oneof![
            idx.clone().prop_map(Op::Set),
            idx.prop_map(Op::Clear),
            (0..b, 0..b).prop_map(|(s, n)| Op::SetRange(s, n)),
            (0..b, 0..b).prop_map(|(s, n)| Op::ClearRange(s, n)),
            Just(Op::SetAll),
            Just(Op::ClearAll),
        ]
    }

    fn check_model(b: &AtomicBitmap, m: &[bool]) {
        assert_eq!(b.len(), m.len());
        for (i, &v) in m.iter().enumerate() {
            assert_eq!(b.test(i), v, "bit {i}");
        }
        assert_eq!(b.count_ones(), m.iter().filter(|&&v| v).count());
        for from in 0..=m.len() + 1 {
            let want = (from..m.len()).find(|&i| m[i]);
            assert_eq!(b.next_set(from), want, "next_set({from})");
        }
        let ones: Vec<usize> = b.iter_ones().collect();
        let want: Vec<usize> = (0..m.len()).filter(|&i| m[i]).collect();
        assert_eq!(ones, want);
        let bytes = b.to_bytes();
        assert_eq!(bytes.len(), m.len().div_ceil(64) * 8);
        let back = AtomicBitmap::from_bytes(m.len(), &bytes).expect("round trip");
        for (i, &v) in m.iter().enumerate() {
            assert_eq!(back.test(i), v);
        }
    }

    proptest! {
        #[test]
        fn matches_vec_bool_model(
            (bits, ops) in (0usize..200).prop_flat_map(|bits| (Just(bits), proptest::collection::vec(op(bits), 0..40)))
        ) {
            let b = AtomicBitmap::new(bits);
            let mut m = vec![false; bits];
            for o in ops {
                match o {
                    Op::Set(i) if bits > 0 => {
                        prop_assert_eq!(b.set(i), m[i]);
                        m[i] = true;
                    }
                    Op::Clear(i) if bits > 0 => {
                        prop_assert_eq!(b.clear(i), m[i]);
                        m[i] = false;
                    }
                    Op::Set(_) | Op::Clear(_) => {}
                    Op::SetRange(s, n) => {
                        b.set_range(s, n);
                        for v in m.iter_mut().take(s.saturating_add(n)).skip(s) { *v = true; }
                    }
                    Op::ClearRange(s, n) => {
                        b.clear_range(s, n);
                        for v in m.iter_mut().take(s.saturating_add(n)).skip(s) { *v = false; }
                    }
                    Op::SetAll => { b.set_all(); m.iter_mut().for_each(|v| *v = true); }
                    Op::ClearAll => { b.clear_all(); m.iter_mut().for_each(|v| *v = false); }
                }
            }
            check_model(&b, &m);
        }

        #[test]
        fn or_from_matches_model(bits in 0usize..200, a in proptest::collection::vec(any::<bool>(), 200), c in proptest::collection::vec(any::<bool>(), 200)) {
            let x = AtomicBitmap::new(bits);
            let y = AtomicBitmap::new(bits);
            for i in 0..bits {
                if a[i] { x.set(i); }
                if c[i] { y.set(i); }
            }
            x.or_from(&y);
            let m: Vec<bool> = (0..bits).map(|i| a[i] || c[i]).collect();
            check_model(&x, &m);
        }
    }

    #[test]
    fn drain_into_moves_bits() {
        let a = AtomicBitmap::new(130);
        let d = AtomicBitmap::new(130);
        for i in [0, 5, 64, 129] {
            a.set(i);
        }
        d.set(5);
        d.set(7);
        assert_eq!(a.drain_into(&d), 4);
        assert_eq!(a.count_ones(), 0);
        assert_eq!(d.iter_ones().collect::<Vec<_>>(), vec![0, 5, 7, 64, 129]);
        assert_eq!(a.drain_into(&d), 0);
    }

    #[test]
    fn new_full_sets_only_valid_bits() {
        for bits in [0usize, 1, 63, 64, 65, 127, 128, 129, 1000] {
            let b = AtomicBitmap::new_full(bits);
            assert_eq!(b.count_ones(), bits);
            assert_eq!(b.next_set(bits), None);
            check_model(&b, &vec![true; bits]);
        }
    }

    #[test]
    fn from_bytes_rejects_bad_input() {
        assert!(AtomicBitmap::from_bytes(65, &[0u8; 8]).is_none());
        assert!(AtomicBitmap::from_bytes(65, &[0u8; 24]).is_none());
        assert!(AtomicBitmap::from_bytes(64, &[0u8; 8]).is_some());
        assert!(AtomicBitmap::from_bytes(0, &[]).is_some());
        // A bit past the end is set.
        let mut bytes = vec![0u8; 16];
        bytes[8] = 0b10;
        assert!(AtomicBitmap::from_bytes(65, &bytes).is_none());
        bytes[8] = 0b1;
        let b = AtomicBitmap::from_bytes(65, &bytes).unwrap();
        assert!(b.test(64));
        assert_eq!(b.count_ones(), 1);
    }

    #[test]
    #[cfg(not(debug_assertions))]
    fn out_of_range_is_harmless() {
        let b = AtomicBitmap::new(10);
        assert!(!b.set(10));
        assert!(!b.test(10));
        assert!(!b.clear(usize::MAX));
        assert_eq!(b.count_ones(), 0);
    }

    #[test]
    #[cfg(debug_assertions)]
    fn out_of_range_asserts_in_debug() {
        let b = AtomicBitmap::new(10);
        let r = std::panic::catch_unwind(|| b.set(10));
        assert!(r.is_err());
        assert_eq!(b.count_ones(), 0);
    }

    #[test]
    fn concurrent_claims_are_exclusive() {
        let bits = 10_000;
        let b = std::sync::Arc::new(AtomicBitmap::new_full(bits));
        let claimed: Vec<usize> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let b = &b;
                    s.spawn(move || (0..bits).filter(|&i| b.clear(i)).count())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(claimed.iter().sum::<usize>(), bits);
        assert_eq!(b.count_ones(), 0);
    }
}
