#!/usr/bin/env bash
# Runs the measurements of docs/BENCHMARKS.md end to end and prints their tables (markdown).
#
# Usage (as root, after `cargo build --release -p migrate-cli`):
#   scripts/bench.sh [SECTION...]
#     sections: loopback loopback_colocated shaped shaped_light shaped_rcvbuf bulk huge seq scale
#     (huge: hugetlb private and --shared, THP, and 4 KiB --shared)
#     (default: all, in that order)
# Environment:
#   RUNS=3             runs per figure (medians are reported)
#   OUT=/tmp/bench-... where the JSON of every run is kept
#   SCALE_SIZES="1G 4G 8G"
#   HUGEPAGES=1100     2 MiB hugetlb pages reserved for the `huge` section (restored on exit)
# Network: loopback, or the namespaces + veth made by scripts/two-hosts.sh. Nothing else.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="$here/../target/release/migrate-cli"
two="$here/two-hosts.sh"
RUNS="${RUNS:-3}"
OUT="${OUT:-/tmp/bench-$(date +%Y%m%d-%H%M%S)}"
SCALE_SIZES="${SCALE_SIZES:-1G 4G 8G}"
HUGEPAGES="${HUGEPAGES:-1100}"
mkdir -p "$OUT"
[[ -x "$bin" ]] || { echo "build first: cargo build --release -p migrate-cli" >&2; exit 1; }

# Restore the hugetlb reservation whatever happens.
orig_hp="$(cat /proc/sys/vm/nr_hugepages)"
restore() { echo "$orig_hp" > /proc/sys/vm/nr_hugepages 2>/dev/null || true; }
trap restore EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { echo "+ $*" >&2; }

# demo NAME ARGS...: one loopback demo run, its JSON kept as $OUT/NAME.json.
demo() {
  local name="$1"; shift
  log "migrate-cli demo $* --json"
  "$bin" demo "$@" --json > "$OUT/$name.json"
}

# shaped NAME ARGS...: one run through scripts/two-hosts.sh; source and dest JSON kept.
shaped() {
  local name="$1"; shift
  log "two-hosts.sh $* --json"
  "$two" "$@" --json --progress never > "$OUT/$name.raw"
  python3 - "$OUT/$name.raw" "$OUT/$name" <<'EOF'
import sys
raw = open(sys.argv[1]).read()
src = raw.split("=== source")[1].split("\n", 1)[1].split("=== destination")[0]
dst = raw.split("=== destination")[1].split("\n", 1)[1]
open(sys.argv[2] + ".src.json", "w").write(src)
open(sys.argv[2] + ".dst.json", "w").write(dst)
EOF
}

stream() {
  local name="$1"
  log "migrate-cli stream --secs 2 --json"
  "$bin" stream --secs 2 --json > "$OUT/$name.json"
}

# The table printer: python over the JSON files.
table() { python3 "$OUT/summarize.py" "$@"; }
cat > "$OUT/summarize.py" <<'EOF'
import json, sys, glob, statistics as st
kind = sys.argv[1]
def load(p):
    return json.load(open(p))
def med(xs):
    xs = [x for x in xs if x is not None]
    return st.median(xs) if xs else float("nan")
def lat(r): return r.get("latency_us") or {}
def cpu_per_page(src_ms, pages): return None if src_ms is None or not pages else src_ms * 1e3 / pages
O = sys.argv[2]
def grouped(prefix):
    """Runs named O/<prefix><name>-<run>.json, grouped by name (in name order)."""
    groups = {}
    for p in sorted(glob.glob(O + "/" + prefix + "*.json")):
        groups.setdefault(p.split("/" + prefix)[1].rsplit("-", 1)[0], []).append(load(p))
    return groups
