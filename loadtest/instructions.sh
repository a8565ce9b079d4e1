#!/usr/bin/env bash
# Instructions per push of a bulk wake, counted by callgrind: a figure that
# does not move with what else the machine is doing, for comparing two
# builds of the sender on a noisy machine (loadtest/sender.sh measures CPU
# time, which does).
#
#   loadtest/instructions.sh [DEVICES]       (default 20000)
#
# One gateway (one shard, epoll: valgrind does not follow io_uring) runs
# under `valgrind --tool=callgrind` against the simulator, imports DEVICES,
# wakes them all once unmeasured, then counts the instructions of a
# second bulk wake of all of them, from its POST until a few seconds after
# it is done (the polls of its progress, its checkpoints and the idle
# gateway's timers included). Run it in two checkouts to compare them:
# the two figures differ only by what the builds do.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl >/dev/null; }
cargo build --release --quiet --bins
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN=$TARGET/release/wnsgate
LOAD=$TARGET/release/wnsgate-load
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wnsgate-instructions.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

echo "# wnsgate instructions per push: $N devices, $(git rev-parse --short HEAD 2>/dev/null || echo unknown), valgrind $(valgrind --version), $(date -u +%Y-%m-%dT%H:%MZ)"
"$LOAD" fleet --devices "$N" >"$WORK/fleet.ndjson"
"$BIN" sim --listen 127.0.0.1:0 --ca-out "$WORK/ca.pem" --no-channel-stats >"$WORK/sim.out" 2>"$WORK/sim.err" &
PIDS+=($!); disown "$!"
SIM_ADDR=""
for _ in $(seq 1 500); do
  SIM_ADDR=$(sed -n 's/^sim listening on \([^ ]*\).*/\1/p' "$WORK/sim.out" | head -1)
  [ -n "$SIM_ADDR" ] && break
  sleep 0.01
done
[ -n "$SIM_ADDR" ] || { cat "$WORK/sim.err"; exit 1; }
WNSGATE_WNS__TOKEN_URL="https://$SIM_ADDR/accesstoken.srf" WNSGATE_WNS__CONNECT_TO="$SIM_ADDR" \
WNSGATE_WNS__CA_FILE="$WORK/ca.pem" WNSGATE_LOG__LEVEL=warn WNSGATE_SERVER__IO=epoll \
WNSGATE_WNS__APPS='[{pfn = "Contoso.MDM_8wekyb3d8bbwe", package_sid = "ms-app://S-1-15-2-1", client_secret = "s"}]' \
  valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p" \
  "$BIN" serve --listen 127.0.0.1:0 --shards 1 --data "$WORK/data" >"$WORK/gw.out" 2>"$WORK/gw.err" &
GW=$!; PIDS+=("$GW"); disown "$GW"
GW_ADDR=""
for _ in $(seq 1 6000); do
  GW_ADDR=$(sed -n 's#^listening on http://##p' "$WORK/gw.out" | head -1)
  [ -n "$GW_ADDR" ] && break
  kill -0 "$GW" 2>/dev/null || { cat "$WORK/gw.err"; exit 1; }
  sleep 0.05
done
until curl -fsS "http://$GW_ADDR/readyz" >/dev/null 2>&1; do sleep 0.1; done
"$BIN" import "$WORK/fleet.ndjson" --url "http://$GW_ADDR" >/dev/null
wake() {
  local job
  job=$(curl -fsS -X POST -H 'content-type: application/json' -d '{"all": true}' "http://$GW_ADDR/v1/pushes" | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
  until curl -fsS "http://$GW_ADDR/v1/pushes/$job" | grep -q '"state":"done"'; do sleep 0.2; done
  curl -fsS "http://$GW_ADDR/v1/pushes/$job" | python3 -c 'import json,sys; print(json.load(sys.stdin)["received"])'
}
wake >/dev/null
sleep 1
callgrind_control -z "$GW" >/dev/null 2>&1
RECEIVED=$(wake)
sleep 3
callgrind_control -d "$GW" >/dev/null 2>&1
DUMP=$(ls "$WORK"/cg.*.1 2>/dev/null | head -1)
for _ in $(seq 1 100); do [ -n "$DUMP" ] && grep -q '^summary:' "$DUMP" && break; sleep 0.1; DUMP=$(ls "$WORK"/cg.*.1 2>/dev/null | head -1); done
INSTR=$(sed -n 's/^summary: //p' "$DUMP")
python3 -c "import sys; i, n, r = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]); print(f'bulk wake of {n} devices ({r} received): {i:,} instructions, {i/n:,.0f} per push')" "$INSTR" "$N" "$RECEIVED"
