#!/usr/bin/env bash
# Runs one migration between two "hosts" on this machine: two network namespaces joined by a
# veth pair (10.99.0.1 = source, 10.99.0.2 = destination), optionally rate-shaped with tbf.
# Everything it creates is removed on exit.
#
# Usage (as root):
#   scripts/two-hosts.sh [--rate 10gbit] [--mtu N] [--port 4444] [--bin PATH] [MIGRATE-CLI ARGS...]
#
# MIGRATE-CLI ARGS go to the side(s) whose `migrate-cli source --help` / `dest --help` lists
# them (e.g. --mode to the source, --think-us to the destination, --mem to both); a flag neither
# side knows is an error.
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

rest=()
while [[ $# -gt 0 ]]; do
  arg="$1"
  case "$arg" in
    --rate) rate="${2:?--rate needs a value, e.g. 10gbit}"; shift 2 ;;
    --rate=*) rate="${arg#*=}"; shift ;;
    --mtu) mtu="${2:?--mtu needs a value}"; shift 2 ;;
    --mtu=*) mtu="${arg#*=}"; shift ;;
    --port) port="${2:?--port needs a value}"; shift 2 ;;
    --port=*) port="${arg#*=}"; shift ;;
    --bin) bin="${2:?--bin needs a path}"; shift 2 ;;
    --bin=*) bin="${arg#*=}"; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) rest+=("$arg"); shift ;;
  esac
done

[[ $EUID -eq 0 ]] || die "run as root (network namespaces)"
command -v ip >/dev/null || die "the ip command (iproute2) is missing"
[[ -x "$bin" ]] || die "$bin not found; build it with: cargo build --release -p migrate-cli"
[[ -z "$rate" ]] || command -v tc >/dev/null || die "--rate needs the tc command"

# The long flags each side takes, from its --help: "--flag" -> "v" if it takes a value, "f" if not.
declare -A src_flags dest_flags
read_flags() {
  local -n into="$1"
  local f
  while read -r f; do
    if [[ "$f" == *= ]]; then into["${f%=}"]=v; else into["$f"]=f; fi
  done < <("$bin" "$2" --help | sed -nE 's/^ *(-[a-zA-Z], )?(--[a-z0-9-]+)( <[^>]+>)?.*/\2\3/p' | sed -E 's/ <.*/=/')
}
read_flags src_flags source
read_flags dest_flags dest

set -- "${rest[@]+"${rest[@]}"}"
while [[ $# -gt 0 ]]; do
  arg="$1"
  name="${arg%%=*}"
  case "$name" in
    --listen|--connect|--port-file) die "$name is set by this script" ;;
  esac
  kind="${src_flags[$name]-}${dest_flags[$name]-}"
  [[ -n "$kind" ]] || die "unknown flag $name (neither migrate-cli source nor dest takes it)"
  group=()
  if [[ "$arg" != *=* && "$kind" == *v* ]]; then
    [[ $# -ge 2 ]] || die "$name needs a value"
    group=("$arg" "$2"); shift 2
  else
    group=("$arg"); shift
  fi
  if [[ -n "${src_flags[$name]-}" && -n "${dest_flags[$name]-}" ]]; then
    both+=("${group[@]}")
  elif [[ -n "${src_flags[$name]-}" ]]; then
    src_only+=("${group[@]}")
  else
    dest_only+=("${group[@]}")
  fi
done

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
