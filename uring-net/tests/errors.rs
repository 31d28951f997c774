//! Failures become typed errors, never hangs or panics.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::*;
use uring_net::{BufRef, FrameSender, NetError, SenderConfig, SubmitPolicy, ZeroCopy};

fn peer_dies_mid_frame(kind: Kind, zc: ZeroCopy) {
    let (tx, rx) = pair(kind);
    let cfg = SenderConfig {
        zero_copy: zc,
        submit: SubmitPolicy::Count(1),
        ..SenderConfig::bulk()
    };
    let mut s = FrameSender::new(tx, cfg).unwrap();
    // The reader takes 100 KB of an 8 MiB frame and closes the connection.
    let reader = std::thread::spawn(move || {
        let mut rx = rx;
        let mut buf = vec![0u8; 100_000];
        rx.read_exact(&mut buf).unwrap();
        drop(rx);
    });
    let len = 8 << 20;
    s.push(&header(0, len), &[BufRef::from_vec(payload(0, len))])
        .unwrap();
    reader.join().unwrap();
    let start = Instant::now();
    let err = s.drain(Some(Duration::from_secs(10))).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert!(err.is_disconnect(), "{kind:?} {zc:?}: unexpected {err:?}");
    // The sender stays failed with the same typed error.
    let again = s.push(b"x", &[]).unwrap_err();
    assert!(again.is_disconnect(), "{again:?}");
    assert!(s.failure().is_some());
    assert!(s.wait(Some(Duration::from_millis(1))).is_err());
}

#[test]
fn tcp_peer_dies_mid_frame() {
    peer_dies_mid_frame(Kind::Tcp, ZeroCopy::Never);
}

#[test]
fn tcp_peer_dies_mid_frame_zero_copy() {
    peer_dies_mid_frame(Kind::Tcp, ZeroCopy::Always);
}

#[test]
fn unix_peer_dies_mid_frame() {
    peer_dies_mid_frame(Kind::Unix, ZeroCopy::Never);
}

fn drain_times_out(zc: ZeroCopy, drop_reader_first: bool) -> Duration {
    let (tx, rx) = pair(Kind::Tcp);
    let cfg = SenderConfig {
        zero_copy: zc,
        ..SenderConfig::bulk()
    };
    let mut s = FrameSender::new(tx, cfg).unwrap();
    let len = 8 << 20;
    s.push(&header(0, len), &[BufRef::from_vec(payload(0, len))])
        .unwrap();
    // Nobody reads: cannot finish.
    let start = Instant::now();
    assert!(matches!(
        s.drain(Some(Duration::from_millis(200))),
        Err(NetError::Timeout)
    ));
    assert!(start.elapsed() >= Duration::from_millis(190));
    assert!(s.backlog_bytes() > 0);
    assert!(!s.is_idle());
    if drop_reader_first {
        drop(rx);
        // The peer is gone: the sender fails, drops its queue, and becomes idle once the
        // kernel has returned every buffer.
        let err = s.drain(Some(Duration::from_secs(5))).unwrap_err();
        assert!(err.is_disconnect(), "{err:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !s.is_idle() && Instant::now() < deadline {
            let _ = s.wait(Some(Duration::from_millis(10)));
        }
        assert!(s.is_idle());
        assert_eq!(s.backlog_bytes(), 0);
        let start = Instant::now();
        drop(s);
        start.elapsed()
    } else {
        // Dropping with a send in flight and a stuck peer shuts the socket down and waits
        // (bounded) for the kernel to release the buffers.
        let start = Instant::now();
        drop(s);
        let t = start.elapsed();
        drop(rx);
        t
    }
}

#[test]
fn drain_timeout_then_drop_copy_send_is_prompt() {
    let t = drain_times_out(ZeroCopy::Never, false);
    assert!(t < Duration::from_millis(500), "drop took {t:?}");
}

#[test]
fn drain_timeout_then_drop_zero_copy_is_bounded() {
    // Notifications cannot arrive while the stuck peer holds the skbs: drop gives up after its
    // bounded wait and leaks the buffers instead of freeing memory the kernel may still read.
    let t = drain_times_out(ZeroCopy::Always, false);
    assert!(t < Duration::from_millis(2500), "drop took {t:?}");
}

#[test]
fn drain_timeout_then_peer_close_releases_everything() {
    let t = drain_times_out(ZeroCopy::Always, true);
    assert!(t < Duration::from_millis(100), "drop took {t:?}");
}

#[test]
fn send_on_closed_socket_is_peer_closed() {
    let (tx, rx) = pair(Kind::Unix);
    drop(rx);
    let mut s = FrameSender::new(tx, SenderConfig::urgent()).unwrap();
    s.push(b"hello", &[]).unwrap();
    match s.drain(Some(Duration::from_secs(2))) {
        Err(NetError::PeerClosed { .. }) | Err(NetError::Reset) => {}
        other => panic!("expected a disconnect error, got {other:?}"),
    }
}
