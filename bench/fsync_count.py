#!/usr/bin/env python3
"""Count the fsyncs of masq's whole path per message, process by process.

Usage: python3 bench/fsync_count.py [--tree TREE] [--messages N]

A fresh `masq-setup local-only` folder; masq-send and masq-tcpserver (with
its masq-smtpd children) run under `strace -f -c -e trace=fsync,fdatasync,
syncfs`; N messages (default 200) come by SMTP (Postfix's smtp-source, one
client, a connection per message) and N by `sendmail -i` calls (each under
strace too), and the script waits until all are delivered into the
maildir.  Prints the calls per message for each part of the path:
masq-smtpd (the queue file, incoming/), masq-send (active/, the maildir
file and new/), and one sendmail call.  strace slows every process down:
the counts are what it is for, not the time.
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

SMTP_SOURCE = os.path.expanduser("~/.cache/masq-bench-tools/bin/smtp-source")
USER = os.environ.get("BENCH_USER", "benchu")
TRACE = ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync,syncfs"]


def counts(path):
    """{syscall: calls} from an strace -c summary."""
    found = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
            if m and m[2] != "total":
                found[m[2]] = int(m[1])
    return found


def delivered(maildir):
    try:
        return len(os.listdir(os.path.join(maildir, "new")))
    except FileNotFoundError:
        return 0


def wait_for(maildir, n, seconds=300):
    deadline = time.monotonic() + seconds
    while delivered(maildir) < n:
        if time.monotonic() > deadline:
            sys.exit(f"only {delivered(maildir)} of {n} delivered")
        time.sleep(0.1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", default=os.path.join(os.path.dirname(__file__), os.pardir))
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--port", type=int, default=2725)
    args = ap.parse_args()
    venv = os.path.join(os.path.abspath(args.tree), ".venv", "bin")
    n = args.messages
    with tempfile.TemporaryDirectory() as d:
        folder = os.path.join(d, "m")
        subprocess.run([f"{venv}/masq-setup", "local-only", folder], check=True,
                       capture_output=True)
        env = dict(os.environ, MASQ_CONF=f"{folder}/masq.toml")
        maildir = f"{folder}/mail/{USER}"
        send = subprocess.Popen([*TRACE, "-o", f"{d}/send.st", f"{venv}/masq-send"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        srv = subprocess.Popen([*TRACE, "-o", f"{d}/srv.st", f"{venv}/masq-tcpserver",
                                "127.0.0.1", str(args.port), f"{venv}/masq-smtpd"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)
        subprocess.run([SMTP_SOURCE, "-s", "1", "-m", str(n), "-l", "4096", "-f",
                        "bench@localhost", "-t", f"{USER}@localhost",
                        f"127.0.0.1:{args.port}"], check=True)
        wait_for(maildir, n)
        with open(os.path.join(d, "msg"), "wb") as f:
            f.write(b"Subject: fsync count\n\n" + b"x" * 4000 + b"\n")
        for i in range(n):
            with open(os.path.join(d, "msg"), "rb") as f:
                subprocess.run([*TRACE, "-o", f"{d}/sendmail.{i}.st", f"{folder}/bin/sendmail",
                                "-i", f"{USER}@localhost"], stdin=f, check=True)
        wait_for(maildir, 2 * n)
        time.sleep(1)
        for p in (srv, send):           # the traced program stops, then strace writes
            with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
                for pid in f.read().split():
                    os.kill(int(pid), signal.SIGTERM)
            p.wait(60)
        smtpd, daemon = counts(f"{d}/srv.st"), counts(f"{d}/send.st")
        calls = {}
        for i in range(n):
            for k, v in counts(f"{d}/sendmail.{i}.st").items():
                calls[k] = calls.get(k, 0) + v
    print(f"fsyncs per message, {n} by SMTP and {n} by sendmail, 4-KiB messages into a maildir")
    print("| process | " + " | ".join(("fsync", "fdatasync", "syncfs")) + " |")
    print("| --- | ---: | ---: | ---: |")
    for name, found, per in (("masq-tcpserver + masq-smtpd (SMTP)", smtpd, n),
                             ("one sendmail call", calls, n),
                             ("masq-send (both ways)", daemon, 2 * n)):
        print(f"| {name} | " + " | ".join(f"{found.get(k, 0) / per:.2f}" for k in
                                           ("fsync", "fdatasync", "syncfs")) + " |")


if __name__ == "__main__":
    main()
