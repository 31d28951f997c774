//! Shared helpers for the integration tests (loopback / Unix sockets only).
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use uring_net::{connect, BufRef, Endpoint, FrameReader, Listener, NetError, StableMemory, Stream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Unix,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A connected (client, server) pair over TCP loopback or a Unix socket.
pub fn pair(kind: Kind) -> (Stream, Stream) {
    let ep: Endpoint = match kind {
        Kind::Tcp => "127.0.0.1:0".parse().unwrap(),
        Kind::Unix => {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("uring-net-it-{}-{n}.sock", std::process::id()));
            Endpoint::Unix(p)
        }
    };
    let l = Listener::bind(&ep).unwrap();
    let ep = l.local_endpoint().unwrap();
    let c = connect(&ep, Some(Duration::from_secs(5))).unwrap();
    let s = l.accept().unwrap();
    (c, s)
}

/// Set SO_SNDBUF (the kernel doubles and clamps it to its minimum).
pub fn set_sndbuf(s: &Stream, bytes: usize) {
    uring_net::SocketOptions {
        nodelay: false,
        priority: None,
        tos: None,
        send_buffer: Some(bytes),
        recv_buffer: None,
        notsent_lowat: None,
        quickack: false,
    }
    .apply(s)
    .unwrap();
}

pub const MAGIC: u32 = 0x5EED_F00D;
pub const HDR: usize = 16;

pub fn header(seq: u64, len: usize) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[..8].copy_from_slice(&seq.to_le_bytes());
    h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    h[12..].copy_from_slice(&MAGIC.to_le_bytes());
    h
}

pub fn pattern(seq: u64, i: usize) -> u8 {
    (seq.wrapping_mul(31) as usize ^ i.wrapping_mul(7) ^ (i >> 9)) as u8
}

pub fn payload(seq: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| pattern(seq, i)).collect()
}

/// Mixed frame sizes from 16 B to 2 MiB, deterministic.
pub fn frame_len(seq: u64) -> usize {
    const SIZES: [usize; 9] = [16, 4096, 100, 65536, 2 << 20, 1, 300_000, 4096, 70_000];
    SIZES[(seq as usize) % SIZES.len()]
}

/// Split a payload into 1..=3 `BufRef`s, some of them sub-ranges of a larger owner.
pub fn payload_bufs(seq: u64, len: usize) -> Vec<BufRef> {
    let data = payload(seq, len);
    match seq % 3 {
        0 => vec![BufRef::from_vec(data)],
        1 => {
            // Embedded at an offset inside a larger owner.
            let mut big = vec![0xEEu8; len + 64];
            big[32..32 + len].copy_from_slice(&data);
            let owner: Arc<dyn StableMemory> = Arc::new(big);
            vec![BufRef::new(owner, 32, len).unwrap()]
        }
        _ => {
            let a = len / 3;
            let b = len / 2;
            let owner: Arc<dyn StableMemory> = Arc::new(data);
            vec![
                BufRef::new(owner.clone(), 0, a).unwrap(),
                BufRef::new(owner.clone(), a, b - a).unwrap(),
                BufRef::new(owner, b, len - b).unwrap(),
            ]
        }
    }
}

/// Read frames until clean EOF, verifying sequence numbers and contents. Sleeps between frames
/// for the first `slow_frames` frames. Returns (frames, bytes).
pub fn verify_reader(
    stream: Stream,
    slow_frames: u64,
    sleep: Duration,
) -> Result<(u64, u64), NetError> {
    let mut r = FrameReader::new(stream, 256 << 10);
    let mut seq = 0u64;
    let mut bytes = 0u64;
    let mut buf = Vec::new();
    while let Some(h) = r.read_header::<HDR>()? {
        let got_seq = u64::from_le_bytes(h[..8].try_into().unwrap());
        let len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
        let magic = u32::from_le_bytes(h[12..].try_into().unwrap());
        assert_eq!(magic, MAGIC, "bad magic at frame {seq}");
        assert_eq!(got_seq, seq, "frames out of order");
        buf.resize(len, 0);
        r.read_exact(&mut buf)?;
        if let Some(i) = (0..len).find(|&i| buf[i] != pattern(seq, i)) {
            panic!("frame {seq} (len {len}) corrupt at byte {i}");
        }
        bytes += (HDR + len) as u64;
        seq += 1;
        if seq <= slow_frames {
            std::thread::sleep(sleep);
        }
    }
    Ok((seq, bytes))
}

/// An owner that records when it is dropped.
pub struct FlagOwner {
    pub data: Vec<u8>,
    pub dropped: Arc<AtomicBool>,
    /// Called on drop (e.g. to snapshot sender stats at that moment).
    pub on_drop: Option<Box<dyn Fn() + Send + Sync>>,
}

// SAFETY: `data` is never mutated or reallocated after construction (no `&mut` access is
// possible through the `Arc` the tests wrap it in).
unsafe impl StableMemory for FlagOwner {
    fn memory(&self) -> (*const u8, usize) {
        (self.data.as_ptr(), self.data.len())
    }
}

impl Drop for FlagOwner {
    fn drop(&mut self) {
        if let Some(f) = &self.on_drop {
            f();
        }
        self.dropped.store(true, Ordering::SeqCst);
    }
}
