//! Embedding the engine the way a VMM would: the VMM owns guest memory and vCPUs, hands the
//! engine its regions, a dirty log and pause/run callbacks, and gets reports back.
//!
//! Both halves run in this one process here (over loopback TCP) so the example is
//! self-contained; in a real deployment `Source::migrate` runs on one host and
//! `Destination::accept` on the other.
//!
//! ```text
//! cargo run --release -p migrate-core --example embed -- [MiB] [vanilla|preempt|preempt-full] [passes]
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use migrate_core::dirty::UffdWpDirtyLog;
use migrate_core::verify::PreWriteDigests;
use migrate_core::workload::{fill_initial, Access, DestWorkload, PreWriteLog, SourceWorkload};
use migrate_core::{
    Backing, DestConfig, Destination, GuestMemory, Mode, RegionSpec, Source, SourceConfig,
};
use uring_net::Listener;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).map_or(Ok(256), |s| s.parse())?;
    let mode: Mode = args.get(2).map_or(Ok(Mode::PreemptFull), |s| s.parse())?;
    let passes: u32 = args.get(3).map_or(Ok(0), |s| s.parse())?;
    let spec = [RegionSpec {
        name: "ram".into(),
        size: mib << 20,
        backing: Backing::Anonymous,
    }];

    // --- destination host: memory the VMM allocated, a guest that starts on "run" ---
    let dst_mem = Arc::new(GuestMemory::allocate(&spec)?);
    let log = Arc::new(PreWriteLog::new(&dst_mem));
    let listener = Listener::bind(&"127.0.0.1:0".parse()?)?;
    let endpoint = listener.local_endpoint()?;
    let dest = {
        let (mem, log) = (dst_mem.clone(), log.clone());
        std::thread::spawn(move || {
            let guest: Arc<Mutex<Option<DestWorkload>>> = Arc::default();
            let g = guest.clone();
            let d = Destination::new(mem.clone(), DestConfig::default())
                .with_guest_digests(log.clone() as Arc<dyn PreWriteDigests>);
            let mut run = move || {
                let w = DestWorkload::start(
                    mem.clone(),
                    log.clone(),
                    2,
                    Access::Random,
                    Duration::from_micros(50),
                    0,
                );
                *g.lock().unwrap() = Some(w);
            };
            let report = d.accept(&listener, &mut run);
            if let Some(mut w) = guest.lock().unwrap().take() {
                w.stop()
            }
            report
        })
    };

    // --- source host: the VMM's memory, its dirty log, and a pause callback ---
    let src_mem = Arc::new(GuestMemory::allocate(&spec)?);
    fill_initial(&src_mem, 4);
    let mut dirty = UffdWpDirtyLog::new()?;
    let mut vcpus = SourceWorkload::start(src_mem.clone(), 2, Access::Random, 50_000);
    let mut pause = || {
        vcpus.pause();
        Ok(())
    };
    // (Every other setting has a default; `migrate-cli` exposes them as flags.)
    let mut cfg = SourceConfig {
        mode,
        ..SourceConfig::default()
    };
    cfg.precopy.max_passes = passes;
    let source = Source::new(src_mem, cfg).migrate(&endpoint, &mut dirty, &mut pause)?;
    let dest = dest.join().expect("destination thread")?;

    println!("{}", dest.latency.render());
    println!(
        "mode {} requests {} p50 {:.1} us p99 {:.1} us p99.9 {:.1} us",
        mode.name(),
        dest.counters.requests,
        dest.latency.p50,
        dest.latency.p99,
        dest.latency.p999
    );
    println!(
        "bulk throughput {:.2} GB/s, precopy {:.2} GB/s",
        source.bulk.bytes as f64 / source.total_ms / 1e6,
        source.precopy_bytes as f64 / source.precopy_ms.max(1e-3) / 1e6
    );
    println!("source {:?}", source.counters);
    println!("dest   {:?}", dest.counters);
    println!(
        "total {:.0} ms, downtime {:.2} ms, verified {:?}",
        source.total_ms, source.downtime_ms, source.verified
    );
    Ok(())
}
