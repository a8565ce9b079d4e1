#!/usr/bin/env bash
# Group-commit syncs and the CPU the machine loses to its host during PUTs,
# with the log's syncs spaced (store.min_sync_interval_us = 1000, the
# default) and not spaced (0), one after the other on fresh data
# directories.
#
# Usage: loadtest/syncs.sh [DEVICES] [RATE] [SECONDS]
#   (defaults 100000 devices cycled, 10000 PUTs/s, 30 s per setting)
#
# For each setting: syncs a second (wnsgate_store_batches_total), mutations
# per sync, PUT latency, and the share of the machine's CPU time that was
# steal (/proc/stat: time the virtual machine was ready to run but its host
# ran something else; 0 on bare metal).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
RATE=${2:-10000}
SECONDS_EACH=${3:-30}

command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl >/dev/null; }
cargo build --release --quiet --bins
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN=$TARGET/release/wnsgate
LOAD=$TARGET/release/wnsgate-load
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wnsgate-syncs.XXXXXX")
PID=""
cleanup() {
  [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

metric() { curl -fsS "http://$ADDR/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
cpu_line() { head -1 /proc/stat; }

echo "# wnsgate sync spacing: $N devices, $RATE PUTs/s for $SECONDS_EACH s per setting, $(nproc) cores, kernel $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ)"
# Registrations must name a configured WNS app; no wake is sent here, so
# the secret is never used.
export WNSGATE_WNS__APPS='[{pfn = "Contoso.MDM_8wekyb3d8bbwe", package_sid = "ms-app://S-1-15-2-1", client_secret = "unused"}]'
for interval in 1000 0; do
  rm -rf "$WORK/data"
  WNSGATE_STORE__MIN_SYNC_INTERVAL_US=$interval \
    "$BIN" serve --listen 127.0.0.1:0 --data "$WORK/data" >"$WORK/out" 2>"$WORK/err" &
  PID=$!
  ADDR=""
  for _ in $(seq 1 6000); do
    ADDR=$(sed -n 's#^listening on http://##p' "$WORK/out" | head -1)
    [ -n "$ADDR" ] && break
    kill -0 "$PID" 2>/dev/null || { cat "$WORK/err"; exit 1; }
    sleep 0.01
  done
  until curl -fsS "http://$ADDR/readyz" >/dev/null 2>&1; do sleep 0.01; done
  B0=$(metric wnsgate_store_batches_total); M0=$(metric wnsgate_store_batch_mutations_sum)
  C0=$(cpu_line)
  OUT=$("$LOAD" put --url "http://$ADDR" --rate "$RATE" --duration "$SECONDS_EACH" --connections 64 --devices "$N" | head -1)
  C1=$(cpu_line)
  B1=$(metric wnsgate_store_batches_total); M1=$(metric wnsgate_store_batch_mutations_sum)
  kill -TERM "$PID"; wait "$PID" || true; PID=""
  python3 - "$interval" "$SECONDS_EACH" "${B0:-0}" "$B1" "${M0:-0}" "$M1" "$C0" "$C1" "$OUT" <<'PY'
import sys
interval, secs = sys.argv[1], float(sys.argv[2])
b0, b1, m0, m1 = (float(x) for x in sys.argv[3:7])
c0 = [int(x) for x in sys.argv[7].split()[1:]]
c1 = [int(x) for x in sys.argv[8].split()[1:]]
d = [b - a for a, b in zip(c0, c1)]
steal = d[7] if len(d) > 7 else 0
syncs = b1 - b0
print(f"min_sync_interval_us={interval}: {syncs/secs:.0f} syncs/s, "
      f"{(m1-m0)/max(syncs,1):.1f} mutations/sync, steal {100*steal/max(sum(d),1):.1f}% of the machine's CPU time; {sys.argv[9]}")
PY
done
