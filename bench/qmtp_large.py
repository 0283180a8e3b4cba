#!/usr/bin/env python3
"""A large message from one masq to another over loopback: QMTP against SMTP.

Usage: bench/qmtp_large.py [--mib N] [--runs R]

For each protocol and run, two masq folders in a temporary folder: a
"laptop" (masq-setup smarthost) whose route points at a "server"
(local-only) listening with masq-tcpserver, which runs masq-qmtpd or
masq-smtpd under a small wrapper that records the session's peak RSS and
CPU.  A message of N MiB (200 by default; LF lines of 76 bytes) is queued
on the laptop with sendmail -odq, then `masq-send --once` sends it; a
reader on the server's trigger keeps it queued there (no local delivery).

Prints per run: the time masq-send --once took (start-up, reading the
queue file, the transfer, the server's fsync and its answer), the peak RSS
and CPU seconds of masq-send (the client) and of the server's session.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)
MEASURE = """import os, resource, subprocess, sys, time
start = time.monotonic()
code = subprocess.call(sys.argv[2:])
u = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write("%d %.3f %.3f\\n" % (u.ru_maxrss, u.ru_utime + u.ru_stime, time.monotonic() - start))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
sys.exit(code)
"""


def setup(folder, profile, name, extra=()):
    subprocess.run([os.path.join(BIN, "masq-setup"), profile, folder, "--hostname",
                    f"{name}.example", *extra], check=True, capture_output=True)
    return os.path.join(folder, "masq.toml")


def set_max_size(conf, size):
    with open(conf) as f:
        text = f.read()
    with open(conf, "w") as f:
        f.write(text.replace("max_size = 52428800", f"max_size = {size}"))


def write_message(path, size):
    head = b"From: alice@laptop.example\nTo: bob@lan.example\nSubject: large\n\n"
    line = b"0123456789" * 7 + b"abcde\n"
    block = line * (65536 // len(line))
    with open(path, "wb") as f:
        f.write(head)
        left = size - len(head)
        while left > 0:
            f.write(block[:left])
            left -= min(left, len(block))


def one_run(protocol, source, size, top):
    folder = tempfile.mkdtemp(dir=top)
    server_conf = setup(os.path.join(folder, "server"), "local-only", "lan")
    laptop_conf = setup(os.path.join(folder, "laptop"), "smarthost", "laptop",
                        ["--relay", "127.0.0.1:1"])
    for conf in (server_conf, laptop_conf):
        set_max_size(conf, 2 * size)     # SMTP counts CRLF line ends
    trigger = os.open(os.path.join(folder, "server", "spool", "trigger"),
                      os.O_RDONLY | os.O_NONBLOCK)
    measure = os.path.join(folder, "measure.py")
    with open(measure, "w") as f:
        f.write(MEASURE)
    rss_file = os.path.join(folder, "server-usage")
    program = os.path.join(BIN, "masq-qmtpd" if protocol == "qmtp" else "masq-smtpd")
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "MASQ_CONF": server_conf}
    listener = subprocess.Popen([os.path.join(BIN, "masq-tcpserver"), "-1", "127.0.0.1", "0",
                                 sys.executable, measure, rss_file, program],
                                stdout=subprocess.PIPE, env=env)
    port = int(listener.stdout.readline())
    with open(laptop_conf) as f:
        text = f.read()
    head = text.partition("[route.smarthost]")[0]
    with open(laptop_conf, "w") as f:
        f.write(head + f'[route.smarthost]\nhost = "127.0.0.1:{port}"\n'
                + ('protocol = "qmtp"\n' if protocol == "qmtp" else 'tls = "none"\n'))
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "MASQ_CONF": laptop_conf}
    with open(source, "rb") as f:
        subprocess.run([os.path.join(folder, "laptop", "bin", "sendmail"), "-odq", "-i", "-f",
                        "alice@laptop.example", "bob@lan.example"], stdin=f, env=env,
                       check=True)
    os.sync()
    start = time.monotonic()
    client = subprocess.Popen([os.path.join(BIN, "masq-send"), "--once"], env=env)
    _, status, usage = os.wait4(client.pid, 0)
    elapsed = time.monotonic() - start
    client.returncode = os.waitstatus_to_exitcode(status)
    deadline = time.monotonic() + 60
    while not os.path.exists(rss_file) and time.monotonic() < deadline:
        time.sleep(0.05)    # the session ends at the client's close; its wrapper then writes
    listener.terminate()
    listener.wait()
    os.close(trigger)
    incoming = os.listdir(os.path.join(folder, "server", "spool", "incoming"))
    if client.returncode != 0 or len(incoming) != 1:
        with open(os.path.join(folder, "laptop", "masq.log")) as f:
            sys.exit(f"{protocol}: the message did not arrive: masq-send exited "
                     f"{client.returncode}; its log:\n{f.read()}")
    with open(rss_file) as f:
        server_rss, server_cpu, _ = f.read().split()
    subprocess.run(["rm", "-rf", folder], check=True)
    return {"seconds": elapsed, "client_rss": usage.ru_maxrss / 1024,
            "client_cpu": usage.ru_utime + usage.ru_stime,
            "server_rss": int(server_rss) / 1024, "server_cpu": float(server_cpu)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = args.mib * 1024 * 1024
    with tempfile.TemporaryDirectory() as top:
        source = os.path.join(top, "message")
        write_message(source, size)
        results = {"qmtp": [], "smtp": []}
        for n in range(args.runs):
            for protocol in results:
                r = one_run(protocol, source, size, top)
                results[protocol].append(r)
                print(f"run {n + 1} {protocol}: {r['seconds']:.2f} s; masq-send "
                      f"{r['client_rss']:.1f} MiB, {r['client_cpu']:.2f} s CPU; server "
                      f"{r['server_rss']:.1f} MiB, {r['server_cpu']:.2f} s CPU", flush=True)
    print(f"\nmedians of {args.runs} runs, {args.mib} MiB:")
    print("| protocol | time | masq-send RSS | masq-send CPU | server RSS | server CPU |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for protocol, runs in results.items():
        m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {protocol.upper()} | {m['seconds']:.2f} s | {m['client_rss']:.1f} MiB | "
              f"{m['client_cpu']:.2f} s | {m['server_rss']:.1f} MiB | "
              f"{m['server_cpu']:.2f} s |")


if __name__ == "__main__":
    main()
