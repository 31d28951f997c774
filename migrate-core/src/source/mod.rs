//! The sending side of a migration.
//!
//! [`Source::migrate`] connects the main and urgent channels, runs precopy passes over the
//! dirty log, switches over (pausing the guest through [`SourceControl`]) and streams the rest
//! while serving page requests according to the [`Mode`](crate::config::Mode).

mod pacing;
mod pages;
mod prefetch;
mod return_path;
mod scanner;
mod serve;
mod shared;

use std::sync::atomic::{AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use uring_net::{connect, Endpoint, FrameReader, FrameSender, Stream};

use crate::bitmap::AtomicBitmap;
use crate::handshake::SourceHello;
use crate::protocol::{ProtocolError, RegionTable, ReturnMsg, RETURN_HEADER_LEN};

pub use shared::{Progress, SourcePhase};

use crate::config::{Mode, SourceConfig};
use crate::dirty::DirtyLog;
use crate::error::MigrateError;
use crate::handshake::{region_table, source_handshake};
use crate::memory::GuestMemory;
use crate::protocol::Channel;
use crate::stats::{ChannelStats, CountersSnapshot};
use return_path::ReturnPath;
use scanner::{PrecopyOutcome, Scanner};
use shared::{Claims, Finish, RequestQueue};

/// What the VMM does at switchover.
pub trait SourceControl: Send {
    /// Stop every vCPU; after this returns, guest memory must not change.
    fn pause(&mut self) -> Result<(), String>;

    /// Let the vCPUs run again after a switchover that failed before the destination could
    /// have received the `Postcopy` record (so the guest cannot run there). The migration then
    /// ends with an error and the guest goes on here. The default cannot resume: the error
    /// then says the guest is still paused.
    fn resume(&mut self) -> Result<(), String> {
        Err("this source cannot resume its guest".into())
    }
}

impl<F: FnMut() -> Result<(), String> + Send> SourceControl for F {
    fn pause(&mut self) -> Result<(), String> {
        self()
    }
}

/// What a completed migration measured on the source.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SourceReport {
    pub mode: Mode,
    pub counters: CountersSnapshot,
    pub precopy_passes: u32,
    pub precopy_ms: f64,
    /// Bytes the bulk channel carried during precopy.
    pub precopy_bytes: u64,
    pub downtime_ms: f64,
    pub total_ms: f64,
    /// Destination's verification result, if it verified.
    pub verified: Option<bool>,
    /// Times postcopy survived a broken connection.
    pub recoveries: u32,
    pub bulk: ChannelStats,
    pub urgent: ChannelStats,
}

/// The sending side of one migration.
pub struct Source {
    memory: Arc<GuestMemory>,
    config: SourceConfig,
    progress: Arc<Progress>,
    /// Clones of the current connections, for [`Source::interrupt_link`].
    live: Mutex<Vec<Stream>>,
    /// Where the migration's threads run (home: the CPUs of the thread that made this).
    placement: crate::sched::Placement,
}

/// The connections of one link and the threads' ends of them.
struct Link {
    bulk: FrameSender,
    urgent: FrameSender,
    /// The urgent connection's reverse direction (the return path), positioned after the
    /// handshake.
    reader: FrameReader,
    closers: Vec<Stream>,
}

impl Source {
    pub fn new(memory: Arc<GuestMemory>, config: SourceConfig) -> Self {
        Self {
            memory,
            placement: config.placement().from_here(),
            config,
            progress: Arc::new(Progress::default()),
            live: Mutex::new(Vec::new()),
        }
    }

