//! The CLI's report: one JSON document per migration (or floor run), and its human rendering.

use std::fmt::Write as _;

use migrate_core::stats::{Bucket, CountersSnapshot, LatencySummary};
use migrate_core::{DestReport, SourceReport};
use serde::{Deserialize, Serialize};

/// Latency percentiles and log2 buckets, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub avg: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub count: u64,
    pub buckets: Vec<LatencyBucket>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyBucket {
    pub lo_us: u64,
    pub hi_us: u64,
    pub count: u64,
}

impl From<&LatencySummary> for Latency {
    fn from(s: &LatencySummary) -> Self {
        Self {
            avg: s.avg,
            p50: s.p50,
            p99: s.p99,
            p999: s.p999,
            max: s.max,
            count: s.count,
            buckets: s
                .buckets
                .iter()
                .map(|b| LatencyBucket {
                    lo_us: b.lo_us,
                    hi_us: b.hi_us,
                    count: b.count,
                })
                .collect(),
        }
    }
}

impl Latency {
    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count,
            avg: self.avg,
            p50: self.p50,
            p99: self.p99,
            p999: self.p999,
            max: self.max,
            buckets: self
                .buckets
                .iter()
                .map(|b| Bucket {
                    lo_us: b.lo_us,
                    hi_us: b.hi_us,
                    count: b.count,
                })
                .collect(),
        }
    }

    /// The histogram in the reference format (`Average: N (us)`, `@delay_us:`, rows).
    pub fn render(&self) -> String {
        self.summary().render()
    }
}

/// The physical floor measured by the emulator, for comparison.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FloorRef {
    pub avg: f64,
    pub p50: f64,
    pub p99: f64,
}

