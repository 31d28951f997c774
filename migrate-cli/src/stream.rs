//! `stream`: the same-run bulk baseline. Plain blocking `writev` of 64 × (16-byte header +
//! 4 KiB page) over loopback TCP to a thread that drains the connection; reports GB/s.

use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

const PAGE: usize = 4096;
const HEADER: usize = 16;
const BATCH: usize = 64;

/// One baseline measurement.
#[derive(Clone, Debug, Serialize)]
pub struct StreamOutcome {
    pub role: String,
    pub mode: String,
    /// Page + header bytes written per second, in GB/s (10^9).
    pub gbytes_per_sec: f64,
    /// Page bytes only, in GB/s.
    pub page_gbytes_per_sec: f64,
    pub bytes: u64,
    pub pages: u64,
    pub secs: f64,
    pub writev_calls: u64,
    /// CPU time (user + system) of the writing thread per page, in µs (null if unknown).
    pub sender_cpu_us_per_page: Option<f64>,
}

impl StreamOutcome {
    pub fn render(&self) -> String {
        let cpu = self
            .sender_cpu_us_per_page
            .map_or("-".to_string(), |c| format!("{c:.3} us"));
        let into = if self.mode == "stream-fresh" {
            ", into fresh memory"
        } else {
            ""
        };
        format!(
            "== stream baseline (writev 64 x (16 B + 4 KiB), loopback TCP{into}) ==\n\
             {:.2} GB/s ({:.2} GB/s of pages), {} pages in {:.2} s, {} writev calls, \
             sender CPU per page {cpu}\n",
            self.gbytes_per_sec, self.page_gbytes_per_sec, self.pages, self.secs, self.writev_calls
        )
    }
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_secs() -> Option<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then_some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
}

/// Runs the baseline for `secs`.
pub fn run(secs: Duration) -> Result<StreamOutcome> {
    stream(Limit::Time(secs))
}

/// The baseline that allocates like a migration destination: exactly `page_bytes` of pages
/// (with their headers) are streamed, and the reader reads them into fresh anonymous memory,
/// so every page costs the receiver a page fault and a zeroed page, as precopy does.
pub fn run_fresh(page_bytes: u64) -> Result<StreamOutcome> {
    // Whole batches of 64 pages (256 KiB), rounded down.
    let batches = page_bytes / (BATCH * PAGE) as u64;
    if batches == 0 {
        bail!("--fresh must be at least {} KiB", BATCH * PAGE / 1024);
    }
    stream(Limit::FreshBatches(batches))
}

/// When the writer stops, and where the reader puts the bytes.
#[derive(Clone, Copy)]
enum Limit {
    /// Stream this long into one reused buffer.
    Time(Duration),
    /// Stream exactly this many batches into fresh memory.
    FreshBatches(u64),
}

