#!/usr/bin/env bash
# Registry, store and restart figures (docs/performance.md, P3, P4, P5) on this
# machine, each with its reference measured in the same run.
#
#   loadtest/registry.sh [DEVICES] [PUT_RATE] [PUT_SECONDS]
#
# Starts a local gateway on a fresh data directory, imports a synthetic fleet
# of DEVICES (default 1,000,000: 36-character ids, ~190-byte channel URIs)
# through POST /v1/devices:import, then reports:
#   P3  RSS per device (whole process, and above the empty process)
#       reference: the raw bytes of id + channel URI per device
#   P4  durable import rate (every batch fsync'd before it is acknowledged)
#       and single-PUT latency at PUT_RATE req/s (default 10000) for
#       PUT_SECONDS (default 60); reference: a bare fsync on the same disk,
#       and GET /healthz at the same rate with the same tool;
#       then twice that rate for SHED_SECONDS (default 20): what is accepted and how fast, what
#       is refused (503 store_overloaded) and how fast
#   snapshot: POST /v1/store:snapshot while PUTs go on at PUT_RATE for
#       CUT_SECONDS (default 30): the cut's
#       time and size, and PUT latency during it
#   P5  restart until /readyz answers 200, and the RSS 3 s after it (P3
#       again: what the same registry costs when loaded from the store);
#       reference: reading the data directory's bytes once (cold page cache
#       is not forced; both read the same warm files)
#       and, afterwards, touching as much fresh memory as the gateway held
#       once (what the machine takes to hand a new process its pages)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
PUT_RATE=${2:-10000}
PUT_SECONDS=${3:-60}
# Length of the above-capacity phase and of the phase around a snapshot cut.
SHED_SECONDS=${SHED_SECONDS:-20}
CUT_SECONDS=${CUT_SECONDS:-30}

