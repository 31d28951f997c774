//! The physical floor of a page request, in the spirit of mig_mon's migration network emulator:
//! no engine logic, just what any postcopy implementation must pay.
//!
//! A vCPU-like thread touches a page of a userfaultfd-registered (MISSING) region; the
//! destination's fault thread reads the event and sends a 16-byte request over loopback TCP
//! (TCP_NODELAY); the source thread replies with a 16-byte header and the page; the
//! destination's receiver thread places it with `UFFDIO_COPY` (which wakes the vCPU) and records
//! fault read → placed. The vCPU then drops the page again (`MADV_DONTNEED`) so the next touch
//! faults too. Optionally a saturating bulk stream runs on a separate connection or on the
//! reply connection itself.

use std::io::{IoSlice, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::ValueEnum;
use migrate_core::memory::GuestRegion;
use migrate_core::sched::Placement;
use migrate_core::stats::LatencyHistogram;
use migrate_core::uffd::{feature, Event, RegisterMode, Userfaultfd};
use migrate_core::{Backing, RegionSpec};
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::report::{gbps, Bytes, FloorRef, Latency, Pages, Report};
use crate::size::PageSize;

/// A saturating bulk stream during the measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BulkMode {
    /// No bulk stream: the idle round trip.
    None,
    /// Bulk on its own connection (like preempt / preempt-full's urgent channel).
    Separate,
    /// Bulk shares the reply connection: replies queue behind it (like vanilla).
    Same,
}

impl BulkMode {
    pub fn name(self) -> &'static str {
        match self {
            BulkMode::None => "none",
            BulkMode::Separate => "separate",
            BulkMode::Same => "same",
        }
    }
}

#[derive(Clone, Debug)]
pub struct FloorConfig {
    pub page: PageSize,
    /// Measured requests (after `warmup` unmeasured ones).
    pub requests: u64,
    pub warmup: u64,
    pub bulk: BulkMode,
    pub vcpus: usize,
    /// Where the emulator's request path (fault, responder, receiver threads) and its bulk
    /// threads run, and the request path's priority: as the engine's, so the floor is like
    /// for like.
    pub placement: Placement,
}

/// What a floor run measured.
#[derive(Clone, Debug)]
pub struct FloorOutcome {
    pub latency: Latency,
    pub elapsed: Duration,
    pub reply_bytes: u64,
    pub bulk_bytes: u64,
    pub replies: u64,
    pub config: FloorConfig,
}

impl FloorOutcome {
    pub fn floor_ref(&self) -> FloorRef {
        FloorRef::from(&self.latency)
    }

    pub fn report(&self) -> Report {
        let c = &self.config;
        let ms = self.elapsed.as_secs_f64() * 1e3;
        let page = c.page.bytes() as u64;
        Report {
            mode: Some(match c.bulk {
                BulkMode::None => "floor".to_string(),
                b => format!("floor+bulk-{}", b.name()),
            }),
            role: "floor".into(),
            latency_us: Some(self.latency.clone()),
            floor_us: Some(self.floor_ref()),
            pages: Pages {
                bulk: self.bulk_bytes / page,
                urgent: self.replies,
                zero: 0,
            },
            bytes: Bytes {
                bulk: self.bulk_bytes,
                urgent: self.reply_bytes,
            },
            requests: self.latency.count,
            total_ms: ms,
            throughput_gbps: gbps(self.bulk_bytes + self.reply_bytes, ms),
            settings: json!({
                "page_size": c.page.name(),
                "requests": c.requests,
                "warmup": c.warmup,
                "bulk": c.bulk.name(),
                "vcpus": c.vcpus,
                "bulk_gbps": gbps(self.bulk_bytes, ms),
                "urgent_cpus": c.placement.urgent_cpus,
                "bulk_cpus": c.placement.bulk_cpus,
                "urgent_priority": c.placement.urgent_priority,
            }),
            ..Default::default()
        }
    }
}

const BULK_CHUNK: usize = 256 << 10;
/// Reply header offset value marking a bulk chunk on a shared connection.
const BULK_MARK: u64 = u64::MAX;

