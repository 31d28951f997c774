//! Waker, single-issuer hand-off between threads, urgent (flush-driven) sends.

mod common;

use std::time::{Duration, Instant};

use common::*;
use uring_net::{FrameReader, FrameSender, NetError, SenderConfig};

#[test]
fn waker_interrupts_wait_and_timeout_returns() {
    let (tx, _rx) = pair(Kind::Unix);
    let mut s = FrameSender::new(tx, SenderConfig::urgent()).unwrap();
    // Idle: a timed wait returns after the timeout without a wakeup.
    let start = Instant::now();
    s.wait(Some(Duration::from_millis(30))).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(25));
    assert!(!s.take_woken());

    let w = s.waker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        w.wake();
    });
    let start = Instant::now();
    s.wait(None).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(40));
    assert!(s.take_woken());
    t.join().unwrap();

    // A wake before the wait is not lost, and the waker re-arms after firing.
    for _ in 0..3 {
        s.waker().wake();
        let start = Instant::now();
        s.wait(Some(Duration::from_secs(5))).unwrap();
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(s.take_woken());
    }
}

#[test]
fn created_on_one_thread_used_on_another() {
    let (tx, rx) = pair(Kind::Tcp);
    let s = FrameSender::new(tx, SenderConfig::bulk()).unwrap();
    let reader = std::thread::spawn(move || verify_reader(rx, 0, Duration::ZERO));
    let mut s = std::thread::spawn(move || {
        let mut s = s;
        for seq in 0..10 {
            let len = frame_len(seq);
            s.push(&header(seq, len), &payload_bufs(seq, len)).unwrap();
        }
        s.drain(Some(Duration::from_secs(10))).unwrap();
        s
    })
    .join()
    .unwrap();
    assert!(s.ring_flags().single_issuer);
    // The ring is bound to the thread that first used it (IORING_SETUP_SINGLE_ISSUER).
    s.push(&header(10, 0), &[]).unwrap();
    assert!(matches!(s.flush(), Err(NetError::Unsupported(_))));
    s.stream().shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(reader.join().unwrap().unwrap().0, 10);
}

#[test]
fn urgent_sends_on_flush_only() {
    let (tx, rx) = pair(Kind::Tcp);
    uring_net::SocketOptions::for_role(uring_net::Role::Urgent)
        .apply(&tx)
        .unwrap();
    let mut s = FrameSender::new(tx, SenderConfig::urgent()).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut r = FrameReader::new(rx, 64 << 10);
    let page = payload(7, 4096);
    s.push(
        &header(7, 4096),
        &[uring_net::BufRef::from_vec(page.clone())],
    )
    .unwrap();
    // Not flushed: nothing on the wire.
    assert!(matches!(r.read_header::<HDR>(), Err(NetError::Timeout)));
    s.flush().unwrap();
    let h = r.read_header::<HDR>().unwrap().unwrap();
    assert_eq!(h, header(7, 4096));
    let mut got = vec![0u8; 4096];
    r.read_exact(&mut got).unwrap();
    assert_eq!(got, page);
    s.drain(Some(Duration::from_secs(2))).unwrap();
    let st = s.stats().snapshot();
    assert_eq!((st.sends, st.zc_sends), (1, 0));
}

/// A bulk sender whose sends may hold 128 KiB, given one 64 KiB frame and a flush at a time,
/// must get each out without waiting for more frames: the send's completion (not a zero-copy
/// notification) ends the wait.
fn frames_smaller_than_a_send_go_out_promptly(zero_copy: uring_net::ZeroCopy) {
    let (tx, rx) = pair(Kind::Tcp);
    let cfg = SenderConfig {
        max_send_bytes: 128 << 10,
        zero_copy,
        ..SenderConfig::bulk()
    };
    let mut s = FrameSender::new(tx, cfg).unwrap();
    let reader = std::thread::spawn(move || verify_reader(rx, 0, Duration::ZERO));
    let start = Instant::now();
    for seq in 0..200u64 {
        let len = 64 << 10;
        s.push(&header(seq, len), &payload_bufs(seq, len)).unwrap();
        s.flush().unwrap();
        while s.backlog_bytes() > 0 {
            s.wait(Some(Duration::from_millis(50))).unwrap();
        }
    }
    let took = start.elapsed();
    s.drain(Some(Duration::from_secs(10))).unwrap();
    s.stream().shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(reader.join().unwrap().unwrap().0, 200);
    assert!(took < Duration::from_secs(2), "200 × 64 KiB took {took:?}");
}

#[test]
fn a_frame_smaller_than_a_send_completes_promptly_after_flush() {
    frames_smaller_than_a_send_go_out_promptly(uring_net::ZeroCopy::default());
}

#[test]
fn a_zero_copy_frame_completes_promptly_after_flush() {
    frames_smaller_than_a_send_go_out_promptly(uring_net::ZeroCopy::Always);
}

/// `settle` waits for what the kernel holds and never sends what is still queued: frames
/// pushed but not flushed stay queued and uncounted (with a live peer that would take them),
/// and go out only on the next flush. `pushed_bytes` counts them from the push on.
#[test]
fn settle_reaps_without_sending_the_queue() {
    let (tx, _rx) = pair(Kind::Tcp);
    let mut s = FrameSender::new(tx, SenderConfig::bulk()).unwrap();
    let bufs = payload_bufs(0, 4096);
    s.push(&header(0, 4096), &bufs).unwrap();
    s.flush().unwrap();
    assert!(s.settle(Duration::from_secs(5)), "an idle sender settles");
    let sent = s.accepted_bytes();
    assert_eq!(sent, (HDR + 4096) as u64);
    assert_eq!(s.pushed_bytes(), sent);

    s.push(&header(1, 4096), &payload_bufs(1, 4096)).unwrap();
    assert_eq!(
        s.pushed_bytes(),
        2 * sent,
        "pushed counts a frame once queued"
    );
    assert!(s.settle(Duration::from_secs(5)));
    assert_eq!(s.accepted_bytes(), sent, "settle sent a queued frame");
    assert_eq!(s.backlog_bytes(), HDR + 4096, "the frame is still queued");
    s.flush().unwrap();
    assert!(s.settle(Duration::from_secs(5)));
    assert_eq!(s.accepted_bytes(), 2 * sent, "the next flush sends it");
}
