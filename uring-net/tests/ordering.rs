//! Byte order and completeness under short sends: tiny SO_SNDBUF, slow reader, mixed frame
//! sizes (16 B .. 2 MiB), TCP loopback and Unix sockets, zero-copy always / never / auto.

mod common;

use std::time::{Duration, Instant};

use common::*;
use uring_net::{FrameSender, SenderConfig, SubmitPolicy, ZeroCopy};

fn run(
    kind: Kind,
    zc: ZeroCopy,
    submit: SubmitPolicy,
    frames: u64,
) -> uring_net::SendStatsSnapshot {
    run_with(kind, zc, submit, frames, false)
}

/// `wait_all = false` makes the kernel return every partial send, so the sender's own
/// short-send resubmission path is exercised.
fn run_with(
    kind: Kind,
    zc: ZeroCopy,
    submit: SubmitPolicy,
    frames: u64,
    wait_all: bool,
) -> uring_net::SendStatsSnapshot {
    let (tx, rx) = pair(kind);
    set_sndbuf(&tx, 4096);
    let reader = std::thread::spawn(move || verify_reader(rx, 40, Duration::from_millis(2)));
    let cfg = SenderConfig {
        zero_copy: zc,
        submit,
        ..SenderConfig::bulk()
    };
    let mut s = FrameSender::new(tx, cfg).unwrap();
    s.set_wait_all(wait_all);
    let stats = s.stats();
    let mut expect_bytes = 0u64;
    let start = Instant::now();
    for seq in 0..frames {
        let len = frame_len(seq);
        s.push(&header(seq, len), &payload_bufs(seq, len)).unwrap();
        expect_bytes += (HDR + len) as u64;
        s.poll().unwrap();
        while s.backlog_bytes() > 8 << 20 {
            s.wait(Some(Duration::from_millis(100))).unwrap();
        }
    }
    s.drain(Some(Duration::from_secs(15))).unwrap();
    assert!(s.is_idle());
    assert_eq!(s.backlog_bytes(), 0);
    s.stream().shutdown(std::net::Shutdown::Write).unwrap();
    let (n, bytes) = reader.join().unwrap().unwrap();
    assert_eq!(n, frames);
    assert_eq!(bytes, expect_bytes);
    let snap = stats.snapshot();
    assert_eq!(snap.bytes, expect_bytes);
    assert_eq!(snap.frames, frames);
    eprintln!(
        "{kind:?} {zc:?} {submit:?}: {:?} in {:?}",
        snap,
        start.elapsed()
    );
    snap
}

/// Unix sockets: 45 frames (5 of 2 MiB, 12.7 MB). TCP loopback with a 4 KiB SO_SNDBUF moves
/// only ~2 MB/s (sub-MSS send buffer), so TCP runs 12 frames (one 2 MiB, 2.5 MB).
const FRAMES: u64 = 45;
const TCP_FRAMES: u64 = 12;

#[test]
fn tcp_never_zero_copy_in_order() {
    let s = run(
        Kind::Tcp,
        ZeroCopy::Never,
        SubmitPolicy::Count(4),
        TCP_FRAMES,
    );
    assert_eq!(s.zc_sends, 0);
    assert!(s.short_sends > 0, "tiny SO_SNDBUF must cause short sends");
}

#[test]
fn tcp_always_zero_copy_in_order() {
    let s = run(
        Kind::Tcp,
        ZeroCopy::Always,
        SubmitPolicy::Count(4),
        TCP_FRAMES,
    );
    assert_eq!(s.zc_sends, s.sends, "every send must be zero-copy");
    assert_eq!(
        s.notifications, s.zc_sends,
        "one notification per zero-copy send"
    );
    assert!(s.short_sends > 0, "tiny SO_SNDBUF must cause short sends");
    // Loopback always copies; the kernel reports it.
    assert!(s.zc_copied > 0);
}

#[test]
fn unix_never_zero_copy_in_order() {
    let s = run(
        Kind::Unix,
        ZeroCopy::Never,
        SubmitPolicy::Bytes(64 << 10),
        FRAMES,
    );
    assert_eq!(s.zc_sends, 0);
    assert!(s.short_sends > 0, "tiny SO_SNDBUF must cause short sends");
}

#[test]
fn unix_always_zero_copy_falls_back_in_order() {
    // AF_UNIX has no zero-copy: ZeroCopy::Always must still deliver (copying sends).
    let s = run(Kind::Unix, ZeroCopy::Always, SubmitPolicy::Flush, FRAMES);
    assert_eq!(s.zc_sends, 0);
}

#[test]
fn tcp_auto_zero_copy_only_for_large_sends() {
    let s = run(
        Kind::Tcp,
        ZeroCopy::Auto {
            min_bytes: 64 << 10,
        },
        SubmitPolicy::Count(1),
        TCP_FRAMES,
    );
    assert!(s.zc_sends > 0, "2 MiB frames must go zero-copy");
    assert!(s.zc_sends < s.sends, "small frames must not go zero-copy");
}

#[test]
fn tcp_wait_all_in_order_with_few_short_sends() {
    let s = run_with(
        Kind::Tcp,
        ZeroCopy::Always,
        SubmitPolicy::Count(4),
        TCP_FRAMES,
        true,
    );
    assert_eq!(
        s.short_sends, 0,
        "MSG_WAITALL: the kernel completes whole sends"
    );
}

#[test]
fn unix_wait_all_in_order() {
    run_with(
        Kind::Unix,
        ZeroCopy::Never,
        SubmitPolicy::Count(2),
        FRAMES,
        true,
    );
}

#[test]
fn many_small_frames_are_coalesced() {
    let (tx, rx) = pair(Kind::Tcp);
    let reader = std::thread::spawn(move || verify_reader(rx, 0, Duration::ZERO));
    let cfg = SenderConfig {
        submit: SubmitPolicy::Flush,
        ..SenderConfig::bulk()
    };
    let mut s = FrameSender::new(tx, cfg).unwrap();
    let n = 2000u64;
    for seq in 0..50 {
        s.push(&header(seq, 64), &payload_bufs(seq, 64)).unwrap();
    }
    assert_eq!(
        s.stats().snapshot().sends,
        0,
        "Flush policy sends nothing before flush"
    );
    for seq in 50..n {
        s.push(&header(seq, 64), &payload_bufs(seq, 64)).unwrap();
    }
    s.drain(Some(Duration::from_secs(10))).unwrap();
    s.stream().shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(reader.join().unwrap().unwrap().0, n);
    let st = s.stats().snapshot();
    // 2000 frames of ~3 segments each, ≤ 512 iovecs per send: a handful of sends.
    assert!(st.sends <= 20, "not coalesced: {st:?}");
    assert!(st.submits <= 40, "too many io_uring_enter calls: {st:?}");
}
