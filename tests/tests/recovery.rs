//! Postcopy that survives broken connections: the link is cut at random points of postcopy,
//! several times per run, in every mode; every run completes and verifies. And a destination
//! whose source never comes back stays paused (vCPUs wait) instead of failing at once.

use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

use migrate_core::dirty::UffdWpDirtyLog;
use migrate_core::source::SourcePhase;
use migrate_core::verify::PreWriteDigests;
use migrate_core::workload::{fill_initial, Access, PreWriteLog};
use migrate_core::{DestConfig, Destination, Mode, ReconnectPolicy, Source};
use migrate_tests::{
    assert_identical, loopback_listener, memory, migrate_source, spawn_dest, Case, Outcome,
};

/// Runs `case` while a chaos thread cuts the connection `breaks` times during postcopy.
fn run_with_breaks(case: &Case, breaks: usize, seed: u64) -> Outcome {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let src_mem = Arc::new(memory(case));
    fill_initial(&src_mem, 4);
    let dst_mem = Arc::new(memory(case));
    let log = Arc::new(PreWriteLog::new(&dst_mem));
    let (listener, ep) = loopback_listener();
    let dest_cfg = DestConfig {
        resume_timeout: Duration::from_secs(20),
        ..DestConfig::default()
    };
    let dest = Destination::new(dst_mem.clone(), dest_cfg)
        .with_guest_digests(log.clone() as Arc<dyn PreWriteDigests>);
    let dest_watch = dest.watch();
    let dest_thread = spawn_dest(dest, listener, dst_mem.clone(), log.clone(), case);

    let mut cfg = case.source_config();
    // Keep the background stream slow enough that postcopy lasts long enough to be cut.
    cfg.bulk_backlog = 64 << 10;
    cfg.reconnect = ReconnectPolicy {
        retries: 50,
        backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(100),
    };
    let source = Source::new(src_mem.clone(), cfg);
    let progress = source.progress();
    let stop = AtomicBool::new(false);
    let (result, cuts) = std::thread::scope(|s| {
        let chaos = s.spawn(|| {
            let mut x = seed | 1;
            let mut cuts = 0;
            while cuts < breaks && !stop.load(Acquire) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                std::thread::sleep(Duration::from_micros(300 + x % 3000));
                if progress.phase() == SourcePhase::Postcopy {
                    source.interrupt_link();
                    cuts += 1;
                }
            }
            cuts
        });
        let r = migrate_source(&source, case, src_mem.clone(), &ep);
        stop.store(true, Release);
        (r, chaos.join().unwrap())
    });
    let dest = dest_thread
        .join()
        .expect("destination thread")
        .expect("destination migration");
    let source = result.expect("source migration");
    assert!(!dest_watch.snapshot().paused);
    eprintln!(
        "{:?}: {cuts} cuts, {} recoveries, {} requests, verified {:?}",
        case.mode, source.recoveries, dest.counters.requests, source.verified
    );
    assert!(
        source.recoveries as usize >= cuts.min(1),
        "cuts {cuts}, recoveries {}",
        source.recoveries
    );
    Outcome {
        source,
        dest,
        src_mem,
        dst_mem,
        log,
    }
}

fn survives(mode: Mode, seed: u64) {
    let mut case = Case::small(mode, Access::Random);
    case.region_size = 32 << 20;
    case.passes = 0;
    case.touches = 2000;
    let o = run_with_breaks(&case, 3, seed);
    assert!(
        o.source.recoveries >= 1,
        "no break landed in postcopy: {:?}",
        o.source
    );
    let v = o.dest.verify.as_ref().expect("verification ran");
    assert!(v.ok(), "{v:?}");
    assert_eq!(o.source.verified, Some(true));
    assert_identical(&o);
}

#[test]
fn vanilla_survives_broken_links() {
    survives(Mode::Vanilla, 0x1234);
}

#[test]
fn preempt_survives_broken_links() {
    survives(Mode::Preempt, 0x5678);
}

#[test]
fn preempt_full_survives_broken_links() {
    survives(Mode::PreemptFull, 0x9abc);
}

/// The source gives up after a break; the destination does not fail: it stays paused with
/// userfaultfd armed (a vCPU touching a missing page waits), until its resume timeout.
#[test]
fn destination_pauses_rather_than_fails() {
    let mut case = Case::small(Mode::PreemptFull, Access::Random);
    case.region_size = 32 << 20;
    case.passes = 0;
    let src_mem = Arc::new(memory(&case));
    fill_initial(&src_mem, 4);
    let dst_mem = Arc::new(memory(&case));
    let (listener, ep) = loopback_listener();
    let dest_cfg = DestConfig {
        resume_timeout: Duration::from_secs(3),
        ..DestConfig::default()
    };
    let dest = Destination::new(dst_mem.clone(), dest_cfg);
    let watch = dest.watch();
    let started = Arc::new(AtomicBool::new(false));
    let dest_thread = {
        let started = started.clone();
        std::thread::spawn(move || dest.accept(&listener, &mut || started.store(true, Release)))
    };
    let mut cfg = case.source_config();
    cfg.precopy.max_passes = 0;
    cfg.bulk_backlog = 16 << 10;
    cfg.reconnect.retries = 0;
    let source = Source::new(src_mem.clone(), cfg);
    let progress = source.progress();
    let mut dirty = UffdWpDirtyLog::new().unwrap();
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            while progress.phase() != SourcePhase::Postcopy {
                std::thread::sleep(Duration::from_micros(100));
            }
            source.interrupt_link();
        });
        source.migrate(&ep, &mut dirty, &mut || Ok(()))
    });
    let err = result.expect_err("the source was told not to reconnect");
    assert!(err.is_link_failure(), "{err}");

    // The destination is paused, not failed: its accept is still running.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !watch.snapshot().paused && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let snap = watch.snapshot();
    assert!(snap.paused, "{snap:?}");
    assert!(started.load(Acquire), "the guest was running");
    assert!(!dest_thread.is_finished());
    assert!(
        snap.pages_received < snap.total_pages,
        "pages are still missing: {snap:?}"
    );

    // A vCPU that touches a missing page waits (it is not handed a zero page).
    let region = dst_mem.regions()[1].clone();
    let missing = (0..region.host_pages())
        .rev()
        .find(|&hp| !region.is_populated(hp * region.host_page_size()).unwrap())
        .expect("a missing page");
    let touched = Arc::new(AtomicBool::new(false));
    {
        let (region, touched) = (region.clone(), touched.clone());
        std::thread::spawn(move || {
            let mut b = [0u8; 8];
            let _ = region.read_into(missing * region.host_page_size(), &mut b);
            touched.store(true, Release);
        });
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !touched.load(Acquire),
        "a vCPU read a missing page while paused"
    );

    // Nobody resumes: after its resume timeout the destination reports it.
    let err = dest_thread
        .join()
        .unwrap()
        .expect_err("no source came back");
    assert!(err.to_string().contains("reconnect"), "{err}");
}
