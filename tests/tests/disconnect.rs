//! Peers that vanish: a destination that hangs up in the middle of the bulk stream, and a source
//! that disappears in the middle of a frame. Each side must fail promptly, never hang.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use migrate_core::dirty::UffdWpDirtyLog;
use migrate_core::protocol::{Channel, Record};
use migrate_core::workload::{fill_initial, Access, SourceWorkload};
use migrate_core::{GuestMemory, Mode, Source, SourceConfig};
use migrate_tests::{test_dest_config, zeroed_memory, DestUnderTest, FakeSource};
use uring_net::{Endpoint, FrameReader, Stream};

const DEADLINE: Duration = Duration::from_secs(10);

// ---- the destination vanishes ------------------------------------------------------------------

/// A fake destination: accepts the two connections of a migration, completes both handshakes
/// with the engine's own destination-side handshake, then hands the raw sockets to `then`.
fn fake_destination(
    then: impl FnOnce(TcpStream, TcpStream) + Send + 'static,
    memory: &GuestMemory,
) -> (Endpoint, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let ep = Endpoint::Tcp(listener.local_addr().unwrap());
    let table = migrate_core::handshake::region_table(memory).unwrap();
    let t = std::thread::spawn(move || {
        let handshake = |s: TcpStream| {
            let table = table.clone();
            std::thread::spawn(move || {
                s.set_read_timeout(Some(DEADLINE)).unwrap();
                let mut reader = FrameReader::new(Stream::Tcp(s.try_clone().unwrap()), 4096);
                let hello =
                    migrate_core::handshake::dest_handshake(&mut reader, &table, None, |_| Ok(()))
                        .expect("fake destination handshake");
                (hello.channel, s)
            })
        };
        let a = handshake(listener.accept().unwrap().0);
        let b = handshake(listener.accept().unwrap().0);
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        let (main, urgent) = match (a, b) {
            ((Channel::Main, m), (Channel::Urgent, u))
            | ((Channel::Urgent, u), (Channel::Main, m)) => (m, u),
            _ => panic!("the source opened two connections of the same channel"),
        };
        then(main, urgent);
    });
    (ep, t)
}

fn source_memory() -> Arc<GuestMemory> {
    // Larger than every socket buffer between the two ends, so the first pass cannot complete.
    let m = zeroed_memory(32 << 20);
    fill_initial(&m, 4);
    m
}

fn source_config() -> SourceConfig {
    SourceConfig {
        mode: Mode::PreemptFull,
        timeout: Duration::from_secs(20),
        connect_timeout: Duration::from_secs(5),
        urgent_priority: None,
        ..SourceConfig::default()
    }
}

fn digests(m: &GuestMemory) -> Vec<u64> {
    m.regions()
        .iter()
        .flat_map(|r| {
            let page = r.host_page_size();
            (0..r.host_pages()).map(move |hp| r.digest(hp * page, page))
        })
        .collect()
}

/// Runs `Source::migrate` in a thread and waits for it with a deadline.
fn migrate_with_deadline(
    memory: Arc<GuestMemory>,
    ep: Endpoint,
    paused: Arc<AtomicBool>,
) -> Result<migrate_core::SourceReport, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut dirty = UffdWpDirtyLog::new().expect("uffd-wp dirty log");
        let mut pause = move || {
            paused.store(true, SeqCst);
            Ok(())
        };
        let r = Source::new(memory, source_config())
            .migrate(&ep, &mut dirty, &mut pause)
            .map_err(|e| e.to_string());
        let _ = tx.send(r);
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(r) => r,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("Source::migrate hung"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the source thread panicked"),
    }
}

/// Reads `n` bytes of the bulk stream, then closes both connections.
fn read_then_close(n: usize) -> impl FnOnce(TcpStream, TcpStream) + Send + 'static {
    move |mut main, urgent| {
        let mut buf = vec![0u8; n];
        main.read_exact(&mut buf).expect("bulk bytes");
        drop(main);
        drop(urgent);
    }
}

#[test]
fn source_fails_when_destination_vanishes_mid_stream() {
    let memory = source_memory();
    let before = digests(&memory);
    let (ep, fake) = fake_destination(read_then_close(300 << 10), &memory);
    let paused = Arc::new(AtomicBool::new(false));
    let t = Instant::now();
    let err = migrate_with_deadline(memory.clone(), ep, paused.clone())
        .expect_err("the migration succeeded without a destination");
    eprintln!("source failed after {:?}: {err}", t.elapsed());
    fake.join().unwrap();
    assert!(
        !paused.load(SeqCst),
        "the guest was paused for a destination that was gone"
    );
    assert!(
        before == digests(&memory),
        "the source engine changed guest memory"
    );
}

