#!/usr/bin/env bash
# io_uring vs epoll, side by side in one run (docs/performance.md, P6 and P7).
#
#   loadtest/io.sh [SECONDS] [RUNS] [SENDER_DEVICES]   (defaults: 10, 3, 200000)
#   SECONDS=0 skips the API part, SENDER_DEVICES=0 the sender part.
#
# API path: each server pinned to core 0 (one shard), the load tool to core
# 1. Servers: `wnsgate serve --io epoll`, `wnsgate serve --io uring`, and
# the reference, `wnsgate-load trivial-server` (hyper, current-thread
# runtime, answers 202). Scenarios, each measured on all three in every run:
#   h1-healthz  wrk -t1 -c64, GET /healthz (HTTP/1.1 keep-alive)
#   h1-push     wrk -t1 -c64, POST /v1/devices/{id}/push over 10,000
#               registered devices, the gateway sending the wakes to the
#               WNS simulator on core 1 (TLS, h2); the reference answers 202
#   h2c-healthz h2load -c4 -m100, GET /healthz (h2c, prior knowledge)
# Each figure: requests/s and server CPU us per request, median of RUNS;
# then uring/epoll and gateway/reference ratios.
# Sender path: loadtest/sender.sh once with WNSGATE_SERVER__IO=epoll and
# once with uring (P1, P2), medians of its runs, ratio uring/epoll.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
RUNS=${2:-3}
SENDER_N=${3:-200000}
DEVICES=10000
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null; }
command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl >/dev/null; }
cargo build --release --quiet --bins
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN=$TARGET/release/wnsgate
LOAD=$TARGET/release/wnsgate-load
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wnsgate-io.XXXXXX")
PIDS=()
cleanup() { exec 2>/dev/null; for p in "${PIDS[@]}"; do kill -9 "$p" || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
PFN=Contoso.MDM_8wekyb3d8bbwe

if [ "$SECS" != 0 ]; then
echo "# wnsgate io backends: ${SECS} s runs, median of $RUNS, $(nproc) cores, kernel $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ)"

wait_line() { # file sed-expression -> prints the first match
  local v=""
  for _ in $(seq 1 1000); do
    v=$(sed -n "$2" "$1" 2>/dev/null | head -1 || true)
    [ -n "$v" ] && { echo "$v"; return 0; }
    sleep 0.01
  done
  echo "no '$2' in $1" >&2; cat "$1" >&2; return 1
}

# The WNS simulator, on core 1 beside the load tools.
taskset -c 1 "$BIN" sim --listen 127.0.0.1:0 --mode tls --ca-out "$WORK/ca.pem" --no-channel-stats >"$WORK/sim.out" 2>"$WORK/sim.err" &
PIDS+=($!)
SIM_ADDR=$(wait_line "$WORK/sim.out" 's/^sim listening on \([^ ]*\).*/\1/p')

# Devices for the push scenario, and a wrk script cycling through them.
"$LOAD" fleet --devices "$DEVICES" >"$WORK/fleet.ndjson"
python3 - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
ids = [json.loads(l)["device_id"] for l in open(f"{work}/fleet.ndjson")]
with open(f"{work}/push.lua", "w") as f:
    f.write("ids = {" + ",".join(f'"{i}"' for i in ids) + "}\n")
    f.write("n = 0\nrequest = function()\n  n = n + 1\n"
            "  return wrk.format(\"POST\", \"/v1/devices/\" .. ids[(n % #ids) + 1] .. \"/push\")\nend\n")
PY

declare -A ADDR PID
start_gateway() { # io
  WNSGATE_WNS__TOKEN_URL="https://$SIM_ADDR/accesstoken.srf" \
  WNSGATE_WNS__CONNECT_TO="$SIM_ADDR" \
  WNSGATE_WNS__CA_FILE="$WORK/ca.pem" \
  WNSGATE_WNS__APPS="[{pfn = \"$PFN\", package_sid = \"ms-app://S-1-15-2-1\", client_secret = \"s\"}]" \
  WNSGATE_LOG__LEVEL=warn \
    taskset -c 0 "$BIN" serve --listen 127.0.0.1:0 --shards 1 --io "$1" --data "$WORK/data-$1" >"$WORK/gw-$1.out" 2>"$WORK/gw-$1.err" &
  PID[$1]=$!; PIDS+=($!)
  ADDR[$1]=$(wait_line "$WORK/gw-$1.out" 's#^listening on http://##p')
  until curl -fsS "http://${ADDR[$1]}/readyz" >/dev/null 2>&1; do sleep 0.02; done
  local metrics; metrics=$(curl -fsS "http://${ADDR[$1]}/metrics")
  [[ $metrics == *"io=\"$1\""* ]] || { echo "gateway is not on $1" >&2; exit 1; }
  "$BIN" import "$WORK/fleet.ndjson" --url "http://${ADDR[$1]}" >/dev/null
}
start_gateway epoll
start_gateway uring
taskset -c 0 "$LOAD" trivial-server --listen 127.0.0.1:0 >"$WORK/ref.out" 2>"$WORK/ref.err" &
PID[ref]=$!; PIDS+=($!)
ADDR[ref]=$(wait_line "$WORK/ref.out" 's#^listening on http://##p')

measure() { # scenario target -> "req/s us_per_req"
  local addr=${ADDR[$2]} pid=${PID[$2]} c0 c1 out rps
  c0=$(ticks "$pid")
  case $1 in
    h1-healthz) out=$(taskset -c 1 wrk -t1 -c64 -d"${SECS}s" "http://$addr/healthz")
                rps=$(echo "$out" | awk '/^Requests\/sec:/ {print $2}') ;;
    h1-push)    out=$(taskset -c 1 wrk -t1 -c64 -d"${SECS}s" -s "$WORK/push.lua" "http://$addr")
                rps=$(echo "$out" | awk '/^Requests\/sec:/ {print $2}')
                if echo "$out" | grep -q 'Non-2xx'; then echo "$2 answered non-2xx to pushes: $out" >&2; exit 1; fi ;;
    h2c-healthz) out=$(taskset -c 1 h2load -c4 -m100 -D "$SECS" "http://$addr/healthz")
                rps=$(echo "$out" | sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p') ;;
  esac
  c1=$(ticks "$pid")
  python3 -c "r=float('${rps:-0}'); print(r, ($c1-$c0)/$HZ/max(r*$SECS,1)*1e6)"
}