impl From<&Latency> for FloorRef {
    fn from(l: &Latency) -> Self {
        Self {
            avg: l.avg,
            p50: l.p50,
            p99: l.p99,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pages {
    pub bulk: u64,
    pub urgent: u64,
    pub zero: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bytes {
    pub bulk: u64,
    pub urgent: u64,
}

impl From<&CountersSnapshot> for Pages {
    fn from(c: &CountersSnapshot) -> Self {
        Self {
            bulk: c.pages_bulk,
            urgent: c.pages_urgent,
            zero: c.zero_pages,
        }
    }
}

impl From<&CountersSnapshot> for Bytes {
    fn from(c: &CountersSnapshot) -> Self {
        Self {
            bulk: c.bytes_bulk,
            urgent: c.bytes_urgent,
        }
    }
}

/// One report. `role` says who produced it: `source`, `dest`, `migration` (both sides merged by
/// the demo) or `floor`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub mode: Option<String>,
    pub role: String,
    /// The destination's verification: true/false, or null when not verified.
    pub verified: Option<bool>,
    /// Page-request latency, fault read → page placed (measured on the destination).
    pub latency_us: Option<Latency>,
    pub floor_us: Option<FloorRef>,
    pub pages: Pages,
    pub bytes: Bytes,
    pub requests: u64,
    pub total_ms: f64,
    pub downtime_ms: Option<f64>,
    /// Page bytes (both channels) over `total_ms`, in Gbit/s.
    pub throughput_gbps: f64,
    pub precopy_passes: Option<u64>,
    pub precopy_ms: Option<f64>,
    pub postcopy_ms: Option<f64>,
    /// Times postcopy survived a broken connection (each side counts its own; null in a floor
    /// report).
    #[serde(default)]
    pub recoveries: Option<u64>,
    /// Verification details (pages checked, written by the guest, mismatches).
    pub verify: Option<serde_json::Value>,
    /// What was run (memory size, page size, vCPUs, access pattern, ...).
    pub settings: serde_json::Value,
    /// The engine's full source report, when available.
    pub source: Option<serde_json::Value>,
    /// The engine's full destination report, when available.
    pub dest: Option<serde_json::Value>,
    /// CPU time (user + system) of the source process during the migration, in ms.
    #[serde(default)]
    pub source_cpu_ms: Option<f64>,
    /// CPU time (user + system) of the destination process during the migration (including
    /// its guest's vCPU threads), in ms.
    #[serde(default)]
    pub dest_cpu_ms: Option<f64>,
    /// The same-run `stream` baseline (GB/s), when measured.
    #[serde(default)]
    pub baseline_gbytes_per_sec: Option<f64>,
    /// Precopy bulk throughput (source precopy bytes / precopy time), GB/s.
    #[serde(default)]
    pub precopy_gbytes_per_sec: Option<f64>,
    /// `precopy_gbytes_per_sec` as a percentage of the baseline.
    #[serde(default)]
    pub precopy_vs_baseline_pct: Option<f64>,
}

pub fn gbps(bytes: u64, ms: f64) -> f64 {
    if ms <= 0.0 {
        0.0
    } else {
        bytes as f64 * 8.0 / (ms * 1e6)
    }
}

impl Report {
    pub fn from_source(r: &SourceReport, settings: serde_json::Value) -> Self {
        let c = &r.counters;
        let precopy_gbytes_per_sec = (r.precopy_passes > 0 && r.precopy_ms > 0.0)
            .then(|| r.precopy_bytes as f64 / (r.precopy_ms * 1e6));
        Self {
            mode: Some(r.mode.name().to_string()),
            role: "source".into(),
            verified: r.verified,
            pages: Pages::from(c),
            bytes: Bytes::from(c),
            requests: c.requests,
            total_ms: r.total_ms,
            downtime_ms: Some(r.downtime_ms),
            throughput_gbps: gbps(c.bytes_bulk + c.bytes_urgent, r.total_ms),
            precopy_passes: Some(r.precopy_passes as u64),
            precopy_ms: Some(r.precopy_ms),
            recoveries: Some(r.recoveries as u64),
            settings,
            source: serde_json::to_value(r).ok(),
            precopy_gbytes_per_sec,
            ..Default::default()
        }
    }

    pub fn from_dest(r: &DestReport, mode: Option<String>, settings: serde_json::Value) -> Self {
        let c = &r.counters;
        Self {
            mode,
            role: "dest".into(),
            verified: r.verify.as_ref().map(|v| v.ok()),
            latency_us: Some(Latency::from(&r.latency)),
            pages: Pages::from(c),
            bytes: Bytes::from(c),
            requests: c.requests,
            total_ms: r.total_ms,
            throughput_gbps: gbps(c.bytes_bulk + c.bytes_urgent, r.total_ms),
            precopy_passes: Some(c.precopy_passes),
            postcopy_ms: Some(r.postcopy_ms),
            recoveries: Some(r.recoveries as u64),
            verify: r.verify.as_ref().and_then(|v| serde_json::to_value(v).ok()),
            settings,
            dest: serde_json::to_value(r).ok(),
            ..Default::default()
        }
    }

    /// Both sides of one migration: latency, requests and verification from the destination
    /// (which measured them), pages, bytes, times and mode from the source (which sent them).
    pub fn merge(src: Report, dst: Report) -> Report {
        let verified = match (dst.verified, src.verified) {
            (Some(a), Some(b)) => Some(a && b),
            (a, b) => a.or(b),
        };
        Report {
            mode: src.mode.or(dst.mode),
            role: "migration".into(),
            verified,
            latency_us: dst.latency_us,
            floor_us: src.floor_us.or(dst.floor_us),
            pages: src.pages,
            bytes: src.bytes,
            requests: dst.requests,
            total_ms: src.total_ms,
            downtime_ms: src.downtime_ms,
            throughput_gbps: src.throughput_gbps,
            precopy_passes: src.precopy_passes,
            precopy_ms: src.precopy_ms,
            postcopy_ms: dst.postcopy_ms,
            recoveries: src.recoveries.or(dst.recoveries),
            verify: dst.verify,
            settings: merge_settings(src.settings, dst.settings),
            source: src.source,
            dest: dst.dest,
            source_cpu_ms: src.source_cpu_ms,
            dest_cpu_ms: dst.dest_cpu_ms,
            precopy_gbytes_per_sec: src.precopy_gbytes_per_sec,
            ..Default::default()
        }
    }

    /// Records the same-run bulk baseline and the precopy throughput against it.
    pub fn set_baseline(&mut self, gbytes_per_sec: f64) {
        self.baseline_gbytes_per_sec = Some(gbytes_per_sec);
        self.precopy_vs_baseline_pct = self
            .precopy_gbytes_per_sec
            .filter(|_| gbytes_per_sec > 0.0)
            .map(|p| p * 100.0 / gbytes_per_sec);
    }

    /// The human report.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = match self.mode.as_deref() {
            Some(mode) => writeln!(o, "== {mode} ({}) ==", self.role),
            None => writeln!(o, "== {} ==", self.role),
        };
        match &self.latency_us {
            Some(l) => {
                let _ = writeln!(o, "page-request latency (fault read -> page placed):");
                o.push_str(&l.render());
                let _ = writeln!(
                    o,
                    "p50 {:.1} us  p99 {:.1} us  p99.9 {:.1} us  max {:.1} us  count {}",
                    l.p50, l.p99, l.p999, l.max, l.count
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "page-request latency: measured on the destination (see its report)"
                );
            }
        }
        if let Some(f) = &self.floor_us {
            let _ = writeln!(
                o,
                "floor (emulated round trip + UFFDIO_COPY): avg {:.1} us  p50 {:.1} us  p99 {:.1} us",
                f.avg, f.p50, f.p99
            );
        }
        let _ = writeln!(
            o,
            "pages: bulk {} ({})  urgent {} ({})  zero {}",
            self.pages.bulk,
            human_bytes(self.bytes.bulk),
            self.pages.urgent,
            human_bytes(self.bytes.urgent),
            self.pages.zero
        );
        let _ = writeln!(o, "requests: {}", self.requests);
        if let (Some(p), Some(ms)) = (self.precopy_passes, self.precopy_ms) {
            let _ = writeln!(o, "precopy: {p} passes in {ms:.1} ms");
        }
        if let Some(ms) = self.postcopy_ms {
            let _ = writeln!(
                o,
                "postcopy (guest running here until complete): {ms:.1} ms"
            );
        }
        if let Some(n) = self.recoveries {
            let _ = writeln!(o, "recoveries (postcopy resumed after a broken link): {n}");
        }
        let downtime = self
            .downtime_ms
            .map_or("n/a".to_string(), |d| format!("{d:.2} ms"));
        let _ = writeln!(
            o,
            "total: {:.1} ms  downtime: {downtime}  throughput: {:.2} Gbit/s",
            self.total_ms, self.throughput_gbps
        );
        if let Some(p) = self.precopy_gbytes_per_sec {
            let vs = match (self.baseline_gbytes_per_sec, self.precopy_vs_baseline_pct) {
                (Some(b), Some(pct)) => format!(" = {pct:.0}% of the stream baseline {b:.2} GB/s"),
                _ => String::new(),
            };
            let _ = writeln!(o, "precopy throughput: {p:.2} GB/s{vs}");
        }
        if let Some(c) = self.source_cpu_ms {
            let pages = (self.pages.bulk + self.pages.urgent).max(1);
            let _ = writeln!(
                o,
                "source CPU: {c:.0} ms ({:.2} us per page sent)",
                c * 1e3 / pages as f64
            );
        }
        let _ = writeln!(o, "verification: {}", self.verification_text());
        o
    }

    fn verification_text(&self) -> String {
        let detail = self.verify.as_ref().map(|v| {
            format!(
                "{} pages checked, {} written by the guest, {} mismatches, {} missing digests",
                v["pages_checked"],
                v["pages_written_by_guest"],
                v["mismatches"],
                v["missing_digests"]
            )
        });
        match (self.verified, detail) {
            (Some(true), Some(d)) => format!("OK ({d})"),
            (Some(true), None) => "OK".into(),
            (Some(false), Some(d)) => format!("FAILED ({d})"),
            (Some(false), None) => "FAILED".into(),
            (None, _) if self.role == "floor" => "n/a".into(),
            (None, _) => "not verified".into(),
        }
    }
}

fn merge_settings(a: serde_json::Value, b: serde_json::Value) -> serde_json::Value {
    match (a, b) {
        (serde_json::Value::Object(mut a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                a.entry(k).or_insert(v);
            }
            serde_json::Value::Object(a)
        }
        (a, _) => a,
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (size, unit) in UNITS {
        if b >= size {
            return format!("{:.1} {unit}", b as f64 / size as f64);
        }
    }
    format!("{b} B")
}

/// The `--mode all` comparison: one row per report, ratios against `floor_avg`.
pub fn comparison_table(rows: &[Report], floor_avg: Option<f64>) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<20} {:>9} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "mode", "requests", "avg(us)", "p50(us)", "p99(us)", "p99.9(us)", "x floor", "verified"
    );
    for r in rows {
        let l = r.latency_us.clone().unwrap_or_default();
        let ratio = match floor_avg {
            Some(f) if f > 0.0 && l.count > 0 => format!("{:.2}", l.avg / f),
            _ => "-".into(),
        };
        let verified = match r.verified {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        let _ = writeln!(
            o,
            "{:<20} {:>9} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>9} {:>9}",
            r.mode.as_deref().unwrap_or("?"),
            r.requests,
            l.avg,
            l.p50,
            l.p99,
            l.p999,
            ratio,
            verified
        );
    }
    if let Some(b) = rows.iter().find_map(|r| r.baseline_gbytes_per_sec) {
        let _ = writeln!(o, "bulk baseline (stream, same run): {b:.2} GB/s");
        for r in rows.iter().filter(|r| r.role == "migration") {
            let _ = match (r.precopy_gbytes_per_sec, r.precopy_vs_baseline_pct) {
                (Some(p), Some(pct)) => writeln!(
                    o,
                    "  {:<18} precopy {p:.2} GB/s = {pct:.0}% of baseline",
                    r.mode.as_deref().unwrap_or("?")
                ),
                _ => writeln!(
                    o,
                    "  {:<18} precopy throughput n/a (pure postcopy; use --postcopy-after-passes 1+)",
                    r.mode.as_deref().unwrap_or("?")
                ),
            };
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use migrate_core::stats::LatencyHistogram;
    use std::time::Duration;

    fn sample() -> Report {
        let h = LatencyHistogram::new();
        for _ in 0..90 {
            h.record(Duration::from_micros(150));
        }
        for _ in 0..10 {
            h.record(Duration::from_micros(9000));
        }
        Report {
            mode: Some("preempt-full".into()),
            role: "migration".into(),
            verified: Some(true),
            latency_us: Some(Latency::from(&h.summary())),
            floor_us: Some(FloorRef {
                avg: 20.0,
                p50: 18.0,
                p99: 40.0,
            }),
            pages: Pages {
                bulk: 1000,
                urgent: 100,
                zero: 50,
            },
            bytes: Bytes {
                bulk: 1000 * 4096,
                urgent: 100 * 4096,
            },
            requests: 100,
            total_ms: 250.0,
            downtime_ms: Some(1.5),
            throughput_gbps: gbps(1100 * 4096, 250.0),
            precopy_passes: Some(1),
            precopy_ms: Some(100.0),
            postcopy_ms: Some(150.0),
            recoveries: Some(2),
            verify: Some(serde_json::json!({
                "pages_checked": 1150, "pages_written_by_guest": 7,
                "mismatches": 0, "missing_digests": 0, "first_mismatches": []
            })),
            settings: serde_json::json!({"mem": 1}),
            source: None,
            dest: None,
            source_cpu_ms: None,
            dest_cpu_ms: None,
            baseline_gbytes_per_sec: None,
            precopy_gbytes_per_sec: None,
            precopy_vs_baseline_pct: None,
        }
    }

    #[test]
    fn human_report_has_reference_histogram_and_figures() {
        let r = sample();
        let text = r.render();
        let hist = r.latency_us.as_ref().unwrap().render();
        assert!(text.contains(&hist), "{text}");
        assert!(hist.starts_with("Average: "), "{hist}");
        assert!(hist.contains("@delay_us:\n"), "{hist}");
        assert!(hist.contains("[128, 256)"), "{hist}");
        assert!(hist.contains("[8K, 16K)"), "{hist}");
        // The largest bucket gets the full 52-character bar.
        assert!(hist.contains(&format!("|{}|", "@".repeat(52))), "{hist}");
        assert!(text.contains("count 100"), "{text}");
        assert!(text.contains("urgent 100 (400.0 KiB)"), "{text}");
        assert!(text.contains("zero 50"), "{text}");
        assert!(text.contains("requests: 100"), "{text}");
        assert!(text.contains("downtime: 1.50 ms"), "{text}");
        assert!(
            text.contains("recoveries (postcopy resumed after a broken link): 2"),
            "{text}"
        );
        assert!(
            text.contains("verification: OK (1150 pages checked"),
            "{text}"
        );
        assert!(text.contains("floor (emulated"), "{text}");
    }

    #[test]
    fn failed_verification_is_loud() {
        let mut r = sample();
        r.verified = Some(false);
        assert!(r.render().contains("verification: FAILED"));
        r.verified = None;
        r.verify = None;
        assert!(r.render().contains("verification: not verified"));
    }

    #[test]
    fn json_round_trip_keeps_required_fields() {
        let r = sample();
        let v = serde_json::to_value(&r).unwrap();
        for k in [
            "mode",
            "verified",
            "latency_us",
            "floor_us",
            "pages",
            "bytes",
            "requests",
            "total_ms",
            "downtime_ms",
            "throughput_gbps",
            "recoveries",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        for k in ["avg", "p50", "p99", "p999", "max", "count", "buckets"] {
            assert!(v["latency_us"].get(k).is_some(), "missing latency_us.{k}");
        }
        let back: Report = serde_json::from_value(v).unwrap();
        assert_eq!(back.latency_us, r.latency_us);
        // 1100 pages of 4 KiB in 250 ms = 0.144 Gbit/s.
        assert!((back.throughput_gbps - 0.1441792).abs() < 1e-6);
    }

    #[test]
    fn merge_takes_latency_from_dest_and_pages_from_source() {
        let mut src = sample();
        src.role = "source".into();
        src.latency_us = None;
        src.requests = 7;
        src.verify = None;
        src.settings = serde_json::json!({"mode": "vanilla", "mem": 2});
        let mut dst = sample();
        dst.role = "dest".into();
        dst.mode = None;
        dst.pages.bulk = 1;
        dst.requests = 9;
        dst.verified = Some(false);
        dst.settings = serde_json::json!({"mem": 3, "touches": 5});
        dst.recoveries = None;
        let m = Report::merge(src, dst);
        assert_eq!(m.role, "migration");
        assert_eq!(m.mode.as_deref(), Some("preempt-full"));
        assert_eq!(m.pages.bulk, 1000);
        assert_eq!(m.requests, 9);
        assert_eq!(m.verified, Some(false));
        assert!(m.latency_us.is_some());
        assert_eq!(m.settings["mem"], 2);
        assert_eq!(m.settings["touches"], 5);
        assert_eq!(m.recoveries, Some(2), "recoveries come from the source");
    }

    #[test]
    fn comparison_table_ratios() {
        let r = sample();
        let t = comparison_table(&[r], Some(75.0));
        let line = t.lines().nth(1).unwrap();
        // avg = (90*150 + 10*9000)/100 ≈ 1035 us → ratio ≈ 13.8.
        assert!(line.starts_with("preempt-full"), "{t}");
        assert!(line.contains("13.8"), "{t}");
        assert!(line.trim_end().ends_with("yes"), "{t}");
        assert!(t.lines().next().unwrap().contains("x floor"));
    }
}