/// With a running source guest: the failed migration leaves it running and writing (the dirty
/// log is released, writes are not blocked).
#[test]
fn source_guest_keeps_running_when_destination_vanishes() {
    let memory = source_memory();
    let mut guest = SourceWorkload::start(memory.clone(), 2, Access::Random, 20_000);
    let (ep, fake) = fake_destination(read_then_close(300 << 10), &memory);
    let paused = Arc::new(AtomicBool::new(false));
    migrate_with_deadline(memory.clone(), ep, paused.clone())
        .expect_err("the migration succeeded without a destination");
    fake.join().unwrap();
    assert!(!paused.load(SeqCst), "the guest was paused");
    let w0 = guest.writes.load(SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    let w1 = guest.writes.load(SeqCst);
    assert!(
        w1 > w0,
        "the source guest stopped writing after the failure"
    );
    guest.pause();
}

#[test]
fn source_fails_when_destination_vanishes_after_handshake() {
    let memory = source_memory();
    let (ep, fake) = fake_destination(|main, urgent| drop((main, urgent)), &memory);
    let paused = Arc::new(AtomicBool::new(false));
    migrate_with_deadline(memory, ep, paused.clone())
        .expect_err("the migration succeeded without a destination");
    fake.join().unwrap();
    assert!(!paused.load(SeqCst));
}

/// A destination that completes the handshakes and then goes silent (reads nothing, closes
/// nothing): the source must give up after its configured timeout, not wait forever.
#[test]
fn source_gives_up_on_a_silent_destination() {
    let memory = source_memory();
    let (release, held) = mpsc::channel::<()>();
    let (ep, fake) = fake_destination(
        move |main, urgent| {
            let _ = held.recv_timeout(Duration::from_secs(30));
            drop((main, urgent));
        },
        &memory,
    );
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut dirty = UffdWpDirtyLog::new().expect("uffd-wp dirty log");
        let mut pause = || Ok(());
        let cfg = SourceConfig {
            timeout: Duration::from_secs(2),
            ..source_config()
        };
        let r = Source::new(memory, cfg)
            .migrate(&ep, &mut dirty, &mut pause)
            .map_err(|e| e.to_string());
        let _ = tx.send(r);
    });
    let r = rx.recv_timeout(DEADLINE);
    let _ = release.send(());
    fake.join().unwrap();
    match r {
        Ok(r) => {
            let err = r.expect_err("the migration succeeded without a destination");
            eprintln!("source gave up: {err}");
        }
        Err(_) => panic!("Source::migrate hung on a silent destination (timeout 2 s)"),
    }
}

// ---- the source vanishes -----------------------------------------------------------------------

const REGION: usize = 2 << 20;

fn page_record(i: u64) -> [u8; 16] {
    Record::Pages {
        region: 0,
        offset: i * 4096,
        len: 4096,
    }
    .encode()
}

/// Sends three valid precopy pages (filled with 1, 2, 3).
fn three_pages(src: &mut FakeSource) {
    for i in 0..3u8 {
        src.send_main(&page_record(i as u64), &[i + 1; 4096]);
    }
}

fn assert_three_pages_landed(d: &DestUnderTest) {
    let r = &d.memory.regions()[0];
    let mut buf = vec![0u8; 4096];
    for i in 0..3u8 {
        r.read_into(i as usize * 4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == i + 1), "page {i} did not land");
    }
}

#[test]
fn destination_fails_when_source_vanishes_mid_frame() {
    let d = DestUnderTest::start(zeroed_memory(REGION), test_dest_config());
    let mut src = FakeSource::connect(&d, 42);
    three_pages(&mut src);
    src.send_main(&page_record(3), &[9; 1000]);
    drop(src);
    let err = d.expect_err(DEADLINE);
    assert!(err.contains("closed"), "{err}");
    assert_three_pages_landed(&d);
    assert!(!d.ran.load(SeqCst));
}

#[test]
fn destination_fails_when_source_vanishes_between_frames() {
    let d = DestUnderTest::start(zeroed_memory(REGION), test_dest_config());
    let mut src = FakeSource::connect(&d, 42);
    three_pages(&mut src);
    drop(src);
    let err = d.expect_err(DEADLINE);
    assert!(err.contains("closed") && err.contains("precopy"), "{err}");
    assert_three_pages_landed(&d);
}
