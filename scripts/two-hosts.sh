#!/usr/bin/env bash
# Runs one migration between two "hosts" on this machine: two network namespaces joined by a
# veth pair (10.99.0.1 = source, 10.99.0.2 = destination), optionally rate-shaped with tbf.
# Everything it creates is removed on exit.
#
# Usage (as root):
#   scripts/two-hosts.sh [--rate 10gbit] [--mtu N] [--port 4444] [--bin PATH] [MIGRATE-CLI ARGS...]
#
# MIGRATE-CLI ARGS are routed by name:
#   destination only: --think-us --touches
#   destination only: --rcvbuf
#   source only:      --mode --dirty-rate --precopy-secs --postcopy-after-passes --no-verify
#                     --connect-timeout-secs --no-seq-assist --bulk-backlog --max-record
#                     --bulk-send --notsent-lowat --sndbuf --pacing-headroom --no-pacing
#                     --push-ahead
#   both:             everything else (--mem --page-size --vcpus --access --json --timeout-secs
#                     --urgent-cpus --bulk-cpus --no-realtime ...)
# Example:
#   scripts/two-hosts.sh --rate 10gbit --mem 1G --mode preempt-full --postcopy-after-passes 0
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="$here/../target/release/migrate-cli"
rate=""
mtu=""
port=4444
both=()
dest_only=()
src_only=()

# Flags of migrate-cli that take a value (so their value is routed with them).
takes_value() {
  case "$1" in
    --mem|--page-size|--vcpus|--access|--timeout-secs|--progress|--think-us|--touches|\
    --mode|--dirty-rate|--precopy-secs|--postcopy-after-passes|--connect-timeout-secs|\
    --bulk-backlog|--max-record|--bulk-send|--notsent-lowat|--sndbuf|--pacing-headroom|\
    --rcvbuf|--urgent-cpus|--bulk-cpus|--push-ahead) return 0 ;;
    *) return 1 ;;
  esac
}

while [[ $# -gt 0 ]]; do
  arg="$1"
  case "$arg" in
    --rate) rate="${2:?--rate needs a value, e.g. 10gbit}"; shift 2; continue ;;
    --rate=*) rate="${arg#*=}"; shift; continue ;;
    --mtu) mtu="${2:?--mtu needs a value}"; shift 2; continue ;;
    --mtu=*) mtu="${arg#*=}"; shift; continue ;;
    --port) port="${2:?--port needs a value}"; shift 2; continue ;;
    --port=*) port="${arg#*=}"; shift; continue ;;
    --bin) bin="${2:?--bin needs a path}"; shift 2; continue ;;
    --bin=*) bin="${arg#*=}"; shift; continue ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
  esac
  name="${arg%%=*}"
  group=()
  if [[ "$arg" != *=* ]] && takes_value "$name"; then
    [[ $# -ge 2 ]] || die "$name needs a value"
    group=("$arg" "$2"); shift 2
  else
    group=("$arg"); shift
  fi
  case "$name" in
    --think-us|--touches|--rcvbuf) dest_only+=("${group[@]}") ;;
    --mode|--dirty-rate|--precopy-secs|--postcopy-after-passes|--no-verify|--connect-timeout-secs|\
    --no-seq-assist|--bulk-backlog|--max-record|--bulk-send|--notsent-lowat|--sndbuf|\
    --pacing-headroom|--no-pacing|--push-ahead)
      src_only+=("${group[@]}") ;;
    --listen|--connect|--port-file) die "$name is set by this script" ;;
    *) both+=("${group[@]}") ;;
  esac
done

[[ $EUID -eq 0 ]] || die "run as root (network namespaces)"
command -v ip >/dev/null || die "the ip command (iproute2) is missing"
[[ -x "$bin" ]] || die "$bin not found; build it with: cargo build --release -p migrate-cli"
[[ -z "$rate" ]] || command -v tc >/dev/null || die "--rate needs the tc command"

ns_src="mig-src-$$"
ns_dst="mig-dst-$$"
veth_src="vmsrc$$"
veth_dst="vmdst$$"
src_ip=10.99.0.1
dst_ip=10.99.0.2
tmp="$(mktemp -d /tmp/two-hosts.XXXXXX)"
dest_pid=""
src_pid=""

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local pid
  for pid in "$src_pid" "$dest_pid"; do
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  # Deleting a namespace deletes the veth end in it (and so the pair) and its qdiscs.
  ip netns del "$ns_src" 2>/dev/null || true
  ip netns del "$ns_dst" 2>/dev/null || true
  ip link del "$veth_src" 2>/dev/null || true
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip netns add "$ns_src"
ip netns add "$ns_dst"
ip link add "$veth_src" type veth peer name "$veth_dst"
ip link set "$veth_src" netns "$ns_src"
ip link set "$veth_dst" netns "$ns_dst"
ip -n "$ns_src" addr add "$src_ip/24" dev "$veth_src"
ip -n "$ns_dst" addr add "$dst_ip/24" dev "$veth_dst"
if [[ -n "$mtu" ]]; then
  ip -n "$ns_src" link set "$veth_src" mtu "$mtu"
  ip -n "$ns_dst" link set "$veth_dst" mtu "$mtu"
fi
for ns in "$ns_src" "$ns_dst"; do ip -n "$ns" link set lo up; done
ip -n "$ns_src" link set "$veth_src" up
ip -n "$ns_dst" link set "$veth_dst" up
if [[ -n "$rate" ]]; then
  tc -n "$ns_src" qdisc add dev "$veth_src" root tbf rate "$rate" burst 256kb latency 1ms
  tc -n "$ns_dst" qdisc add dev "$veth_dst" root tbf rate "$rate" burst 256kb latency 1ms
fi
echo "two-hosts: $ns_src ($src_ip, $veth_src) <-> $ns_dst ($dst_ip, $veth_dst)${rate:+, tbf rate $rate}${mtu:+, mtu $mtu}" >&2

ip netns exec "$ns_dst" "$bin" dest --listen "$dst_ip:$port" --port-file "$tmp/port" \
  "${both[@]}" "${dest_only[@]}" >"$tmp/dest.out" &
dest_pid=$!

for _ in $(seq 1 3000); do
  [[ -s "$tmp/port" ]] && break
  kill -0 "$dest_pid" 2>/dev/null || { wait "$dest_pid" || true; die "the destination exited before listening"; }
  sleep 0.01
done
[[ -s "$tmp/port" ]] || die "the destination did not start listening"

# In the background, so a signal to this script is handled at once (bash runs traps only
# between commands, and `wait` is interruptible).
ip netns exec "$ns_src" "$bin" source --connect "$(cat "$tmp/port")" \
  "${both[@]}" "${src_only[@]}" >"$tmp/source.out" &
src_pid=$!
src_rc=0
wait "$src_pid" || src_rc=$?
src_pid=""
if [[ $src_rc -ne 0 ]]; then
  # The destination cannot finish without its source.
  kill "$dest_pid" 2>/dev/null || true
fi
dest_rc=0
wait "$dest_pid" || dest_rc=$?
dest_pid=""

echo "=== source ($ns_src, exit $src_rc) ==="
cat "$tmp/source.out"
echo "=== destination ($ns_dst, exit $dest_rc) ==="
cat "$tmp/dest.out"
[[ $src_rc -eq 0 && $dest_rc -eq 0 ]] || exit 1
