#!/usr/bin/env python3
"""masq's half of ../shared/tools/peers/side_by_side.sh, for one or more work trees in turn.

Usage: python3 bench/side_by_side.py [--rounds N] [--port P] [--args ARGS] TREE...

For each TREE (its .venv made by `make install`), as side_by_side.sh runs
masq: a folder made by `masq-setup local-only`, masq-send running, and
masq-tcpserver HOST PORT masq-smtpd with the options the tree's Makefile
`run` target gives it (--args overrides them: --args "-m 1" for one
process per connection); then the same four measures with the same
scripts (../shared/tools/peers): submit_local.py (200 `sendmail -i` calls,
delivered), smtp_source.py with 1 and 10 clients (a connection per
message), lib/cmdtime.py (one `sendmail -i` call, 30 runs).  Each round
measures every tree once, in turn, and the order flips every round, so
the noise of a shared machine falls on every tree alike.

Besides the four figures it reads, around each measure, the CPU of every
masq process from /proc (self, reaped children, and children still
alive), per message: masq-send (the queue runner and local delivery),
masq-tcpserver (the listener alone) and its masq-smtpd children, and the
sendmail calls (their own rusage, from submit_local.py).  Prints the
medians over the rounds as a Markdown table, and each round on stderr.
Do not run side_by_side.sh itself beside other work: it installs Postfix,
which takes /usr/sbin/sendmail over.
"""
import argparse
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.normpath(os.path.join(HERE, os.pardir, os.pardir, "shared", "tools", "peers"))
SMTP_SOURCE = os.path.expanduser("~/.cache/masq-bench-tools/bin/smtp-source")
USER = os.environ.get("BENCH_USER", "benchu")
TICKS = os.sysconf("SC_CLK_TCK")
ROWS = [("local: 200 sendmail calls, delivered", "msg/s"), ("smtp: 1 client", "msg/s"),
        ("smtp: 10 clients", "msg/s"), ("one sendmail call", "ms")]


def cpu_seconds(pid):
    """CPU of a process: its own, its reaped children's, and its live children's."""
    total = 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total = sum(int(x) for x in fields[11:15]) / TICKS     # utime stime cutime cstime
    except OSError:
        return 0.0
    for child in children(pid):
        total += cpu_seconds(child)
    return total


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def listener_args(tree):
    """masq-tcpserver's options in the tree's `make run` line (before HOST)."""
    with open(os.path.join(tree, "Makefile")) as f:
        m = re.search(r"masq-tcpserver((?: -\w+(?: \d+)?)*) 127\.0\.0\.1", f.read())
    return m[1].split() if m else []


