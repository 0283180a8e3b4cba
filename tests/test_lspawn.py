"""masq-lspawn: the request framing and its refusals, then one request run as a user.

The refusals need root (masq-lspawn runs only as root) but no user of their
own: nothing is started for a refused request.  The last test runs a real
request in a throwaway root (tests/sysroot.py).
"""
import os
import socket
import subprocess

import pytest
from conftest import BIN, clean_env

from masq import install

pytest_plugins = ["sysroot"]        # the sysroot fixture

LSPAWN = os.path.join(BIN, "masq-lspawn")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="masq-lspawn runs only as root")


def netstring(data):
    return b"%d:%s," % (len(data), data)


def read_answer(sock):
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        length, colon, rest = data.partition(b":")
        if colon and len(rest) > int(length):
            assert rest[int(length):] == b","
            return rest[:int(length)]
    return None


class Spawner:
    """masq-lspawn with a socketpair on fd 0, as masq-send starts it."""

    def __init__(self, conf, popen=subprocess.Popen, argv=(LSPAWN,)):
        self.sock, theirs = socket.socketpair()
        self.proc = popen([*argv, "-C", str(conf)], stdin=theirs, stderr=subprocess.PIPE,
                          env=clean_env())
        theirs.close()
        self.message = open(os.devnull, "rb")

    def ask(self, fields, fds=None):
        frame = netstring(b"\0".join(fields))
        socket.send_fds(self.sock, [frame], [self.message.fileno()] if fds is None else fds)
        return read_answer(self.sock)

    def close(self):
        self.sock.close()
        self.message.close()
        rc = self.proc.wait(10)
        self.proc.stderr.close()
        return rc


@pytest.fixture
def spawner(tmp_path):
    conf = tmp_path / "masq.toml"
    conf.write_text('user = "masq"\n[local]\nmailbox = "mbox"\n')
    s = Spawner(conf)
    yield s
    s.sock.close()
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait()


REQUEST = [b"QID", b"someone@example.org", b"mailbox:x", b"x@localhost"]


@needs_root
def test_root_is_refused_and_the_spawner_goes_on(spawner):
    assert spawner.ask([b"root", *REQUEST]) == b"!refusing to deliver as root: uid or gid 0"
    assert spawner.ask([b"no-such-user-here", *REQUEST]) == b"!no such user: no-such-user-here"
    assert spawner.close() == 0         # EOF: it exits


@needs_root
def test_a_request_without_the_message_descriptor_is_refused(spawner):
    assert spawner.ask([b"nobody", *REQUEST], fds=[]).startswith(b"!the request needs exactly")
    assert spawner.ask([b"nobody", b"QID"]).startswith(b"!the request needs USER QID")
    assert spawner.close() == 0


@needs_root
def test_an_oversize_request_is_answered_and_ends_the_spawner(spawner):
    socket.send_fds(spawner.sock, [b"70000:" + b"x" * 100], [spawner.message.fileno()])
    assert read_answer(spawner.sock) == b"!a request is at most 65536 bytes"
    assert spawner.proc.wait(10) == 111


@needs_root
def test_bytes_that_are_no_netstring_end_the_spawner(spawner):
    spawner.sock.sendall(b"hello\n")
    assert read_answer(spawner.sock) == b"!a request must be a netstring"
    assert spawner.proc.wait(10) == 111


@needs_root
def test_sigterm_when_idle_ends_it(spawner):
    assert spawner.ask([b"root", *REQUEST]).startswith(b"!")     # it is up and waiting
    spawner.proc.terminate()
    assert spawner.proc.wait(10) == 0


def test_it_refuses_to_run_unless_root(tmp_path):
    conf = tmp_path / "masq.toml"
    conf.write_text("")
    r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                        LSPAWN, "-C", str(conf)], capture_output=True, stdin=subprocess.DEVNULL,
                       env=clean_env()) if os.geteuid() == 0 else \
        subprocess.run([LSPAWN, "-C", str(conf)], capture_output=True, env=clean_env())
    assert r.returncode == 111 and b"must run as root" in r.stderr, r


def test_a_request_runs_masq_local_as_the_user(sysroot):
    sysroot.run(["rm", "-f", *[path for path, _ in install.LINKS]]).ok()
    sysroot.adduser("bob")
    sysroot.run("printf 'postmaster: bob\\nroot: bob\\n' > /etc/aliases").ok()
    sysroot.run(["masq-setup", "system", "local-only", "--hostname", "test.example"]).ok()
    sysroot.run("printf 'Subject: hi\\n\\nbody\\n' > /var/tmp/msg && chmod 600 /var/tmp/msg"
                ).ok()
    s = Spawner("/etc/masq/masq.toml", popen=sysroot.popen, argv=(LSPAWN,))
    with open(sysroot.path("/var/tmp/msg"), "rb") as message:
        answer = s.ask([b"bob", b"QID", b"someone@example.org", b"mailbox:bob",
                        b"bob@test.example", b"|id -u -n; id -g -n; umask; pwd; env | sort",
                        b"bob@test.example"], fds=[message.fileno()])
    status, _, output = answer.partition(b"\0")
    assert status == b"0", answer
    lines = output.decode().splitlines()
    assert lines[0] == "K delivered to mbox /var/mail/bob", lines
    assert lines[1] == "K delivered to program id", lines
    assert os.stat(sysroot.path("/var/mail/bob")).st_mode & 0o777 == 0o660
    assert s.close() == 0


def test_a_command_never_runs_with_the_mail_group(sysroot):
    sysroot.run(["rm", "-f", *[path for path, _ in install.LINKS]]).ok()
    sysroot.adduser("bob")
    sysroot.run("printf 'postmaster: bob\\nroot: bob\\n' > /etc/aliases").ok()
    sysroot.run(["masq-setup", "system", "local-only", "--hostname", "test.example"]).ok()
    sysroot.run("printf 'Subject: hi\\n\\nbody\\n' > /var/tmp/msg").ok()
    s = Spawner("/etc/masq/masq.toml", popen=sysroot.popen, argv=(LSPAWN,))
    with open(sysroot.path("/var/tmp/msg"), "rb") as message:
        answer = s.ask([b"bob", b"QID", b"", b"|id > $HOME/ids; umask >> $HOME/ids; pwd >> "
                        b"$HOME/ids; env | sort >> $HOME/ids", b"bob@test.example",
                        b"/var/mail/alice", b"bob@test.example"],
                       fds=[message.fileno()])
    assert answer.startswith(b"0\0K delivered to program id\nZ "), answer
    assert not os.path.exists(sysroot.path("/var/mail/alice"))
    with open(sysroot.path("/home/bob/ids")) as f:
        ids, umask, cwd, *env = f.read().splitlines()
    assert "mail" not in ids and ids.startswith("uid="), ids
    assert umask == "0077" and cwd == "/home/bob"
    names = {line.partition("=")[0] for line in env}
    assert {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "MASQ_CONF"} <= names, env
    assert s.close() == 0
