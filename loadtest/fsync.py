#!/usr/bin/env python3
"""What one durable log append costs on this disk: 300-byte appends, each
followed by fdatasync, to a file that grows as written, to one reserved
with posix_fallocate, and to one written with zeros first (what the
store's log segments are). Each alone, then beside a competing buffered
writer (a snapshot being written): there, a sync that must wait for a
file-system journal commit also waits for the other file's data.
Two rounds of each, alternated.

    python3 loadtest/fsync.py [DIR] [APPENDS] [BESIDE_MB]
    # defaults: $TMPDIR, 3000 appends, a 2000 MB writer (0: no such round)
"""
import os
import subprocess
import sys
import tempfile
import time

DIR = sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir()
N = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
BESIDE_MB = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
SEGMENT = 64 << 20


def run(mode, beside):
    os.sync()
    path = os.path.join(DIR, "wnsgate-fsync.probe")
    other = os.path.join(DIR, "wnsgate-fsync.writer")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    writer = None
    try:
        if mode == "reserved":
            os.posix_fallocate(fd, 0, SEGMENT)
        elif mode == "zeroed":
            zeros = b"\0" * (1 << 20)
            for _ in range(SEGMENT >> 20):
                os.write(fd, zeros)
        os.fsync(fd)
        if beside:
            writer = subprocess.Popen(
                ["dd", "if=/dev/zero", f"of={other}", "bs=1M", f"count={BESIDE_MB}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ts, off = [], 0
        for _ in range(N):
            os.pwrite(fd, b"x" * 300, off)
            off += 300
            t = time.perf_counter()
            os.fdatasync(fd)
            ts.append(time.perf_counter() - t)
    finally:
        if writer:
            writer.wait()
            os.unlink(other)
        os.close(fd)
        os.unlink(path)
    ts.sort()
    return ts[len(ts) // 2] * 1e6, ts[int(len(ts) * 0.99)] * 1e6, ts[-1] * 1e6


rounds = [False, True] if BESIDE_MB > 0 else [False]
for beside in rounds:
    for _ in range(2):
        for mode in ("growing", "reserved", "zeroed"):
            p50, p99, mx = run(mode, beside)
            where = f"beside a {BESIDE_MB} MB writer" if beside else "alone"
            print(f"{mode:8} {where:24} {N} appends: fdatasync p50 {p50:.0f} us, p99 {p99:.0f} us, max {mx:.0f} us")
