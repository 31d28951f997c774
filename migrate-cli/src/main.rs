//! `migrate-cli`: the command-line front end of the migration engine.
//!
//! * `dest` / `source`: the two sides of a migration between two hosts (or namespaces).
//! * `demo`: both sides as child processes on one machine; `--mode all` compares the modes
//!   against the floor.
//! * `floor`: the physical floor of a page request (round trip + page + UFFDIO_COPY).

mod demo;
mod floor;
mod migrate;
mod report;
mod size;
mod stream;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::floor::{BulkMode, FloorConfig};
use crate::report::{comparison_table, Report};
use crate::size::PageSize;

#[derive(Parser, Debug)]
#[command(
    name = "migrate-cli",
    version,
    about = "Postcopy live migration: source, destination, demo and floor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Receive one migration: build the guest, accept, run the guest's vCPUs, report.
    Dest(migrate::DestArgs),
    /// Send one migration to a listening destination.
    Source(migrate::SourceArgs),
    /// Run the destination and the source as child processes over loopback.
    Demo(demo::DemoArgs),
    /// Measure the physical floor of a page request over loopback TCP.
    Floor(FloorArgs),
    /// The bulk baseline: blocking writev of 64 x (16 B header + 4 KiB page) over loopback
    /// TCP to a draining reader thread, in GB/s.
    Stream(StreamArgs),
}

#[derive(Args, Debug)]
struct StreamArgs {
    /// How long to stream (seconds).
    #[arg(long, default_value_t = 2.0, conflicts_with = "fresh")]
    secs: f64,
    /// Instead: stream this much page data (rounded down to 256 KiB) into fresh memory (the
    /// reader allocates every page as it reads, as a migration destination does), e.g. 1G.
    #[arg(long, value_name = "SIZE")]
    fresh: Option<size::Size>,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct FloorArgs {
    /// 4k, 2m (hugetlb) or thp.
    #[arg(long, default_value = "4k")]
    page_size: PageSize,
    /// Requests to measure (default 5000 for 4k pages, 300 for 2 MiB pages).
    #[arg(long)]
    requests: Option<u64>,
    /// Unmeasured requests first (default: 5% of --requests, at least 10).
    #[arg(long)]
    warmup: Option<u64>,
    /// A saturating bulk stream during the measurement: none, separate (own connection) or
    /// same (shares the reply connection).
    #[arg(long, value_enum, default_value = "none")]
    bulk: BulkMode,
    /// Faulting threads.
    #[arg(long, default_value_t = 1)]
    vcpus: usize,
    /// Placement of the request path and the bulk stream (as for `source` and `dest`).
    #[command(flatten)]
    placement: migrate::CpuPlacement,
    #[arg(long)]
    json: bool,
}

/// What a command printed, and whether it counts as a failure.
struct Output {
    json: serde_json::Value,
    human: String,
    as_json: bool,
    failed_verification: bool,
}

fn single(report: Report, as_json: bool) -> Result<Output> {
    Ok(Output {
        failed_verification: report.verified == Some(false),
        human: report.render(),
        json: serde_json::to_value(&report).context("serialising the report")?,
        as_json,
    })
}

fn run(cli: Cli) -> Result<Output> {
    match cli.command {
        Command::Dest(a) => single(migrate::run_dest(&a)?, a.json),
        Command::Source(a) => single(migrate::run_source(&a)?, a.json),
        Command::Floor(a) => {
            let requests = a.requests.unwrap_or(match a.page_size {
                PageSize::Small => 5000,
                _ => 300,
            });
            let cfg = FloorConfig {
                page: a.page_size,
                requests: requests.max(1),
                warmup: a.warmup.unwrap_or((requests / 20).max(10)),
                bulk: a.bulk,
                vcpus: a.vcpus.max(1),
                placement: a.placement.floor_placement()?,
            };
            single(floor::run(&cfg)?.report(), a.json)
        }
        Command::Stream(a) => {
            let out = match a.fresh {
                Some(s) => stream::run_fresh(s.0 as u64)?,
                None => stream::run(migrate::seconds("--secs", a.secs, false)?)?,
            };
            Ok(Output {
                human: out.render(),
                json: serde_json::to_value(&out).context("serialising the result")?,
                as_json: a.json,
                failed_verification: false,
            })
        }
        Command::Demo(a) => {
            let out = demo::run(&a)?;
            let failed = out.reports.iter().any(|r| r.verified == Some(false));
            if out.all {
                let mut human: String = out.reports.iter().map(|r| r.render() + "\n").collect();
                if let Some(b) = &out.baseline {
                    human.push_str(&b.render());
                    human.push('\n');
                }
                human.push_str("== comparison (page-request latency, fault read -> placed) ==\n");
                human.push_str(&comparison_table(&out.reports, out.floor_avg));
                Ok(Output {
                    json: serde_json::to_value(&out.reports).context("serialising the reports")?,
                    human,
                    as_json: a.json,
                    failed_verification: failed,
                })
            } else {
                // Without --mode all: the migration's report (its floor_us holds the floor, if
                // measured with --floor).
                let report = out
                    .reports
                    .into_iter()
                    .last()
                    .context("the demo produced no report")?;
                single(report, a.json)
            }
        }
    }
}

/// The whole context chain on one line, colon-separated, without the repeats that wrapped
/// errors produce when they both print and chain their source.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string().replace('\n', " ");
        if parts.last().is_some_and(|p| p.contains(&s)) {
            continue;
        }
        parts.push(s);
    }
    parts.join(": ")
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(out) => {
            if out.as_json {
                match serde_json::to_string_pretty(&out.json) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: serialising the report: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", out.human);
            }
            if out.failed_verification {
                eprintln!("error: verification failed: guest memory differs after migration");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_is_one_line_without_repeats() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = anyhow::Error::new(io)
            .context("network: refused")
            .context("migration to x failed");
        assert_eq!(one_line(&e), "migration to x failed: network: refused");
        let e = anyhow::anyhow!("a\nb").context("c");
        assert_eq!(one_line(&e), "c: a b");
    }

    #[test]
    fn demo_mode_parses() {
        assert_eq!("all".parse::<demo::DemoMode>(), Ok(demo::DemoMode::All));
        assert_eq!(
            "preempt-full".parse::<demo::DemoMode>(),
            Ok(demo::DemoMode::One(migrate_core::Mode::PreemptFull))
        );
        assert!("warp"
            .parse::<demo::DemoMode>()
            .unwrap_err()
            .contains("or all"));
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