if kind == "loopback":
    rows = {}
    base = []
    prefix = sys.argv[3] if len(sys.argv) > 3 else "loopback-default-"
    for p in sorted(glob.glob(O + "/" + prefix + "*.json")):
        runs = load(p)
        for r in runs:
            rows.setdefault(r["mode"], []).append(r)
        base += [r["baseline_gbytes_per_sec"] for r in runs if r.get("baseline_gbytes_per_sec")][:1]
    floor = med([lat(r)["avg"] for r in rows["floor"]])
    print(f"| mode | runs | requests | avg µs | p50 µs | p99 µs | p99.9 µs | avg × floor | bulk GB/s | verified |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m, rs in rows.items():
        a = med([lat(r)["avg"] for r in rs])
        gbs = med([r["bytes"]["bulk"] / (r["total_ms"] * 1e6) for r in rs]) if m not in ("floor",) else float("nan")
        print(f"| {m} | {len(rs)} | {med([r['requests'] for r in rs]):.0f} | {a:.1f} | {med([lat(r)['p50'] for r in rs]):.1f} | {med([lat(r)['p99'] for r in rs]):.1f} | {med([lat(r)['p999'] for r in rs]):.1f} | {a/floor:.2f} | {gbs:.2f} | {','.join(str(r['verified']) for r in rs)} |")
    print(f"\nsame-run stream baseline: {', '.join(f'{b:.2f}' for b in base)} GB/s")
elif kind == "shaped":
    print("| setting | runs | requests | avg µs | p50 µs | p99 µs | p99.9 µs | bulk GB/s (postcopy) | % of 1.25 GB/s | verified |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    groups = {}
    for p in sorted(glob.glob(O + "/shaped-*.src.json")):
        name = p.split("/shaped-")[1].rsplit("-", 1)[0]
        groups.setdefault(name, []).append((load(p), load(p.replace(".src.", ".dst."))))
    for name, rs in groups.items():
        g = med([s["bytes"]["bulk"] / (s["total_ms"] * 1e6) for s, d in rs])
        print(f"| {name} | {len(rs)} | {med([d['requests'] for s,d in rs]):.0f} | {med([lat(d)['avg'] for s,d in rs]):.1f} | {med([lat(d)['p50'] for s,d in rs]):.1f} | {med([lat(d)['p99'] for s,d in rs]):.1f} | {med([lat(d)['p999'] for s,d in rs]):.1f} | {g:.2f} | {g/1.25*100:.0f}% | {','.join(str(d['verified']) for s,d in rs)} |")
elif kind == "bulk":
    print("| where | run | precopy GB/s | stream baseline GB/s | % of baseline | source CPU µs/page | verified |")
    print("|---|---|---|---|---|---|---|")
    for p in sorted(glob.glob(O + "/bulk-loop-*.json")):
        r = load(p)
        pages = r["pages"]["bulk"] + r["pages"]["urgent"]
        c = cpu_per_page(r.get("source_cpu_ms"), pages)
        print(f"| loopback | {p.rsplit('-',1)[1][:-5]} | {r['precopy_gbytes_per_sec']:.2f} | {r['baseline_gbytes_per_sec']:.2f} | {r['precopy_vs_baseline_pct']:.0f}% | {c:.2f} | {r['verified']} |")
    for p in sorted(glob.glob(O + "/bulk-shaped-*.src.json")):
        s = load(p); d = load(p.replace(".src.", ".dst."))
        pages = s["pages"]["bulk"] + s["pages"]["urgent"]
        c = cpu_per_page(s.get("source_cpu_ms"), pages)
        g = s["source"]["precopy_bytes"] / (s["source"]["precopy_ms"] * 1e6)
        print(f"| tbf 10gbit | {p.rsplit('-',1)[1].split('.')[0]} | {g:.2f} | - | - | {c:.2f} | {d['verified']} |")
    for p in sorted(glob.glob(O + "/bulk-stream-*.json")):
        r = load(p)
        print(f"| stream alone | {p.rsplit('-',1)[1][:-5]} | - | {r['gbytes_per_sec']:.2f} | - | {r['sender_cpu_us_per_page']:.2f} | - |")
    for p in sorted(glob.glob(O + "/bulk-fresh-*.json")):
        r = load(p)
        print(f"| stream --fresh 1G (into fresh memory) | {p.rsplit('-',1)[1][:-5]} | - | {r['gbytes_per_sec']:.2f} | - | {r['sender_cpu_us_per_page']:.2f} | - |")
elif kind == "huge":
    print("| what | run | requests | avg µs | p50 µs | p99 µs | dest anon_huge before → after | verified |")
    print("|---|---|---|---|---|---|---|---|")
    for p in sorted(glob.glob(O + "/huge-*.json")):
        rs = load(p)
        rs = rs if isinstance(rs, list) else [rs]
        for r in rs:
            l = lat(r)
            hb = (r.get("dest") or {}).get("anon_huge_bytes")
            hs = f"{hb[0]} → {hb[1]}" if hb else "-"
            print(f"| {p.split('/huge-')[1][:-5]}:{r['mode']} | | {r['requests']} | {l.get('avg',0):.1f} | {l.get('p50',0):.1f} | {l.get('p99',0):.1f} | {hs} | {r['verified']} |")
elif kind == "seq":
    print("| access | runs | requests | avg µs | p50 µs | p99 µs | vCPU wait ms (requests × avg) | verified |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rs in grouped("seq-").items():
        req = med([r["requests"] for r in rs]); a = med([lat(r)["avg"] for r in rs])
        w = med([r["requests"] * lat(r)["avg"] / 1e3 for r in rs])
        print(f"| {name} | {len(rs)} | {req:.0f} | {a:.1f} | {med([lat(r)['p50'] for r in rs]):.1f} | {med([lat(r)['p99'] for r in rs]):.1f} | {w:.1f} | {','.join(str(r['verified']) for r in rs)} |")
elif kind == "scale":
    print("| mem | runs | requests | avg µs | p50 µs | p99 µs | bulk GB/s | total ms | source CPU µs/page | verified |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, rs in grouped("scale-").items():
        g = med([r["bytes"]["bulk"] / (r["total_ms"] * 1e6) for r in rs])
        c = med([cpu_per_page(r.get("source_cpu_ms"), r["pages"]["bulk"] + r["pages"]["urgent"]) for r in rs])
        print(f"| {name} | {len(rs)} | {med([r['requests'] for r in rs]):.0f} | {med([lat(r)['avg'] for r in rs]):.1f} | {med([lat(r)['p50'] for r in rs]):.1f} | {med([lat(r)['p99'] for r in rs]):.1f} | {g:.2f} | {med([r['total_ms'] for r in rs]):.0f} | {c:.2f} | {','.join(str(r['verified']) for r in rs)} |")
EOF

sec_loopback() {
  for i in $(seq 1 "$RUNS"); do demo "loopback-default-$i" --mode all; done
  table loopback "$OUT" loopback-default-
}

# The same with every urgent-path thread of both processes on one CPU (the last one): on one
# machine the three hops of a request then wake each other locally instead of by IPI.
sec_loopback_colocated() {
  # The last CPU this process may use (not nproc - 1: under a cpuset the CPUs need not be 0..n-1).
  local last
  last="$(awk '/^Cpus_allowed_list:/ { n = split($2, r, /[,-]/); print r[n] }' /proc/self/status)"
  for i in $(seq 1 "$RUNS"); do demo "loopback-colo-$i" --mode all --urgent-cpus "$last"; done
  table loopback "$OUT" loopback-colo-
}

sec_shaped() {
  local i
  for i in $(seq 1 "$RUNS"); do shaped "shaped-default-$i" --rate 10gbit --mode preempt-full --postcopy-after-passes 0; done
  for m in vanilla preempt; do shaped "shaped-$m-1" --rate 10gbit --mode "$m" --postcopy-after-passes 0; done
  local -a names=(no-pacing headroom-0.8 headroom-0.9 lowat-32K lowat-128K backlog-1M backlog-128K)
  local -a flags=("--no-pacing" "--pacing-headroom 0.8" "--pacing-headroom 0.9" "--notsent-lowat 32K"
                  "--notsent-lowat 128K" "--bulk-backlog 1M" "--bulk-backlog 128K")
  for k in "${!names[@]}"; do
    for i in $(seq 1 "${TRADEOFF_RUNS:-2}"); do
      # shellcheck disable=SC2086
      shaped "shaped-${names[$k]}-$i" --rate 10gbit --mode preempt-full --postcopy-after-passes 0 ${flags[$k]}
    done
  done
  table shaped "$OUT"
}

# A lighter destination guest (1 vCPU, 100 µs think time) leaves CPU for the bulk stream, to
# see the shaped link closer to saturation.
sec_shaped_light() {
  local i
  for i in $(seq 1 "${TRADEOFF_RUNS:-2}"); do
    shaped "shaped-light-default-$i" --rate 10gbit --mode preempt-full --postcopy-after-passes 0 \
      --vcpus 1 --think-us 100
    shaped "shaped-light-no-pacing-$i" --rate 10gbit --mode preempt-full --postcopy-after-passes 0 \
      --vcpus 1 --think-us 100 --no-pacing
  done
  table shaped "$OUT"
}

# The destination's receive buffer bounds the bulk window (default 256 KiB).
sec_shaped_rcvbuf() {
  local i
  for i in $(seq 1 "${TRADEOFF_RUNS:-2}"); do
    shaped "shaped-rcvbuf-1M-$i" --rate 10gbit --mode preempt-full --postcopy-after-passes 0 --rcvbuf 1M
    shaped "shaped-rcvbuf-4M-$i" --rate 10gbit --mode preempt-full --postcopy-after-passes 0 --rcvbuf 4M
    shaped "shaped-rcvbuf-4M-no-pacing-$i" --rate 10gbit --mode preempt-full --postcopy-after-passes 0 \
      --rcvbuf 4M --no-pacing
  done
  table shaped "$OUT"
}

sec_bulk() {
  for i in $(seq 1 "$RUNS"); do
    stream "bulk-stream-$i"
    log "migrate-cli stream --fresh 1G --json"
    "$bin" stream --fresh 1G --json > "$OUT/bulk-fresh-$i.json"
    demo "bulk-loop-$i" --mode preempt-full --postcopy-after-passes 2 --dirty-rate 0 --baseline --baseline-secs 2
    shaped "bulk-shaped-$i" --rate 10gbit --mode preempt-full --postcopy-after-passes 2 --dirty-rate 0
  done
  table bulk "$OUT"
}

sec_huge() {
  # hugetlb: two 1 GiB guests (source + destination) need 1024 pages + slack.
  echo "$HUGEPAGES" > /proc/sys/vm/nr_hugepages
  log "nr_hugepages=$(cat /proc/sys/vm/nr_hugepages) (was $orig_hp)"
  log "migrate-cli floor --page-size 2m --json"
  "$bin" floor --page-size 2m --json > "$OUT/huge-floor2m.json"
  log "migrate-cli floor --page-size 2m --bulk separate --json"
  "$bin" floor --page-size 2m --bulk separate --json > "$OUT/huge-floor2m-bulk.json"
  for i in $(seq 1 "$RUNS"); do
    demo "huge-2m-$i" --mode preempt-full --page-size 2m
    # hugetlbfs memfd guest RAM: requested pages go straight into the file (UFFDIO_CONTINUE).
    demo "huge-2m-shared-$i" --mode preempt-full --page-size 2m --shared
  done
  restore
  for i in $(seq 1 "$RUNS"); do demo "huge-thp-$i" --mode preempt-full --page-size thp; done
  for i in $(seq 1 "$RUNS"); do demo "huge-4k-shared-$i" --mode preempt-full --shared; done
  table huge "$OUT"
}

sec_seq() {
  for i in $(seq 1 "$RUNS"); do
    demo "seq-sequential-$i" --mode preempt-full --access sequential
    demo "seq-sequential-noassist-$i" --mode preempt-full --access sequential --no-seq-assist
    demo "seq-random-$i" --mode preempt-full --access random
  done
  table seq "$OUT"
}

sec_scale() {
  for m in $SCALE_SIZES; do
    local n="$RUNS"
    [[ "$m" == 8G ]] && n=1
    for i in $(seq 1 "$n"); do demo "scale-$m-$i" --mode preempt-full --mem "$m" --timeout-secs 120; done
  done
  table scale "$OUT"
}

sections=("$@")
[[ ${#sections[@]} -gt 0 ]] || sections=(loopback loopback_colocated shaped shaped_light shaped_rcvbuf bulk huge seq scale)
for s in "${sections[@]}"; do
  declare -F "sec_$s" >/dev/null || { echo "unknown section: $s" >&2; exit 2; }
done
echo "results in $OUT ($(date -u +%F), $(nproc) CPUs, $(uname -r))" >&2
for s in "${sections[@]}"; do
  echo "## $s"
  "sec_$s"
  echo
done
