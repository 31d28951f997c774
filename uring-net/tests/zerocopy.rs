//! Zero-copy buffer lifetime: payload owners outlive the notification CQE, header memory is owned
//! by the sender, and the opcode fallbacks work.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use uring_net::ring::OpSupport;
use uring_net::{
    BufRef, FrameSender, NetError, SenderConfig, StableMemory, SubmitPolicy, ZeroCopy,
};

#[test]
fn payload_owner_lives_until_notification_and_header_is_copied() {
    let (tx, rx) = pair(Kind::Tcp);
    let cfg = SenderConfig {
        zero_copy: ZeroCopy::Always,
        submit: SubmitPolicy::Flush,
        // One send for the whole frame, so nothing is sealed before the explicit flush.
        max_send_bytes: 16 << 20,
        ..SenderConfig::bulk()
    };
    let mut s = FrameSender::new(tx, cfg).unwrap();
    let stats = s.stats();

    // 8 MiB payload in an owner that records (a) that it was dropped and (b) the sender's
    // counters at that moment.
    let len = 8 << 20;
    let dropped = Arc::new(AtomicBool::new(false));
    let at_drop: Arc<Mutex<Option<uring_net::SendStatsSnapshot>>> = Arc::new(Mutex::new(None));
    let (st, ad) = (stats.clone(), at_drop.clone());
    let owner = Arc::new(FlagOwner {
        data: payload(0, len),
        dropped: dropped.clone(),
        on_drop: Some(Box::new(move || *ad.lock().unwrap() = Some(st.snapshot()))),
    });
    let weak = Arc::downgrade(&owner);
    let dyn_owner: Arc<dyn StableMemory> = owner;
    let buf = BufRef::from_owner(dyn_owner);

    // The header lives in caller memory that is clobbered right after push (before anything is
    // sent: Flush policy), so the receiver can only see the right header if push copied it.
    let mut hdr = header(0, len).to_vec();
    s.push(&hdr, &[buf]).unwrap();
    hdr.fill(0xAA);
    drop(hdr);
    assert_eq!(stats.snapshot().sends, 0);
    s.flush().unwrap();

    // The receiver is not reading yet: the 8 MiB cannot be fully sent, so the sender must still
    // hold the owner although the caller dropped its handle.
    for _ in 0..10 {
        s.poll().unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let mid = stats.snapshot();
    assert!(mid.zc_sends >= 1, "{mid:?}");
    assert!(mid.bytes < (len + HDR) as u64, "{mid:?}");
    assert!(
        weak.strong_count() >= 1,
        "sender must keep the payload owner alive"
    );
    assert!(!dropped.load(Ordering::SeqCst));

    let reader = std::thread::spawn(move || verify_reader(rx, 0, Duration::ZERO));
    s.drain(Some(Duration::from_secs(10))).unwrap();
    s.stream().shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(reader.join().unwrap().unwrap(), (1, (HDR + len) as u64));

    // Released after the last notification, and not before.
    assert!(dropped.load(Ordering::SeqCst));
    assert_eq!(weak.strong_count(), 0);
    let end = stats.snapshot();
    let at = at_drop.lock().unwrap().expect("owner dropped");
    assert_eq!(at.zc_sends, end.zc_sends);
    assert_eq!(
        at.notifications, at.zc_sends,
        "owner dropped before all notifications: {at:?}"
    );
    assert_eq!(end.notifications, end.zc_sends);
    assert_eq!(end.zc_copied, end.notifications, "loopback always copies");
    assert!(s.is_idle());
}

fn transfer(ops: OpSupport, zc: ZeroCopy) -> Result<uring_net::SendStatsSnapshot, NetError> {
    let (tx, rx) = pair(Kind::Tcp);
    let cfg = SenderConfig {
        zero_copy: zc,
        submit: SubmitPolicy::Count(3),
        ..SenderConfig::bulk()
    };
    let mut s = FrameSender::new_with_ops(tx, cfg, ops)?;
    let reader = std::thread::spawn(move || verify_reader(rx, 0, Duration::ZERO));
    let frames = 20;
    for seq in 0..frames {
        let len = frame_len(seq);
        s.push(&header(seq, len), &payload_bufs(seq, len))?;
    }
    s.drain(Some(Duration::from_secs(10)))?;
    s.stream().shutdown(std::net::Shutdown::Write)?;
    assert_eq!(reader.join().unwrap().unwrap().0, frames);
    Ok(s.stats().snapshot())
}

const ALL: OpSupport = OpSupport {
    sendmsg: true,
    send: true,
    sendmsg_zc: true,
    send_zc: true,
    read: true,
};

#[test]
fn send_zc_only_kernel_sends_one_iovec_per_zero_copy_send() {
    let st = transfer(
        OpSupport {
            sendmsg_zc: false,
            ..ALL
        },
        ZeroCopy::Always,
    )
    .unwrap();
    assert_eq!(st.zc_sends, st.sends);
    // Every header and payload piece is its own SEND_ZC.
    assert!(st.sends >= 40, "{st:?}");
    assert_eq!(st.notifications, st.zc_sends);
}

#[test]
fn no_zero_copy_opcodes() {
    let none = OpSupport {
        sendmsg_zc: false,
        send_zc: false,
        ..ALL
    };
    let (tx, _rx) = pair(Kind::Tcp);
    let cfg = SenderConfig {
        zero_copy: ZeroCopy::Always,
        ..SenderConfig::bulk()
    };
    assert!(matches!(
        FrameSender::new_with_ops(tx, cfg, none),
        Err(NetError::Unsupported(_))
    ));
    // Auto silently uses copying sends.
    let st = transfer(none, ZeroCopy::Auto { min_bytes: 1 }).unwrap();
    assert_eq!(st.zc_sends, 0);
    assert!(st.sends > 0);
}

#[test]
fn send_only_kernel_still_delivers() {
    let st = transfer(
        OpSupport {
            sendmsg: false,
            sendmsg_zc: false,
            send_zc: false,
            ..ALL
        },
        ZeroCopy::Never,
    )
    .unwrap();
    assert_eq!(st.zc_sends, 0);
}

#[test]
fn auto_threshold_decides_per_send() {
    // Huge threshold: nothing goes zero-copy; tiny threshold: everything does.
    let st = transfer(
        ALL,
        ZeroCopy::Auto {
            min_bytes: usize::MAX,
        },
    )
    .unwrap();
    assert_eq!(st.zc_sends, 0);
    // Tiny threshold: sends go zero-copy, until the kernel has reported enough of them as
    // copied (loopback always copies; see auto_gives_up_when_the_kernel_copies_anyway).
    let st = transfer(ALL, ZeroCopy::Auto { min_bytes: 1 }).unwrap();
    assert!(st.zc_sends > 0, "{st:?}");
    assert!(st.zc_sends == st.sends || st.zc_copied >= 8, "{st:?}");
}

#[test]
fn auto_gives_up_when_the_kernel_copies_anyway() {
    // Loopback always copies "zero-copy" sends (and says so in the notification): Auto must
    // notice and fall back to plain sends, while Always keeps using zero copy.
    let (tx, rx) = pair(Kind::Tcp);
    let cfg = SenderConfig {
        zero_copy: ZeroCopy::Auto { min_bytes: 1 },
        submit: SubmitPolicy::Count(1),
        ..SenderConfig::bulk()
    };
    let mut s = FrameSender::new(tx, cfg).unwrap();
    let reader = std::thread::spawn(move || verify_reader(rx, 0, Duration::ZERO));
    let frames = 200;
    for seq in 0..frames {
        let len = frame_len(seq);
        s.push(&header(seq, len), &payload_bufs(seq, len)).unwrap();
        s.drain(Some(Duration::from_secs(10))).unwrap();
    }
    s.stream().shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(reader.join().unwrap().unwrap().0, frames);
    let st = s.stats().snapshot();
    assert!(st.zc_copied >= 8, "{st:?}");
    assert!(
        st.zc_sends < st.sends / 2,
        "Auto kept zero copy on a copying path: {st:?}"
    );
}
