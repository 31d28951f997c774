//! End-to-end page-request latency of the three sender modes, in one process over loopback.
//!
//! Each run migrates a guest of `BENCH_MEM_MIB` (default 256) MiB in pure postcopy while two
//! destination vCPU threads touch random pages, and reports the destination's page-request
//! latency (fault read → page placed). `BENCH_RUNS` runs per mode (default 3); the table shows
//! medians. The physical floor for the same machine is `migrate-cli floor` (or
//! `migrate-cli demo --mode all`, which measures it in the same run).
//!
//! Run: `cargo bench -p migrate-benches --bench request_latency`

use std::sync::{Arc, Mutex};
use std::time::Duration;

use migrate_benches::{env, median};
use migrate_core::dirty::UffdWpDirtyLog;
use migrate_core::stats::LatencySummary;
use migrate_core::workload::{fill_initial, Access, DestWorkload, PreWriteLog, SourceWorkload};
use migrate_core::{
    Backing, DestConfig, Destination, GuestMemory, Mode, RegionSpec, Source, SourceConfig,
};
use uring_net::Listener;

/// One pure-postcopy migration; returns the destination's latency summary and bulk GB/s.
fn migrate(mode: Mode, mib: usize) -> (LatencySummary, f64) {
    let spec = [RegionSpec {
        name: "ram".into(),
        size: mib << 20,
        backing: Backing::Anonymous,
    }];
    let src = Arc::new(GuestMemory::allocate(&spec).expect("source memory"));
    fill_initial(&src, 4);
    let dst = Arc::new(GuestMemory::allocate(&spec).expect("destination memory"));
    let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap()).expect("bind loopback");
    let endpoint = listener.local_endpoint().expect("endpoint");
    let dest = {
        let dst = dst.clone();
        std::thread::spawn(move || {
            let log = Arc::new(PreWriteLog::new(&dst));
            let guest: Arc<Mutex<Option<DestWorkload>>> = Arc::default();
            let g = guest.clone();
            let d = Destination::new(dst.clone(), DestConfig::default());
            let mut run = move || {
                let w = DestWorkload::start(
                    dst.clone(),
                    log.clone(),
                    2,
                    Access::Random,
                    Duration::from_micros(20),
                    0,
                );
                *g.lock().unwrap() = Some(w);
            };
            let report = d.accept(&listener, &mut run);
            if let Some(mut w) = guest.lock().unwrap().take() {
                w.stop();
            }
            report
        })
    };
    let mut dirty = UffdWpDirtyLog::new().expect("dirty log");
    let mut vcpus = SourceWorkload::start(src.clone(), 2, Access::Random, 0);
    let mut pause = || {
        vcpus.pause();
        Ok(())
    };
    let mut cfg = SourceConfig {
        mode,
        verify: false,
        ..SourceConfig::default()
    };
    cfg.precopy.max_passes = 0;
    let source = Source::new(src, cfg)
        .migrate(&endpoint, &mut dirty, &mut pause)
        .expect("source");
    let dest = dest
        .join()
        .expect("destination thread")
        .expect("destination");
    (
        dest.latency,
        source.bulk.bytes as f64 / source.total_ms / 1e6,
    )
}

fn main() {
    let (mib, runs) = (
        env("BENCH_MEM_MIB", 256usize),
        env("BENCH_RUNS", 3usize).max(1),
    );
    println!("pure postcopy, {mib} MiB, 2 destination vCPUs touching random pages, {runs} runs per mode (medians)");
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9}",
        "mode", "requests", "avg us", "p50 us", "p99 us", "p99.9 us", "bulk GB/s"
    );
    for mode in Mode::ALL {
        let results: Vec<_> = (0..runs).map(|_| migrate(mode, mib)).collect();
        let m = |f: &dyn Fn(&(LatencySummary, f64)) -> f64| {
            median(&mut results.iter().map(f).collect::<Vec<_>>())
        };
        println!(
            "{:<14} {:>9.0} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>9.2}",
            mode.name(),
            m(&|r| r.0.count as f64),
            m(&|r| r.0.avg),
            m(&|r| r.0.p50),
            m(&|r| r.0.p99),
            m(&|r| r.0.p999),
            m(&|r| r.1)
        );
    }
}
