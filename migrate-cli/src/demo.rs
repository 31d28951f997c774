//! `demo`: a whole migration on one machine, the destination and the source as two child
//! processes of this binary over loopback TCP; `--mode all` adds the floor and compares.

use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use migrate_core::Mode;

use crate::floor::{self, BulkMode, FloorConfig, FloorOutcome};
use crate::migrate::{CpuPlacement, GuestArgs, SourceTuning};
use crate::report::{FloorRef, Report};
use crate::size::Size;
use crate::stream::{self, StreamOutcome};

/// One mode, or all three in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DemoMode {
    One(Mode),
    All,
}

impl FromStr for DemoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "all" {
            return Ok(DemoMode::All);
        }
        s.parse::<Mode>()
            .map(DemoMode::One)
            .map_err(|e| format!("{e}, or all"))
    }
}

#[derive(Args, Clone, Debug)]
pub struct DemoArgs {
    /// vanilla, preempt, preempt-full, or all (floor, then the three modes, then a comparison).
    #[arg(long, default_value = "preempt-full")]
    pub mode: DemoMode,
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Host pages the source guest writes per second during precopy.
    #[arg(long, default_value_t = 20_000)]
    pub dirty_rate: u64,
    /// Precopy passes before postcopy (0: pure postcopy, every page is either pushed by the
    /// bulk stream or requested by the running guest).
    #[arg(long, default_value_t = 0)]
    pub postcopy_after_passes: u32,
    /// Also end precopy after this long (seconds).
    #[arg(long)]
    pub precopy_secs: Option<f64>,
    /// Destination guest think time between touches (microseconds).
    #[arg(long, default_value_t = 20)]
    pub think_us: u64,
    /// Destination guest touches per vCPU (0: until the migration completes).
    #[arg(long, default_value_t = 20_000)]
    pub touches: u64,
    /// Also measure the floor first (always done with --mode all).
    #[arg(long)]
    pub floor: bool,
    /// Requests the floor emulator measures (default 2000 for 4 KiB pages, 200 for 2 MiB).
    #[arg(long)]
    pub floor_requests: Option<u64>,
    #[arg(long)]
    pub no_verify: bool,
    /// Per-side silence timeout (seconds).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub timeout_secs: u64,
    /// Pre-shared key file handed to both sides. Without it the demo writes a fresh random
    /// key to a private (0600) file in a temporary directory for its two processes and deletes
    /// it afterwards, so the demo's connections are always authenticated.
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    #[command(flatten)]
    pub tuning: SourceTuning,
    /// Thread placement, applied to both sides.
    #[command(flatten)]
    pub placement: CpuPlacement,
    /// SO_RCVBUF of the destination's main (bulk) connection.
    #[arg(long, value_name = "SIZE")]
    pub rcvbuf: Option<Size>,
    /// Also measure the `stream` bulk baseline first (always done with --mode all) and report
    /// the precopy throughput against it.
    #[arg(long)]
    pub baseline: bool,
    /// How long the stream baseline runs (seconds).
    #[arg(long, default_value_t = 1.0)]
    pub baseline_secs: f64,
    #[arg(long)]
    pub json: bool,
}

/// A private temporary directory, removed with everything in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "migrate-cli-demo-{}-{tag}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a fresh random key (64 hex digits) to a file only the owner can read.
fn write_random_key(path: &Path) -> Result<()> {
    let bytes: [u8; 32] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create the key file {}", path.display()))?;
    writeln!(f, "{hex}").with_context(|| format!("cannot write {}", path.display()))
}

/// What the demo produced: one report per run, in order.
pub struct DemoOutcome {
    pub reports: Vec<Report>,
    pub baseline: Option<StreamOutcome>,
    pub floor_avg: Option<f64>,
    pub all: bool,
}

/// Kills the child (by its own handle) if it is still running when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn read_all(child: &mut Child) -> Result<JoinHandle<Vec<u8>>> {
    let mut out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("child stdout not captured"))?;
    Ok(std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    }))
}

fn parse_report(who: &str, bytes: &[u8]) -> Result<Report> {
    serde_json::from_slice(bytes).with_context(|| {
        format!(
            "the {who} printed no JSON report ({} bytes on stdout)",
            bytes.len()
        )
    })
}