declare -A RESULTS
for run in $(seq 1 "$RUNS"); do
  for scenario in h1-healthz h1-push h2c-healthz; do
    for target in epoll uring ref; do
      read -r rps us < <(measure "$scenario" "$target")
      printf 'run %s %s %s: %.0f req/s, server %.2f us CPU/req\n' "$run" "$scenario" "$target" "$rps" "$us"
      RESULTS[$scenario.$target]+="$rps:$us "
    done
  done
done

echo "# API path, median of $RUNS (req/s, server us CPU per request)"
for scenario in h1-healthz h1-push h2c-healthz; do
  python3 - "$scenario" "${RESULTS[$scenario.epoll]}" "${RESULTS[$scenario.uring]}" "${RESULTS[$scenario.ref]}" <<'PY'
import statistics, sys
name, *cols = sys.argv[1:]
med = []
for c in cols:
    pairs = [tuple(map(float, x.split(":"))) for x in c.split()]
    med.append((statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)))
(e, eu), (u, uu), (r, ru) = med
print(f"{name}: epoll {e:,.0f} req/s ({eu:.2f} us), uring {u:,.0f} req/s ({uu:.2f} us), "
      f"reference {r:,.0f} req/s ({ru:.2f} us); uring/epoll {u/max(e,1):.2f}; "
      f"epoll/reference {e/max(r,1):.2f}, uring/reference {u/max(r,1):.2f}")
PY
done
for p in "${PID[epoll]}" "${PID[uring]}" "${PID[ref]}"; do kill "$p" 2>/dev/null || true; done
fi

[ "$SENDER_N" = 0 ] && exit 0
echo "# sender path: loadtest/sender.sh $SENDER_N $RUNS per backend"
for io in epoll uring; do
  WNSGATE_SERVER__IO=$io bash loadtest/sender.sh "$SENDER_N" "$RUNS" | tee "$WORK/sender-$io.txt"
done
python3 - "$WORK/sender-epoll.txt" "$WORK/sender-uring.txt" <<'PY'
import re, statistics, sys
def medians(path):
    out = {}
    for line in open(path):
        m = re.match(r"(P\d) run \d+ .*?: gateway ([0-9.]+) us CPU/push \(([0-9,]+) pushes/s", line)
        if m:
            out.setdefault(m[1], []).append((float(m[2]), float(m[3].replace(",", ""))))
    return {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v)) for k, v in out.items()}
e, u = medians(sys.argv[1]), medians(sys.argv[2])
if any("too short to measure" in open(f).read() for f in sys.argv[1:3]):
    print("(sender runs too short to measure: the CPU figures below are whole clock ticks; use more devices)")
for p in sorted(e):
    if p in u:
        # A run so short the gateway used no whole clock tick has no ratio.
        ratio = f"{u[p][0]/e[p][0]:.2f}" if e[p][0] > 0 else "n/a (epoll used no measurable CPU)"
        print(f"{p} sender: epoll {e[p][0]:.2f} us CPU/push ({e[p][1]:,.0f}/s), uring {u[p][0]:.2f} us CPU/push "
              f"({u[p][1]:,.0f}/s); CPU per push uring/epoll {ratio}")
PY