fn stream(limit: Limit) -> Result<StreamOutcome> {
    let batch_bytes = BATCH * (HEADER + PAGE);
    let fresh_len = match limit {
        Limit::FreshBatches(b) => Some(
            usize::try_from(b)
                .ok()
                .and_then(|b| b.checked_mul(batch_bytes))
                .context("--fresh is too large")?,
        ),
        Limit::Time(_) => None,
    };
    // Allocated (but not touched) before the clock starts; rounded up to whole pages.
    let fresh = fresh_len
        .map(|len| {
            migrate_core::memory::Mapping::new(
                "stream-fresh",
                len.next_multiple_of(PAGE),
                migrate_core::memory::Backing::Anonymous,
            )
        })
        .transpose()
        .context("mapping the fresh receive memory")?;
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let addr = listener.local_addr()?;
    // The reader owns the mapping: it stays mapped for as long as the thread can write to it,
    // whichever way this function returns.
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, Instant)> {
        let (mut conn, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let r = match &fresh {
                // SAFETY: `m` is owned by this thread, so it is mapped for the whole call and
                // nothing else touches it; the read stays inside its `m.len()` bytes.
                Some(m) if (total as usize) < m.len() => unsafe {
                    let at = total as usize;
                    let n = (m.len() - at).min(1 << 20);
                    let r = libc::read(conn.as_raw_fd(), m.as_ptr().add(at).cast(), n);
                    if r < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(r as usize)
                    }
                },
                _ => conn.read(&mut buf),
            };
            match r {
                Ok(0) => return Ok((total, Instant::now())),
                Ok(n) => total += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    });
    let conn = TcpStream::connect(addr).context("connecting over loopback")?;
    let fd = conn.as_raw_fd();
    // The payload: 64 distinct pages and headers, touched once so no page faults are timed.
    let pages: Vec<u8> = (0..BATCH * PAGE).map(|i| (i % 251) as u8).collect();
    let headers: Vec<u8> = vec![0xa5; BATCH * HEADER];
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(2 * BATCH);
    for i in 0..BATCH {
        iov.push(libc::iovec {
            iov_base: headers[i * HEADER..].as_ptr() as *mut libc::c_void,
            iov_len: HEADER,
        });
        iov.push(libc::iovec {
            iov_base: pages[i * PAGE..].as_ptr() as *mut libc::c_void,
            iov_len: PAGE,
        });
    }
    let more = |start: Instant, batches: u64| match limit {
        Limit::Time(t) => start.elapsed() < t,
        Limit::FreshBatches(n) => batches < n,
    };
    let cpu0 = thread_cpu_secs();
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut batches = 0u64;
    let mut calls = 0u64;
    while more(start, batches) {
        // One batch, resubmitting the rest after a short write.
        let mut done = 0usize;
        while done < batch_bytes {
            let (first, skip) = locate(&iov, done);
            let mut v: Vec<libc::iovec> = iov[first..].to_vec();
            // SAFETY: `skip` is within the first iovec, which points into a live buffer.
            v[0].iov_base = unsafe { (v[0].iov_base as *mut u8).add(skip) } as *mut libc::c_void;
            v[0].iov_len -= skip;
            // SAFETY: every iovec points into `headers` or `pages`, alive for this call.
            let n = unsafe { libc::writev(fd, v.as_ptr(), v.len() as libc::c_int) };
            calls += 1;
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("writev");
            }
            done += n as usize;
        }
        bytes += batch_bytes as u64;
        batches += 1;
    }
    let writer_done = start.elapsed();
    let cpu1 = thread_cpu_secs();
    conn.shutdown(Shutdown::Write).ok();
    let (received, reader_done) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))?
        .context("reading the stream")?;
    // The fresh variant is over when the last byte is in place; the timed one when the
    // writer's time is up.
    let elapsed = match limit {
        Limit::Time(_) => writer_done,
        Limit::FreshBatches(_) => reader_done - start,
    }
    .as_secs_f64();
    if received != bytes {
        bail!("the reader got {received} bytes of {bytes}");
    }
    let pages_sent = bytes / (HEADER + PAGE) as u64;
    Ok(StreamOutcome {
        role: "stream".into(),
        mode: match limit {
            Limit::Time(_) => "stream",
            Limit::FreshBatches(_) => "stream-fresh",
        }
        .into(),
        gbytes_per_sec: bytes as f64 / elapsed / 1e9,
        page_gbytes_per_sec: (pages_sent * PAGE as u64) as f64 / elapsed / 1e9,
        bytes,
        pages: pages_sent,
        secs: elapsed,
        writev_calls: calls,
        sender_cpu_us_per_page: cpu0
            .zip(cpu1)
            .map(|(a, b)| (b - a) * 1e6 / pages_sent.max(1) as f64),
    })
}

/// The iovec index and offset within it where byte `done` of the batch lies.
fn locate(iov: &[libc::iovec], mut done: usize) -> (usize, usize) {
    for (i, v) in iov.iter().enumerate() {
        if done < v.iov_len {
            return (i, done);
        }
        done -= v.iov_len;
    }
    (iov.len(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_stream_moves_exactly_the_requested_pages() {
        let out = run_fresh(4 << 20).unwrap();
        assert_eq!(out.mode, "stream-fresh");
        assert_eq!(out.pages, (4 << 20) / PAGE as u64);
        // Sizes that are not whole batches are rounded down to them (not refused).
        for (size, batches) in [(300 << 10, 1), (512 << 10, 2), (1280 << 10, 5)] {
            assert_eq!(
                run_fresh(size).unwrap().pages,
                batches * BATCH as u64,
                "{size}"
            );
        }
        assert_eq!(out.bytes, out.pages * (HEADER + PAGE) as u64);
        assert!(out.gbytes_per_sec > 0.0);
        assert!(run_fresh(PAGE as u64).is_err(), "less than one batch");
        // `stream --secs` goes through the seconds check before `run`.
        let secs = |s| crate::migrate::seconds("--secs", s, false);
        assert!(secs(0.0).is_err() && secs(f64::NAN).is_err());
    }

    #[test]
    fn locate_finds_offsets() {
        let a = [0u8; 8];
        let iov: Vec<libc::iovec> = [3usize, 5]
            .iter()
            .map(|&l| libc::iovec {
                iov_base: a.as_ptr() as *mut libc::c_void,
                iov_len: l,
            })
            .collect();
        assert_eq!(locate(&iov, 0), (0, 0));
        assert_eq!(locate(&iov, 2), (0, 2));
        assert_eq!(locate(&iov, 3), (1, 0));
        assert_eq!(locate(&iov, 7), (1, 4));
    }
}