fn wait_port_file(path: &Path, dest: &mut Child, deadline: Duration) -> Result<String> {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            let s = s.trim().to_string();
            if !s.is_empty() {
                return Ok(s);
            }
        }
        if let Some(status) = dest.try_wait()? {
            bail!("the destination process exited before listening ({status})");
        }
        if start.elapsed() > deadline {
            bail!("the destination did not start listening within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs one migration as two child processes and merges their reports.
fn run_pair(args: &DemoArgs, mode: Mode, show_progress: bool) -> Result<Report> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    // Removed (with the generated key) when this function returns, whatever happens.
    let dir = TempDir::new(mode.name())?;
    let port_file: PathBuf = dir.0.join("port");
    let key_file = match &args.key_file {
        Some(k) => k.clone(),
        None => {
            let k = dir.0.join("key");
            write_random_key(&k)?;
            k
        }
    };

    let mut dest = Command::new(&exe);
    dest.arg("dest")
        .args(["--listen", "127.0.0.1:0", "--port-file"])
        .arg(&port_file)
        .args(args.guest.to_flags())
        .args(["--think-us", &args.think_us.to_string()])
        .args(["--touches", &args.touches.to_string()])
        .args(
            args.rcvbuf
                .iter()
                .flat_map(|r| ["--rcvbuf".to_string(), r.0.to_string()]),
        )
        .args(["--timeout-secs", &args.timeout_secs.to_string()])
        .args(args.placement.to_flags())
        .arg("--key-file")
        .arg(&key_file)
        .args(["--json", "--progress", "never"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut dest = ChildGuard(
        dest.spawn()
            .context("cannot start the destination process")?,
    );
    let dest_out = read_all(&mut dest.0)?;
    let endpoint = wait_port_file(&port_file, &mut dest.0, Duration::from_secs(30));
    let endpoint = endpoint?;
    tracing::info!(%endpoint, mode = mode.name(), "destination listening; starting the source");

    let mut source = Command::new(&exe);
    source
        .arg("source")
        .args(["--connect", &endpoint, "--mode", mode.name()])
        .args(args.guest.to_flags())
        .args(["--dirty-rate", &args.dirty_rate.to_string()])
        .args([
            "--postcopy-after-passes",
            &args.postcopy_after_passes.to_string(),
        ])
        .args(["--timeout-secs", &args.timeout_secs.to_string()])
        .arg("--key-file")
        .arg(&key_file)
        .args(args.tuning.to_flags())
        .args(args.placement.to_flags())
        .args(["--json", "--progress"])
        .arg(if show_progress { "always" } else { "never" })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(s) = args.precopy_secs {
        source.args(["--precopy-secs", &s.to_string()]);
    }
    if args.no_verify {
        source.arg("--no-verify");
    }
    let source = source
        .spawn()
        .context("cannot start the source process")?
        .wait_with_output()
        .context("waiting for the source process")?;
    // On error `dest` is killed by its guard.
    let src_report = parse_report("source", &source.stdout)
        .with_context(|| format!("the source process failed ({})", source.status))?;

    // The destination finishes right after the source; bound the wait anyway.
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs.max(1) * 2);
    let status = loop {
        if let Some(status) = dest.0.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("the destination process did not finish (killed)");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let dest_out = dest_out
        .join()
        .map_err(|_| anyhow!("destination output reader panicked"))?;
    let dst_report = parse_report("destination", &dest_out)
        .with_context(|| format!("the destination process failed ({status})"))?;
    Ok(Report::merge(src_report, dst_report))
}

fn spinner(show: bool, msg: String) -> ProgressBar {
    let bar = if show {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(msg);
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

fn measure_floor(args: &DemoArgs, bulk: BulkMode, show: bool) -> Result<FloorOutcome> {
    let page = args.guest.page_size;
    let bar = spinner(
        show,
        format!("floor ({} pages, bulk {})", page.name(), bulk.name()),
    );
    let requests = args
        .floor_requests
        .unwrap_or(if page.bytes() == 4096 { 2000 } else { 200 })
        .max(1);
    let cfg = FloorConfig {
        page,
        requests,
        warmup: (requests / 20).max(10),
        bulk,
        vcpus: 1,
        placement: args.placement.floor_placement()?,
    };
    let out = floor::run(&cfg).with_context(|| format!("floor (bulk {})", bulk.name()));
    bar.finish_and_clear();
    out
}

pub fn run(args: &DemoArgs) -> Result<DemoOutcome> {
    let show = !args.json && std::io::stderr().is_terminal();
    if let Some(k) = &args.key_file {
        // Fail here, once, rather than in both children.
        crate::migrate::load_key(k)?;
    }
    args.guest.backing()?;
    let all = args.mode == DemoMode::All;
    let mut reports = Vec::new();
    let mut floor_ref: Option<FloorRef> = None;
    if all || args.floor {
        let idle = measure_floor(args, BulkMode::None, show)?;
        floor_ref = Some(idle.floor_ref());
        reports.push(idle.report());
        if all {
            reports.push(measure_floor(args, BulkMode::Separate, show)?.report());
        }
    }
    let baseline = if all || args.baseline {
        let bar = spinner(show, "stream baseline".into());
        let secs = crate::migrate::seconds("--baseline-secs", args.baseline_secs, false)?;
        let b = stream::run(secs).context("stream baseline");
        bar.finish_and_clear();
        Some(b?)
    } else {
        None
    };
    let modes: Vec<Mode> = match args.mode {
        DemoMode::One(m) => vec![m],
        DemoMode::All => Mode::ALL.to_vec(),
    };
    for mode in modes {
        if show {
            eprintln!(
                "migrating {} of {} pages, mode {}",
                args.guest.mem,
                args.guest.page_size.name(),
                mode.name()
            );
        }
        let mut r =
            run_pair(args, mode, show).with_context(|| format!("{} migration", mode.name()))?;
        r.floor_us = floor_ref;
        if let Some(b) = &baseline {
            r.set_baseline(b.gbytes_per_sec);
        }
        reports.push(r);
    }
    Ok(DemoOutcome {
        reports,
        baseline,
        floor_avg: floor_ref.map(|f| f.avg),
        all,
    })
}
