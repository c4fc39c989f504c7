#!/usr/bin/env bash
# Runs bench/sp_scale.py with every rank in its own network namespace, as separate hosts would
# (issue 16, item 4): namespaces agns0..agns{P-1}, each with a veth whose peer is on a bridge in
# the root namespace, addresses 10.77.0.{r+1}/24, gloo between those addresses. Each rank counts
# the bytes its own veth sent. Needs root (ip netns). Cleans up on exit, also on SIGINT/SIGTERM.
#
#   scripts/sp-netns.sh PROCS SEQ_LEN [OUT.jsonl]
set -euo pipefail
cd "$(dirname "$0")/.."
P=${1:?usage: scripts/sp-netns.sh PROCS SEQ_LEN [OUT.jsonl]}
N=${2:?usage: scripts/sp-netns.sh PROCS SEQ_LEN [OUT.jsonl]}
OUT=${3:-}
PY=${PY:-$PWD/.venv/bin/python}
cleanup() {
  for r in $(seq 0 $((P - 1))); do ip netns del "agns$r" 2>/dev/null || true; ip link del "agv$r" 2>/dev/null || true; done
  ip link del agbr0 2>/dev/null || true
}
trap cleanup EXIT INT TERM
cleanup
ip link add agbr0 type bridge
ip link set agbr0 up
for r in $(seq 0 $((P - 1))); do
  ip netns add "agns$r"
  ip link add "agv$r" type veth peer name "agp$r"
  ip link set "agp$r" netns "agns$r"
  ip link set "agv$r" master agbr0 up
  ip netns exec "agns$r" ip addr add "10.77.0.$((r + 1))/24" dev "agp$r"
  ip netns exec "agns$r" ip link set "agp$r" up
  ip netns exec "agns$r" ip link set lo up
done
pids=()
for r in $(seq 0 $((P - 1))); do
  ip netns exec "agns$r" env GLOO_SOCKET_IFNAME="agp$r" "$PY" bench/sp_scale.py --procs "$P" --rank "$r" \
    --master 10.77.0.1:29511 --iface "agp$r" --seq-len "$N" ${OUT:+--out "$OUT"} &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
