//! SQE batching and coalescing in uring-net, against a blocking `writev` baseline.
//!
//! Loopback TCP to a draining receiver thread; frames are a 16-byte header + payload (4 KiB
//! pages, and 2 MiB frames). Variants:
//!
//! * `sqe-per-page`: raw io_uring, one `SEND` SQE per frame (header and payload contiguous in a
//!   pre-built buffer), `batch` SQEs per `io_uring_enter` (submit + wait for the batch).
//! * `FrameSender`: coalesced vectored `SENDMSG`, one send in flight, `SubmitPolicy::Count(64)`.
//! * `FrameSender ZC`: same with `ZeroCopy::Always` (`SENDMSG_ZC`; loopback copies anyway).
//! * `writev`: blocking `writev` of 64 × (header + page) (or 1 × (header + 2 MiB)).
//!
//! Prints a table. Environment: `BENCH_SECS` (seconds per row, default 1.5), `BENCH_PAGES`
//! (pages in the source pool, default 4096), `BENCH_BIG` (0 to skip the 2 MiB rows).
//!
//! Run: `cargo bench -p migrate-benches --bench sqe_batching`

use std::io::{IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use migrate_benches::env;
use uring_net::{
    BufRef, Endpoint, FrameSender, Listener, Role, SenderConfig, SocketOptions, StableMemory,
    Stream, SubmitPolicy, ZeroCopy,
};

const HDR: usize = 16;

struct Row {
    size: &'static str,
    variant: String,
    batch: String,
    frames: u64,
    bytes: u64,
    secs: f64,
    syscalls: u64,
    cpu_ns: u64,
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable timespec; CLOCK_THREAD_CPUTIME_ID is always valid.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Pin the calling thread to `cpu` if `BENCH_PIN=1` (off by default: on this 2-core box
/// pinning sender and receiver apart made every variant ~3x slower).
fn pin(cpu: usize) {
    if env::<u32>("BENCH_PIN", 0) == 0 {
        return;
    }
    // SAFETY: `set` is a live, zero-initialised cpu_set_t; CPU_SET stays within its bounds
    // (cpu < CPU_SETSIZE) and sched_setaffinity(0, ..) only affects the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % libc::CPU_SETSIZE as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A connected loopback TCP pair; the receiving side drains into a thread until EOF.
fn connection() -> (Stream, std::thread::JoinHandle<u64>) {
    let l = Listener::bind(&"127.0.0.1:0".parse::<Endpoint>().unwrap()).unwrap();
    let ep = l.local_endpoint().unwrap();
    let tx = uring_net::connect(&ep, Some(Duration::from_secs(5))).unwrap();
    let rx = l.accept().unwrap();
    SocketOptions::for_role(Role::Bulk).apply(&tx).unwrap();
    let rx_thread = std::thread::spawn(move || {
        pin(1);
        let mut rx = rx;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match rx.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n as u64,
            }
        }
    });
    (tx, rx_thread)
}

fn finish(tx: Stream, rx: std::thread::JoinHandle<u64>, expect: u64) {
    tx.shutdown(std::net::Shutdown::Write).unwrap();
    let got = rx.join().unwrap();
    assert_eq!(got, expect, "receiver byte count");
}

/// Raw io_uring, one SEND per frame, `batch` SQEs per enter.
fn sqe_per_frame(size: &'static str, frame_len: usize, batch: usize, secs: f64) -> Row {
    let (tx, rx) = connection();
    let nframes = (8 << 20) / (frame_len + HDR) + batch;
    let stride = frame_len + HDR;
    let pool: Vec<u8> = (0..nframes * stride).map(|i| i as u8).collect();
    let mut ring = IoUring::new(batch.max(8).next_power_of_two() as u32).unwrap();
    let fd = types::Fd(tx.as_raw_fd());
    let (mut bytes, mut enters) = (0u64, 0u64);
    let mut idx = 0;
    let cpu0 = thread_cpu_ns();
    let t0 = Instant::now();
    let deadline = Duration::from_secs_f64(secs);
    while t0.elapsed() < deadline {
        for _ in 0..batch {
            // SAFETY: `pool` outlives the batch: we wait for all `batch` CQEs before reuse.
            let p = unsafe { pool.as_ptr().add(idx * stride) };
            let e = opcode::Send::new(fd, p, stride as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build();
            // SAFETY: the SQE points into `pool`, alive until its CQE is reaped below.
            unsafe { ring.submission().push(&e).unwrap() };
            idx = (idx + 1) % nframes;
        }
        ring.submit_and_wait(batch).unwrap();
        enters += 1;
        let mut done = 0;
        while done < batch {
            for c in ring.completion() {
                assert!(c.result() >= 0, "send failed: {}", c.result());
                bytes += c.result() as u64;
                done += 1;
            }
            if done < batch {
                ring.submit_and_wait(batch - done).unwrap();
                enters += 1;
            }
        }
    }
    // Short sends lose bytes here (independent SQEs; fine for a drain-only receiver), so
    // report whole frames' worth of bytes actually sent.
    let frames = bytes / stride as u64;
    let secs = t0.elapsed().as_secs_f64();
    let cpu_ns = thread_cpu_ns() - cpu0;
    finish(tx, rx, bytes);
    Row {
        size,
        variant: "sqe-per-page SEND".into(),
        batch: batch.to_string(),
        frames,
        bytes,
        secs,
        syscalls: enters,
        cpu_ns,
    }
}

struct Pool(Vec<u8>);
// SAFETY: the vector is never mutated or reallocated after construction.
unsafe impl StableMemory for Pool {
    fn memory(&self) -> (*const u8, usize) {
        (self.0.as_ptr(), self.0.len())
    }
}

fn page_bufs(frame_len: usize, n: usize) -> Vec<BufRef> {
    let owner: Arc<dyn StableMemory> =
        Arc::new(Pool((0..frame_len * n).map(|i| (i * 7) as u8).collect()));
    (0..n)
        .map(|i| BufRef::new(owner.clone(), i * frame_len, frame_len).unwrap())
        .collect()
}

fn frame_sender(
    size: &'static str,
    frame_len: usize,
    npages: usize,
    zc: ZeroCopy,
    count: usize,
    secs: f64,
) -> Row {
    let (tx, rx) = connection();
    let bufs = page_bufs(frame_len, (npages * 4096 / frame_len).max(4));
    let cfg = SenderConfig {
        zero_copy: zc,
        submit: SubmitPolicy::Count(count),
        ..SenderConfig::bulk()
    };
    let mut s = FrameSender::new(tx, cfg).unwrap();
    let stats = s.stats();
    let mut frames = 0u64;
    let mut idx = 0;
    let high_water = 8 << 20;
    let cpu0 = thread_cpu_ns();
    let t0 = Instant::now();
    let deadline = Duration::from_secs_f64(secs);
    while t0.elapsed() < deadline {
        for _ in 0..count {
            let mut h = [0u8; HDR];
            h[..8].copy_from_slice(&frames.to_le_bytes());
            s.push(&h, &bufs[idx..idx + 1]).unwrap();
            idx = (idx + 1) % bufs.len();
            frames += 1;
        }
        while s.backlog_bytes() > high_water {
            s.wait(None).unwrap();
        }
    }
    s.drain(Some(Duration::from_secs(30))).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let cpu_ns = thread_cpu_ns() - cpu0;
    let st = stats.snapshot();
    let name = match zc {
        ZeroCopy::Always => "FrameSender ZC (SENDMSG_ZC)",
        _ => "FrameSender (SENDMSG)",
    };
    tracing_free_log(name, size, &st);
    let tx = s.stream().try_clone().unwrap();
    drop(s);
    finish(tx, rx, st.bytes);
    Row {
        size,
        variant: name.into(),
        batch: format!("Count({count})"),
        frames,
        bytes: st.bytes,
        secs,
        syscalls: st.submits,
        cpu_ns,
    }
}

fn tracing_free_log(name: &str, size: &str, st: &uring_net::SendStatsSnapshot) {
    if std::env::var("BENCH_VERBOSE").is_ok() {
        eprintln!("  {name} {size}: {st:?}");
    }
}

fn writev_baseline(size: &'static str, frame_len: usize, per_call: usize, secs: f64) -> Row {
    let (tx, rx) = connection();
    let n = ((8 << 20) / frame_len).max(per_call);
    let pool: Vec<u8> = (0..frame_len * n).map(|i| (i * 7) as u8).collect();
    let hdrs = vec![0u8; HDR * per_call];
    let (mut frames, mut bytes, mut calls) = (0u64, 0u64, 0u64);
    let mut idx = 0;
    let cpu0 = thread_cpu_ns();
    let t0 = Instant::now();
    let deadline = Duration::from_secs_f64(secs);
    let mut w = &tx;
    while t0.elapsed() < deadline {
        let mut iov = Vec::with_capacity(per_call * 2);
        for k in 0..per_call {
            iov.push(IoSlice::new(&hdrs[k * HDR..(k + 1) * HDR]));
            let p = (idx + k) % n;
            iov.push(IoSlice::new(&pool[p * frame_len..(p + 1) * frame_len]));
        }
        idx = (idx + per_call) % n;
        let mut slices = &mut iov[..];
        while !slices.is_empty() {
            let k = w.write_vectored(slices).unwrap();
            calls += 1;
            bytes += k as u64;
            IoSlice::advance_slices(&mut slices, k);
        }
        frames += per_call as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu_ns = thread_cpu_ns() - cpu0;
    finish(tx, rx, bytes);
    Row {
        size,
        variant: "blocking writev".into(),
        batch: format!("{per_call}/call"),
        frames,
        bytes,
        secs,
        syscalls: calls,
        cpu_ns,
    }
}

fn print(rows: &[Row]) {
    println!(
        "| size | variant | batch | frames/s | GB/s | syscalls/frame | sender CPU ns/frame | % of writev GB/s |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.size == r.size && b.variant == "blocking writev")
            .map(|b| b.bytes as f64 / b.secs);
        let gbs = r.bytes as f64 / r.secs / 1e9;
        let pct = base.map_or("-".to_string(), |b| {
            format!("{:.0}%", 100.0 * r.bytes as f64 / r.secs / b)
        });
        println!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.4} | {:.0} | {} |",
            r.size,
            r.variant,
            r.batch,
            r.frames as f64 / r.secs,
            gbs,
            r.syscalls as f64 / r.frames as f64,
            r.cpu_ns as f64 / r.frames as f64,
            pct
        );
    }
}

#[derive(Clone, Copy)]
enum Case {
    Writev(&'static str, usize, usize),
    Sqe(&'static str, usize, usize),
    Sender(&'static str, usize, ZeroCopy, usize),
}

fn run(case: Case, npages: usize, secs: f64) -> Row {
    match case {
        Case::Writev(size, len, per_call) => writev_baseline(size, len, per_call, secs),
        Case::Sqe(size, len, batch) => sqe_per_frame(size, len, batch, secs),
        Case::Sender(size, len, zc, count) => frame_sender(size, len, npages, zc, count, secs),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; arguments are ignored.
    let secs: f64 = env("BENCH_SECS", 1.0);
    let reps: usize = env("BENCH_REPS", 3);
    let npages: usize = env("BENCH_PAGES", 4096);
    let big = env::<u32>("BENCH_BIG", 1) != 0;
    pin(0);
    let mb2 = 2 << 20;
    let mut cases = vec![Case::Writev("4 KiB", 4096, 64)];
    for batch in [1, 4, 16, 64, 256] {
        cases.push(Case::Sqe("4 KiB", 4096, batch));
    }
    for count in [16, 64, 256] {
        cases.push(Case::Sender("4 KiB", 4096, ZeroCopy::Never, count));
    }
    cases.push(Case::Sender("4 KiB", 4096, ZeroCopy::Always, 64));
    if big {
        cases.push(Case::Writev("2 MiB", mb2, 1));
        for batch in [1, 4] {
            cases.push(Case::Sqe("2 MiB", mb2, batch));
        }
        cases.push(Case::Sender("2 MiB", mb2, ZeroCopy::Never, 1));
        cases.push(Case::Sender("2 MiB", mb2, ZeroCopy::Always, 1));
    }
    eprintln!(
        "sqe_batching: {} cases x {reps} reps x {secs} s, {npages}-page pool; median by GB/s",
        cases.len()
    );
    // Interleave repetitions so slow drifts (thermal, other load) hit every case alike.
    let mut runs: Vec<Vec<Row>> = cases.iter().map(|_| Vec::new()).collect();
    for _ in 0..reps.max(1) {
        for (i, &c) in cases.iter().enumerate() {
            runs[i].push(run(c, npages, secs));
        }
    }
    let rows: Vec<Row> = runs
        .into_iter()
        .map(|mut v| {
            v.sort_by(|a, b| (a.bytes as f64 / a.secs).total_cmp(&(b.bytes as f64 / b.secs)));
            let mid = v.len() / 2;
            v.swap_remove(mid)
        })
        .collect();
    print(&rows);
}
