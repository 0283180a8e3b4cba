#!/usr/bin/env python3
"""Measure two work trees of masq side by side in one run (before and after a change).

Usage: python3 bench/compare.py BEFORE_TREE AFTER_TREE [--rounds N] [--messages N]

Each tree needs its own .venv (`make install` in it); each is measured with
its own .venv/bin/python and its own bench scripts, run as they are and their
output parsed.  Every round runs each script for before and after in turn, so
the machine's noise hits both alike; in every other round after goes first, so
that going second (often slower) does not count against one side:
  - bench/local_path.py --rounds 1: one `sendmail -odq` call (median of 10
    calls, wall and CPU) and one runq over 1,000 queued 4-KiB messages into a
    maildir (msg/s);
  - bench/smtpd_load.py: 10 SMTP clients, a connection per message, 4-KiB
    messages (--messages in all, default 2,000), msg/s; with Postfix's
    smtp-source when ../shared/tools/get-postfix-tools.sh has fetched it (as
    `make bench` does), else the script's own Python clients.
Prints a Markdown table for bench/README.md: the median over the rounds with
the range (lowest-highest), and after/before of the medians.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

SMTP_SOURCE = os.path.expanduser("~/.cache/masq-bench-tools/bin/smtp-source")
# measure, unit, script, pattern of the script's output that holds the figure
MEASURES = [
    ("one `sendmail -odq` call, wall", "ms", "local_path", r"call, wall \| ([\d.]+) ms"),
    ("one `sendmail -odq` call, CPU", "ms", "local_path", r"call, CPU [^|]*\| ([\d.]+) ms"),
    ("runq over 1,000 4-KiB messages into a maildir", "msg/s", "local_path",
     r"into a maildir \| ([\d.]+) msg/s"),
    ("10 SMTP clients, a connection per message", "msg/s", "smtpd_load",
     r"connection per message: .* = ([\d.]+) msg/s"),
]


def sh(*argv):
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def describe(tree):
    dirty = sh("git", "-C", tree, "status", "--porcelain")
    return f"{tree} at {sh('git', '-C', tree, 'rev-parse', '--short', 'HEAD')}" + (
        " (dirty: uncommitted changes)" if dirty else " (clean)")


def load():
    uptime = sh("uptime")
    return uptime.split("load average:")[-1].strip()


def run(tree, script, argv):
    os.sync()                           # the previous run's writes do not land in this one
    cmd = [f"{tree}/.venv/bin/python", f"{tree}/bench/{script}.py", *argv]
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def cell(values, unit):
    fmt = "{:.1f}" if unit == "ms" else "{:.0f}"
    med, low, high = statistics.median(values), min(values), max(values)
    return f"{fmt.format(med)} {unit} ({fmt.format(low)}-{fmt.format(high)})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--messages", type=int, default=2000, help="for the 10 SMTP clients")
    args = ap.parse_args()
    trees = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    for tree in trees.values():
        if not os.access(f"{tree}/.venv/bin/python", os.X_OK):
            sys.exit(f"{tree}/.venv/bin/python is missing: run `make install` there")
        sh(f"{tree}/.venv/bin/python", "-m", "compileall", "-q", f"{tree}/lib")  # make compile
    smtp = ["--messages", str(args.messages), "--clients", "10", "--pipelined", "200",
            "--size", "4096"]
    has_source = os.access(SMTP_SOURCE, os.X_OK)
    if has_source:
        smtp += ["--smtp-source", SMTP_SOURCE]
    argv = {"local_path": ["--rounds", "1"], "smtpd_load": smtp}

    started, load_before = time.monotonic(), load()
    found = {(side, m[0]): [] for side in trees for m in MEASURES}
    for r in range(args.rounds):
        for script in argv:
            for side, tree in list(trees.items())[::1 if r % 2 == 0 else -1]:
                out = run(tree, script, argv[script])
                for measure, _, name, pattern in MEASURES:
                    if name == script:
                        m = re.search(pattern, out)
                        if not m:
                            sys.exit(f"{tree}/bench/{script}.py: no {measure!r} in:\n{out}")
                        found[side, measure].append(float(m[1]))
        print(f"round {r + 1}/{args.rounds} ({time.monotonic() - started:.0f} s):", *(
            f"{side} " + ", ".join(f"{found[side, m[0]][-1]:g}" for m in MEASURES)
            for side in trees), sep="  ", file=sys.stderr)

    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}: {args.rounds} rounds in "
          f"{time.monotonic() - started:.0f} s, before and after in turn (after first in "
          "rounds 2, 4, ...).")
    print(f"- before: {describe(trees['before'])}")
    print(f"- after: {describe(trees['after'])}")
    print(f"- load average (uptime): {load_before} at the start, {load()} at the end")
    print(f"- SMTP clients: {SMTP_SOURCE if has_source else 'smtpd_load.py own Python clients'}"
          f", {args.messages} messages a run")
    print()
    print("| measure | before (median, range) | after (median, range) | after/before |")
    print("| --- | ---: | ---: | ---: |")
    for measure, unit, _, _ in MEASURES:
        before, after = found["before", measure], found["after", measure]
        ratio = statistics.median(after) / statistics.median(before)
        print(f"| {measure} | {cell(before, unit)} | {cell(after, unit)} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
