#!/usr/bin/env python3
"""Messages per second relayed by runq (masq-send --once) to a loopback sink.

Usage: bench/relay.py [--messages N] [--runs R] [--size BYTES] [--parallel P]

A masq folder made by `masq-setup smarthost` points its route at a tiny
threaded SMTP sink in this script (250 to everything, PIPELINING, counts
messages and connections).  Each run queues N messages of SIZE bytes
(through the spool library, not timed), then times one `masq-send --once`
that sends them all, two ways:

  reused     one connection for every message (the default)
  per-msg    reuse_connection = false: connect, EHLO, send, QUIT per message

Prints the median of R runs of each in messages per second, and the number
of connections the sink saw.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from smtp_relay import Sink  # noqa: E402 -- the sink both relay benchmarks use

BIN = os.path.dirname(sys.executable)

FILL = """
import io, sys
from masq import config, envelope
from masq.handoff import enqueue
conf = config.load(None)
count, size = int(sys.argv[1]), int(sys.argv[2])
line = b"x" * 63 + b"\\n"
for i in range(count):
    head = b"From: a@laptop.example.org\\nSubject: bench %d\\n\\n" % i
    body = line * ((size - len(head)) // 64)
    enqueue(conf, io.BytesIO(head + body), envelope.Envelope("a@laptop.example.org",
            ["b@remote.example"]), {"proto": "local", "user": "bench"})
"""


def folder(tmp, sink, reuse, parallel):
    path = os.path.join(tmp, f"masq-{'reused' if reuse else 'per-msg'}")
    subprocess.run([os.path.join(BIN, "masq-setup"), "smarthost", path, "--relay",
                    f"127.0.0.1:{sink.port}", "--hostname", "laptop.example.org"],
                   check=True, capture_output=True)
    conf = os.path.join(path, "masq.toml")
    with open(conf) as f:
        text = f.read()
    text = text.replace('tls = "starttls"', 'tls = "none"')
    text = text.replace("[local]", f"[queue]\nparallel = {parallel}\n\n[local]")
    if not reuse:
        text += "reuse_connection = false\n"
    with open(conf, "w") as f:
        f.write(text)
    return conf


def one_run(conf, sink, count, size):
    env = {"PATH": os.environ["PATH"], "MASQ_CONF": conf, "HOME": os.environ.get("HOME", "/")}
    subprocess.run([sys.executable, "-c", FILL, str(count), str(size)], env=env, check=True)
    before_m, before_c = sink.messages, sink.connections
    start = time.perf_counter()
    subprocess.run([os.path.join(BIN, "masq-send"), "--once"], env=env, check=True)
    elapsed = time.perf_counter() - start
    sent = sink.messages - before_m
    if sent != count:
        sys.exit(f"relay.py: the sink got {sent} of {count} messages")
    return count / elapsed, sink.connections - before_c


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--parallel", type=int, default=2)
    args = p.parse_args()
    sink = Sink()
    with tempfile.TemporaryDirectory() as tmp:
        for reuse in (True, False):
            conf = folder(tmp, sink, reuse, args.parallel)
            rates, conns = [], []
            for _ in range(args.runs):
                rate, connections = one_run(conf, sink, args.messages, args.size)
                rates.append(rate)
                conns.append(connections)
            name = "reused" if reuse else "per-msg"
            print(f"{name:8} median {statistics.median(rates):8.1f} msg/s  "
                  f"(runs: {', '.join(f'{r:.0f}' for r in rates)}; "
                  f"connections per run: {statistics.median(conns):.0f})")


if __name__ == "__main__":
    main()
