"""Local delivery by LMTP into Dovecot ([local] mailbox = "lmtp").

Dovecot's own LMTP server (dovecot-lmtpd) runs in the foreground from a
configuration written here: a Unix socket in tmp_path and 127.0.0.1 on a
port picked here, a passwd-file userdb, maildir mailboxes read back with
Python's mailbox module.  The mailboxes live in a folder of their own under
/tmp: Dovecot refuses to deliver as root, and the user it delivers as
(nobody, when the tests run as root) cannot enter pytest's tmp_path.  The
quota plugin with quota_full_tempfail makes Dovecot answer 452 for a
mailbox that is full.
"""
import io
import mailbox
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

import pytest
from conftest import Masq, clean_env, free_port, reap, run

from masq import config, local

MESSAGE = (b"From: Alice <alice@test.example>\nTo: bob@test.example\nSubject: by lmtp\n"
           b"Message-ID: <lmtp-1@test.example>\n\n.a line with a dot\n\xc3\xa9t\xc3\xa9\n"
           b"From here on\n")
BODY = MESSAGE.split(b"\n\n", 1)[1]
DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
START_SECONDS = 30

CONF = """\
protocols = lmtp
base_dir = {run}
state_dir = {state}
log_path = {log}
instance_name = masq-test-{port}
ssl = no
listen = 127.0.0.1
default_internal_user = {me}
default_internal_group = {group}
default_login_user = {me}
first_valid_uid = 0
mail_location = maildir:{mail}/%n
mail_plugins = $mail_plugins quota
lmtp_rcpt_check_quota = yes
quota_full_tempfail = yes
passdb {{
  driver = passwd-file
  args = {users}
}}
userdb {{
  driver = passwd-file
  args = {users}
  default_fields = uid={uid} gid={gid} home={mail}/%n
}}
plugin {{
  quota = maildir:User quota
}}
service lmtp {{
  unix_listener {socket} {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
service anvil {{
  chroot =
}}
"""
USERS = ("alice", "bob", "dan", "carol:userdb_quota_rule=*:storage=1B")


class Dovecot:
    """dovecot -F with LMTP on a Unix socket and on 127.0.0.1:port."""

    def __init__(self, tmp_path):
        self.socket = str(tmp_path / "dovecot-lmtp")
        self.users = str(tmp_path / "dovecot-users")
        self.log = str(tmp_path / "dovecot.log")
        self.mail = tempfile.mkdtemp(prefix="masq-dovecot-")
        os.chmod(self.mail, 0o755)
        if os.geteuid() == 0:       # Dovecot delivers as no one's root
            user = pwd.getpwnam("nobody")
            uid, gid = user.pw_uid, user.pw_gid
            os.chown(self.mail, uid, gid)
        else:
            uid, gid = os.getuid(), os.getgid()
        self.port = free_port()
        with open(self.users, "w") as f:
            for entry in USERS:
                name, _, extra = entry.partition(":")
                f.write(f"{name}:{{PLAIN}}secret::::::{extra}\n")
        for sub in ("run", "state"):
            os.makedirs(tmp_path / f"dovecot-{sub}")
        conf = str(tmp_path / "dovecot.conf")
        me = pwd.getpwuid(os.getuid())
        with open(conf, "w") as f:
            f.write(CONF.format(run=tmp_path / "dovecot-run", state=tmp_path / "dovecot-state",
                                log=self.log, port=self.port, me=me.pw_name,
                                group=_group_name(os.getgid()), mail=self.mail,
                                users=self.users, uid=uid, gid=gid, socket=self.socket))
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", conf], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self):
        """Until both listeners take a connection (Dovecot prints no readiness line)."""
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited: {self.proc.stdout.read()!r} "
                                   f"{open(self.log).read() if os.path.exists(self.log) else ''}")
            try:
                for family, where in ((socket.AF_UNIX, self.socket),
                                      (socket.AF_INET, ("127.0.0.1", self.port))):
                    with socket.socket(family, socket.SOCK_STREAM) as s:
                        s.settimeout(5)
                        s.connect(where)
                        assert s.recv(100).startswith(b"220 ")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def messages(self, user):
        """The messages in a user's Dovecot maildir."""
        folder = os.path.join(self.mail, user)
        if not os.path.isdir(folder):
            return []
        return list(mailbox.Maildir(folder, create=False))

    def raw(self, user):
        """The bytes of each message file of a user's maildir."""
        new = os.path.join(self.mail, user, "new")
        out = []
        for name in sorted(os.listdir(new)):
            with open(os.path.join(new, name), "rb") as f:
                out.append(f.read())
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        reap(self.proc)
        shutil.rmtree(self.mail, ignore_errors=True)


def _group_name(gid):
    import grp
    return grp.getgrgid(gid).gr_name


@pytest.fixture
def dovecot(tmp_path):
    server = Dovecot(tmp_path)
    yield server
    server.stop()