cargo build --release --quiet --bins
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN=$TARGET/release/wnsgate
LOAD=$TARGET/release/wnsgate-load
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wnsgate-load.XXXXXX")
PID=""
cleanup() {
  [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Registrations must name a configured WNS app; no wake is sent here, so
# the secret is never used.
export WNSGATE_WNS__APPS='[{pfn = "Contoso.MDM_8wekyb3d8bbwe", package_sid = "ms-app://S-1-15-2-1", client_secret = "unused"}]'

start_server() {
  "$BIN" serve --listen 127.0.0.1:0 --data "$WORK/data" >"$WORK/out" 2>"$WORK/err" &
  PID=$!
  for _ in $(seq 1 6000); do
    ADDR=$(sed -n 's#^listening on http://##p' "$WORK/out" | head -1)
    [ -n "$ADDR" ] && break
    kill -0 "$PID" 2>/dev/null || { cat "$WORK/err"; exit 1; }
    sleep 0.01
  done
}
wait_ready() {
  until curl -fsS "http://$ADDR/readyz" >/dev/null 2>&1; do sleep 0.01; done
}
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Waits (at most 120 s) until the gateway uses under 5% of a core for a
# second: background compaction after a bulk import would otherwise land in
# the latency figures of the next phase.
wait_idle() {
  local hz; hz=$(getconf CLK_TCK)
  for _ in $(seq 1 120); do
    local a; a=$(cpu_ticks "$1"); sleep 1
    local b; b=$(cpu_ticks "$1")
    [ $(( (b - a) * 100 )) -lt $(( hz * 5 )) ] && return 0
  done
  echo "note: the gateway was still busy after 120 s"
}

echo "# wnsgate registry load test: $N devices, $(nproc) cores, kernel $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ)"
"$LOAD" fleet --devices "$N" >"$WORK/fleet.ndjson"
RAW=$(head -1000 "$WORK/fleet.ndjson" | python3 -c '
import sys, json
n = t = 0
for l in sys.stdin:
    d = json.loads(l); n += 1; t += len(d["device_id"]) + len(d["channel_uri"])
print(t // n)')

start_server
wait_ready
EMPTY_KB=$(rss_kb "$PID")
IMPORT_OUT=$("$BIN" import "$WORK/fleet.ndjson" --url "http://$ADDR")
echo "import: $IMPORT_OUT"
sleep 1
FULL_KB=$(rss_kb "$PID")
python3 - "$N" "$EMPTY_KB" "$FULL_KB" "$RAW" <<'PY'
import sys
n, empty, full, raw = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(f"P3 memory: RSS {full/1024:.0f} MiB with {n} devices, {empty/1024:.0f} MiB empty")
print(f"P3 memory: {full*1024/n:.0f} B/device whole process, {(full-empty)*1024/n:.0f} B/device above the empty process "
      f"(reference: {raw} B/device of raw id + channel URI; target <= 220)")
PY
RATE=$(echo "$IMPORT_OUT" | sed -n 's/.*(\([0-9]*\) devices\/s).*/\1/p')
FSYNC_US=$(python3 - "$WORK" <<'PY'
import os, sys, time
p = os.path.join(sys.argv[1], "fsync.probe")
fd = os.open(p, os.O_WRONLY | os.O_CREAT)
ts = []
for i in range(200):
    os.write(fd, b"x" * 4096)
    t = time.perf_counter(); os.fsync(fd); ts.append(time.perf_counter() - t)
ts.sort()
print(f"{ts[len(ts)//2]*1e6:.0f}")
PY
)
echo "P4 import: $RATE devices/s durable (target >= 200000; reference: one bare 4 KiB write+fsync takes ${FSYNC_US} us here)"
wait_idle "$PID"
GET_OUT=$("$LOAD" get --url "http://$ADDR" --path /healthz --rate "$PUT_RATE" --duration "$PUT_SECONDS" --connections 64)
PUT_OUT=$("$LOAD" put --url "http://$ADDR" --rate "$PUT_RATE" --duration "$PUT_SECONDS" --connections 64 --devices "$N")
echo "P4 single PUT at $PUT_RATE/s: $PUT_OUT (target p99 <= 5 ms)"
echo "P4 reference, GET /healthz at $PUT_RATE/s with the same tool: $GET_OUT"
SHED_RATE=$((PUT_RATE * 2))
SHED_OUT=$("$LOAD" put --url "http://$ADDR" --rate "$SHED_RATE" --duration "$SHED_SECONDS" --connections 128 --devices "$N")
echo "P4 PUT at $SHED_RATE/s for $SHED_SECONDS s (above capacity: the accepted keep p99 <= 20 ms, the rest are refused at once): $SHED_OUT"
wait_idle "$PID"

# A snapshot cut while PUTs go on.
"$LOAD" put --url "http://$ADDR" --rate "$PUT_RATE" --duration "$CUT_SECONDS" --connections 64 --devices "$N" >"$WORK/put-during-cut" &
LOADER=$!
sleep $((CUT_SECONDS / 10 + 1))
CUT_OUT=$(curl -fsS -X POST "http://$ADDR/v1/store:snapshot")
wait "$LOADER"
echo "snapshot: $CUT_OUT (cut while PUTs went on at $PUT_RATE/s)"
echo "snapshot: PUT during the $CUT_SECONDS s around the cut: $(tr '\n' ' ' <"$WORK/put-during-cut")"

kill -TERM "$PID"; wait "$PID" || true; PID=""
DATA_BYTES=$(du -sb "$WORK/data" | cut -f1)
T0=$(date +%s.%N)
find "$WORK/data" -type f -exec cat {} + >/dev/null
T1=$(date +%s.%N)
start_server
wait_ready
T2=$(date +%s.%N)
python3 - "$T0" "$T1" "$T2" "$DATA_BYTES" "$N" <<'PY'
import sys
t0, t1, t2, size, n = map(float, sys.argv[1:])
print(f"P5 restart: ready in {t2-t1:.2f} s with {int(n)} devices (target <= 5 s at 10M; "
      f"reference: reading the {size/2**20:.0f} MiB data directory once took {t1-t0:.2f} s)")
PY
echo "P5 detail: $(grep -m1 -o 'ready.*' "$WORK/err" | cut -c1-240)"
sleep 3
RESTART_KB=$(rss_kb "$PID")
python3 - "$N" "$EMPTY_KB" "$FULL_KB" "$RESTART_KB" <<'PY'
import sys
n, empty, full, again = map(int, sys.argv[1:])
print(f"P3 after the restart: RSS {again/1024:.0f} MiB, {(again-empty)*1024/n:.0f} B/device above the empty process "
      f"(after the import: {(full-empty)*1024/n:.0f} B/device)")
PY
kill -TERM "$PID"; wait "$PID" || true; PID=""
# A second P5 reference: what this machine takes to hand a new process as
# much fresh memory as the gateway held after the import, touched once.
python3 - "$FULL_KB" <<'PY'
import sys, time
kb = int(sys.argv[1])
t = time.monotonic()
b = bytearray(kb * 1024)
b[::4096] = b"\x01" * len(range(0, len(b), 4096))
print(f"P5 reference: touching {kb/1024:.0f} MiB of fresh memory once (the gateway's RSS after the import) took {time.monotonic()-t:.2f} s")
PY