/// State shared by the emulator's threads.
struct Shared {
    base: Instant,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
    uffd: Userfaultfd,
    region: GuestRegion,
    hist: LatencyHistogram,
    placed: AtomicU64,
    reply_bytes: AtomicU64,
    bulk_bytes: AtomicU64,
    warmup: u64,
    /// Bulk bytes counted only while measuring.
    measuring: AtomicBool,
    /// When measuring started (after the warm-up), in `now_ns` time.
    measure_start_ns: AtomicU64,
    /// Where the request-path and bulk threads run (like the engine's).
    placement: Placement,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Records the first error and unblocks everything: the region is unregistered, which
    /// wakes vCPUs waiting on a fault that will now never be served.
    fn fail(&self, what: &str, e: anyhow::Error) {
        if !self.stop.swap(true, SeqCst) {
            *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{what}: {e:#}"));
        }
        let _ = self
            .uffd
            .unregister(self.region.base_addr(), self.region.len());
    }
}

/// Writes all of `bufs` with vectored writes.
fn write_all_vectored(s: &mut TcpStream, bufs: &[&[u8]]) -> std::io::Result<()> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut done = 0;
    while done < total {
        let mut skip = done;
        let mut slices = Vec::with_capacity(bufs.len());
        for b in bufs {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            slices.push(IoSlice::new(&b[skip..]));
            skip = 0;
        }
        match s.write_vectored(&slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn header(a: u64, b: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&a.to_le_bytes());
    h[8..].copy_from_slice(&b.to_le_bytes());
    h
}

fn parse_header(h: &[u8; 16]) -> (u64, u64) {
    let a = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
    let b = u64::from_le_bytes(h[8..].try_into().expect("8 bytes"));
    (a, b)
}

fn tcp_pair(listener: &TcpListener) -> Result<(TcpStream, TcpStream)> {
    let addr = listener.local_addr()?;
    let dst = TcpStream::connect(addr).context("connect over loopback")?;
    let (src, _) = listener.accept().context("accept over loopback")?;
    dst.set_nodelay(true)?;
    src.set_nodelay(true)?;
    Ok((dst, src))
}

fn spawn(
    name: &str,
    shared: &Arc<Shared>,
    f: impl FnOnce(&Shared) -> Result<()> + Send + 'static,
) -> Result<JoinHandle<()>> {
    spawn_as(Role::Other, name, shared, f)
}

/// Which part of the emulator a thread plays, for its placement.
#[derive(Clone, Copy)]
enum Role {
    Other,
    /// The request path: placed (and prioritised) like the engine's urgent path.
    Urgent,
    /// The bulk stream: placed like the engine's bulk threads.
    Bulk,
}

fn spawn_as(
    role: Role,
    name: &str,
    shared: &Arc<Shared>,
    f: impl FnOnce(&Shared) -> Result<()> + Send + 'static,
) -> Result<JoinHandle<()>> {
    let shared = shared.clone();
    let what = name.to_string();
    std::thread::Builder::new()
        .name(format!("floor-{name}"))
        .spawn(move || {
            match role {
                Role::Urgent => shared.placement.enter_urgent(&what),
                Role::Bulk => shared.placement.enter_bulk(&what),
                Role::Other => {}
            }
            if let Err(e) = f(&shared) {
                if !shared.stop.load(SeqCst) {
                    shared.fail(&what, e);
                }
            }
        })
        .with_context(|| format!("spawn the {name} thread"))
}

/// Runs the emulator and returns its histogram.
pub fn run(config: &FloorConfig) -> Result<FloorOutcome> {
    let page = config.page.bytes();
    let vcpus = config.vcpus.max(1);
    // Enough pages that vCPUs pick among many; each is dropped again after every touch.
    let pages_per_vcpu = if page == 4096 { 256 } else { 4 };
    let npages = pages_per_vcpu * vcpus;
    let backing = config.page.backing();
    let region = GuestRegion::allocate(
        0,
        &RegionSpec {
            name: "floor".into(),
            size: npages * page,
            backing,
        },
    )
    .with_context(|| format!("allocating the floor's {} region", config.page.name()))?;
    let features = if backing == Backing::HugeTlb {
        feature::MISSING_HUGETLBFS
    } else {
        0
    };
    let uffd = Userfaultfd::open(features).context("opening a userfaultfd")?;
    uffd.register(region.base_addr(), region.len(), RegisterMode::MISSING)
        .context("registering the floor region for missing faults")?;

    // The source's memory: random content, replies are sent straight from it.
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut src_mem = vec![0u8; npages * page];
    rng.fill(&mut src_mem[..]);
    let src_mem = Arc::new(src_mem);

    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let (req_dst, req_src) = tcp_pair(&listener)?;
    let bulk_pair = match config.bulk {
        BulkMode::Separate => Some(tcp_pair(&listener)?),
        _ => None,
    };
    // Clones to shut everything down at the end (blocked reads and writes then return).
    let mut closers = vec![req_dst.try_clone()?, req_src.try_clone()?];
    if let Some((d, s)) = &bulk_pair {
        closers.push(d.try_clone()?);
        closers.push(s.try_clone()?);
    }

    let shared = Arc::new(Shared {
        base: Instant::now(),
        stop: AtomicBool::new(false),
        error: Mutex::new(None),
        uffd,
        region,
        hist: LatencyHistogram::new(),
        placed: AtomicU64::new(0),
        reply_bytes: AtomicU64::new(0),
        bulk_bytes: AtomicU64::new(0),
        warmup: config.warmup,
        measuring: AtomicBool::new(false),
        measure_start_ns: AtomicU64::new(0),
        placement: config.placement.clone(),
    });
    let mut threads = Vec::new();

    // Destination fault thread: event → request, no hand-off.
    {
        let mut out = req_dst.try_clone()?;
        threads.push(spawn_as(Role::Urgent, "fault", &shared, move |sh| {
            let mut events = Vec::with_capacity(64);
            let mut buf = Vec::with_capacity(64 * 16);
            while !sh.stop.load(Relaxed) {
                if !sh.uffd.wait(None, Some(Duration::from_millis(50)))? {
                    continue;
                }
                events.clear();
                sh.uffd.read_events(&mut events, 64)?;
                let now = sh.now_ns();
                buf.clear();
                for ev in &events {
                    if let Event::PageFault { addr, .. } = *ev {
                        let offset = (addr - sh.region.base_addr()) / page * page;
                        buf.extend_from_slice(&header(offset as u64, now));
                    }
                }
                out.write_all(&buf).context("sending a request")?;
            }
            Ok(())
        })?);
    }

    // Destination receiver: replies (and bulk chunks on a shared connection) → UFFDIO_COPY.
    {
        let mut input = req_dst.try_clone()?;
        threads.push(spawn_as(Role::Urgent, "receiver", &shared, move |sh| {
            let mut page_buf = vec![0u8; page];
            let mut drain = vec![0u8; BULK_CHUNK];
            let mut h = [0u8; 16];
            loop {
                if input.read_exact(&mut h).is_err() {
                    return Ok(());
                }
                let (offset, token) = parse_header(&h);
                if offset == BULK_MARK {
                    if token as usize > drain.len() {
                        return Err(anyhow!("bulk chunk of {token} bytes is too large"));
                    }
                    input.read_exact(&mut drain[..token as usize])?;
                    if sh.measuring.load(Relaxed) {
                        sh.bulk_bytes.fetch_add(token, Relaxed);
                    }
                    continue;
                }
                input.read_exact(&mut page_buf)?;
                let dst = sh.region.base_addr() + offset as usize;
                sh.uffd
                    .copy(dst, &page_buf, page, true)
                    .context("UFFDIO_COPY")?;
                let placed = sh.now_ns();
                let n = sh.placed.fetch_add(1, Relaxed);
                if n >= sh.warmup {
                    sh.hist
                        .record(Duration::from_nanos(placed.saturating_sub(token)));
                    sh.reply_bytes.fetch_add(page as u64, Relaxed);
                } else if n + 1 == sh.warmup {
                    sh.measure_start_ns.store(sh.now_ns(), Relaxed);
                    sh.measuring.store(true, Relaxed);
                }
            }
        })?);
    }
    if config.warmup == 0 {
        shared.measure_start_ns.store(shared.now_ns(), Relaxed);
        shared.measuring.store(true, Relaxed);
    }

    // Source: reads requests, replies from its memory (directly, or through the bulk writer
    // when bulk shares the connection).
    let (reply_tx, reply_rx) = mpsc::channel::<(u64, u64)>();
    {
        let mut input = req_src.try_clone()?;
        let mut out = req_src.try_clone()?;
        let src_mem = src_mem.clone();
        let via_bulk = config.bulk == BulkMode::Same;
        threads.push(spawn_as(Role::Urgent, "source", &shared, move |_sh| {
            let mut h = [0u8; 16];
            loop {
                if input.read_exact(&mut h).is_err() {
                    return Ok(());
                }
                let (offset, token) = parse_header(&h);
                if via_bulk {
                    if reply_tx.send((offset, token)).is_err() {
                        return Ok(());
                    }
                    continue;
                }
                let off = offset as usize;
                write_all_vectored(&mut out, &[&h, &src_mem[off..off + page]])
                    .context("sending a reply")?;
            }
        })?);
    }

    // Bulk stream.
    match config.bulk {
        BulkMode::None => {}
        BulkMode::Separate => {
            let (mut d, mut s) = bulk_pair.expect("made for Separate");
            let src_mem = src_mem.clone();
            threads.push(spawn_as(Role::Bulk, "bulk-sender", &shared, move |sh| {
                let chunk = &src_mem[..BULK_CHUNK.min(src_mem.len())];
                while !sh.stop.load(Relaxed) {
                    s.write_all(chunk)?;
                }
                Ok(())
            })?);
            threads.push(spawn_as(Role::Bulk, "bulk-receiver", &shared, move |sh| {
                let mut buf = vec![0u8; BULK_CHUNK];
                loop {
                    let n = d.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    if sh.measuring.load(Relaxed) {
                        sh.bulk_bytes.fetch_add(n as u64, Relaxed);
                    }
                }
            })?);
        }
        BulkMode::Same => {
            let mut out = req_src.try_clone()?;
            let src_mem = src_mem.clone();
            threads.push(spawn_as(Role::Bulk, "bulk-sender", &shared, move |sh| {
                let len = BULK_CHUNK.min(src_mem.len());
                let bulk_header = header(BULK_MARK, len as u64);
                while !sh.stop.load(Relaxed) {
                    while let Ok((offset, token)) = reply_rx.try_recv() {
                        let off = offset as usize;
                        write_all_vectored(
                            &mut out,
                            &[&header(offset, token), &src_mem[off..off + page]],
                        )?;
                    }
                    write_all_vectored(&mut out, &[&bulk_header, &src_mem[..len]])?;
                }
                Ok(())
            })?);
        }
    }

    // The vCPUs: touch a random page of their share, wait for it, drop it again.
    let total = config.warmup + config.requests;
    let mut vcpu_threads = Vec::new();
    for v in 0..vcpus {
        let per = total / vcpus as u64 + u64::from((v as u64) < total % vcpus as u64);
        vcpu_threads.push(spawn(&format!("vcpu{v}"), &shared, move |sh| {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(v as u64 + 1);
            let mut word = [0u8; 8];
            for _ in 0..per {
                if sh.stop.load(Relaxed) {
                    break;
                }
                let hp = v * pages_per_vcpu + rng.gen_range(0..pages_per_vcpu);
                let at = hp * page + rng.gen_range(0..page / 8) * 8;
                sh.region.read_into(at, &mut word)?;
                sh.region.discard(hp * page, page)?;
            }
            Ok(())
        })?);
    }
    for t in vcpu_threads {
        let _ = t.join();
    }
    let elapsed = Duration::from_nanos(
        shared
            .now_ns()
            .saturating_sub(shared.measure_start_ns.load(Relaxed)),
    );
    shared.stop.store(true, SeqCst);
    for s in &closers {
        let _ = s.shutdown(Shutdown::Both);
    }
    for t in threads {
        let _ = t.join();
    }
    if let Some(e) = shared
        .error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        return Err(anyhow!("floor emulator failed in {e}"));
    }
    let latency = Latency::from(&shared.hist.summary());
    if latency.count == 0 {
        return Err(anyhow!("floor emulator measured no requests"));
    }
    Ok(FloorOutcome {
        replies: latency.count,
        latency,
        elapsed,
        reply_bytes: shared.reply_bytes.load(Relaxed),
        bulk_bytes: shared.bulk_bytes.load(Relaxed),
        config: config.clone(),
    })
}
