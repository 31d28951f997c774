//! `dest` and `source`: one side of a migration each, driving migrate-core the way
//! `tests/src/lib.rs` does, with progress bars and a [`Report`].

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use migrate_core::dirty::UffdWpDirtyLog;
use migrate_core::protocol::AuthKey;
use migrate_core::source::{Progress, SourcePhase};
use migrate_core::verify::PreWriteDigests;
use migrate_core::workload::{fill_initial, Access, DestWorkload, PreWriteLog, SourceWorkload};
use migrate_core::{
    Backing, DestConfig, DestWatch, Destination, GuestMemory, Mode, PrecopyLimits, ReconnectPolicy,
    RegionSpec, Source, SourceConfig,
};
use serde_json::json;
use uring_net::{Endpoint, Listener};

use crate::report::Report;
use crate::size::{PageSize, Size};

/// When to draw progress bars on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// When stderr is a terminal and --json is not given.
    Auto,
    Always,
    Never,
}

impl ProgressMode {
    pub fn enabled(self, json: bool) -> bool {
        match self {
            ProgressMode::Auto => !json && std::io::stderr().is_terminal(),
            ProgressMode::Always => true,
            ProgressMode::Never => false,
        }
    }
}

/// The guest: memory size, page size, vCPUs, access pattern (both sides must agree on the
/// first two).
#[derive(Args, Clone, Debug)]
pub struct GuestArgs {
    /// Guest memory size (512M, 4G, 2MiB, 1GiB, 4096).
    #[arg(long, default_value = "1G")]
    pub mem: Size,
    /// Host page size: 4k (anonymous), 2m (hugetlb, needs /proc/sys/vm/nr_hugepages) or thp.
    #[arg(long, default_value = "4k")]
    pub page_size: PageSize,
    /// Guest vCPU threads.
    #[arg(long, default_value_t = 2)]
    pub vcpus: usize,
    /// How the guest's vCPUs pick pages: random or sequential.
    #[arg(long, default_value = "random")]
    pub access: Access,
    /// Back guest memory with a shared memfd (shmem for 4k, hugetlbfs for 2m), allocated up
    /// front, as a VMM does for vhost-user: the destination reads postcopy pages straight into
    /// the file and maps them with UFFDIO_CONTINUE (no second copy). Not with thp.
    #[arg(long)]
    pub shared: bool,
}

impl GuestArgs {
    pub fn allocate(&self) -> Result<Arc<GuestMemory>> {
        let page = self.page_size.bytes();
        if self.mem.0 == 0 || !self.mem.0.is_multiple_of(page) {
            bail!(
                "--mem {} is not a positive multiple of the {} host page size",
                self.mem,
                self.page_size.name()
            );
        }
        if self.vcpus == 0 {
            bail!("--vcpus must be at least 1");
        }
        let mem = GuestMemory::allocate(&[RegionSpec {
            name: "ram".into(),
            size: self.mem.0,
            backing: self.backing()?,
        }])
        .with_context(|| {
            format!(
                "allocating {} of guest memory with {} pages{}",
                self.mem,
                self.page_size.name(),
                if self.shared { " (shared memfd)" } else { "" }
            )
        })?;
        Ok(Arc::new(mem))
    }

    /// These settings as command-line flags (for the processes `demo` starts): every field,
    /// so a flag added here cannot be dropped on the way.
    pub fn to_flags(&self) -> Vec<String> {
        let GuestArgs {
            mem,
            page_size,
            vcpus,
            access,
            shared,
        } = self;
        let mut f = vec![
            "--mem".into(),
            mem.0.to_string(),
            "--page-size".into(),
            page_size.name().into(),
            "--vcpus".into(),
            vcpus.to_string(),
            "--access".into(),
            match access {
                Access::Random => "random",
                Access::Sequential => "sequential",
            }
            .into(),
        ];
        if *shared {
            f.push("--shared".into());
        }
        f
    }

    /// The backing for `--page-size` and `--shared`.
    pub fn backing(&self) -> Result<Backing> {
        Ok(match (self.page_size, self.shared) {
            (p, false) => p.backing(),
            (PageSize::Small, true) => Backing::Shared,
            (PageSize::Huge, true) => Backing::SharedHugeTlb,
            (PageSize::Thp, true) => {
                bail!("--shared works with --page-size 4k (shmem) or 2m (hugetlbfs), not thp")
            }
        })
    }

