//! End-to-end tests of the built `migrate-cli` binary: small guests, loopback only.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_migrate-cli");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run migrate-cli")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "status {}; stderr:\n{}",
        o.status,
        stderr(o)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}):\n{}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

fn assert_latency(v: &Value, what: &str) {
    let l = &v["latency_us"];
    for k in ["avg", "p50", "p99", "p999", "max"] {
        assert!(
            l[k].as_f64().is_some(),
            "{what}: latency_us.{k} missing in {l}"
        );
    }
    assert!(l["count"].as_u64().is_some(), "{what}: latency_us.count");
    assert!(
        l["buckets"].as_array().is_some(),
        "{what}: latency_us.buckets"
    );
}

/// The fields every migration report carries.
fn assert_migration_fields(v: &Value, mode: &str) {
    assert_eq!(v["mode"], mode, "{v}");
    assert_eq!(v["verified"], Value::Bool(true), "not verified: {v}");
    assert_latency(v, mode);
    assert!(v.get("floor_us").is_some(), "floor_us missing");
    for k in ["bulk", "urgent", "zero"] {
        assert!(v["pages"][k].as_u64().is_some(), "pages.{k}");
    }
    for k in ["bulk", "urgent"] {
        assert!(v["bytes"][k].as_u64().is_some(), "bytes.{k}");
    }
    assert!(v["total_ms"].as_f64().unwrap() > 0.0);
    assert!(v["downtime_ms"].as_f64().is_some());
    assert!(v["throughput_gbps"].as_f64().unwrap() > 0.0);
    // 32 MiB of 4 KiB pages: every one is sent in bulk, sent urgently or is a zero page.
    let p = &v["pages"];
    let total =
        p["bulk"].as_u64().unwrap() + p["urgent"].as_u64().unwrap() + p["zero"].as_u64().unwrap();
    assert!(total >= 8192, "only {total} pages accounted for: {p}");
    // Pure postcopy (the demo's default) with a guest touching random pages at once: the guest
    // faults on pages the bulk stream has not reached yet.
    let requests = v["requests"].as_u64().unwrap();
    assert!(requests > 0, "no page requests: {v}");
    assert!(
        v["latency_us"]["count"].as_u64().unwrap() > 0,
        "no latency samples"
    );
}

fn demo(mode: &str) {
    let o = run(&["demo", "--json", "--mem", "32M", "--mode", mode]);
    let v = json(&o);
    assert_migration_fields(&v, mode);
    assert_eq!(
        v["floor_us"],
        Value::Null,
        "no floor measured without --floor"
    );
}

#[test]
fn demo_vanilla() {
    demo("vanilla");
}

#[test]
fn demo_preempt() {
    demo("preempt");
}

#[test]
fn demo_preempt_full() {
    demo("preempt-full");
}

/// `demo --shared` migrates shared memfd guest RAM: both child processes get the flag (it
/// was once dropped on the way, and the "shared" runs were private).
#[test]
fn demo_shared_runs_on_shared_memory() {
    let o = run(&["demo", "--json", "--mem", "32M", "--shared"]);
    let v = json(&o);
    assert_migration_fields(&v, "preempt-full");
    assert_eq!(
        v["settings"]["shared"],
        Value::Bool(true),
        "{}",
        v["settings"]
    );
    let bad = run(&["demo", "--mem", "16M", "--shared", "--page-size", "thp"]);
    assert!(
        !bad.status.success(),
        "demo --shared --page-size thp was accepted"
    );
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--shared works with"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn demo_all_compares_against_the_floor() {
    let o = run(&[
        "demo",
        "--json",
        "--mode",
        "all",
        "--mem",
        "16M",
        "--floor-requests",
        "200",
    ]);
    let v = json(&o);
    let rows = v.as_array().expect("an array of reports");
    let modes: Vec<&str> = rows.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(
        modes,
        [
            "floor",
            "floor+bulk-separate",
            "vanilla",
            "preempt",
            "preempt-full"
        ]
    );
    let floor = &rows[0];
    assert_latency(floor, "floor");
    assert_eq!(floor["latency_us"]["count"], 200);
    assert_eq!(floor["verified"], Value::Null);
    let floor_avg = floor["latency_us"]["avg"].as_f64().unwrap();
    for r in &rows[2..] {
        assert_eq!(r["verified"], Value::Bool(true), "{r}");
        assert_eq!(r["floor_us"]["avg"].as_f64(), Some(floor_avg));
    }
}

