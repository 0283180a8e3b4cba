"""What a refused AUTH costs masq-smtpd, and what one password check costs.

Usage: .venv/bin/python bench/auth_refused.py [--sessions N] [--attempts K]

A masq-setup folder in a temporary directory, AUTH on pipes
(auth_without_tls), one user in the password file.  192.0.2.7 is locked
out first (auth_failures wrong passwords).  Then N sessions from it each
send K AUTH PLAIN lines, all refused with 454 before any check; as many
sessions sending K NOOPs are the baseline.  CPU (user+sys, from wait4 of
each masq-smtpd) per refused attempt is the difference over N*K.  Peak
memory (ru_maxrss) of one session: no AUTH, one refused AUTH, one scrypt
check of a wrong password from another address.
"""
import argparse
import base64
import os
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)


def session(folder, ip, lines):
    """(cpu seconds, wall seconds, max RSS KiB, replies) of one masq-smtpd session."""
    data = b"EHLO bench.example\r\n" + b"".join(x + b"\r\n" for x in lines) + b"QUIT\r\n"
    env = {"PATH": os.environ["PATH"], "MASQ_CONF": os.path.join(folder, "masq.toml"),
           "TCPREMOTEIP": ip}
    start = time.monotonic()
    p = subprocess.Popen([os.path.join(BIN, "masq-smtpd")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    p.stdin.write(data)                 # a few KiB: the pipe takes it
    p.stdin.close()
    out = p.stdout.read()
    p.stdout.close()
    _, status, usage = os.wait4(p.pid, 0)   # this child's own usage, not all children's
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    return usage.ru_utime + usage.ru_stime, wall, usage.ru_maxrss, out.decode()


def plain(password):
    return b"AUTH PLAIN " + base64.b64encode(b"\0alice\0" + password)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--attempts", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "masq")
        subprocess.run([os.path.join(BIN, "masq-setup"), "local-only", folder], check=True,
                       capture_output=True)
        subprocess.run([os.path.join(BIN, "masq-setup"), "passwd", folder, "alice"],
                       input=b"right horse\n", check=True, capture_output=True)
        with open(os.path.join(folder, "masq.toml"), "a") as f:
            f.write(f"\n[smtpd]\nauth_without_tls = true\nrelay_nets = []\n"
                    f"max_errors = {args.attempts + 20}\n")
        _, _, _, out = session(folder, "192.0.2.7", [plain(b"wrong")] * 11)
        assert out.count("454 4.7.0 Error: too many failed") == 1, out
        refused, noop = [], []
        for _ in range(args.sessions):
            cpu, wall, _, out = session(folder, "192.0.2.7", [plain(b"wrong")] * args.attempts)
            assert out.count("454 4.7.0 Error: too many failed") == args.attempts, out
            refused.append((cpu, wall))
            cpu, wall, _, _ = session(folder, "192.0.2.7", [b"NOOP"] * args.attempts)
            noop.append((cpu, wall))
        n = args.attempts
        cpu_each = (statistics.median(c for c, _ in refused)
                    - statistics.median(c for c, _ in noop)) / n
        wall_each = (statistics.median(w for _, w in refused)
                     - statistics.median(w for _, w in noop)) / n
        print(f"{args.sessions} sessions x {n} refused AUTH from a locked address")
        refused_cpu = statistics.median(c for c, _ in refused)
        noop_cpu = statistics.median(c for c, _ in noop)
        print(f"  session CPU, median: refused {refused_cpu*1e3:.1f} ms, "
              f"NOOPs {noop_cpu*1e3:.1f} ms")
        print(f"  CPU per refused attempt: {cpu_each*1e3:.3f} ms; wall {wall_each*1e3:.3f} ms")
        rss = {}
        for name, ip, lines in (("no AUTH", "192.0.2.20", [b"NOOP"]),
                                ("one refused AUTH", "192.0.2.7", [plain(b"wrong")]),
                                ("one scrypt check", "192.0.2.21", [plain(b"wrong")])):
            rss[name] = statistics.median(session(folder, ip, lines)[2] for _ in range(5))
        checks = [session(folder, f"192.0.2.{30 + i}", [plain(b"wrong")])[0] for i in range(5)]
        print("  peak RSS of one session: " + ", ".join(f"{k} {v/1024:.1f} MiB"
                                                        for k, v in rss.items()))
        print(f"  CPU of a session with one scrypt check, median: "
              f"{statistics.median(checks)*1e3:.1f} ms")


if __name__ == "__main__":
    main()
