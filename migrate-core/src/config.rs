//! Migration settings.

use std::time::Duration;

use uring_net::{SenderConfig, SocketOptions};

use crate::protocol::AuthKey;

/// How the source sends pages the destination asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// One channel: a requested page is sent next by the scanner, behind the bulk queue.
    Vanilla,
    /// The scanner sends requested pages on the urgent channel between bulk batches.
    Preempt,
    /// The return-path thread sends the requested host page on the urgent channel itself.
    PreemptFull,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Vanilla, Mode::Preempt, Mode::PreemptFull];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Vanilla => "vanilla",
            Mode::Preempt => "preempt",
            Mode::PreemptFull => "preempt-full",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vanilla" => Ok(Mode::Vanilla),
            "preempt" => Ok(Mode::Preempt),
            "preempt-full" | "preempt_full" => Ok(Mode::PreemptFull),
            o => Err(format!(
                "unknown mode {o:?} (expected vanilla, preempt or preempt-full)"
            )),
        }
    }
}

/// When precopy ends and postcopy begins (whichever comes first).
#[derive(Clone, Debug)]
pub struct PrecopyLimits {
    /// At most this many passes over memory; 0 starts postcopy at once (pure postcopy).
    pub max_passes: u32,
    /// At most this long in precopy.
    pub max_time: Duration,
    /// Switch over once no more than this many host pages are dirty after a pass.
    pub dirty_threshold: u64,
}

impl Default for PrecopyLimits {
    fn default() -> Self {
        Self {
            max_passes: 3,
            max_time: Duration::from_secs(30),
            dirty_threshold: 0,
        }
    }
}

/// How a source retries after a broken connection in postcopy.
#[derive(Clone, Debug)]
pub struct ReconnectPolicy {
    /// Attempts per break (0: fail instead of pausing).
    pub retries: u32,
    /// Wait before the first attempt; doubled each time up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            retries: 20,
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// Source settings.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub mode: Mode,
    pub precopy: PrecopyLimits,
    /// Send per-page digests at the end so the destination can verify.
    pub verify: bool,
    pub bulk: SenderConfig,
    pub urgent: SenderConfig,
    pub bulk_socket: SocketOptions,
    pub urgent_socket: SocketOptions,
    /// Largest page record the scanner builds (bytes, a multiple of the host page size).
    pub max_record_bytes: usize,
    /// The scanner waits while more than this many bytes are queued in its bulk sender.
    pub bulk_backlog: usize,
    /// After serving a requested page, continue the background scan right after it.
    pub page_hint: bool,
    /// When requests form a sequential stream, push this many bytes past the requested page
    /// on the urgent channel too (preempt and preempt-full; 0: off).
    pub prefetch_bytes: usize,
    /// While requests are being served (preempt, preempt-full), pace the bulk socket at this
    /// fraction of the rate it achieved on its own, so a shared bottleneck queue drains in
    /// front of urgent pages; `None`: never pace.
    pub adaptive_pacing: Option<f64>,
    /// Give up if the destination is silent this long.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Run the return-path thread at this `SCHED_FIFO` priority (falls back to nice -10 where
    /// not permitted); `None` leaves default scheduling.
    pub urgent_priority: Option<i32>,
    /// CPUs for the scanner (empty: anywhere).
    pub bulk_cpus: Vec<usize>,
    /// CPUs for the return-path thread (empty: anywhere).
    pub urgent_cpus: Vec<usize>,
    /// Pre-shared key: both sides prove possession on every connection.
    pub key: Option<AuthKey>,
    pub reconnect: ReconnectPolicy,
    /// A ping goes to the destination this often.
    pub heartbeat: Duration,
    /// A connection with no traffic from the peer for this long is broken.
    pub link_timeout: Duration,
}

impl SourceConfig {
    /// Where this side's threads run, as configured.
    pub fn placement(&self) -> crate::sched::Placement {
        crate::sched::Placement {
            bulk_cpus: self.bulk_cpus.clone(),
            urgent_cpus: self.urgent_cpus.clone(),
            urgent_priority: self.urgent_priority,
            home_cpus: Vec::new(),
        }
    }
}

