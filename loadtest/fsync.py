#!/usr/bin/env python3
"""What one durable log append costs on this disk: 300-byte appends, each
followed by fdatasync, to a file that grows as written and to one
preallocated with posix_fallocate (what the store's log segments do).
Two rounds of each, alternated.

    python3 loadtest/fsync.py [DIR] [APPENDS]   # default: $TMPDIR, 3000
"""
import os
import sys
import tempfile
import time

DIR = sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir()
N = int(sys.argv[2]) if len(sys.argv) > 2 else 3000


def run(prealloc):
    path = os.path.join(DIR, "wnsgate-fsync.probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        if prealloc:
            os.posix_fallocate(fd, 0, 64 << 20)
            os.fsync(fd)
        ts, off = [], 0
        for _ in range(N):
            os.pwrite(fd, b"x" * 300, off)
            off += 300
            t = time.perf_counter()
            os.fdatasync(fd)
            ts.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)
    ts.sort()
    return ts[len(ts) // 2] * 1e6, ts[int(len(ts) * 0.99)] * 1e6, ts[-1] * 1e6


for pre in (False, True, False, True):
    p50, p99, mx = run(pre)
    name = "preallocated" if pre else "growing     "
    print(f"{name} {N} appends: fdatasync p50 {p50:.0f} us, p99 {p99:.0f} us, max {mx:.0f} us")