def lmtp_folder(tmp_path, where, deliver="in-process"):
    folder = str(tmp_path / "masq")
    run(["masq-setup", "local-only", folder, "--hostname", "test.example"]).ok()
    masq = Masq(folder)
    text = open(masq.conf).read()
    assert 'mailbox = "maildir"' in text
    masq.set_config(text.replace('mailbox = "maildir"', f'mailbox = "lmtp"\nlmtp = "{where}"\n'
                                 f'deliver = "{deliver}"'))
    with open(os.path.join(folder, "aliases"), "a") as f:
        f.write("robert: dan\n")
    return masq


def cmd(masq, name, *args, input=b""):
    return run([masq.bin(name), *args], input=input, env=clean_env())


def send(masq, *rcpts, sender="alice@test.example"):
    cmd(masq, "sendmail", "-odq", "-f", sender, *rcpts, input=MESSAGE).ok()


@pytest.mark.parametrize("deliver", ["in-process", "child"])
def test_two_local_recipients_through_the_unix_socket(dovecot, tmp_path, deliver):
    masq = lmtp_folder(tmp_path, dovecot.socket, deliver)
    send(masq, "bob@test.example", "robert@test.example")     # robert: an alias of dan
    cmd(masq, "runq").ok()
    assert masq.queue_ids() == []
    for user in ("bob", "dan"):
        [msg] = dovecot.messages(user)
        assert msg["Subject"] == "by lmtp" and msg["Return-Path"] == "<alice@test.example>"
        [raw] = dovecot.raw(user)
        assert raw.endswith(b"\n\n" + BODY)             # the body, byte for byte
    assert masq.log().count("status=sent") == 2 and "Saved" in masq.log()
    assert not os.path.exists(os.path.join(masq.dir, "mail", "bob"))   # not masq's maildir


def test_host_and_port(dovecot, tmp_path):
    masq = lmtp_folder(tmp_path, f"127.0.0.1:{dovecot.port}")
    send(masq, "bob@test.example", "dan@test.example")
    cmd(masq, "runq").ok()
    assert len(dovecot.messages("bob")) == 1 and len(dovecot.messages("dan")) == 1
    assert masq.queue_ids() == []
    assert f"local, LMTP 127.0.0.1:{dovecot.port} as bob".encode() in cmd(
        masq, "sendmail", "-bv", "bob@test.example").ok().out


def test_an_unknown_user_bounces_only_that_one(dovecot, tmp_path):
    masq = lmtp_folder(tmp_path, dovecot.socket)
    send(masq, "bob@test.example", "nosuch@test.example")
    cmd(masq, "runq").ok()
    assert len(dovecot.messages("bob")) == 1
    line = next(x for x in masq.log().splitlines() if "to=<nosuch@test.example>" in x)
    assert "status=bounced" in line and "550 5.1.1" in line, line
    cmd(masq, "runq").ok()              # the bounce goes to alice, by LMTP too
    [report] = dovecot.messages("alice")
    assert b"nosuch@test.example" in report.as_bytes() and b"550 5.1.1" in report.as_bytes()
    assert len(dovecot.messages("bob")) == 1


def test_a_452_defers_only_that_one(dovecot, tmp_path):
    masq = lmtp_folder(tmp_path, dovecot.socket)
    send(masq, "bob@test.example", "carol@test.example")    # carol's mailbox is full
    cmd(masq, "runq").ok()
    assert len(dovecot.messages("bob")) == 1 and dovecot.messages("carol") == []
    listing = cmd(masq, "mailq").ok().out
    assert b"carol@test.example" in listing and b"452 4.2.2" in listing, listing
    assert b"bob@test.example" not in listing          # done: it is not tried again
    cmd(masq, "runq").ok()              # tried again: carol only, bob once
    assert len(dovecot.messages("bob")) == 1 and dovecot.messages("carol") == []
    assert masq.log().count("to=<bob@test.example>") == 1
    assert masq.log().count("to=<carol@test.example>") == 2


def test_no_server_defers(tmp_path):
    masq = lmtp_folder(tmp_path, str(tmp_path / "no-such-socket"))
    send(masq, "bob@test.example")
    cmd(masq, "runq").ok()
    listing = cmd(masq, "mailq").ok().out
    assert b"no-such-socket" in listing and len(masq.queue_ids()) == 1


def test_system_mode_delivers_lmtp_itself_without_spawning(dovecot, tmp_path):
    masq = lmtp_folder(tmp_path, dovecot.socket)
    conf = config.load(masq.conf)

    def spawn(user, pairs, source):
        raise AssertionError(f"masq-lspawn asked to deliver as {user}: {pairs}")

    answers = local.deliver(conf, "alice@test.example",
                            ["bob@test.example", "robert@test.example", "nosuch@test.example"],
                            lambda: io.BytesIO(MESSAGE), "qid1", spawn=spawn)
    assert [a[0] for a in answers] == ["K", "K", "D"], answers
    assert len(dovecot.messages("bob")) == 1 and len(dovecot.messages("dan")) == 1