impl Default for SourceConfig {
    fn default() -> Self {
        let mut bulk_socket = SocketOptions::for_role(uring_net::Role::Bulk);
        // The Postcopy and Run records that end the downtime are small: don't let Nagle hold them.
        bulk_socket.nodelay = true;
        // Small bulk syscalls and a short bulk queue: on a kernel without full preemption a
        // request's hops wait behind whatever a bulk thread is doing in the kernel, and a
        // requested page still queued behind the bulk stream waits for the whole queue.
        // Measured on loopback (docs/BENCHMARKS.md): 64 KiB records, 128 KiB sends and a
        // 256 KiB queue cut the request p99 by 2-4x at the same bulk throughput.
        let bulk = SenderConfig {
            max_send_bytes: 128 << 10,
            ..SenderConfig::bulk()
        };
        Self {
            mode: Mode::PreemptFull,
            precopy: PrecopyLimits::default(),
            verify: true,
            bulk,
            urgent: SenderConfig::urgent(),
            bulk_socket,
            urgent_socket: SocketOptions::for_role(uring_net::Role::Urgent),
            max_record_bytes: 64 << 10,
            bulk_backlog: 256 << 10,
            page_hint: true,
            prefetch_bytes: 128 << 10,
            adaptive_pacing: Some(0.9),
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            urgent_priority: Some(10),
            bulk_cpus: Vec::new(),
            urgent_cpus: Vec::new(),
            key: None,
            reconnect: ReconnectPolicy::default(),
            heartbeat: Duration::from_millis(500),
            link_timeout: Duration::from_secs(5),
        }
    }
}

/// Destination settings.
#[derive(Clone, Debug)]
pub struct DestConfig {
    /// Options for the main connection.
    pub main_socket: SocketOptions,
    pub urgent_socket: SocketOptions,
    /// Give up if the source is silent this long (before postcopy) or a handshake stalls.
    pub timeout: Duration,
    /// Run the fault thread and the urgent receiver at this `SCHED_FIFO` priority (falls back
    /// to nice -10 where not permitted); `None` leaves default scheduling.
    pub urgent_priority: Option<i32>,
    /// CPUs for the main (bulk) receiver (empty: anywhere).
    pub bulk_cpus: Vec<usize>,
    /// CPUs for the fault thread and the urgent receiver (empty: anywhere).
    pub urgent_cpus: Vec<usize>,
    /// Pre-shared key: no connection is accepted without proof of it.
    pub key: Option<AuthKey>,
    /// A connection with no traffic from the source for this long is broken.
    pub link_timeout: Duration,
    /// How long a paused postcopy waits for the source to reconnect.
    pub resume_timeout: Duration,
}

impl DestConfig {
    /// Where this side's threads run, as configured.
    pub fn placement(&self) -> crate::sched::Placement {
        crate::sched::Placement {
            bulk_cpus: self.bulk_cpus.clone(),
            urgent_cpus: self.urgent_cpus.clone(),
            urgent_priority: self.urgent_priority,
            home_cpus: Vec::new(),
        }
    }
}

impl Default for DestConfig {
    fn default() -> Self {
        let mut main_socket = SocketOptions::for_role(uring_net::Role::ReturnPath);
        main_socket.nodelay = true;
        // Bound what the bulk stream can park in our receive queue: a requested page stuck
        // there waits for everything ahead of it. About one bandwidth-delay product of a
        // 10 Gbit/s LAN.
        main_socket.recv_buffer = Some(256 << 10);
        Self {
            main_socket,
            urgent_socket: SocketOptions::for_role(uring_net::Role::Urgent),
            timeout: Duration::from_secs(30),
            urgent_priority: Some(10),
            bulk_cpus: Vec::new(),
            urgent_cpus: Vec::new(),
            key: None,
            link_timeout: Duration::from_secs(5),
            resume_timeout: Duration::from_secs(600),
        }
    }
}
