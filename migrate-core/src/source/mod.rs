//! The sending side of a migration.
//!
//! [`Source::migrate`] connects the main and urgent channels, runs precopy passes over the
//! dirty log, switches over (pausing the guest through [`SourceControl`]) and streams the rest
//! while serving page requests according to the [`Mode`](crate::config::Mode).

mod pages;
mod return_path;
mod scanner;
mod shared;

use std::sync::atomic::{AtomicUsize, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uring_net::{connect, Endpoint, FrameReader, FrameSender, Stream};

pub use shared::{Progress, SourcePhase};

use crate::config::{Mode, SourceConfig};
use crate::dirty::DirtyLog;
use crate::error::MigrateError;
use crate::handshake::{region_table, source_handshake};
use crate::memory::GuestMemory;
use crate::protocol::Channel;
use crate::stats::{ChannelStats, CountersSnapshot};
use return_path::ReturnPath;
use scanner::Scanner;
use shared::{Claims, Finish, RequestQueue};

/// What the VMM does at switchover.
pub trait SourceControl: Send {
    /// Stop every vCPU; after this returns, guest memory must not change.
    fn pause(&mut self) -> Result<(), String>;
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
    pub bulk: ChannelStats,
    pub urgent: ChannelStats,
}

/// The sending side of one migration.
pub struct Source {
    memory: Arc<GuestMemory>,
    config: SourceConfig,
    progress: Arc<Progress>,
}

impl Source {
    pub fn new(memory: Arc<GuestMemory>, config: SourceConfig) -> Self {
        Self {
            memory,
            config,
            progress: Arc::new(Progress::default()),
        }
    }

    /// Live progress (and the `go_postcopy` switch).
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Connects to a destination listening at `endpoint` and migrates.
    pub fn migrate(
        &self,
        endpoint: &Endpoint,
        dirty: &mut dyn DirtyLog,
        control: &mut dyn SourceControl,
    ) -> Result<SourceReport, MigrateError> {
        let main = connect(endpoint, Some(self.config.connect_timeout))?;
        self.config.bulk_socket.apply(&main)?;
        let urgent = connect(endpoint, Some(self.config.connect_timeout))?;
        self.config.urgent_socket.apply(&urgent)?;
        self.migrate_streams(main, urgent, dirty, control)
    }

    /// Migrates over two connected streams (main and urgent).
    pub fn migrate_streams(
        &self,
        main: Stream,
        urgent: Stream,
        dirty: &mut dyn DirtyLog,
        control: &mut dyn SourceControl,
    ) -> Result<SourceReport, MigrateError> {
        let result = self.run(main, urgent, dirty, control);
        self.progress.set_phase(if result.is_ok() {
            SourcePhase::Done
        } else {
            SourcePhase::Failed
        });
        result
    }

    fn run(
        &self,
        main: Stream,
        urgent: Stream,
        dirty: &mut dyn DirtyLog,
        control: &mut dyn SourceControl,
    ) -> Result<SourceReport, MigrateError> {
        let start = Instant::now();
        let cfg = &self.config;
        let table = region_table(&self.memory);
        let session: u64 = rand::random();
        main.set_read_timeout(Some(cfg.timeout))?;
        urgent.set_read_timeout(Some(cfg.timeout))?;
        source_handshake(&main, Channel::Main, session, &table)?;
        source_handshake(&urgent, Channel::Urgent, session, &table)?;
        main.set_read_timeout(None)?;

        let claims = Arc::new(Claims::new(&self.memory));
        self.progress
            .total_pages
            .store(self.memory.total_host_pages() as u64, Relaxed);
        self.progress
            .pages_left
            .store(self.memory.total_host_pages() as u64, Relaxed);
        let requests = Arc::new(RequestQueue::default());
        let finish = Arc::new(Finish::default());
        let hint: Arc<Vec<AtomicUsize>> = Arc::new(
            self.memory
                .regions()
                .iter()
                .map(|_| AtomicUsize::new(usize::MAX))
                .collect(),
        );

        let reader = FrameReader::new(main.try_clone()?, 64 << 10);
        let urgent_close = urgent.try_clone()?;
        let main_close = main.try_clone()?;
        let bulk = FrameSender::new(main, cfg.bulk.clone())?;
        let urgent_sender = FrameSender::new(urgent, cfg.urgent.clone())?;
        let urgent_stats = urgent_sender.stats();
        let (rp_urgent, scan_urgent) = match cfg.mode {
            Mode::PreemptFull => (Some(urgent_sender), None),
            Mode::Preempt => (None, Some(urgent_sender)),
            Mode::Vanilla => (None, None),
        };
        let rp = ReturnPath {
            memory: self.memory.clone(),
            table: table.clone(),
            reader,
            urgent: rp_urgent,
            claims: claims.clone(),
            requests: requests.clone(),
            scanner_waker: bulk.waker(),
            progress: self.progress.clone(),
            finish: finish.clone(),
            hint: hint.clone(),
            max_record_bytes: cfg.max_record_bytes,
            timeout: cfg.timeout,
        };
        let priority = cfg.urgent_priority;
        let rp_thread = std::thread::Builder::new()
            .name("src-return-path".into())
            .spawn(move || {
                if let Some(p) = priority {
                    tracing::debug!(boost = ?crate::sched::boost_current_thread(p), "return-path thread");
                }
                rp.run()
            })
            .map_err(|e| MigrateError::Internal(format!("spawn return-path thread: {e}")))?;

        let mut scanner = Scanner {
            memory: self.memory.clone(),
            config: cfg.clone(),
            claims,
            bulk,
            urgent: scan_urgent,
            requests,
            progress: self.progress.clone(),
            finish: finish.clone(),
            cursor: vec![0; self.memory.regions().len()],
            hint,
            scratch: Vec::new(),
        };
        let outcome = scanner
            .precopy_and_switch(dirty, control)
            .and_then(|pre| scanner.postcopy().map(|_| pre));
        // Close both channels so the return-path thread and the destination's receivers end.
        let _ = urgent_close.shutdown(std::net::Shutdown::Both);
        let _ = main_close.shutdown(std::net::Shutdown::Both);
        let _ = rp_thread.join();
        let pre = outcome?;
        if let Some(e) = finish
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(MigrateError::Remote(e));
        }
        Ok(SourceReport {
            mode: cfg.mode,
            counters: self.progress.counters.snapshot(),
            precopy_passes: pre.passes,
            precopy_ms: pre.elapsed.as_secs_f64() * 1e3,
            precopy_bytes: pre.bytes,
            downtime_ms: pre.downtime.as_secs_f64() * 1e3,
            total_ms: start.elapsed().as_secs_f64() * 1e3,
            verified: finish.verified(),
            bulk: scanner.bulk.stats().snapshot().into(),
            urgent: urgent_stats.snapshot().into(),
        })
    }
}

/// Default wait between progress polls for front ends.
pub const PROGRESS_TICK: Duration = Duration::from_millis(100);
