#!/usr/bin/env bash
# Short runs of every load-test script so they keep working (used by CI).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl >/dev/null; }
SHED_SECONDS=2 CUT_SECONDS=3 bash loadtest/registry.sh 20000 500 2
python3 loadtest/fsync.py "${TMPDIR:-/tmp}" 200 100
bash loadtest/syncs.sh 2000 500 2
LEASE_TTL=3s bash loadtest/cluster.sh 2000 500 2
bash loadtest/sender.sh 5000 1
bash loadtest/instructions.sh 1000
bash loadtest/wake.sh --local --devices 2000 --rate 200 --duration 2 --sim-latency 1-5
# io_uring vs epoll: 1 s per figure, one run, a 2,000-device sender pass per backend.
bash loadtest/io.sh 1 1 2000
