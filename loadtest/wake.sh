#!/usr/bin/env bash
# Wake-up load test: register a synthetic fleet through the API, wake it one
# device at a time at a fixed rate, then all of it with bulk wakes, and
# report achieved rates, latency percentiles and outcomes.
#
# Against a running deployment:
#   WNSGATE_TOKEN=... loadtest/wake.sh --url http://gateway:8080 \
#       [--devices N] [--rate R] [--duration S] [--connections C] \
#       [--pfn PFN] [--bulk-rate R] [--keep]
# Self-contained (a WNS simulator and a gateway on this machine):
#   loadtest/wake.sh --local [--devices N] [--rate R] [--duration S] \
#       [--sim-latency MIN-MAX] [--sim-errors RATIO] [--shards N]
#
# Defaults: 100,000 devices, single wakes at 500/s for 30 s over 64
# connections, unpaced bulk wakes. See loadtest/README.md for what each
# figure measures. The synthetic devices are deleted at the end unless
# --keep is given.
set -euo pipefail
cd "$(dirname "$0")/.."

URL="" LOCAL=0 KEEP=0
DEVICES=100000 RATE=500 DURATION=30 CONNECTIONS=64
PFN=Contoso.MDM_8wekyb3d8bbwe BULK_RATE="" SIM_LATENCY="" SIM_ERRORS="" SHARDS=0
usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --url) URL=$2; shift 2 ;;
    --token) export WNSGATE_TOKEN=$2; shift 2 ;;
    --local) LOCAL=1; shift ;;
    --devices) DEVICES=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --connections) CONNECTIONS=$2; shift 2 ;;
    --pfn) PFN=$2; shift 2 ;;
    --bulk-rate) BULK_RATE=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --sim-latency) SIM_LATENCY=$2; shift 2 ;;
    --sim-errors) SIM_ERRORS=$2; shift 2 ;;
    --shards) SHARDS=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
if [ "$LOCAL" = 1 ] && [ -n "$URL" ]; then echo "--local and --url exclude each other" >&2; exit 2; fi
if [ "$LOCAL" = 0 ] && [ -z "$URL" ]; then echo "give --url URL or --local" >&2; usage; fi

# The tools: $WNSGATE_BIN_DIR, else on PATH, else built from this checkout.
if [ -n "${WNSGATE_BIN_DIR:-}" ]; then
  BIN=$WNSGATE_BIN_DIR/wnsgate LOAD=$WNSGATE_BIN_DIR/wnsgate-load
elif [ "$LOCAL" = 0 ] && command -v wnsgate-load >/dev/null; then
  BIN=$(command -v wnsgate || true) LOAD=$(command -v wnsgate-load)
else
  cargo build --release --quiet --bins
  BIN=${CARGO_TARGET_DIR:-target}/release/wnsgate LOAD=${CARGO_TARGET_DIR:-target}/release/wnsgate-load
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/wnsgate-wake.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

wait_line() { # file sed-expression pid -> the first match
  local v
  for _ in $(seq 1 3000); do
    v=$(sed -n "$2" "$1" | head -1)
    [ -n "$v" ] && { echo "$v"; return 0; }
    kill -0 "$3" 2>/dev/null || break
    sleep 0.01
  done
  echo "process $3 did not start:" >&2; cat "$WORK"/*.err >&2; return 1
}

if [ "$LOCAL" = 1 ]; then
  SIM_ARGS=(--listen 127.0.0.1:0 --ca-out "$WORK/ca.pem")
  [ -n "$SIM_LATENCY" ] && SIM_ARGS+=(--latency-ms "$SIM_LATENCY")
  [ -n "$SIM_ERRORS" ] && SIM_ARGS+=(--error-ratio "$SIM_ERRORS")
  "$BIN" sim "${SIM_ARGS[@]}" >"$WORK/sim.out" 2>"$WORK/sim.err" &
  PIDS+=($!)
  SIM_ADDR=$(wait_line "$WORK/sim.out" 's/^sim listening on \([^ ]*\).*/\1/p' "$!")
  WNSGATE_WNS__TOKEN_URL="https://$SIM_ADDR/accesstoken.srf" \
  WNSGATE_WNS__CONNECT_TO="$SIM_ADDR" \
  WNSGATE_WNS__CA_FILE="$WORK/ca.pem" \
  WNSGATE_WNS__APPS="[{pfn = \"$PFN\", package_sid = \"ms-app://S-1-15-2-1\", client_secret = \"load\"}]" \
  WNSGATE_LOG__LEVEL=warn \
    "$BIN" serve --listen 127.0.0.1:0 --shards "$SHARDS" --data "$WORK/data" >"$WORK/gw.out" 2>"$WORK/gw.err" &
  PIDS+=($!)
  URL=http://$(wait_line "$WORK/gw.out" 's#^listening on http://##p' "$!")
  until "$BIN" health --url "$URL" >/dev/null 2>&1; do sleep 0.05; done
  KEEP=1   # the data directory goes away with the run
  echo "# wnsgate wake load test, local: simulator $SIM_ADDR${SIM_LATENCY:+ latency ${SIM_LATENCY} ms}${SIM_ERRORS:+ error ratio $SIM_ERRORS}, gateway $URL"
else
  echo "# wnsgate wake load test against $URL"
  echo "# note: the synthetic channel URIs are sent to the WNS endpoint this deployment is configured for;"
  echo "#       point it at a simulator (wns.connect_to) or a staging credential, not at production WNS."
fi
echo "# $DEVICES devices (pfn $PFN), single wakes at $RATE/s for $DURATION s over $CONNECTIONS connections, bulk${BULK_RATE:+ paced at $BULK_RATE/s}; $(date -u +%Y-%m-%dT%H:%MZ), load generator: $(nproc) cores"

"$LOAD" register --url "$URL" --devices "$DEVICES" --pfn "$PFN"
"$LOAD" push --url "$URL" --devices "$DEVICES" --rate "$RATE" --duration "$DURATION" --connections "$CONNECTIONS"
"$LOAD" bulk --url "$URL" --devices "$DEVICES" ${BULK_RATE:+--rate "$BULK_RATE"}
if command -v curl >/dev/null; then
  echo "# the gateway's own count (wnsgate_pushes_total, since it started):"
  curl -fsS "$URL/metrics" | grep '^wnsgate_pushes_total' | sed 's/^/#   /' || true
fi
if [ "$KEEP" = 0 ]; then
  "$LOAD" forget --url "$URL" --devices "$DEVICES"
fi
