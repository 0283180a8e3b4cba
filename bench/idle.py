#!/usr/bin/env python3
"""Measure an idle masq-send daemon: its memory and how often it wakes up.

Usage: python3 bench/idle.py [--seconds N] [--detect WORD] [--lib DIR]

Makes a folder with masq-setup local-only in a temporary folder, adds a
route `isp` (to 127.0.0.1:9, where nothing listens: a delivery is refused at once) and
[online] detect = WORD (default "file"; "always", "link", "command"),
starts `masq-send -C FOLDER/masq.toml` and waits for its log line "daemon
started", then 2 s more.  Then, over N seconds (default 60) each:
  - VmRSS, RssAnon and RssFile from /proc/PID/status;
  - wake-ups: the growth of voluntary_ctxt_switches + nonvoluntary_ctxt_switches
    (/proc/PID/status) with nothing attached to the process, per minute;
  - system calls: `strace -f -c -p PID` for N seconds (when strace is there;
    attaching interrupts the select() under way, so strace's own restart of
    it is left out: restart_syscall, or the one select/pselect6 it restarts);
  - VmRSS after masq.toml is changed (the daemon reads it again);
  - detect = "file": a message for the route is queued (it waits), then
    `echo isp > online`: the time until the log shows its delivery attempt,
    and VmRSS after it; then VmRSS after one local delivery.
--lib DIR runs masq-send from another tree's lib/ with this venv's python
(the "before" figures: `git archive HEAD | tar -x -C /tmp/before`).
Prints a Markdown table for bench/README.md.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_BIN = os.path.join(HERE, "..", ".venv", "bin")


def status(pid):
    """/proc/PID/status as {field: first word}."""
    with open(f"/proc/{pid}/status") as f:
        return {k: v.split()[0] for k, _, v in (line.partition(":") for line in f) if v.split()}


def switches(pid):
    s = status(pid)
    return int(s["voluntary_ctxt_switches"]) + int(s["nonvoluntary_ctxt_switches"])


def wait_for(predicate, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def log_has(path, text):
    try:
        with open(path) as f:
            return text in f.read()
    except FileNotFoundError:
        return False


def strace_calls(pid, seconds):
    """System calls strace -c counts over `seconds`, less the one it restarts on attach."""
    if not shutil.which("strace"):
        return None
    out = tempfile.NamedTemporaryFile(suffix=".strace", delete=False).name
    p = subprocess.Popen(["strace", "-f", "-c", "-o", out, "-p", str(pid)],
                         stderr=subprocess.DEVNULL)
    time.sleep(seconds)
    p.terminate()
    p.wait()
    calls = 0
    with open(out) as f:
        for line in f:
            cols = line.split()
            if len(cols) >= 5 and cols[-1] not in ("syscall", "total") and cols[3].isdigit():
                calls += int(cols[3])
    os.unlink(out)
    return max(0, calls - 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--detect", default="file")
    ap.add_argument("--lib", help="another tree's lib/")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="masq-idle-")
    folder = os.path.join(work, "masq")
    subprocess.run([os.path.join(VENV_BIN, "masq-setup"), "local-only", folder,
                    "--hostname", "idle.example"], check=True, stdout=subprocess.DEVNULL)
    conf = os.path.join(folder, "masq.toml")
    with open(conf) as f:
        text = f.read()
    text = text.replace('detect = "always"', f'detect = "{args.detect}"')
    if args.detect == "command":
        text = text.replace("[online]\n", '[online]\ncommand = "cat online"\n')
    text += '\n[route.isp]\nhost = "127.0.0.1:9"\n'
    with open(conf, "w") as f:
        f.write(text)
    env = {"PATH": "/usr/bin:/bin", "MASQ_CONF": conf, "HOME": work}
    if args.lib:
        site = subprocess.run([os.path.join(VENV_BIN, "python"), "-c",
                               "import setproctitle, os; print(os.path.dirname("
                               "os.path.dirname(setproctitle.__file__)))"],
                              capture_output=True, text=True, check=True).stdout.strip()
        argv = [os.path.join(VENV_BIN, "python"), "-IS", "-c",
                f"import sys; sys.path[:0] = [{args.lib!r}, {site!r}]; "
                "sys.argv[0] = 'masq-send'; from masq.cmd.send import main; "
                "from masq.program import run; sys.exit(run(main))", "-C", conf]
    else:
        argv = [os.path.join(VENV_BIN, "masq-send"), "-C", conf]
    # any program run after the edit parses the file and keeps the marshal cache
    # (masq.config), as masq-setup check or the first sendmail would
    subprocess.run([os.path.join(VENV_BIN, "masq-queue"), "list"], env=env,
                   stdout=subprocess.DEVNULL, check=True)
    log = os.path.join(folder, "masq.log")
    daemon = subprocess.Popen(argv, env=env, cwd=folder)
    rows = []
    try:
        if not wait_for(lambda: log_has(log, "daemon started")):
            sys.exit("masq-send did not start")
        time.sleep(2)
        s = status(daemon.pid)
        rows.append(("VmRSS after start (RssAnon + RssFile)",
                     f"{int(s['VmRSS']) / 1024:.1f} MiB ({int(s['RssAnon']) / 1024:.1f} + "
                     f"{int(s['RssFile']) / 1024:.1f})"))
        before = switches(daemon.pid)
        time.sleep(args.seconds)
        woken = switches(daemon.pid) - before
        rows.append((f"wake-ups (context switches) in {args.seconds:.0f} s",
                     f"{woken} ({woken * 60 / args.seconds:.1f}/min)"))
        calls = strace_calls(daemon.pid, args.seconds)
        if calls is not None:
            rows.append((f"system calls in {args.seconds:.0f} s (strace -c)", str(calls)))
        with open(conf, "a") as f:
            f.write("# changed\n")
        if wait_for(lambda: log_has(log, "read again"), 5):
            time.sleep(0.5)
            rows.append(("VmRSS after masq.toml changed (read again: tomllib)",
                         f"{int(status(daemon.pid)['VmRSS']) / 1024:.1f} MiB"))
        user = os.environ.get("USER", "root")
        if args.detect == "file":
            # mail for the route waits; the route comes up: its delivery starts
            subprocess.run([os.path.join(folder, "bin", "sendmail"), "someone@remote.example"],
                           env=env, input=b"Subject: idle\n\nhello\n", check=True)
            time.sleep(1)
            start = time.time()
            with open(os.path.join(folder, "online"), "w") as f:
                f.write("isp\n")
            if wait_for(lambda: log_has(log, "relay=isp"), 10):
                rows.append(("`echo isp > online` to the delivery's log line (connection "
                             "refused)", f"{(time.time() - start) * 1000:.0f} ms"))
            time.sleep(1)
            rows.append(("VmRSS after that SMTP attempt",
                         f"{int(status(daemon.pid)['VmRSS']) / 1024:.1f} MiB"))
        maildir = os.path.join(folder, "mail", user, "new")
        subprocess.run([os.path.join(folder, "bin", "sendmail"), user], env=env,
                       input=b"Subject: idle\n\nhello\n", check=True)
        wait_for(lambda: os.path.isdir(maildir) and any(os.scandir(maildir)))
        time.sleep(1)
        rows.append(("VmRSS after one local delivery",
                     f"{int(status(daemon.pid)['VmRSS']) / 1024:.1f} MiB"))
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(work, ignore_errors=True)
    print(f"| masq-send, detect = \"{args.detect}\"{' (' + args.lib + ')' if args.lib else ''} "
          "| |")
    print("| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
