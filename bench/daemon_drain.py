#!/usr/bin/env python3
"""How fast the masq-send daemon empties a queue: N messages waiting, then it starts.

Usage: python3 bench/daemon_drain.py [--rounds R] [--count N] [SEND ...]

Queues N 4-KiB messages to one local maildir with no daemon running (the
library, not timed), starts SEND (a masq-send launcher; default the venv's)
as the daemon, and times from its start until every message is in the
maildir's new/.  With several SENDs (a worktree's launcher beside this
one), the rounds alternate between them.  Prints the median rate and the
daemon's CPU per message (its own and its children's: the helper that
shares a burst, masq-send(8)).
"""
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from local_path import fill, setup  # noqa: E402

BIN = os.path.dirname(sys.executable)


def drain(send, count):
    with tempfile.TemporaryDirectory() as d:
        env = setup(f"{d}/m")
        fill(env, count)
        new = f"{d}/m/mail/bob/new"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.Popen([send], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = t0 + 300
        while time.perf_counter() < deadline:
            if os.path.isdir(new) and len(os.listdir(new)) >= count:
                break
            time.sleep(0.002)
        elapsed = time.perf_counter() - t0
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        return count / elapsed, cpu / count * 1000


def main(argv):
    rounds, count, sends = 3, 600, []
    while argv:
        word = argv.pop(0)
        if word == "--rounds":
            rounds = int(argv.pop(0))
        elif word == "--count":
            count = int(argv.pop(0))
        else:
            sends.append(word)
    sends = sends or [os.path.join(BIN, "masq-send")]
    results = {s: [] for s in sends}
    for r in range(rounds):
        for send in sends if r % 2 == 0 else sends[::-1]:
            results[send].append(drain(send, count))
    for send, got in results.items():
        rates = [g[0] for g in got]
        cpus = [g[1] for g in got]
        print(f"{send}: {statistics.median(rates):.0f} msg/s ({min(rates):.0f}-{max(rates):.0f}), "
              f"CPU {statistics.median(cpus):.2f} ms per message, {count} messages, "
              f"{rounds} rounds")


if __name__ == "__main__":
    main(sys.argv[1:])
