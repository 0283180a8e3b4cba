#!/usr/bin/env python3
"""Measure the pipe transport and LMTP into Dovecot: runq over 200 queued messages.

Usage: .venv/bin/python bench/pipe_lmtp.py [--rounds N] [--count N]

Rows (each the median of N rounds, default 3, in a fresh masq-setup folder):
  pipe to `cat` (the transport's own cost: a fork and exec per message),
  pipe to the `rmail -odq` of a second masq folder (a real gateway: a
  Python program and an fsynced enqueue per message), LMTP into Dovecot
  over its Unix socket, and a maildir of masq's own for reference.
Dovecot (dovecot-lmtpd) runs in the foreground from a configuration written
here; its LMTP deliveries are fsynced by Dovecot (fsync_mode default).
Prints a Markdown table for bench/README.md.
"""
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from local_path import fill, setup  # noqa: E402

BIN = os.path.dirname(sys.executable)
DOVECOT = """protocols = lmtp
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
instance_name = masq-bench-{pid}
ssl = no
listen = 127.0.0.1
default_internal_user = root
default_internal_group = root
default_login_user = root
mail_location = maildir:{mail}/%n
passdb {{
  driver = passwd-file
  args = {d}/users
}}
userdb {{
  driver = passwd-file
  args = {d}/users
  default_fields = uid={uid} gid={gid} home={mail}/%n
}}
service lmtp {{
  unix_listener {d}/lmtp {{
    mode = 0666
  }}
}}
service anvil {{
  chroot =
}}
"""


def runq(env):
    t0 = time.perf_counter()
    subprocess.run([f"{BIN}/masq-send", "--once"], env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def append(env, text):
    with open(env["MASQ_CONF"], "a") as f:
        f.write("\n" + text + "\n")


def pipe_to(command_of, count, extra=""):
    """msg/s of runq piping `count` messages; command_of(tmpdir) is the pipe."""
    with tempfile.TemporaryDirectory() as d:
        env = setup(f"{d}/m")
        append(env, f"[route.gw]\npipe = '{command_of(d)}'\n{extra}")
        fill(env, count, "bob@gw.example")
        wall = runq(env)
        assert not os.listdir(f"{d}/m/spool/active"), "not all delivered"
        return count / wall


def rmail_command(d):
    subprocess.run([f"{BIN}/masq-setup", "local-only", f"{d}/gw", "--hostname",
                    "gw.example"], check=True, capture_output=True)
    return f"{d}/gw/bin/rmail -odq -- {{rcpt}}"


def maildir(count):
    with tempfile.TemporaryDirectory() as d:
        env = setup(f"{d}/m")
        fill(env, count, "bob@localhost")
        return count / runq(env)


def lmtp(count):
    mail = tempfile.mkdtemp(prefix="masq-bench-dovecot-")
    os.chmod(mail, 0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(mail, nobody.pw_uid, nobody.pw_gid)
    with tempfile.TemporaryDirectory() as d:
        for sub in ("run", "state"):
            os.makedirs(f"{d}/{sub}")
        with open(f"{d}/users", "w") as f:
            f.write("bob:{PLAIN}x::::::\n")
        with open(f"{d}/dovecot.conf", "w") as f:
            f.write(DOVECOT.format(d=d, pid=os.getpid(), mail=mail, uid=nobody.pw_uid,
                                   gid=nobody.pw_gid))
        proc = subprocess.Popen(["dovecot", "-F", "-c", f"{d}/dovecot.conf"])
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(f"{d}/lmtp")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            env = setup(f"{d}/m")
            text = open(env["MASQ_CONF"]).read().replace(
                'mailbox = "maildir"', f'mailbox = "lmtp"\nlmtp = "{d}/lmtp"')
            with open(env["MASQ_CONF"], "w") as f:
                f.write(text)
            fill(env, count, "bob@localhost")
            wall = runq(env)
            assert len(os.listdir(f"{mail}/bob/new")) == count
            return count / wall
        finally:
            proc.terminate()
            proc.wait()
            shutil.rmtree(mail, ignore_errors=True)


def main():
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
    count = int(sys.argv[sys.argv.index("--count") + 1]) if "--count" in sys.argv else 200
    rows = [
        ("pipe to `cat` (fork+exec per message)",
         lambda: pipe_to(lambda d: "/bin/sh -c \"exec cat >/dev/null\"", count)),
        ("pipe to a second masq's `rmail -odq`",
         lambda: pipe_to(rmail_command, count, "pipe_fromline = true")),
        ("LMTP into Dovecot (Unix socket)", lambda: lmtp(count)),
        ("maildir of masq's own (reference)", lambda: maildir(count)),
    ]
    print(f"| runq over {count} 4-KiB messages | msg/s (median of {rounds}) | range |")
    print("| --- | ---: | --- |")
    for label, measure in rows:
        rates = [measure() for _ in range(rounds)]
        print(f"| {label} | {statistics.median(rates):.0f} | "
              f"{min(rates):.0f}-{max(rates):.0f} |", flush=True)


if __name__ == "__main__":
    main()