class Masq:
    """One tree's masq as side_by_side.sh starts it, in a fresh folder."""

    def __init__(self, tree, port, args, nice=None):
        self.tree, self.port = tree, port
        self.dir = tempfile.mkdtemp(prefix="masq-sbs-")
        venv = os.path.join(tree, ".venv", "bin")
        folder = os.path.join(self.dir, "m")
        subprocess.run([f"{venv}/masq-setup", "local-only", folder], check=True,
                       capture_output=True)
        env = dict(os.environ, MASQ_CONF=f"{folder}/masq.toml")
        self.log = open(os.path.join(self.dir, "daemons.log"), "wb")
        self.send = subprocess.Popen([f"{venv}/masq-send"], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        largs = listener_args(tree) if args is None else shlex.split(args)
        self.srv = subprocess.Popen([f"{venv}/masq-tcpserver", *largs, "127.0.0.1", str(port),
                                     f"{venv}/masq-smtpd"], env=env, stdout=self.log,
                                    stderr=subprocess.STDOUT)
        self.largs = largs
        self.sendmail = f"{folder}/bin/sendmail"
        self.maildir = f"{folder}/mail/{USER}"
        time.sleep(2)
        if nice is not None:            # as if the daemon ran at this nice value (after
            os.setpriority(os.PRIO_PROCESS, self.send.pid, nice)    # it set its own)

    def cpu(self):
        """(masq-send, listener alone, smtpd children) CPU seconds so far."""
        listener = cpu_seconds(self.srv.pid)
        try:
            with open(f"/proc/{self.srv.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            own = sum(int(x) for x in fields[11:13]) / TICKS
        except OSError:
            own = 0.0
        return cpu_seconds(self.send.pid), own, listener - own

    def stop(self):
        for p in (self.srv, self.send):
            p.send_signal(signal.SIGTERM)
        for p in (self.srv, self.send):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.log.close()
        subprocess.run(["rm", "-rf", self.dir])


def peer(script, env, pattern):
    """Run one peer script; the figures its last line names."""
    out = subprocess.run([sys.executable, os.path.join(PEERS, script)], env=env,
                         capture_output=True, text=True)
    found = {}
    for key in pattern:
        m = re.search(rf"{key}=([\d.]+)", out.stdout)
        if not m:
            sys.exit(f"{script}: no {key} in:\n{out.stdout}{out.stderr[-3000:]}")
        found[key] = float(m[1])
    return found


def one_round(masq):
    """The four measures, each with its CPU per message per process."""
    base = dict(os.environ, RCPT=f"{USER}@localhost", MAILDIR=masq.maildir, REPEATS="1",
                TIMEOUT="120", BENCH_USER=USER)
    results = []
    c0 = masq.cpu()
    r = peer("submit_local.py", dict(base, SENDMAIL=masq.sendmail, N="200", LABEL="mq"),
             ["mq_e2e_rate", "sendmail_cpu_ms", "system_cpu_ms_per_msg"])
    c1 = masq.cpu()
    results.append((r["mq_e2e_rate"], per_message(c0, c1, 200),
                    r["sendmail_cpu_ms"], r["system_cpu_ms_per_msg"]))
    for sessions, messages in ((1, 300), (10, 500)):
        c0 = masq.cpu()
        r = peer("smtp_source.py", dict(base, SMTP_SOURCE=SMTP_SOURCE, SMTP_PORT=str(masq.port),
                                        SESSIONS=str(sessions), MESSAGES=str(messages),
                                        LABEL="mq"),
                 ["mq_accept_rate", "system_cpu_ms_per_msg"])
        c1 = masq.cpu()
        results.append((r["mq_accept_rate"], per_message(c0, c1, messages), 0.0,
                        r["system_cpu_ms_per_msg"]))
    out = subprocess.run([sys.executable, os.path.join(PEERS, "lib", "cmdtime.py"), "--runs",
                          "30", "--name", "c", "--", masq.sendmail, "-i", f"{USER}@localhost"],
                         capture_output=True, text=True).stdout
    wall, cpu = (float(re.search(rf"{k}=([\d.]+)", out)[1]) for k in ("c_wall_ms", "cpu_ms"))
    results.append((wall, (0.0, 0.0, 0.0), cpu, 0.0))
    return results


def per_message(c0, c1, n):
    return tuple((b - a) * 1000 / n for a, b in zip(c0, c1, strict=True))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trees", nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=2625)
    ap.add_argument("--args", action="append",
                    help="masq-tcpserver options for the tree in the same place")
    ap.add_argument("--nice", action="append",
                    help="the nice value of masq-send for the tree in the same place "
                         "(- for the daemon's own)")
    args = ap.parse_args()
    trees = [os.path.abspath(t) for t in args.trees]
    largs = (args.args or []) + [None] * (len(trees) - len(args.args or []))
    nices = [None if n in (None, "-") else int(n) for n in (args.nice or [])]
    nices += [None] * (len(trees) - len(nices))
    names = [f"{os.path.basename(t)}{' ' + a if a is not None else ''}"
             f"{f' nice {n}' if n is not None else ''}"
             for t, a, n in zip(trees, largs, nices, strict=True)]
    found = {n: [] for n in names}
    load0 = os.getloadavg()
    started = time.monotonic()
    for r in range(args.rounds):
        order = list(range(len(trees)))[::1 if r % 2 == 0 else -1]
        for i in order:
            masq = Masq(trees[i], args.port + i, largs[i], nices[i])
            try:
                res = one_round(masq)
            finally:
                masq.stop()
            found[names[i]].append(res)
            print(f"round {r + 1} {names[i]} ({' '.join(masq.largs)}): "
                  + "  ".join(f"{x[0]:.1f}" for x in res), file=sys.stderr, flush=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}: {args.rounds} rounds in "
          f"{time.monotonic() - started:.0f} s, trees in turn; load average "
          f"{load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    print("| measure | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for k, (row, unit) in enumerate(ROWS):
        cells = []
        for n in names:
            vals = [res[k][0] for res in found[n]]
            cells.append(f"{statistics.median(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})")
        print(f"| {row}, {unit} | " + " | ".join(cells) + " |")
    print("\nCPU per message (ms, medians): masq-send / masq-tcpserver itself / its "
          "masq-smtpd children / the sendmail processes / the whole machine\n")
    print("| measure | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for k, (row, _) in enumerate(ROWS):
        cells = []
        for n in names:
            rows = [res[k] for res in found[n]]
            parts = [[x[1][0] for x in rows], [x[1][1] for x in rows], [x[1][2] for x in rows],
                     [x[2] for x in rows], [x[3] for x in rows]]
            cells.append(" / ".join(f"{statistics.median(p):.2f}" for p in parts))
        print(f"| {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