    /// Live progress (and the `go_postcopy` switch).
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Breaks the current connections as a network failure would (both directions shut
    /// down). In postcopy the migration pauses and reconnects; in precopy it is cancelled.
    /// For operators and tests.
    pub fn interrupt_link(&self) {
        for s in self.live.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Connects to a destination listening at `endpoint` and migrates.
    pub fn migrate(
        &self,
        endpoint: &Endpoint,
        dirty: &mut dyn DirtyLog,
        control: &mut dyn SourceControl,
    ) -> Result<SourceReport, MigrateError> {
        let result = if self.config.bulk_cpus.is_empty() {
            self.run(endpoint, dirty, control)
        } else {
            // The scanner runs on the bulk CPUs; the caller's thread keeps its affinity.
            std::thread::scope(|s| {
                std::thread::Builder::new()
                    .name("src-scanner".into())
                    .spawn_scoped(s, || {
                        self.placement.enter_bulk("scanner");
                        self.run(endpoint, dirty, control)
                    })
                    .map_err(|e| MigrateError::Internal(format!("spawn scanner: {e}")))?
                    .join()
                    .map_err(|_| MigrateError::Internal("the scanner thread panicked".into()))?
            })
        };
        self.progress.set_phase(if result.is_ok() {
            SourcePhase::Done
        } else {
            SourcePhase::Failed
        });
        result
    }

    fn open_link(
        &self,
        endpoint: &Endpoint,
        session: u64,
        table: &RegionTable,
        resume: bool,
    ) -> Result<Link, MigrateError> {
        let cfg = &self.config;
        let main = connect(endpoint, Some(cfg.connect_timeout))?;
        cfg.bulk_socket.apply(&main)?;
        let urgent = connect(endpoint, Some(cfg.connect_timeout))?;
        cfg.urgent_socket.apply(&urgent)?;
        main.set_read_timeout(Some(cfg.timeout))?;
        urgent.set_read_timeout(Some(cfg.timeout))?;
        let hello = |channel| SourceHello {
            channel,
            session,
            table,
            key: cfg.key.as_ref(),
            resume,
        };
        source_handshake(&main, &hello(Channel::Main))?;
        // The return path is the urgent connection's reverse direction: the main socket's lock
        // is busy with bulk sends, and a request read from it would wait for them.
        let reader = source_handshake(&urgent, &hello(Channel::Urgent))?;
        urgent.set_read_timeout(Some(cfg.link_timeout))?;
        let closers = vec![main.try_clone()?, urgent.try_clone()?];
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = closers
            .iter()
            .map(|c| c.try_clone())
            .collect::<Result<_, _>>()?;
        Ok(Link {
            bulk: FrameSender::new(main, cfg.bulk.clone())?,
            urgent: FrameSender::new(urgent, cfg.urgent.clone())?,
            reader,
            closers,
        })
    }

    /// Reconnects after a break in postcopy, with back-off; learns what the destination has
    /// and rebuilds the set of pages to send from it.
    fn reconnect(
        &self,
        endpoint: &Endpoint,
        session: u64,
        table: &RegionTable,
        claims: &Claims,
    ) -> Result<Link, MigrateError> {
        let policy = &self.config.reconnect;
        let mut wait = policy.backoff;
        let mut last = None;
        for attempt in 1..=policy.retries {
            std::thread::sleep(wait);
            wait = (wait * 2).min(policy.max_backoff);
            match self
                .open_link(endpoint, session, table, true)
                .and_then(|mut l| {
                    self.read_bitmaps(&mut l.reader, table, claims)?;
                    Ok(l)
                }) {
                Ok(l) => return Ok(l),
                Err(MigrateError::Protocol(e)) => return Err(e.into()),
                Err(e) => {
                    tracing::info!(attempt, error = %e, "reconnect failed");
                    last = Some(e);
                }
            }
        }
        Err(MigrateError::Link(format!(
            "could not reconnect after {} attempts: {}",
            policy.retries,
            last.map_or_else(|| "no attempt allowed".into(), |e| e.to_string())
        )))
    }

    fn read_bitmaps(
        &self,
        reader: &mut FrameReader,
        table: &RegionTable,
        claims: &Claims,
    ) -> Result<(), MigrateError> {
        for r in self.memory.regions() {
            let Some(hdr) = reader.read_header::<RETURN_HEADER_LEN>()? else {
                return Err(MigrateError::Link(
                    "closed before sending its received bitmap".into(),
                ));
            };
            let (region, len) = match ReturnMsg::decode(&hdr, table)? {
                ReturnMsg::Bitmap { region, len } if region == r.id() => (region, len),
                _ => {
                    return Err(ProtocolError::Handshake(format!(
                        "expected the received bitmap of region {:?} after the resume handshake",
                        r.name()
                    ))
                    .into())
                }
            };
            let mut bytes = vec![0; len as usize];
            reader.read_exact(&mut bytes)?;
            let received = AtomicBitmap::from_bytes(r.host_pages(), &bytes).ok_or_else(|| {
                ProtocolError::Handshake(format!("malformed received bitmap for region {region}"))
            })?;
            claims.rebuild_from_received(region as usize, &received);
        }
        Ok(())
    }

    fn run(
        &self,
        endpoint: &Endpoint,
        dirty: &mut dyn DirtyLog,
        control: &mut dyn SourceControl,
    ) -> Result<SourceReport, MigrateError> {
        let start = Instant::now();
        let cfg = &self.config;
        if let Some(h) = cfg.adaptive_pacing {
            if !(h.is_finite() && h > 0.0) {
                return Err(MigrateError::Config(format!(
                    "adaptive_pacing {h} must be a positive fraction of the measured rate \
                     (None turns pacing off)"
                )));
            }
        }
        let table = region_table(&self.memory)?;
        let session: u64 = rand::random();
        let link = self.open_link(endpoint, session, &table, false)?;

        let claims = Arc::new(Claims::new(&self.memory));
        let total = self.memory.total_host_pages() as u64;
        self.progress.total_pages.store(total, Relaxed);
        self.progress.pages_left.store(total, Relaxed);
        let requests = Arc::new(RequestQueue::default());
        let finish = Arc::new(Finish::default());
        let hint: Arc<Vec<AtomicUsize>> = Arc::new(
            self.memory
                .regions()
                .iter()
                .map(|_| AtomicUsize::new(usize::MAX))
                .collect(),
        );
        let mut bulk_stats = ChannelStats::default();
        let mut urgent_stats = ChannelStats::default();

        let Link {
            bulk,
            urgent,
            reader,
            mut closers,
        } = link;
        let pacer = Arc::new(pacing::Pacer::new(cfg.adaptive_pacing.unwrap_or(1.0)));
        let paced = |closers: &[Stream]| {
            (cfg.adaptive_pacing.is_some() && cfg.mode != Mode::Vanilla)
                .then(|| closers[0].try_clone().ok())
                .flatten()
        };
        pacer.attach(paced(&closers));
        let mut scanner = Scanner {
            memory: self.memory.clone(),
            config: cfg.clone(),
            claims: claims.clone(),
            bulk,
            urgent: None,
            requests: requests.clone(),
            progress: self.progress.clone(),
            finish: finish.clone(),
            cursor: vec![0; self.memory.regions().len()],
            hint: hint.clone(),
            scratch: Vec::new(),
            last_ping: Instant::now(),
            server: serve::UrgentServer::new(cfg),
            pacer: pacer.clone(),
            switched: false,
            postcopy_end: None,
            past_no_return: false,
        };
        let mut rp_thread = Some(self.start_return_path(&mut scanner, urgent, reader, &table)?);
        let mut recoveries = 0u32;

        let mut pre = None;
        let result = loop {
            let step = match pre {
                None => scanner
                    .precopy_and_switch(dirty, control)
                    .map(|p| pre = Some(p)),
                Some(_) => scanner.postcopy(),
            };
            let done =
                matches!((&step, &pre), (Ok(()), Some(_)) if scanner.finish.done.load(Acquire));
            // After a failure past the pause: decided on this connection's offsets, before it
            // is torn down (and latched, for the connections after it).
            let dest_may_run = step.is_err() && scanner.switched && scanner.dest_may_run();
            // Either way this link is over when the step failed or the migration is done.
            if step.is_err() || done {
                for c in &closers {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                }
                let (b, u) = self.end_link(&mut scanner, rp_thread.take());
                bulk_stats = add(bulk_stats, b);
                urgent_stats = add(urgent_stats, u);
            }
            match step {
                Ok(()) if done => break Ok(()),
                Ok(()) => continue,
                Err(e) if scanner.switched && !dest_may_run => {
                    // Paused, but the Postcopy record never reached the kernel: the destination
                    // cannot run the guest, so it goes on here.
                    let _ = dirty.stop(&self.memory);
                    let resumed = control.resume();
                    break Err(MigrateError::Cancelled(match resumed {
                        Ok(()) => format!(
                            "switchover failed before the destination could run the guest \
                             ({e}); the guest runs here again"
                        ),
                        Err(r) => format!(
                            "switchover failed before the destination could run the guest \
                             ({e}), and the guest could not be resumed here: {r}"
                        ),
                    }));
                }
                Err(e) if e.is_link_failure() && scanner.switched && cfg.reconnect.retries > 0 => {
                    tracing::warn!(error = %e, "postcopy paused: reconnecting");
                    self.progress.set_phase(SourcePhase::Paused);
                    let link = match self.reconnect(endpoint, session, &table, &claims) {
                        Ok(l) => l,
                        Err(e) => break Err(e),
                    };
                    recoveries += 1;
                    self.progress.pages_left.store(claims.remaining(), Relaxed);
                    self.progress.set_phase(SourcePhase::Postcopy);
                    closers = link.closers;
                    pacer.attach(paced(&closers));
                    scanner.bulk = link.bulk;
                    claims.reset_bulk_offsets();
                    scanner.last_ping = Instant::now();
                    rp_thread = Some(self.start_return_path(
                        &mut scanner,
                        link.urgent,
                        link.reader,
                        &table,
                    )?);
                    if pre.is_none() {
                        // Broke during switchover, after the pause: the destination has (or will
                        // have, from its armed state) the guest running.
                        pre = Some(PrecopyOutcome::default());
                    }
                }
                Err(e) if !scanner.switched => {
                    // The guest was never paused: it keeps running (tracking stops below).
                    break Err(if e.is_link_failure() {
                        MigrateError::Cancelled(format!("connection lost during precopy: {e}"))
                    } else {
                        e
                    });
                }
                Err(e) => break Err(e),
            }
        };
        self.live.lock().unwrap_or_else(|p| p.into_inner()).clear();
        // However it ended (a failure after the pause may have skipped the switchover's own
        // stop), tracking is over; stopping twice is harmless.
        let _ = dirty.stop(&self.memory);
        result?;
        let pre = pre.unwrap_or_default();
        Ok(SourceReport {
            mode: cfg.mode,
            counters: self.progress.counters.snapshot(),
            precopy_passes: pre.passes,
            precopy_ms: pre.elapsed.as_secs_f64() * 1e3,
            precopy_bytes: pre.bytes,
            downtime_ms: pre.downtime.as_secs_f64() * 1e3,
            total_ms: start.elapsed().as_secs_f64() * 1e3,
            verified: finish.verified(),
            recoveries,
            bulk: bulk_stats,
            urgent: urgent_stats,
        })
    }

    /// Starts the return-path thread of a link; the urgent sender goes to whoever sends
    /// urgent pages in this mode.
    fn start_return_path(
        &self,
        scanner: &mut Scanner,
        urgent: FrameSender,
        reader: FrameReader,
        table: &RegionTable,
    ) -> Result<std::thread::JoinHandle<Option<FrameSender>>, MigrateError> {
        let cfg = &self.config;
        let rp_urgent = match cfg.mode {
            Mode::PreemptFull => Some(urgent),
            Mode::Preempt => {
                scanner.urgent = Some(urgent);
                None
            }
            Mode::Vanilla => {
                scanner.urgent = None;
                drop(urgent);
                None
            }
        };
        let rp = ReturnPath {
            memory: self.memory.clone(),
            table: table.clone(),
            reader,
            urgent: rp_urgent,
            claims: scanner.claims.clone(),
            requests: scanner.requests.clone(),
            scanner_waker: scanner.bulk.waker(),
            bulk_stats: scanner.bulk.stats(),
            progress: self.progress.clone(),
            finish: scanner.finish.clone(),
            hint: scanner.hint.clone(),
            server: serve::UrgentServer::new(cfg),
            pacer: scanner.pacer.clone(),
        };
        let placement = self.placement.clone();
        std::thread::Builder::new()
            .name("src-return-path".into())
            .spawn(move || {
                placement.enter_urgent("return path");
                rp.run()
            })
            .map_err(|e| MigrateError::Internal(format!("spawn return-path thread: {e}")))
    }

    /// Joins the return-path thread of a finished link; returns the link's transport counters.
    fn end_link(
        &self,
        scanner: &mut Scanner,
        rp: Option<std::thread::JoinHandle<Option<FrameSender>>>,
    ) -> (ChannelStats, ChannelStats) {
        // The urgent sender is with the return-path thread (preempt-full) or the scanner
        // (preempt); vanilla has none.
        let rp_urgent = rp.and_then(|t| t.join().ok()).flatten();
        // The link's failure has been handled; a new link starts clean.
        let _ = scanner.finish.take_error();
        let urgent = rp_urgent
            .or_else(|| scanner.urgent.take())
            .map(|u| u.stats().snapshot().into())
            .unwrap_or_default();
        (scanner.bulk.stats().snapshot().into(), urgent)
    }
}

fn add(a: ChannelStats, b: ChannelStats) -> ChannelStats {
    ChannelStats {
        frames: a.frames + b.frames,
        bytes: a.bytes + b.bytes,
        sends: a.sends + b.sends,
        submits: a.submits + b.submits,
        zc_sends: a.zc_sends + b.zc_sends,
        zc_copied: a.zc_copied + b.zc_copied,
        short_sends: a.short_sends + b.short_sends,
    }
}