#[test]
fn human_demo_report_has_histogram() {
    let o = run(&["demo", "--mem", "16M", "--mode", "preempt-full"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.contains("Average: "), "{out}");
    assert!(out.contains("@delay_us:\n"), "{out}");
    assert!(out.contains("p99.9"), "{out}");
    assert!(out.contains("verification: OK"), "{out}");
}

#[test]
fn floor_json() {
    let o = run(&["floor", "--json", "--requests", "300", "--warmup", "20"]);
    let v = json(&o);
    assert_eq!(v["mode"], "floor");
    assert_latency(&v, "floor");
    assert_eq!(v["latency_us"]["count"], 300);
    assert_eq!(v["requests"], 300);
    let l = &v["latency_us"];
    let (p50, p99, max) = (
        l["p50"].as_f64().unwrap(),
        l["p99"].as_f64().unwrap(),
        l["max"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{l}");
    assert_eq!(v["floor_us"]["p50"], l["p50"]);
    assert_eq!(v["bytes"]["urgent"], 300 * 4096);
    // The request path is placed like the engine's urgent path.
    assert_eq!(v["settings"]["urgent_priority"], 10, "{v}");

    let o = run(&[
        "floor",
        "--json",
        "--requests",
        "50",
        "--urgent-cpus",
        "0",
        "--no-realtime",
    ]);
    let s = &json(&o)["settings"];
    assert_eq!(s["urgent_cpus"], serde_json::json!([0]), "{s}");
    assert_eq!(s["urgent_priority"], Value::Null, "{s}");
}

#[test]
fn floor_with_bulk_on_the_same_connection() {
    let o = run(&["floor", "--json", "--requests", "50", "--bulk", "same"]);
    let v = json(&o);
    assert_eq!(v["mode"], "floor+bulk-same");
    assert_eq!(v["latency_us"]["count"], 50);
    assert!(
        v["bytes"]["bulk"].as_u64().unwrap() > 0,
        "no bulk stream: {v}"
    );
}

fn port_file(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("migrate-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// A key file with `contents`, removed when dropped.
struct KeyFile(PathBuf);

impl KeyFile {
    fn new(name: &str, contents: &str) -> Self {
        let p = port_file(&format!("{name}.key"));
        std::fs::write(&p, contents).unwrap();
        Self(p)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts a destination of `mem` with `extra` flags; returns it and its endpoint.
fn spawn_dest(name: &str, mem: &str, extra: &[&str]) -> (std::process::Child, String) {
    let pf = port_file(name);
    let dest = Command::new(BIN)
        .args(["dest", "--listen", "127.0.0.1:0", "--mem", mem, "--json"])
        .args(["--timeout-secs", "10", "--port-file"])
        .arg(&pf)
        .args(extra)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ep = wait_for(&pf);
    (dest, ep)
}

/// Runs a source against `ep` with `mem` of guest memory, a JSON report, and `extra` flags.
fn run_source(ep: &str, mem: &str, extra: &[&str]) -> Output {
    let mut args = vec!["source", "--connect", ep, "--mem", mem, "--json"];
    args.extend_from_slice(extra);
    run(&args)
}

fn wait_for(path: &PathBuf) -> String {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.trim().is_empty() {
                let _ = std::fs::remove_file(path);
                return s.trim().to_string();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "dest never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn dest_and_source_processes() {
    let (dest, ep) = spawn_dest("pair", "16M", &[]);
    let src = run_source(
        &ep,
        "16M",
        &["--mode", "preempt", "--postcopy-after-passes", "1"],
    );
    let dst = dest.wait_with_output().unwrap();
    let s = json(&src);
    let d = json(&dst);
    assert_eq!(s["mode"], "preempt");
    assert_eq!(s["verified"], Value::Bool(true));
    assert_eq!(s["precopy_passes"], 1);
    assert_eq!(d["verified"], Value::Bool(true));
    assert_latency(&d, "dest");
    // What one side sent, the other received.
    assert_eq!(s["bytes"]["bulk"], d["bytes"]["bulk"]);
    assert_eq!(s["bytes"]["urgent"], d["bytes"]["urgent"]);
}

#[test]
fn mismatched_memory_sizes_fail_on_both_sides() {
    let key = KeyFile::new("mismatch", "a key for the mismatch test\n");
    let (dest, ep) = spawn_dest("mismatch", "8M", &["--key-file", key.path()]);
    let src = run_source(&ep, "16M", &["--key-file", key.path()]);
    let dst = dest.wait_with_output().unwrap();
    assert!(!src.status.success());
    assert!(!dst.status.success());
    assert!(src.stdout.is_empty(), "no report on failure");
    for o in [&src, &dst] {
        let e = stderr(o);
        assert_eq!(e.lines().count(), 1, "one line: {e}");
        assert!(e.starts_with("error: "), "{e}");
        assert!(e.contains("mismatch"), "{e}");
    }
}

#[test]
fn bad_size_is_rejected() {
    let o = run(&["demo", "--mem", "12Q"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("invalid size \"12Q\""),
        "{}",
        stderr(&o)
    );
}

#[test]
fn placement_flags_reach_both_sides_and_bad_cpus_are_refused() {
    let o = run(&[
        "demo",
        "--json",
        "--mem",
        "16M",
        "--urgent-cpus",
        "0",
        "--bulk-cpus",
        "0",
        "--no-realtime",
    ]);
    let s = &json(&o)["settings"];
    for side in ["source_placement", "dest_placement"] {
        assert_eq!(s[side]["urgent_cpus"], serde_json::json!([0]), "{s}");
        assert_eq!(s[side]["bulk_cpus"], serde_json::json!([0]), "{s}");
        assert_eq!(s[side]["urgent_priority"], Value::Null, "{s}");
    }
    let o = run(&["demo", "--mem", "16M", "--urgent-cpus", "1000"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("CPU 1000 is not available"),
        "{}",
        stderr(&o)
    );
    let o = run(&["demo", "--mem", "16M", "--bulk-cpus", "3-1"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bad CPU range"), "{}", stderr(&o));
}

/// Out-of-range times are clear errors, not panics (exit 101) or overflows later on.
#[test]
fn out_of_range_seconds_are_refused() {
    for args in [
        &["stream", "--secs", "1e300"][..],
        &[
            "demo",
            "--mem",
            "16M",
            "--baseline",
            "--baseline-secs",
            "1e300",
        ],
        &[
            "source",
            "--connect",
            "127.0.0.1:1",
            "--link-timeout-secs",
            "1e300",
        ],
        &[
            "source",
            "--connect",
            "127.0.0.1:1",
            "--connect-timeout-secs=-1",
        ],
        &[
            "source",
            "--connect",
            "127.0.0.1:1",
            "--precopy-secs",
            "1e18",
        ],
        &[
            "dest",
            "--listen",
            "127.0.0.1:0",
            "--link-timeout-secs",
            "1e18",
        ],
        &[
            "dest",
            "--listen",
            "127.0.0.1:0",
            "--resume-timeout-secs",
            "18446744073709551615",
        ],
        &["dest", "--listen", "127.0.0.1:0", "--timeout-secs", "0"],
    ] {
        let o = run(args);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert_ne!(
            o.status.code(),
            Some(101),
            "{args:?} panicked: {}",
            stderr(&o)
        );
        let e = stderr(&o);
        assert!(
            e.contains("seconds") || e.contains("not in"),
            "{args:?}: {e}"
        );
    }
}

#[test]
fn bad_mode_is_rejected() {
    let o = run(&["demo", "--mode", "warp"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown mode"), "{}", stderr(&o));
    let o = run(&["source", "--connect", "127.0.0.1:1", "--mode", "warp"]);
    assert!(!o.status.success());
}

#[test]
fn mem_not_a_multiple_of_the_page_size_is_rejected() {
    let o = run(&[
        "dest",
        "--listen",
        "127.0.0.1:0",
        "--mem",
        "3M",
        "--page-size",
        "2m",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.starts_with("error: --mem 3MiB is not a positive multiple"),
        "{e}"
    );
}

#[test]
fn unreachable_peer_fails_fast_with_one_line() {
    let start = Instant::now();
    let key = KeyFile::new("unreachable", "0123456789abcdef0123\n");
    let o = run(&[
        "source",
        "--connect",
        "127.0.0.1:1",
        "--mem",
        "4M",
        "--connect-timeout-secs",
        "2",
        "--key-file",
        key.path(),
    ]);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.starts_with("error: migration to 127.0.0.1:1 failed"),
        "{e}"
    );
    assert!(e.contains("refused"), "{e}");
}

// ---- authentication and recovery ---------------------------------------------------------------

#[test]
fn demo_survives_broken_links() {
    let o = run(&[
        "demo",
        "--json",
        "--mem",
        "32M",
        "--mode",
        "preempt-full",
        "--chaos-breaks",
        "3",
    ]);
    let v = json(&o);
    assert_eq!(v["verified"], Value::Bool(true), "{v}");
    let recoveries = v["recoveries"].as_u64().expect("recoveries in the report");
    assert!(recoveries >= 1, "no break landed in postcopy: {v}");
    assert_eq!(v["source"]["recoveries"].as_u64(), Some(recoveries));
    assert_migration_fields(&v, "preempt-full");
}

#[test]
fn human_report_shows_recoveries() {
    let o = run(&["demo", "--mem", "16M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout.clone()).unwrap();
    assert!(
        out.contains("recoveries (postcopy resumed after a broken link): 0"),
        "{out}"
    );
    // The demo authenticates its children with a generated key: no warning.
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
}

#[test]
fn demo_with_a_key_file() {
    let key = KeyFile::new("demo", "a demo key given by the user\n");
    let o = run(&["demo", "--json", "--mem", "16M", "--key-file", key.path()]);
    let v = json(&o);
    assert_eq!(v["verified"], Value::Bool(true), "{v}");
    assert_eq!(v["settings"]["authenticated"], Value::Bool(true), "{v}");
}

/// Both exited non-zero with exactly one stderr line, an error naming authentication.
fn assert_auth_failure(who: &str, o: &Output) {
    assert!(!o.status.success(), "the {who} succeeded");
    assert!(o.stdout.is_empty(), "{who}: no report on failure");
    let e = stderr(o);
    assert_eq!(e.lines().count(), 1, "{who}: one line: {e}");
    assert!(e.starts_with("error: "), "{who}: {e}");
    assert!(e.contains("authentication"), "{who}: {e}");
}

#[test]
fn different_keys_fail_on_both_sides() {
    let dkey = KeyFile::new("dkey", "the destination's key........\n");
    let skey = KeyFile::new("skey", "the source's different key...\n");
    let (dest, ep) = spawn_dest("keys", "8M", &["--key-file", dkey.path()]);
    let src = run_source(&ep, "8M", &["--key-file", skey.path()]);
    let dst = dest.wait_with_output().unwrap();
    assert_auth_failure("source", &src);
    assert_auth_failure("destination", &dst);
}

#[test]
fn source_without_a_key_is_refused() {
    let dkey = KeyFile::new("nokey", "the destination's key........\n");
    let (dest, ep) = spawn_dest("nokey", "8M", &["--key-file", dkey.path()]);
    let src = run(&["source", "--connect", &ep, "--mem", "8M", "--json"]);
    let dst = dest.wait_with_output().unwrap();
    assert!(!src.status.success());
    assert!(src.stdout.is_empty());
    let e = stderr(&src);
    assert!(
        e.lines()
            .next()
            .unwrap_or("")
            .starts_with("warning: no --key-file"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 2, "a warning and one error line: {e}");
    assert!(e.lines().nth(1).unwrap().starts_with("error: "), "{e}");
    assert!(e.contains("authentication"), "{e}");
    assert_auth_failure("destination", &dst);
}

#[test]
fn short_key_file_is_a_clear_error() {
    let key = KeyFile::new("short", "too short\n");
    for args in [
        vec!["dest", "--listen", "127.0.0.1:0", "--mem", "4M"],
        vec!["source", "--connect", "127.0.0.1:1", "--mem", "4M"],
        vec!["demo", "--mem", "4M"],
    ] {
        let mut args = args;
        args.extend(["--key-file", key.path()]);
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let e = stderr(&o);
        assert_eq!(e.lines().count(), 1, "{args:?}: {e}");
        assert!(e.starts_with("error: "), "{e}");
        assert!(e.contains("key file"), "{e}");
        assert!(e.contains("at least 16"), "{e}");
    }
    let o = run(&[
        "source",
        "--connect",
        "127.0.0.1:1",
        "--key-file",
        "/nonexistent/migrate-cli.key",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.starts_with("error: cannot read the key file /nonexistent/migrate-cli.key"),
        "{e}"
    );
}

#[test]
fn no_key_warns_once() {
    let (dest, ep) = spawn_dest("warn", "4M", &[]);
    let src = run_source(&ep, "4M", &["--postcopy-after-passes", "1"]);
    let dst = dest.wait_with_output().unwrap();
    json(&src);
    json(&dst);
    assert_eq!(
        stderr(&dst),
        "warning: no --key-file: the migration port accepts connections from anyone who can reach it\n"
    );
    let e = stderr(&src);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.starts_with("warning: no --key-file: "), "{e}");
}

#[test]
fn recovery_flags_reach_the_report() {
    let key = KeyFile::new("flags", "a key for the flags test....\n");
    let (dest, ep) = spawn_dest(
        "flags",
        "4M",
        &[
            "--key-file",
            key.path(),
            "--link-timeout-secs",
            "3",
            "--resume-timeout-secs",
            "60",
        ],
    );
    let src = run_source(
        &ep,
        "4M",
        &[
            "--key-file",
            key.path(),
            "--reconnect",
            "5",
            "--reconnect-backoff-ms",
            "10",
            "--link-timeout-secs",
            "3",
            "--heartbeat-ms",
            "100",
        ],
    );
    let dst = dest.wait_with_output().unwrap();
    let s = json(&src);
    let d = json(&dst);
    assert_eq!(s["recoveries"], 0);
    assert_eq!(s["settings"]["reconnect_retries"], 5);
    assert_eq!(s["settings"]["reconnect_backoff_ms"], 10);
    assert_eq!(s["settings"]["heartbeat_ms"], 100);
    assert_eq!(s["settings"]["authenticated"], Value::Bool(true));
    assert_eq!(d["settings"]["resume_timeout_secs"], 60);
    assert_eq!(d["settings"]["link_timeout_secs"], 3.0);
    assert_eq!(d["recoveries"], 0);
    assert_eq!(d["verified"], Value::Bool(true));
    let o = run(&["source", "--connect", "127.0.0.1:1", "--heartbeat-ms", "0"]);
    assert!(
        stderr(&o).contains("--heartbeat-ms must be positive"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn stream_baseline_json() {
    let o = run(&["stream", "--json", "--secs", "0.2"]);
    let v = json(&o);
    assert_eq!(v["mode"], "stream");
    let gbs = v["gbytes_per_sec"].as_f64().unwrap();
    assert!(gbs > 0.0, "{v}");
    let pages = v["pages"].as_u64().unwrap();
    assert!(pages > 0, "{v}");
    assert_eq!(v["bytes"].as_u64().unwrap(), pages * (4096 + 16));
    assert!(v["secs"].as_f64().unwrap() >= 0.2, "{v}");
}

#[test]
fn source_tuning_flags_reach_the_settings() {
    let o = run(&[
        "demo",
        "--json",
        "--mem",
        "16M",
        "--bulk-backlog",
        "512K",
        "--max-record",
        "32K",
        "--bulk-send",
        "64K",
        "--notsent-lowat",
        "64K",
        "--sndbuf",
        "1M",
        "--no-pacing",
        "--push-ahead",
        "0",
        "--rcvbuf",
        "512K",
        "--postcopy-after-passes",
        "1",
        "--baseline",
        "--baseline-secs",
        "0.1",
    ]);
    let v = json(&o);
    let s = &v["settings"];
    assert_eq!(s["bulk_backlog"], 512 << 10, "{s}");
    assert_eq!(s["max_record_bytes"], 32 << 10, "{s}");
    assert_eq!(s["bulk_send_bytes"], 64 << 10, "{s}");
    assert_eq!(s["notsent_lowat"], 64 << 10, "{s}");
    assert_eq!(s["sndbuf"], 1 << 20, "{s}");
    assert_eq!(s["adaptive_pacing"], Value::Null, "{s}");
    assert_eq!(s["push_ahead_bytes"], 0, "{s}");
    assert_eq!(s["rcvbuf"], 512 << 10, "{s}");
    assert!(v["baseline_gbytes_per_sec"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["precopy_vs_baseline_pct"].as_f64().unwrap() > 0.0, "{v}");
}
