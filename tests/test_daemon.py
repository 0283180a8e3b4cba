"""The masq-send daemon sleeps: no wake-up while idle, events bring routes up.

Each test starts the real daemon on a masq-setup folder with a route `isp`
to a port where nothing listens, so that a delivery attempt is a log line
(`relay=isp`, deferred) as soon as the route is up.
"""
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import BIN, enqueue, free_port, wait_for
from masq import config

MESSAGE = b"From: alice@test.example\nSubject: hello\n\nbody line\n"
# select() or pselect6() on x86_64, pselect6() on arm64: the timeout is the 5th argument
SELECT_CALLS = {"23", "270", "72"}



def with_route(masq, detect, online_keys="", route_keys=""):
    text = open(masq.conf).read().replace('detect = "always"', f'detect = "{detect}"\n'
                                          + online_keys)
    masq.set_config(text + f'\n[route.isp]\nhost = "127.0.0.1:{free_port()}"\n{route_keys}')
    problems = config.check(masq.conf)
    if problems:        # the schema (masq.schema) has to know the keys this test uses
        pytest.fail("masq.toml refused: " + "; ".join(problems))


class Daemon:
    """masq-send as a daemon (argv may start with a wrapper: unshare); stopped by stop()."""

    def __init__(self, masq, prefix=()):
        self.masq = masq
        self.proc = subprocess.Popen([*prefix, os.path.join(BIN, "masq-send")], env=masq.env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert wait_for(lambda: "daemon started" in masq.log()), self.stop()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stderr.read().decode()

    def idle(self):
        """True once the process title says it waits (its first full scan done)."""
        with open(f"/proc/{self.proc.pid}/cmdline", "rb") as f:
            return f.read().startswith(b"masq-send: idle")

    def switches(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)


@pytest.fixture
def daemons():
    started = []
    yield started
    for d in started:
        d.stop()


def attempts(masq):
    return masq.log().count("relay=isp")


def test_an_idle_daemon_sleeps_in_select_without_a_timeout(masq, daemons):
    with_route(masq, "file")
    d = Daemon(masq)
    daemons.append(d)
    assert wait_for(d.idle)
    with open(f"/proc/{d.proc.pid}/syscall") as f:
        call = f.read().split()
    if call[0] not in SELECT_CALLS:
        pytest.skip(f"system call {call[0]}: not select() on this machine")
    assert call[5] == "0x0", f"select() with a timeout: {call}"     # no timeout: forever
    before = d.switches()
    time.sleep(2)           # the measure is the absence of wake-ups over a while
    assert d.switches() == before


def test_echo_isp_to_the_online_file_starts_delivery_within_a_second(masq, daemons):
    with_route(masq, "file")
    d = Daemon(masq)
    daemons.append(d)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@remote.example"]).ok()
    assert wait_for(lambda: masq.queue_ids("active") and d.idle())
    assert attempts(masq) == 0      # the route is down: the mail waits
    online = os.path.join(masq.dir, "online")
    start = time.monotonic()
    with open(online, "w") as f:    # echo isp > online
        f.write("isp\n")
    assert wait_for(lambda: attempts(masq) == 1, 5), masq.log()
    assert time.monotonic() - start < 1.0
    os.unlink(online)               # rm online: down again
    assert wait_for(lambda: masq.log().count("routes up: none") == 2, 5), masq.log()
    with open(online + ".new", "w") as f:
        f.write("isp\n")
    os.rename(online + ".new", online)  # an editor's save: a rename over the file
    assert wait_for(lambda: attempts(masq) == 2, 5), masq.log()


def test_a_changed_masq_toml_is_read_again_and_a_bad_one_is_not_taken(masq, daemons):
    with_route(masq, "file", 'file = "online"')
    d = Daemon(masq)
    daemons.append(d)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@remote.example"]).ok()
    assert wait_for(lambda: masq.queue_ids("active") and d.idle())
    good = open(masq.conf).read()
    masq.set_config(good.replace('file = "online"', 'file = "up"'))
    assert wait_for(lambda: "read again" in masq.log()), masq.log()
    with open(os.path.join(masq.dir, "up"), "w") as f:     # the new online file is watched
        f.write("isp\n")
    assert wait_for(lambda: attempts(masq) == 1, 5), masq.log()
    masq.set_config(good.replace("[online]", "[online"))    # not TOML
    assert wait_for(lambda: "keeping the configuration" in masq.log(), 5), masq.log()
    assert d.proc.poll() is None
    good_copy = os.path.join(masq.dir, "good.toml")    # the same folder: the same spool
    with open(good_copy, "w") as f:
        f.write(good)
    env = masq.env()
    env["MASQ_CONF"] = good_copy
    enqueue(masq, MESSAGE, "alice@test.example", ["carol@localhost"], env=env).ok()
    new = os.path.join(masq.dir, "mail/carol/new")
    assert wait_for(lambda: os.path.isdir(new) and len(os.listdir(new)) == 1)


def in_netns(pid, *argv):
    subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", *argv], check=True)


needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"),
    reason="a network namespace needs root, unshare(1) and ip(8)")


@needs_netns
@pytest.mark.parametrize("keys", [("", ""), ('link = "masq0"', ""),
                                  ("", 'interface = "masq0"')],
                         ids=["default-route", "online.link", "route-interface"])
def test_a_link_coming_up_in_a_network_namespace_starts_delivery(masq, daemons, keys):
    with_route(masq, "link", *keys)
    d = Daemon(masq, ["unshare", "--net"])     # execs masq-send: the same pid
    daemons.append(d)
    pid = d.proc.pid
    in_netns(pid, "ip", "link", "set", "lo", "up")
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@remote.example"]).ok()
    assert wait_for(lambda: masq.queue_ids("active") and d.idle())
    in_netns(pid, "ip", "link", "add", "masq0", "type", "veth", "peer", "name", "masq1")
    in_netns(pid, "ip", "addr", "add", "192.0.2.1/24", "dev", "masq0")
    in_netns(pid, "ip", "link", "set", "masq0", "up")     # no carrier yet: still down
    in_netns(pid, "ip", "route", "add", "default", "via", "192.0.2.254")
    assert attempts(masq) == 0
    in_netns(pid, "ip", "link", "set", "masq1", "up")     # the cable is in
    assert wait_for(lambda: attempts(masq) == 1, 5), masq.log()
