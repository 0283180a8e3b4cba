#!/usr/bin/env python3
"""One `sendmail -odq` call in system mode: a user's (a drop file) and root's.

Usage: .venv/bin/python bench/system_submit.py [--calls N]   (as root)

In a throwaway root (tests/sysroot.py: a mount namespace with overlays, so
the machine is not changed) with `masq-setup system local-only` and the
users alice and bob: N calls of /usr/sbin/sendmail -odq bob (4 KiB) as
alice (runuser) and as root, in turn, three times; the medians in ms, and
the cost of entering the namespace as alice (`true`) to subtract.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests")]
from sysroot import Sysroot  # noqa: E402

LINKS = ["/usr/sbin/sendmail", "/usr/lib/sendmail", "/usr/bin/mailq", "/usr/bin/newaliases",
         "/usr/bin/runq"]
MESSAGE = b"Subject: hi\n\n" + (b"x" * 76 + b"\n") * 52


def median_ms(root, argv, user, calls, data=b""):
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        root.run(argv, user=user, input=data).ok()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=40)
    calls = ap.parse_args().calls
    root = Sysroot(tempfile.mkdtemp(prefix="masq-bench-"))
    try:
        root.run(["rm", "-f", *LINKS]).ok()
        root.run([os.path.join(os.path.dirname(sys.executable), "masq-setup"), "system",
                  "local-only", "--admin", "root@example.org"]).ok()
        root.adduser("alice")
        root.adduser("bob")
        print(f"entering as alice (true): {median_ms(root, ['true'], 'alice', calls):.1f} ms")
        for _ in range(3):
            for user in ("alice", None):
                ms = median_ms(root, ["/usr/sbin/sendmail", "-odq", "bob"], user, calls,
                               MESSAGE)
                print(f"sendmail -odq bob as {user or 'root'}: {ms:.1f} ms")
    finally:
        root.close()


if __name__ == "__main__":
    main()
