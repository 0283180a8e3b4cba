#!/usr/bin/env python3
"""Messages per second masq-fetch takes from Dovecot's POP3 server into the queue.

Usage: bench/fetch.py [--messages N] [--runs R] [--size BYTES]

Starts a Dovecot of its own on loopback (tests/dovecot_helpers.py), puts N
messages of SIZE bytes into a user's maildir (not timed), then times one
`masq-fetch --route isp` in delete mode (RETR, queue with fsync, the id
fsynced, DELE; QUIT) into a `masq-setup local-only` folder whose trigger
has a reader, so no delivery runs meanwhile.  Two ways: tls = "none" and
"pop3s".  Prints the median of R runs of each in messages per second.
Needs dovecot-pop3d; as root, as the tests run it.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from dovecot_helpers import Dovecot  # noqa: E402 -- the tests' Dovecot

BIN = os.path.dirname(sys.executable)


def folder(tmp, dovecot, tls):
    path = os.path.join(tmp, f"masq-{tls}")
    subprocess.run([os.path.join(BIN, "masq-setup"), "local-only", path, "--hostname",
                    "bench.example"], check=True, capture_output=True)
    with open(os.path.join(path, "pop.secret"), "w") as f:
        f.write("secret\n")
    os.chmod(os.path.join(path, "pop.secret"), 0o600)
    port = dovecot.pop3s if tls == "pop3s" else dovecot.pop3
    with open(os.path.join(path, "masq.toml"), "a") as f:
        f.write(f'\n[route.isp]\nalways = true\n\n[[route.isp.fetch]]\n'
                f'server = "127.0.0.1:{port}"\ntls = "{tls}"\n'
                f'tls_ca_file = "{dovecot.ca_file}"\nuser = "bench"\n'
                f'password_file = "pop.secret"\ndeliver_to = "bob"\n')
    return path


def one_run(path, dovecot, count, size):
    for name in os.listdir(os.path.join(path, "spool", "incoming")):
        os.unlink(os.path.join(path, "spool", "incoming", name))
    line = b"x" * 63 + b"\n"
    for i in range(count):
        head = b"From: a@far.example\nTo: bench@isp.example\nSubject: bench %d\n\n" % i
        dovecot.put("bench", head + line * max(0, (size - len(head)) // 64))
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "MASQ_CONF": os.path.join(path, "masq.toml")}
    start = time.perf_counter()
    subprocess.run([os.path.join(BIN, "masq-fetch"), "--route", "isp"], check=True, env=env)
    took = time.perf_counter() - start
    queued = len(os.listdir(os.path.join(path, "spool", "incoming")))
    assert queued == count and dovecot.count("bench") == 0, (queued, dovecot.count("bench"))
    return count / took


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    if not shutil.which("dovecot"):
        sys.exit("bench/fetch.py: dovecot is not installed: apt-get install dovecot-pop3d")
    with tempfile.TemporaryDirectory() as tmp:
        dovecot = Dovecot(os.path.join(tmp, "dovecot"))
        dovecot.add_user("bench", "secret")
        dovecot.start()
        try:
            for tls in ("none", "pop3s"):
                path = folder(tmp, dovecot, tls)
                fd = os.open(os.path.join(path, "spool", "trigger"),
                             os.O_RDONLY | os.O_NONBLOCK)     # a daemon's stand-in
                try:
                    rates = [one_run(path, dovecot, args.messages, args.size)
                             for _ in range(args.runs)]
                finally:
                    os.close(fd)
                print(f"tls = {tls:6} {args.messages} messages of {args.size} bytes: "
                      f"{statistics.median(rates):7.1f} messages/s "
                      f"(runs: {', '.join(f'{r:.0f}' for r in rates)})")
        finally:
            dovecot.stop()


if __name__ == "__main__":
    main()
