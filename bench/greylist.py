"""What the greylist check costs masq-smtpd per RCPT.

Usage: .venv/bin/python bench/greylist.py [--rows N] [--calls K] [--rcpts R]

1. In-process, masq.greylist.Greylist.check() on a table of N rows
   (filled first, in one transaction): K checks of a known (passed)
   triplet, the common case (one SELECT), and K of new triplets (one
   IMMEDIATE transaction with an INSERT: a WAL commit, no fsync).  Then
   the cost of opening the table once (import sqlite3, connect, pragmas).
2. Whole sessions: masq-smtpd on pipes from 192.0.2.7, one MAIL and 1 or
   R RCPTs of triplets that passed already, with greylist = true and with
   it off; CPU (user+sys from wait4), the median of 7 sessions each.  The
   session's fixed cost is on - off with one RCPT (import sqlite3, open
   the table); the cost per RCPT is the difference of those differences
   over R - 1.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))

from masq import greylist  # noqa: E402


def in_process(spool, rows, calls):
    table = greylist.Greylist(spool, delay=0)
    now = time.time()
    db = table._open()
    db.execute("BEGIN")
    db.executemany("INSERT INTO triplets VALUES (?, ?, ?, ?, ?, ?)",
                   ((f"10.{i >> 16 & 255}.{i >> 8 & 255}.0/24", f"s{i}@example.net",
                     "bob@test.example", now - 600, now - 300, now + 86400 * 30)
                    for i in range(rows)))
    db.execute("COMMIT")
    table.check("192.0.2.0/24", "known@example.net", "bob@test.example", now=now - 10)
    table.check("192.0.2.0/24", "known@example.net", "bob@test.example", now=now)
    start = time.perf_counter()
    for _ in range(calls):
        state, _ = table.check("192.0.2.0/24", "known@example.net", "bob@test.example")
    known = (time.perf_counter() - start) / calls
    assert state == greylist.KNOWN
    start = time.perf_counter()
    for i in range(calls):
        state, _ = table.check("192.0.2.0/24", f"new{i}@example.net", "bob@test.example")
    new = (time.perf_counter() - start) / calls
    assert state == greylist.NEW
    table.close()
    code = ("import time; t = time.perf_counter(); import sys; sys.path.insert(0, %r); "
            "from masq import greylist; g = greylist.Greylist(%r); g._open(); "
            "print(time.perf_counter() - t)") % (sys.path[0], spool)
    opens = [float(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                  check=True).stdout) for _ in range(5)]
    return known, new, statistics.median(opens)


def session_cpu(folder, rcpts):
    data = b"EHLO bench.example\r\nMAIL FROM:<known@example.net>\r\n" + b"".join(
        b"RCPT TO:<r%d@test.example>\r\n" % i for i in range(rcpts)) + b"QUIT\r\n"
    env = {"PATH": os.environ["PATH"], "MASQ_CONF": os.path.join(folder, "masq.toml"),
           "TCPREMOTEIP": "192.0.2.7"}
    p = subprocess.Popen([os.path.join(BIN, "masq-smtpd")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    p.stdin.write(data)
    p.stdin.close()
    out = p.stdout.read()
    p.stdout.close()
    _, _, usage = os.wait4(p.pid, 0)
    return usage.ru_utime + usage.ru_stime, out


def sessions(tmp, rcpts):
    folder = os.path.join(tmp, "masq")
    subprocess.run([os.path.join(BIN, "masq-setup"), "local-only", folder,
                    "--hostname", "test.example"], check=True, capture_output=True)
    conf = os.path.join(folder, "masq.toml")
    with open(conf) as f:
        base = f.read()
    results = {}
    for name, extra in (("off", ""), ("on", "greylist = true\ngreylist_delay = 0\n")):
        with open(conf, "w") as f:
            f.write(base + "\n[smtpd]\nrelay_nets = []\n" + extra)
        session_cpu(folder, rcpts)          # the table filled, caches warm
        for count in (1, rcpts):
            cpu = []
            for _ in range(7):
                seconds, out = session_cpu(folder, count)
                assert out.count(b"250 2.1.5") == count, out[-300:]
                cpu.append(seconds)
            results[name, count] = statistics.median(cpu)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100000)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rcpts", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        known, new, opened = in_process(tmp, args.rows, args.calls)
        print(f"check(), table of {args.rows} rows: known triplet {known * 1e6:.0f} us, "
              f"new triplet {new * 1e6:.0f} us; first open {opened * 1e3:.1f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        cpu = sessions(tmp, args.rcpts)
    r = args.rcpts
    fixed = cpu["on", 1] - cpu["off", 1]
    per = ((cpu["on", r] - cpu["on", 1]) - (cpu["off", r] - cpu["off", 1])) / (r - 1)
    print(f"masq-smtpd CPU, greylist off / on: 1 RCPT {cpu['off', 1] * 1e3:.1f} / "
          f"{cpu['on', 1] * 1e3:.1f} ms, {r} RCPTs {cpu['off', r] * 1e3:.1f} / "
          f"{cpu['on', r] * 1e3:.1f} ms: {fixed * 1e3:.1f} ms a session, "
          f"{per * 1e6:.0f} us per RCPT of a passed triplet")


if __name__ == "__main__":
    main()