    fn settings(&self) -> serde_json::Value {
        json!({
            "mem_bytes": self.mem.0,
            "page_size": self.page_size.name(),
            "shared": self.shared,
            "vcpus": self.vcpus,
            "access": self.access,
        })
    }
}

/// Where one side's migration threads run. Unset: the engine's defaults (anywhere; urgent-path
/// threads `SCHED_FIFO` 10).
#[derive(Args, Clone, Debug, Default)]
pub struct CpuPlacement {
    /// CPUs for the urgent-path threads (e.g. `1` or `2-3,6`).
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub urgent_cpus: Option<CpuList>,
    /// CPUs for the bulk threads (source scanner, destination bulk receiver).
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub bulk_cpus: Option<CpuList>,
    /// Leave the urgent-path threads at normal priority (no `SCHED_FIFO`).
    #[arg(long)]
    pub no_realtime: bool,
}

/// A list of CPU numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// Parses `0`, `0,2`, `1-3`, `0-1,4`.
fn parse_cpu_list(s: &str) -> std::result::Result<CpuList, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{t}` is not a CPU number (expected e.g. 0,2-3)"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b || b - a > 4096 {
                    return Err(format!("bad CPU range `{part}`"));
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    if let Some(&c) = out.iter().find(|&&c| c >= libc::CPU_SETSIZE as usize) {
        return Err(format!("CPU {c} is beyond what the kernel interface takes"));
    }
    out.sort_unstable();
    out.dedup();
    Ok(CpuList(out))
}

impl CpuPlacement {
    /// Applies the placement to one side's configuration fields, refusing CPUs this process
    /// cannot run on.
    fn apply(
        &self,
        urgent: &mut Vec<usize>,
        bulk: &mut Vec<usize>,
        prio: &mut Option<i32>,
    ) -> Result<()> {
        let allowed = migrate_core::sched::current_affinity();
        for (flag, list, field) in [
            ("--urgent-cpus", &self.urgent_cpus, urgent),
            ("--bulk-cpus", &self.bulk_cpus, bulk),
        ] {
            let Some(c) = list else { continue };
            // (An empty set means the kernel would not say: leave the check to pinning, which
            // warns when it is refused.)
            if let Some(bad) =
                c.0.iter()
                    .find(|c| !allowed.is_empty() && !allowed.contains(c))
            {
                bail!("{flag}: CPU {bad} is not available here (this process may use {allowed:?})");
            }
            field.clone_from(&c.0);
        }
        if self.no_realtime {
            *prio = None;
        }
        Ok(())
    }

    /// The placement as the floor emulator applies it (the engine's default priority unless
    /// `--no-realtime`).
    pub fn floor_placement(&self) -> Result<migrate_core::sched::Placement> {
        let mut c = DestConfig::default();
        self.apply_dest(&mut c)?;
        Ok(c.placement().from_here())
    }

    pub fn apply_source(&self, c: &mut SourceConfig) -> Result<()> {
        self.apply(&mut c.urgent_cpus, &mut c.bulk_cpus, &mut c.urgent_priority)
    }

    pub fn apply_dest(&self, c: &mut DestConfig) -> Result<()> {
        self.apply(&mut c.urgent_cpus, &mut c.bulk_cpus, &mut c.urgent_priority)
    }

    /// The effective settings, for the report.
    pub fn settings(urgent: &[usize], bulk: &[usize], prio: Option<i32>) -> serde_json::Value {
        json!({ "urgent_cpus": urgent, "bulk_cpus": bulk, "urgent_priority": prio })
    }

    /// The same flags (for child processes).
    pub fn to_flags(&self) -> Vec<String> {
        let list = |c: &CpuList| {
            c.0.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut v = Vec::new();
        if let Some(c) = &self.urgent_cpus {
            v.extend(["--urgent-cpus".to_string(), list(c)]);
        }
        if let Some(c) = &self.bulk_cpus {
            v.extend(["--bulk-cpus".to_string(), list(c)]);
        }
        if self.no_realtime {
            v.push("--no-realtime".into());
        }
        v
    }
}

/// Source tuning knobs (bulk queue, records, socket, pacing). Unset: the engine's defaults.
#[derive(Args, Clone, Debug, Default)]
pub struct SourceTuning {
    /// The scanner waits while more than this many bytes are queued in its bulk sender.
    #[arg(long, value_name = "SIZE")]
    pub bulk_backlog: Option<Size>,
    /// Largest page record the scanner builds (a multiple of the host page size).
    #[arg(long, value_name = "SIZE")]
    pub max_record: Option<Size>,
    /// Most bytes coalesced into one bulk send.
    #[arg(long, value_name = "SIZE")]
    pub bulk_send: Option<Size>,
    /// TCP_NOTSENT_LOWAT of the bulk socket.
    #[arg(long, value_name = "SIZE")]
    pub notsent_lowat: Option<Size>,
    /// SO_SNDBUF of the bulk socket.
    #[arg(long, value_name = "SIZE")]
    pub sndbuf: Option<Size>,
    /// While requests are served, pace the bulk socket at this fraction of its own rate.
    #[arg(long, value_name = "F", conflicts_with = "no_pacing")]
    pub pacing_headroom: Option<f64>,
    /// Never pace the bulk socket.
    #[arg(long)]
    pub no_pacing: bool,
    /// How much a sequential request stream gets pushed ahead on the urgent channel (0: no
    /// push-ahead; the page hint still steers the bulk scanner).
    #[arg(long, value_name = "SIZE", conflicts_with = "no_seq_assist")]
    pub push_ahead: Option<Size>,
    /// Turn off the sequential-access aids: the page hint (the bulk scan continues right after
    /// a requested page) and pushing pages ahead of a sequential request stream.
    #[arg(long)]
    pub no_seq_assist: bool,
    /// Testing: break the connections this many times at random moments of postcopy (to
    /// exercise recovery).
    #[arg(long, default_value_t = 0)]
    pub chaos_breaks: u32,
}

impl SourceTuning {
    /// Applies the given knobs to `c`.
    pub fn apply(&self, c: &mut SourceConfig) -> Result<()> {
        if let Some(v) = self.bulk_backlog {
            c.bulk_backlog = v.0;
        }
        if let Some(v) = self.max_record {
            if v.0 == 0 {
                bail!("--max-record must be positive");
            }
            c.max_record_bytes = v.0;
        }
        if let Some(v) = self.bulk_send {
            if v.0 == 0 {
                bail!("--bulk-send must be positive");
            }
            c.bulk.max_send_bytes = v.0;
        }
        if let Some(v) = self.notsent_lowat {
            c.bulk_socket.notsent_lowat =
                Some(u32::try_from(v.0).map_err(|_| anyhow::anyhow!("--notsent-lowat too large"))?);
        }
        if let Some(v) = self.sndbuf {
            c.bulk_socket.send_buffer = Some(v.0);
        }
        if let Some(f) = self.pacing_headroom {
            if !(f.is_finite() && f > 0.0 && f <= 1.0) {
                bail!("--pacing-headroom must be in (0, 1]");
            }
            c.adaptive_pacing = Some(f);
        }
        if self.no_pacing {
            c.adaptive_pacing = None;
        }
        if let Some(v) = self.push_ahead {
            c.prefetch_bytes = v.0;
        }
        if self.no_seq_assist {
            c.page_hint = false;
            c.prefetch_bytes = 0;
        }
        Ok(())
    }

    /// The effective settings, for the report.
    pub fn settings(c: &SourceConfig, out: &mut serde_json::Value) {
        out["bulk_backlog"] = json!(c.bulk_backlog);
        out["max_record_bytes"] = json!(c.max_record_bytes);
        out["bulk_send_bytes"] = json!(c.bulk.max_send_bytes);
        out["notsent_lowat"] = json!(c.bulk_socket.notsent_lowat);
        out["sndbuf"] = json!(c.bulk_socket.send_buffer);
        out["adaptive_pacing"] = json!(c.adaptive_pacing);
        out["push_ahead_bytes"] = json!(c.prefetch_bytes);
    }

    /// The same knobs as command-line flags (for child processes).
    pub fn to_flags(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (name, val) in [
            ("--bulk-backlog", self.bulk_backlog),
            ("--max-record", self.max_record),
            ("--bulk-send", self.bulk_send),
            ("--notsent-lowat", self.notsent_lowat),
            ("--sndbuf", self.sndbuf),
            ("--push-ahead", self.push_ahead),
        ] {
            if let Some(s) = val {
                v.push(name.to_string());
                v.push(s.0.to_string());
            }
        }
        if let Some(f) = self.pacing_headroom {
            v.push("--pacing-headroom".into());
            v.push(f.to_string());
        }
        if self.no_pacing {
            v.push("--no-pacing".into());
        }
        if self.no_seq_assist {
            v.push("--no-seq-assist".into());
        }
        if self.chaos_breaks > 0 {
            v.extend(["--chaos-breaks".into(), self.chaos_breaks.to_string()]);
        }
        v
    }
}

/// User + system CPU time of this process so far, in milliseconds (from /proc/self/stat).
pub fn process_cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based) of the whole line; `rest` starts at 3.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some((utime + stime) * 1000.0 / hz)
}

#[derive(Args, Clone, Debug)]
pub struct DestArgs {
    /// Where to listen: IP:PORT (port 0 picks one) or unix:/path.
    #[arg(long)]
    pub listen: Endpoint,
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Guest think time between page touches, in microseconds.
    #[arg(long, default_value_t = 20)]
    pub think_us: u64,
    /// Page touches per vCPU once the guest runs here (0: until the migration completes).
    #[arg(long, default_value_t = 20_000)]
    pub touches: u64,
    /// Give up if the source is silent this long before postcopy, or a handshake stalls
    /// (seconds).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub timeout_secs: u64,
    /// Pre-shared key file (at least 16 bytes; surrounding whitespace is ignored). Every
    /// connection must prove the same key; without one the port accepts anyone who reaches it.
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// A connection with no traffic from the source for this long counts as broken; in
    /// postcopy the migration then pauses and waits for the source to reconnect (seconds).
    #[arg(long, default_value_t = 5.0)]
    pub link_timeout_secs: f64,
    /// How long a paused postcopy waits for the source to reconnect before failing (seconds).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub resume_timeout_secs: u64,
    /// Write the bound endpoint (with the real port) to this file once listening.
    #[arg(long)]
    pub port_file: Option<PathBuf>,
    /// SO_RCVBUF of the main (bulk) connection (default: the engine's, 256 KiB).
    #[arg(long, value_name = "SIZE")]
    pub rcvbuf: Option<Size>,
    #[command(flatten)]
    pub placement: CpuPlacement,
    /// Print one JSON document on stdout instead of the human report.
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
}

#[derive(Args, Clone, Debug)]
pub struct SourceArgs {
    /// The destination: IP:PORT or unix:/path.
    #[arg(long)]
    pub connect: Endpoint,
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Host pages the source guest writes per second during precopy.
    #[arg(long, default_value_t = 20_000)]
    pub dirty_rate: u64,
    /// How requested pages are sent: vanilla, preempt or preempt-full.
    #[arg(long, default_value = "preempt-full")]
    pub mode: Mode,
    /// Switch to postcopy after this long in precopy (seconds).
    #[arg(long)]
    pub precopy_secs: Option<f64>,
    /// Switch to postcopy after this many precopy passes (0: pure postcopy).
    #[arg(long)]
    pub postcopy_after_passes: Option<u32>,
    /// Do not send page digests (the destination then cannot verify).
    #[arg(long)]
    pub no_verify: bool,
    /// TCP connect timeout (seconds).
    #[arg(long, default_value_t = 5.0)]
    pub connect_timeout_secs: f64,
    /// Give up if the destination is silent this long (seconds).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub timeout_secs: u64,
    /// Pre-shared key file (at least 16 bytes; surrounding whitespace is ignored); the
    /// destination must hold the same key. Without one, memory goes to whoever answers.
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// Reconnect attempts after a connection breaks in postcopy (0: fail at once instead of
    /// pausing). Precopy is never resumed: a break there cancels the migration.
    #[arg(long, value_name = "RETRIES", default_value_t = 20)]
    pub reconnect: u32,
    /// Wait before the first reconnect attempt; doubled per attempt up to 2 s (milliseconds).
    #[arg(long, value_name = "MS", default_value_t = 50)]
    pub reconnect_backoff_ms: u64,
    /// A connection with no traffic from the destination for this long counts as broken
    /// (seconds).
    #[arg(long, default_value_t = 5.0)]
    pub link_timeout_secs: f64,
    /// Send a ping this often so both sides see traffic when no pages flow (milliseconds).
    #[arg(long, value_name = "MS", default_value_t = 500)]
    pub heartbeat_ms: u64,
    #[command(flatten)]
    pub tuning: SourceTuning,
    #[command(flatten)]
    pub placement: CpuPlacement,
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
}

impl SourceArgs {
    fn limits(&self) -> Result<PrecopyLimits> {
        let mut limits = PrecopyLimits::default();
        if let Some(s) = self.precopy_secs {
            limits.max_time = seconds("--precopy-secs", s, true)?;
            if self.postcopy_after_passes.is_none() {
                limits.max_passes = u32::MAX;
            }
        }
        if let Some(n) = self.postcopy_after_passes {
            limits.max_passes = n;
        }
        Ok(limits)
    }
}

/// Reads a pre-shared key file.
pub fn load_key(path: &Path) -> Result<AuthKey> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the key file {}", path.display()))?;
    AuthKey::new(&bytes).map_err(|e| anyhow::anyhow!("unusable key file {}: {e}", path.display()))
}

/// The key from `--key-file`, if given.
fn key_from(path: Option<&Path>) -> Result<Option<AuthKey>> {
    path.map(load_key).transpose()
}

/// One warning line when the connection is unauthenticated (after the arguments are known to
/// be good, so a bad argument gives one line).
fn warn_without_key(key: &Option<AuthKey>, warning: &str) {
    if key.is_none() {
        eprintln!("warning: no --key-file: {warning}");
    }
}

/// Longest time a seconds flag takes (a week).
const MAX_SECS: f64 = 7.0 * 86400.0;

/// A seconds flag's value as a `Duration`: positive (or zero, with `zero_ok`), at most a week.
pub fn seconds(what: &str, s: f64, zero_ok: bool) -> Result<Duration> {
    let low_ok = if zero_ok { s >= 0.0 } else { s > 0.0 };
    if !(low_ok && s <= MAX_SECS) {
        bail!(
            "{what} must be a {} number of seconds, at most {MAX_SECS}",
            if zero_ok { "non-negative" } else { "positive" }
        );
    }
    Ok(Duration::from_secs_f64(s))
}

/// Breaks the source's connections `breaks` times at random moments of postcopy, until `stop`.
/// Returns how many breaks it made.
fn chaos(source: &Source, breaks: u32, stop: &AtomicBool) -> u32 {
    let progress = source.progress();
    let mut made = 0;
    while made < breaks && !stop.load(Acquire) {
        std::thread::sleep(Duration::from_micros(rand::Rng::gen_range(
            &mut rand::thread_rng(),
            200..3000,
        )));
        if progress.phase() == SourcePhase::Postcopy {
            tracing::warn!("chaos: breaking the connection ({} of {breaks})", made + 1);
            source.interrupt_link();
            made += 1;
        }
    }
    made
}

/// Runs the destination side; the report's `verified` says whether memory arrived intact.
pub fn run_dest(args: &DestArgs) -> Result<Report> {
    let link_timeout = seconds("--link-timeout-secs", args.link_timeout_secs, false)?;
    let key = key_from(args.key_file.as_deref())?;
    let mem = args.guest.allocate()?;
    let log = Arc::new(PreWriteLog::new(&mem));
    let listener = Listener::bind(&args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener
        .local_endpoint()
        .context("cannot read the bound endpoint")?;
    if let Some(path) = &args.port_file {
        // Write then rename, so a reader never sees a partial endpoint.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{local}\n"))
            .and_then(|_| std::fs::rename(&tmp, path))
            .with_context(|| format!("cannot write the port file {}", path.display()))?;
    }
    warn_without_key(
        &key,
        "the migration port accepts connections from anyone who can reach it",
    );
    tracing::info!(endpoint = %local, mem = %args.guest.mem, "destination listening");

    let mut config = DestConfig {
        timeout: Duration::from_secs(args.timeout_secs.max(1)),
        key,
        link_timeout,
        resume_timeout: Duration::from_secs(args.resume_timeout_secs.max(1)),
        ..DestConfig::default()
    };
    if let Some(r) = args.rcvbuf {
        config.main_socket.recv_buffer = Some(r.0);
    }
    args.placement.apply_dest(&mut config)?;
    let placement = CpuPlacement::settings(
        &config.urgent_cpus,
        &config.bulk_cpus,
        config.urgent_priority,
    );
    let rcvbuf = config.main_socket.recv_buffer;
    let dest = Destination::new(mem.clone(), config)
        .with_guest_digests(log.clone() as Arc<dyn PreWriteDigests>);
    let bar = DestBar::start(dest.watch(), args.progress.enabled(args.json));

    let guest: Arc<Mutex<Option<DestWorkload>>> = Arc::default();
    let mut run = {
        let (guest, mem, log) = (guest.clone(), mem.clone(), log.clone());
        let (vcpus, access) = (args.guest.vcpus, args.guest.access);
        let (think, touches) = (Duration::from_micros(args.think_us), args.touches);
        move || {
            tracing::info!("guest running on the destination");
            *guest.lock().unwrap_or_else(|p| p.into_inner()) = Some(DestWorkload::start(
                mem.clone(),
                log.clone(),
                vcpus,
                access,
                think,
                touches,
            ));
        }
    };
    let cpu0 = process_cpu_ms();
    let result = dest.accept(&listener, &mut run);
    let cpu1 = process_cpu_ms();
    bar.finish();
    // The guest has run through postcopy; stop it now that every page is here.
    let (touches, writes) = match guest.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(mut w) => {
            w.stop();
            (Some(w.touches.load(Relaxed)), Some(w.writes.load(Relaxed)))
        }
        None => (None, None),
    };
    let report = result.context("migration failed on the destination")?;
    let mut settings = args.guest.settings();
    settings["think_us"] = json!(args.think_us);
    settings["touches_per_vcpu"] = json!(args.touches);
    settings["guest_touches"] = json!(touches);
    settings["guest_writes"] = json!(writes);
    settings["listen"] = json!(local.to_string());
    settings["authenticated"] = json!(args.key_file.is_some());
    settings["link_timeout_secs"] = json!(args.link_timeout_secs);
    settings["resume_timeout_secs"] = json!(args.resume_timeout_secs);
    settings["rcvbuf"] = json!(rcvbuf);
    settings["dest_placement"] = placement;
    let mut r = Report::from_dest(&report, None, settings);
    r.dest_cpu_ms = cpu0.zip(cpu1).map(|(a, b)| b - a);
    Ok(r)
}

/// Runs the source side.
pub fn run_source(args: &SourceArgs) -> Result<Report> {
    let limits = args.limits()?;
    let connect_timeout = seconds("--connect-timeout-secs", args.connect_timeout_secs, false)?;
    let link_timeout = seconds("--link-timeout-secs", args.link_timeout_secs, false)?;
    if args.heartbeat_ms == 0 {
        bail!("--heartbeat-ms must be positive");
    }
    let key = key_from(args.key_file.as_deref())?;
    let mem = args.guest.allocate()?;
    warn_without_key(
        &key,
        "guest memory goes to whoever answers at the destination address",
    );
    fill_initial(&mem, 4);
    let mut dirty = UffdWpDirtyLog::new()
        .context("cannot set up dirty tracking (userfaultfd write-protect)")?;
    let mut workload = SourceWorkload::start(
        mem.clone(),
        args.guest.vcpus,
        args.guest.access,
        args.dirty_rate,
    );
    let mut config = SourceConfig {
        mode: args.mode,
        precopy: limits.clone(),
        verify: !args.no_verify,
        timeout: Duration::from_secs(args.timeout_secs.max(1)),
        connect_timeout,
        key,
        reconnect: ReconnectPolicy {
            retries: args.reconnect,
            backoff: Duration::from_millis(args.reconnect_backoff_ms),
            ..ReconnectPolicy::default()
        },
        heartbeat: Duration::from_millis(args.heartbeat_ms),
        link_timeout,
        ..SourceConfig::default()
    };
    args.tuning.apply(&mut config)?;
    args.placement.apply_source(&mut config)?;
    let placement = CpuPlacement::settings(
        &config.urgent_cpus,
        &config.bulk_cpus,
        config.urgent_priority,
    );
    let mut tuning = json!({});
    SourceTuning::settings(&config, &mut tuning);
    let source = Source::new(mem.clone(), config);
    let bar = SourceBar::start(source.progress(), args.progress.enabled(args.json));
    tracing::info!(to = %args.connect, mode = args.mode.name(), "source migrating");
    let stop = AtomicBool::new(false);
    let cpu0 = process_cpu_ms();
    let (result, breaks) = std::thread::scope(|s| {
        let chaos = (args.tuning.chaos_breaks > 0)
            .then(|| s.spawn(|| chaos(&source, args.tuning.chaos_breaks, &stop)));
        let r = source.migrate(&args.connect, &mut dirty, &mut workload);
        stop.store(true, Release);
        (r, chaos.map_or(0, |c| c.join().unwrap_or(0)))
    });
    let cpu1 = process_cpu_ms();
    bar.finish();
    let report = result.with_context(|| format!("migration to {} failed", args.connect))?;
    let mut settings = args.guest.settings();
    settings["mode"] = json!(args.mode.name());
    settings["dirty_rate"] = json!(args.dirty_rate);
    settings["max_passes"] = json!(limits.max_passes);
    settings["max_precopy_secs"] = json!(limits.max_time.as_secs_f64());
    settings["verify"] = json!(!args.no_verify);
    settings["authenticated"] = json!(args.key_file.is_some());
    settings["reconnect_retries"] = json!(args.reconnect);
    settings["reconnect_backoff_ms"] = json!(args.reconnect_backoff_ms);
    settings["link_timeout_secs"] = json!(args.link_timeout_secs);
    settings["heartbeat_ms"] = json!(args.heartbeat_ms);
    settings["seq_assist"] = json!(!args.tuning.no_seq_assist);
    settings["source_placement"] = placement;
    if args.tuning.chaos_breaks > 0 {
        settings["chaos_breaks"] = json!(breaks);
    }
    // The guest is paused (or, after a failed switchover, running again): what it wrote.
    settings["source_guest_writes"] = json!(workload.writes.load(SeqCst));
    if let serde_json::Value::Object(t) = tuning {
        for (k, v) in t {
            settings[k] = v;
        }
    }
    let mut r = Report::from_source(&report, settings);
    r.source_cpu_ms = cpu0.zip(cpu1).map(|(a, b)| b - a);
    Ok(r)
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>10} [{bar:20}] {percent:>3}% {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// A progress bar polled from a thread until [`finish`](Self::finish).
struct Poller {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Poller {
    fn spawn(enabled: bool, mut tick: impl FnMut(&ProgressBar) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = enabled.then(|| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
                bar.set_style(bar_style());
                while !stop.load(Relaxed) {
                    tick(&bar);
                    std::thread::sleep(Duration::from_millis(100));
                }
                tick(&bar);
                bar.finish_and_clear();
            })
        });
        Self { stop, thread }
    }

    fn finish(mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct SourceBar;

impl SourceBar {
    fn start(progress: Arc<Progress>, enabled: bool) -> Poller {
        let mut last = (Instant::now(), 0u64);
        Poller::spawn(enabled, move |bar| {
            let total = progress.total_pages.load(Relaxed);
            let left = progress.pages_left.load(Relaxed);
            let c = progress.counters.snapshot();
            let bytes = c.bytes_bulk + c.bytes_urgent;
            let dt = last.0.elapsed().as_secs_f64().max(1e-3);
            let rate = (bytes.saturating_sub(last.1)) as f64 / dt / 1e9;
            last = (Instant::now(), bytes);
            bar.set_length(total.max(1));
            bar.set_position(total.saturating_sub(left));
            let phase = progress.phase();
            bar.set_prefix(format!("{phase:?}").to_lowercase());
            let msg = match phase {
                SourcePhase::Paused => format!(
                    "link lost, resuming (reconnecting), {left} left, {} requests served",
                    c.requests
                ),
                SourcePhase::Precopy => format!(
                    "pass {}, {left} pages left, {rate:.2} GB/s",
                    progress.pass.load(Relaxed)
                ),
                SourcePhase::Postcopy | SourcePhase::Finishing => format!(
                    "{left} left, {} requests served, {rate:.2} GB/s",
                    c.requests
                ),
                _ => String::new(),
            };
            bar.set_message(msg);
        })
    }
}

struct DestBar;

impl DestBar {
    fn start(watch: DestWatch, enabled: bool) -> Poller {
        Poller::spawn(enabled, move |bar| {
            let s = watch.snapshot();
            bar.set_length(s.total_pages.max(1));
            bar.set_position(s.pages_received);
            let left = s.total_pages.saturating_sub(s.pages_received);
            if s.paused {
                bar.set_prefix("paused");
                bar.set_message(format!(
                    "link lost, waiting for the source to resume; {left} left, {} requests",
                    s.counters.requests
                ));
            } else {
                bar.set_prefix(s.phase);
                bar.set_message(format!("{left} left, {} requests", s.counters.requests));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct GuestOnly {
        #[command(flatten)]
        guest: GuestArgs,
    }

    #[derive(Parser)]
    struct TuningOnly {
        #[command(flatten)]
        tuning: SourceTuning,
        #[command(flatten)]
        placement: CpuPlacement,
    }

    /// The source tuning and placement flags `demo` hands its processes parse back to the
    /// same settings (every field set: a field `to_flags` forgets fails here).
    #[test]
    fn tuning_and_placement_flags_round_trip() {
        let size = |n| Some(Size(n));
        let tuning = SourceTuning {
            bulk_backlog: size(1 << 20),
            max_record: size(128 << 10),
            bulk_send: size(256 << 10),
            notsent_lowat: size(64 << 10),
            sndbuf: size(8 << 20),
            pacing_headroom: Some(0.75),
            no_pacing: false,
            push_ahead: None,
            no_seq_assist: true,
            chaos_breaks: 3,
        };
        let placement = CpuPlacement {
            urgent_cpus: Some(CpuList(vec![1, 3])),
            bulk_cpus: Some(CpuList(vec![0])),
            no_realtime: true,
        };
        let flags = tuning.to_flags().into_iter().chain(placement.to_flags());
        let back =
            TuningOnly::try_parse_from(std::iter::once("x".to_string()).chain(flags)).unwrap();
        assert_eq!(format!("{:?}", back.tuning), format!("{tuning:?}"));
        assert_eq!(format!("{:?}", back.placement), format!("{placement:?}"));
        // The other two settings that only one of a pair of flags can carry.
        let t = SourceTuning {
            no_pacing: true,
            push_ahead: size(64 << 10),
            ..SourceTuning::default()
        };
        let back = TuningOnly::try_parse_from(std::iter::once("x".to_string()).chain(t.to_flags()))
            .unwrap();
        assert_eq!(format!("{:?}", back.tuning), format!("{t:?}"));
    }

    /// `to_flags` parses back to the same settings, every field set away from its default.
    #[test]
    fn guest_flags_round_trip() {
        let g = GuestArgs {
            mem: Size(64 << 20),
            page_size: PageSize::Huge,
            vcpus: 3,
            access: Access::Sequential,
            shared: true,
        };
        let flags = g.to_flags();
        let back = GuestOnly::try_parse_from(std::iter::once("x".to_string()).chain(flags))
            .unwrap()
            .guest;
        assert_eq!(back.mem.0, g.mem.0);
        assert_eq!(back.page_size, g.page_size);
        assert_eq!(back.vcpus, g.vcpus);
        assert_eq!(back.access, g.access);
        assert_eq!(back.shared, g.shared);
    }

    #[test]
    fn cpu_lists_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_cpu_list("1").unwrap().0, vec![1]);
        assert_eq!(parse_cpu_list("3,0-1, 1").unwrap().0, vec![0, 1, 3]);
        for bad in ["", "x", "2-1", "1-", "-1", "0,,1", "99999", "0-99999"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn placement_flags_round_trip() {
        let p = CpuPlacement {
            urgent_cpus: Some(CpuList(vec![1])),
            bulk_cpus: Some(CpuList(vec![0, 2])),
            no_realtime: true,
        };
        assert_eq!(
            p.to_flags(),
            ["--urgent-cpus", "1", "--bulk-cpus", "0,2", "--no-realtime"]
        );
        let cpus = migrate_core::sched::current_affinity();
        assert!(!cpus.is_empty());
        let p = CpuPlacement {
            urgent_cpus: Some(CpuList(vec![cpus[0]])),
            bulk_cpus: Some(CpuList(cpus.clone())),
            no_realtime: true,
        };
        let mut c = SourceConfig::default();
        p.apply_source(&mut c).unwrap();
        assert_eq!(
            (c.urgent_cpus, c.bulk_cpus, c.urgent_priority),
            (vec![cpus[0]], cpus, None)
        );
        let off = CpuPlacement {
            bulk_cpus: Some(CpuList(vec![libc::CPU_SETSIZE as usize - 1])),
            ..CpuPlacement::default()
        };
        let err = off.apply_dest(&mut DestConfig::default()).unwrap_err();
        assert!(err.to_string().contains("not available"), "{err}");
    }
}
