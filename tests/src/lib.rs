//! Harness for whole-migration tests: a source and a destination in one process, each with its
//! own guest memory and synthetic guest, over loopback TCP.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use migrate_core::dirty::UffdWpDirtyLog;
use migrate_core::verify::PreWriteDigests;
use migrate_core::workload::{fill_initial, Access, DestWorkload, PreWriteLog, SourceWorkload};
use migrate_core::{
    Backing, DestConfig, DestReport, Destination, GuestMemory, Mode, RegionSpec, Source,
    SourceConfig, SourceReport,
};
use uring_net::{Endpoint, Listener};

/// One migration to run.
#[derive(Clone, Debug)]
pub struct Case {
    pub mode: Mode,
    pub backing: Backing,
    /// Bytes per region; two regions are migrated.
    pub region_size: usize,
    pub access: Access,
    pub vcpus: usize,
    /// Source guest writes per second during precopy.
    pub dirty_rate: u64,
    pub passes: u32,
    /// Precopy time limit: a short one switches over in the middle of a pass, so postcopy has
    /// both never-sent and dirtied (discarded) pages to fetch.
    pub precopy_limit: Duration,
    /// Destination guest touches per vCPU.
    pub touches: u64,
}

impl Case {
    pub fn small(mode: Mode, access: Access) -> Self {
        Self {
            mode,
            backing: Backing::Anonymous,
            region_size: 8 << 20,
            access,
            vcpus: 2,
            dirty_rate: 20_000,
            passes: 2,
            precopy_limit: Duration::from_millis(3),
            touches: 300,
        }
    }
}

pub struct Outcome {
    pub source: SourceReport,
    pub dest: DestReport,
    pub src_mem: Arc<GuestMemory>,
    pub dst_mem: Arc<GuestMemory>,
    pub log: Arc<PreWriteLog>,
}

pub fn memory(case: &Case) -> GuestMemory {
    GuestMemory::allocate(&[
        RegionSpec {
            name: "ram-low".into(),
            size: case.region_size,
            backing: case.backing,
        },
        RegionSpec {
            name: "ram-high".into(),
            size: case.region_size,
            backing: case.backing,
        },
    ])
    .expect("allocate guest memory")
}

/// A listener on an ephemeral loopback port.
pub fn loopback_listener() -> (Listener, Endpoint) {
    let l = Listener::bind(&"127.0.0.1:0".parse().unwrap()).expect("bind loopback");
    let ep = l.local_endpoint().expect("local endpoint");
    (l, ep)
}

/// Runs `case` end to end and returns both reports.
pub fn run(case: &Case) -> Outcome {
    let src_mem = Arc::new(memory(case));
    fill_initial(&src_mem, 4);
    let dst_mem = Arc::new(memory(case));
    let log = Arc::new(PreWriteLog::new(&dst_mem));
    let (listener, ep) = loopback_listener();

    let dest = {
        let (dst_mem, log, case) = (dst_mem.clone(), log.clone(), case.clone());
        std::thread::spawn(move || {
            let guest: Arc<Mutex<Option<DestWorkload>>> = Arc::default();
            let g = guest.clone();
            let d = Destination::new(dst_mem.clone(), DestConfig::default())
                .with_guest_digests(log.clone() as Arc<dyn PreWriteDigests>);
            let mut run = move || {
                *g.lock().unwrap() = Some(DestWorkload::start(
                    dst_mem.clone(),
                    log.clone(),
                    case.vcpus,
                    case.access,
                    Duration::from_micros(20),
                    case.touches,
                ));
            };
            let report = d.accept(&listener, &mut run);
            if let Some(mut w) = guest.lock().unwrap().take() {
                w.join();
            }
            report
        })
    };

    let mut dirty = UffdWpDirtyLog::new().expect("uffd-wp dirty log");
    let mut workload =
        SourceWorkload::start(src_mem.clone(), case.vcpus, case.access, case.dirty_rate);
    let mut pause = || {
        workload.pause();
        Ok(())
    };
    let mut cfg = SourceConfig {
        mode: case.mode,
        ..SourceConfig::default()
    };
    cfg.precopy.max_passes = case.passes;
    cfg.precopy.max_time = case.precopy_limit;
    let source = Source::new(src_mem.clone(), cfg).migrate(&ep, &mut dirty, &mut pause);
    let dest = dest.join().expect("destination thread");
    let source = source.expect("source migration");
    let dest = dest.expect("destination migration");
    Outcome {
        source,
        dest,
        src_mem,
        dst_mem,
        log,
    }
}

/// Compares the two memories byte for byte, except host pages the destination guest wrote
/// (those are checked through their pre-write digest against the source's digest).
pub fn assert_identical(o: &Outcome) {
    for (s, d) in o.src_mem.regions().iter().zip(o.dst_mem.regions()) {
        let page = s.host_page_size();
        let mut a = vec![0u8; page];
        let mut b = vec![0u8; page];
        for hp in 0..s.host_pages() {
            s.read_into(hp * page, &mut a).unwrap();
            match o.log.pre_write_digest(s.id(), hp) {
                Some(pre) => assert_eq!(
                    pre,
                    s.digest(hp * page, page),
                    "region {} page {hp}: stale before the guest wrote it",
                    s.name()
                ),
                None => {
                    d.read_into(hp * page, &mut b).unwrap();
                    assert!(a == b, "region {} host page {hp} differs", s.name());
                }
            }
        }
    }
}
