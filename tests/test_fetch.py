"""masq-fetch against Dovecot's POP3 server on loopback (masq-fetch(8)).

Each test starts its own Dovecot from a file written into tmp_path
(dovecot_helpers): a passwd-file user, a maildir, a certificate from
trustme, ports picked here.
"""
import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest
from conftest import BIN, free_port, listen_trigger, reap
from dovecot_helpers import Dovecot
from smtp_helpers import AioServer, Recorder

pytest_plugins = ["sysroot"]        # the sysroot fixture: system mode as root


@pytest.fixture
def dovecot(tmp_path):
    if not shutil.which("dovecot") or not os.path.exists("/usr/lib/dovecot/pop3"):
        pytest.fail("dovecot-pop3d is not installed: apt-get install dovecot-pop3d "
                    "(make test does)")
    server = Dovecot(str(tmp_path / "dovecot"))
    server.add_user("alice", "alice-secret")
    server.start()
    yield server
    server.stop()


def wait_logged(dovecot, text, seconds=10):
    """Until Dovecot's log has `text`: its log process writes a moment later."""
    deadline = time.monotonic() + seconds
    while text not in dovecot.logged():
        assert time.monotonic() < deadline, dovecot.logged()
        time.sleep(0.02)


def message(n, size=0, extra="", top=""):
    """A message as the ISP stores it: `top` (its own fields, written at delivery)
    above its Received: line, then the sender's header with `extra` in it."""
    body = "".join(f"line {i} of message {n}\n" for i in range(size // 24 + 1))
    return (f"{top}Received: from far.example by mx.isp.example; 7 Dec 2026 06:00:00 +0000\n"
            f"From: carol@far.example\nTo: alice@isp.example\n{extra}Subject: message {n}\n"
            f"Message-ID: <{n}@far.example>\n\n.a line with a leading dot\n{body}").encode()


def account(masq, dovecot, **keys):
    """Route isp with one fetch account for alice; `keys` override or add."""
    secret = os.path.join(masq.dir, "pop.secret")
    with open(secret, "w") as f:
        f.write("alice-secret\n")
    os.chmod(secret, 0o600)
    entry = {"server": f"127.0.0.1:{dovecot.pop3s}", "tls": "pop3s",
             "tls_ca_file": dovecot.ca_file, "user": "alice",
             "password_file": "pop.secret", "deliver_to": "bob"}
    entry.update(keys)
    route = keys.pop("route", "")
    lines = [f"{k} = {_toml(v)}" for k, v in entry.items() if v is not None and k != "route"]
    masq.config(f"[route.isp]\nalways = true\n{route}\n[[route.isp.fetch]]\n"
                + "\n".join(lines))


def _toml(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return f'"{value}"'


def queued(masq):
    """{queue id: spool file bytes} of what is queued."""
    out = {}
    for stage in ("incoming", "active"):
        for qid in os.listdir(os.path.join(masq.spool, stage)):
            with open(os.path.join(masq.spool, stage, qid), "rb") as f:
                out[qid] = f.read()
    return out


@pytest.fixture
def held(masq):
    """A reader on the trigger: what masq-fetch queues stays queued for the test."""
    fd = listen_trigger(masq.spool)
    yield
    os.close(fd)


# -- TLS, delete and keep -----------------------------------------------------

def test_pop3s_fetches_into_the_queue_then_deletes(masq, dovecot, held):
    for n in (1, 2):
        dovecot.put("alice", message(n, top="Return-Path: <carol@far.example>\n"))
    account(masq, dovecot)
    r = masq.run(["masq-fetch", "-v"]).ok()
    assert b"queued as" in r.err
    files = queued(masq)
    assert len(files) == 2 and dovecot.count("alice") == 0
    for data in files.values():
        assert "Received: from 127.0.0.1 (127.0.0.1 [127.0.0.1])\n\tby test.example (masq) " \
               "with POP3S".encode() in data
        assert b"\nsender carol@far.example\nrcpt bob@test.example\n" in data
        assert b"\n.a line with a leading dot\n" in data and b"\r" not in data
        assert b"Return-Path:" not in data      # it is the envelope sender now
    wait_logged(dovecot, "Login: user=<alice>")
    assert masq.run(["masq-fetch"]).ok().err == b""
    assert len(queued(masq)) == 2
    masq.run([masq.bin("runq")]).ok()
    box = masq.maildir("bob")
    assert sorted(m["Subject"] for m in box) == ["message 1", "message 2"]


def test_stls_with_keep_fetches_each_message_once(masq, dovecot, held):
    for n in (1, 2):
        dovecot.put("alice", message(n))
    account(masq, dovecot, server=f"127.0.0.1:{dovecot.pop3}", tls="stls", keep=True)
    masq.run(["masq-fetch"]).ok()
    assert len(queued(masq)) == 2 and dovecot.count("alice") == 2
    masq.run(["masq-fetch"]).ok()
    assert len(queued(masq)) == 2, "a kept message was fetched again"
    dovecot.put("alice", message(3))
    masq.run(["masq-fetch"]).ok()
    assert len(queued(masq)) == 3 and dovecot.count("alice") == 3
    [record] = os.listdir(os.path.join(masq.spool, "fetch"))
    with open(os.path.join(masq.spool, "fetch", record)) as f:
        assert len(f.read().split()) == 3
    assert "1 fetched, 0 left, 2 fetched before (kept)" in masq.log()
    masq.run(["masq-queue", "check"]).ok()


def test_stls_refuses_a_server_whose_certificate_is_not_trusted(masq, dovecot, held):
    dovecot.put("alice", message(1))
    account(masq, dovecot, server=f"127.0.0.1:{dovecot.pop3}", tls="stls", tls_ca_file=None)
    r = masq.run(["masq-fetch"])
    assert r.rc == 75 and b"TLS failed" in r.err and b"Traceback" not in r.err, r
    assert queued(masq) == {} and dovecot.count("alice") == 1


def test_apop_logs_in_without_sending_the_password(masq, dovecot, held):
    dovecot.put("alice", message(1))
    account(masq, dovecot, server=f"127.0.0.1:{dovecot.pop3}", tls="none", apop=True)
    masq.run(["masq-fetch"]).ok()
    assert len(queued(masq)) == 1 and dovecot.count("alice") == 0
    wait_logged(dovecot, "method=APOP")


def test_a_message_over_max_size_stays_on_the_server_and_is_logged(masq, dovecot, held):
    dovecot.put("alice", message(1))
    dovecot.put("alice", message(2, size=20000))
    account(masq, dovecot, max_size=5000)
    masq.run(["masq-fetch"]).ok()
    [data] = queued(masq).values()
    assert b"Subject: message 1\n" in data
    assert dovecot.count("alice") == 1
    assert "left on the server:" in masq.log() and "more than the limit of 5000" in masq.log()


def test_max_count_fetches_that_many_per_run(masq, dovecot, held):
    for n in (1, 2, 3):
        dovecot.put("alice", message(n))
    account(masq, dovecot, max_count=2)
    masq.run(["masq-fetch"]).ok()
    assert len(queued(masq)) == 2 and dovecot.count("alice") == 1


# -- failures -------------------------------------------------------------------

def test_a_wrong_password_is_a_clear_error_and_exit_77(masq, dovecot, held):
    dovecot.put("alice", message(1))
    account(masq, dovecot)
    with open(os.path.join(masq.dir, "pop.secret"), "w") as f:
        f.write("wrong\n")
    r = masq.run(["masq-fetch"])
    assert r.rc == 77, r
    assert b"masq-fetch: fatal: route isp, alice@127.0.0.1:" in r.err
    assert b"login refused for alice" in r.err and b"Traceback" not in r.err
    assert queued(masq) == {} and dovecot.count("alice") == 1


def test_a_password_file_readable_by_others_is_refused(masq, dovecot, held):
    account(masq, dovecot)
    os.chmod(os.path.join(masq.dir, "pop.secret"), 0o644)
    r = masq.run(["masq-fetch"])
    assert r.rc == 78 and b"is readable by others" in r.err, r


def test_no_server_listening_is_a_temporary_failure(masq, dovecot, held):
    account(masq, dovecot, server=f"127.0.0.1:{free_port()}")
    r = masq.run(["masq-fetch"])
    assert r.rc == 75 and b"unable to connect" in r.err, r


def test_a_message_without_a_local_recipient_stays_on_the_server(masq, dovecot, held):
    dovecot.put("alice", message(1, extra="Cc: bob@test.example\n"))
    dovecot.put("alice", message(2, top="Delivered-To: bob@test.example\n"))
    account(masq, dovecot, deliver_to=None)
    masq.run(["masq-fetch"]).ok()
    [data] = queued(masq).values()
    assert b"Subject: message 2\n" in data and b"\nrcpt bob@test.example\n" in data
    assert b"\nsender \n" in data                # no Return-Path: the null sender
    assert dovecot.count("alice") == 1
    assert "left on the server: no Envelope-To, X-Envelope-To, X-Original-To, " \
           "Delivered-To above its first Received: (the server's own): set deliver_to" \
        in masq.log()


class Cutter:
    """A TCP relay to Dovecot that kills the whole server once `after` bytes
    of its answers have passed: the server dies in the middle of a RETR."""

    def __init__(self, dovecot, after):
        self.dovecot, self.after = dovecot, after
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        client, _ = self.sock.accept()
        server = socket.create_connection(("127.0.0.1", self.dovecot.pop3))
        up = threading.Thread(target=self.pump, args=(client, server), daemon=True)
        up.start()
        passed = 0
        while True:
            data = server.recv(65536)
            if not data:
                break
            client.sendall(data)
            passed += len(data)
            if passed >= self.after:
                self.dovecot.kill()
                break
        for s in (client, server):      # shutdown: the pump thread is blocked in recv()
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        up.join(30)
        client.close()
        server.close()

    @staticmethod
    def pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass

    def stop(self):
        self.sock.close()
        self.thread.join(30)


def test_the_server_dying_mid_retr_loses_nothing_and_duplicates_nothing(masq, dovecot, held):
    big = message(1, size=4 * 1024 * 1024)
    dovecot.put("alice", big)
    cutter = Cutter(dovecot, after=1024 * 1024)
    account(masq, dovecot, server=f"127.0.0.1:{cutter.port}", tls="none")
    try:
        r = masq.run(["masq-fetch"])
    finally:
        cutter.stop()
    assert r.rc == 75 and b"connection" in r.err and b"Traceback" not in r.err, r
    assert queued(masq) == {} and os.listdir(os.path.join(masq.spool, "tmp")) == []
    assert dovecot.count("alice") == 1
    dovecot.start()
    with open(masq.conf) as f:
        text = f.read().replace(f"127.0.0.1:{cutter.port}", f"127.0.0.1:{dovecot.pop3}")
    masq.set_config(text)
    masq.run(["masq-fetch"]).ok()
    [data] = queued(masq).values()
    assert data.count(b"\nline 0 of message 1\n") == 1
    assert data.split(b"\n\n", 1)[1].startswith(big.split(b"\n\n", 1)[1])
    masq.run(["masq-fetch"]).ok()
    assert len(queued(masq)) == 1 and dovecot.count("alice") == 0


def test_a_lost_quit_deletes_at_the_next_session_without_fetching_again(masq, dovecot, held):
    """DELE is only done at QUIT: the ids recorded after queuing say the
    messages left on the server by a lost session are ours already."""
    for n in (1, 2):
        dovecot.put("alice", message(n))
    account(masq, dovecot, keep=True)
    masq.run(["masq-fetch"]).ok()           # as if the deletes of this session were lost
    with open(masq.conf) as f:
        masq.set_config(f.read().replace("keep = true", "keep = false"))
    masq.run(["masq-fetch"]).ok()
    assert len(queued(masq)) == 2 and dovecot.count("alice") == 0
    assert "0 fetched, 0 left, 2 fetched before" in masq.log()


# -- the ways it is started -----------------------------------------------------

def test_sendmail_go_route_fetches_for_that_route(masq, dovecot, held):
    dovecot.put("alice", message(1))
    account(masq, dovecot)
    with open(masq.conf) as f:      # the route is not up: -go ROUTE forces it
        masq.set_config(f.read().replace("always = true", "always = false")
                        .replace('detect = "always"', 'detect = "file"'))
    masq.run([masq.bin("sendmail"), "-go"]).ok()
    assert queued(masq) == {}
    masq.run([masq.bin("sendmail"), "-go", "isp"]).ok()
    assert len(queued(masq)) == 1
    r = masq.run([masq.bin("sendmail"), "-go", "nosuch"])
    assert r.rc == 64 and b"no route named nosuch" in r.err


def test_fetch_on_up_fetches_when_the_route_comes_up(masq, dovecot):
    dovecot.put("alice", message(1))
    account(masq, dovecot, route="fetch_on_up = true")
    with open(masq.conf) as f:
        masq.set_config(f.read().replace("always = true", "always = false")
                        .replace('detect = "always"', 'detect = "file"'))
    daemon = subprocess.Popen([os.path.join(BIN, "masq-send"), "-C", masq.conf],
                              env=masq.env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while "daemon started" not in masq.log():
            assert time.monotonic() < deadline and daemon.poll() is None
            time.sleep(0.05)
        assert dovecot.count("alice") == 1
        with open(os.path.join(masq.dir, "online"), "w") as f:
            f.write("isp\n")
        box = os.path.join(masq.dir, "mail", "bob", "new")
        while not (os.path.isdir(box) and os.listdir(box)):
            assert time.monotonic() < deadline, masq.log()
            time.sleep(0.05)
    finally:
        daemon.terminate()
        reap(daemon)
    assert dovecot.count("alice") == 0
    assert "route isp came up: masq-fetch --route isp" in masq.log()


def test_pop_before_smtp_logs_in_before_each_smtp_session(masq, dovecot):
    class Watcher(Recorder):
        def __init__(self):
            super().__init__()
            self.logins_seen = []

        async def handle_EHLO(self, server, session, envelope, hostname, responses):
            # masq waits for this reply: a login it made now would not show up
            # while we wait for Dovecot's log process to write the line
            deadline = time.monotonic() + 10
            while "Login: user=<alice>" not in dovecot.logged() \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            self.logins_seen.append(dovecot.logged().count("Login: user=<alice>"))
            return await super().handle_EHLO(server, session, envelope, hostname, responses)

    handler = Watcher()
    smtp = AioServer(handler)
    try:
        account(masq, dovecot, route=f'host = "127.0.0.1:{smtp.port}"\ntls = "none"\n'
                f'pop_before_smtp = "alice"')
        masq.run([masq.bin("sendmail"), "-odq", "dave@far.example"],
                 input=b"Subject: out\n\nhello\n").ok()
        masq.run([masq.bin("runq")]).ok()
    finally:
        smtp.stop()
    assert handler.logins_seen == [1], dovecot.logged()
    assert [m[1] for m in handler.messages] == [["dave@far.example"]]
    wait_logged(dovecot, "pop3(alice)")


def test_pop_before_smtp_in_masq_smtp_and_a_refused_login_defers(masq, dovecot):
    handler = Recorder()
    smtp = AioServer(handler)
    try:
        account(masq, dovecot, route=f'host = "127.0.0.1:{smtp.port}"\ntls = "none"\n'
                f'pop_before_smtp = "alice"')
        argv = ["masq-smtp", "--route", "isp", "--", "a@test.example", "dave@far.example"]
        r = masq.run(argv, input=b"Subject: one\n\nhello\n").ok()
        assert r.out.startswith(b"K ")
        wait_logged(dovecot, "Login: user=<alice>")
        with open(os.path.join(masq.dir, "pop.secret"), "w") as f:
            f.write("wrong\n")
        r = masq.run(argv, input=b"Subject: two\n\nhello\n").ok()
        assert r.out.startswith(b"Z POP-before-SMTP: login refused for alice"), r
        masq.run([masq.bin("sendmail"), "-odq", "dave@far.example"],
                 input=b"Subject: three\n\nhello\n").ok()
        masq.run([masq.bin("runq")]).ok()
    finally:
        smtp.stop()
    assert [m[2].count(b"Subject: one") for m in handler.messages] == [1]
    assert len(masq.queue_ids()) == 1, "the message refused a POP login waits"
    assert "status=deferred" in masq.log() and "login refused for alice" in masq.log()


# -- configuration, envelope, usage ----------------------------------------------

def test_check_names_the_line_of_a_bad_key_in_a_fetch_entry(masq):
    masq.config('[route.isp]\nalways = true\n\n[[route.isp.fetch]]\nserver = "a"\n'
                'user = "u"\n\n[[route.isp.fetch]]\nserver = "b"\ntls = "pop4"\nkep = true\n')
    r = masq.run(["masq-setup", "check"])
    assert r.rc == 78, r
    lines = open(masq.conf).read().splitlines()
    tls_line = lines.index('tls = "pop4"') + 1
    assert f"masq.toml:{tls_line}: route.isp.fetch.tls must be one of".encode() in r.err
    assert f"masq.toml:{tls_line + 1}: unknown key kep in [[route.isp.fetch]] " \
           "(did you mean keep?)".encode() in r.err


def test_the_envelope_comes_only_from_fields_above_the_first_received():
    import io

    from masq import config, headers
    from masq.cmd import fetch
    conf = config.Config("/x/masq.toml", {"hostname": "h.example",
                                          "local_domains": ["h.example", "lan.example"]})

    class Account:
        deliver_to = None

    def env(text):
        return fetch.envelope(conf, Account, headers.scan(io.BytesIO(text.encode())))
    isp = "Received: from far by mx.isp.example; 7 Dec 2026 06:00:00 +0000\n"
    e = env("Return-Path: <s@x.example>\nX-Original-To: a@h.example\nDelivered-To: "
            "b@h.example\n" + isp + "To: c@h.example\n\n")
    assert (e.sender, e.recipients) == ("s@x.example", ["a@h.example"])
    # the sender's own fields, below the ISP's Received:, choose nothing
    e = env("Delivered-To: b@h.example\n" + isp + "Envelope-To: root@h.example\n"
            "Return-Path: <forged@h.example>\nTo: c@h.example\n\n")
    assert (e.sender, e.recipients) == ("", ["b@h.example"])
    with pytest.raises(fetch.Error, match="above its first Received:"):
        env(isp + "Envelope-To: a@h.example\nTo: Ann <a@h.example>\nCc: b@lan.example\n\n")
    with pytest.raises(fetch.Error, match="above its first Received:"):
        env("Delivered-To: a@h.example\nTo: a@h.example\n\n")      # no Received: at all
    with pytest.raises(fetch.Error, match="Delivered-To: set deliver_to"):
        env("Delivered-To: me@isp.example\n" + isp + "To: a@h.example\n\n")
    many = ", ".join(f"u{i}@h.example" for i in range(101))
    with pytest.raises(fetch.Error, match="more than 100 recipients in its Envelope-To"):
        env(f"Envelope-To: {many}\n" + isp + "\n")
    assert len(env(f"Envelope-To: {many[:many.rindex(',')]}\n" + isp + "\n").recipients) == 100
    Account.deliver_to = "bob"
    assert env("To: x@y.example\n\n").recipients == ["bob@h.example"]


def test_help_and_bad_usage(masq):
    r = masq.run(["masq-fetch", "--help"]).ok()
    assert b"masq-fetch [-C FILE] [-v] [--route NAME | --all]" in r.out
    assert masq.run(["masq-fetch", "--bogus"]).rc == 64
    r = masq.run(["masq-fetch", "--route", "nosuch"])
    assert r.rc == 64 and b"no route named nosuch" in r.err


FAKE_MESSAGE = (b"Delivered-To: bob@test.example\r\nReceived: from far by mx.isp.example; "
                b"7 Dec 2026 06:00:00 +0000\r\nTo: bob@test.example\r\n\r\n..hi\r\n")


class FakePOP3:
    """A POP3 server in a thread, as hostile as a test wants: `replies` maps a
    verb to the bytes it answers, or to a function(f, args) that writes its own
    answer.  By default: no UIDL (as some old servers), one message."""

    def __init__(self, **replies):
        self.replies = {b"USER": b"+OK\r\n", b"PASS": b"+OK\r\n",
                        b"LIST": b"+OK\r\n1 30\r\n.\r\n", b"UIDL": b"-ERR no UIDL\r\n",
                        b"RETR": b"+OK\r\n" + FAKE_MESSAGE + b".\r\n",
                        b"DELE": b"+OK\r\n", b"QUIT": b"+OK bye\r\n"}
        self.replies.update({k.encode(): v for k, v in replies.items()})
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.deleted, self.commands = [], []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with conn, conn.makefile("rwb") as f:
                    self.session(f)
            except OSError:
                pass

    def session(self, f):
        f.write(b"+OK fake\r\n")
        f.flush()
        marked = []
        for line in f:
            verb, *args = line.split()
            verb = verb.upper()
            self.commands.append(b" ".join([verb, *args]).decode())
            reply = self.replies.get(verb, b"-ERR\r\n")
            if callable(reply):
                reply(f, args)
            else:
                f.write(reply)
            f.flush()
            if verb == b"DELE":
                marked.append(int(args[0]))
            if verb == b"QUIT":
                self.deleted += marked
                return

    def stop(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)    # wakes the accept()
        except OSError:
            pass
        self.sock.close()
        self.thread.join(10)
        assert not self.thread.is_alive()

    def account(self, masq, keys=""):
        """Route isp with one account on this server (tls none, user u)."""
        secret = os.path.join(masq.dir, "pop.secret")
        with open(secret, "w") as f:
            f.write("pw\n")
        os.chmod(secret, 0o600)
        masq.config(f'[route.isp]\nalways = true\n\n[[route.isp.fetch]]\n'
                    f'server = "127.0.0.1:{self.port}"\ntls = "none"\nuser = "u"\n'
                    f'password_file = "pop.secret"\n{keys}\n')


@pytest.fixture
def fake():
    servers = []

    def start(**replies):
        servers.append(FakePOP3(**replies))
        return servers[-1]
    yield start
    for server in servers:
        server.stop()


def test_a_server_without_uidl_cannot_keep_but_can_be_emptied(masq, held, fake):
    server = fake()
    server.account(masq, "keep = true")
    r = masq.run(["masq-fetch"])
    assert r.rc == 78 and b"the server has no UIDL" in r.err, r
    assert queued(masq) == {} and server.deleted == []
    with open(masq.conf) as f:
        masq.set_config(f.read().replace("keep = true", "keep = false"))
    masq.run(["masq-fetch"]).ok()
    [data] = queued(masq).values()
    assert b"\n\n.hi\n" in data and b"\nrcpt bob@test.example\n" in data
    assert server.deleted == [1]


# -- a hostile server (masq-fetch(8) SECURITY) ------------------------------------

def endless(first, line):
    """A reply: `first`, then `line` again and again until the client hangs up."""
    def reply(f, args):
        f.write(first)
        while True:
            f.write(line * 1000)
    return reply


def test_an_endless_listing_ends_the_session_without_quit(masq, held, fake):
    server = fake(LIST=endless(b"+OK\r\n", b"1 30\r\n"))
    server.account(masq)
    r = masq.run(["masq-fetch"], timeout=60)
    assert r.rc == 75 and b"the LIST listing is longer than 100000 lines" in r.err, r
    assert b"ended without QUIT" in r.err and "QUIT" not in server.commands


def test_a_message_is_held_to_max_size_as_it_arrives_and_never_drained_forever(
        masq, held, fake):
    # LIST says 30 bytes; RETR never ends
    server = fake(RETR=endless(b"+OK\r\n" + FAKE_MESSAGE, b"x" * 78 + b"\r\n"))
    server.account(masq, "max_size = 100000")
    r = masq.run(["masq-fetch"], timeout=60)
    assert r.rc == 75 and b"message 1 is more than the limit of 100000 bytes" in r.err, r
    assert "DELE 1" not in server.commands and "QUIT" not in server.commands
    assert queued(masq) == {} and os.listdir(os.path.join(masq.spool, "tmp")) == []
    # one that cannot be queued (no recipient) is read to its end only up to the limit
    server = fake(RETR=endless(b"+OK\r\nTo: x@far.example\r\n\r\n", b"x" * 78 + b"\r\n"))
    with open(masq.conf) as f:
        text = f.read()
    masq.set_config(text[:text.index("[route.isp]")])
    server.account(masq, "max_size = 100000")
    r = masq.run(["masq-fetch"], timeout=60)
    assert r.rc == 75 and b"message 1 is more than the limit of 100000 bytes" in r.err, r
    assert "QUIT" not in server.commands


def test_the_whole_session_has_a_deadline():
    from masq import pop3
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def drip():                 # a greeting one byte at a time, never a line
        conn, _ = listener.accept()
        with conn:
            try:
                while True:
                    conn.sendall(b"+")
                    time.sleep(0.1)
            except OSError:
                pass
    thread = threading.Thread(target=drip, daemon=True)
    thread.start()

    class Account:
        host, port, tls = "127.0.0.1", listener.getsockname()[1], "none"
        label = f"u@127.0.0.1:{port}"
    started = time.monotonic()
    with pytest.raises(pop3.TooMuch, match="the session took more than 1 s"):
        pop3.Session(Account, timeout=30, seconds=1)
    assert time.monotonic() - started < 15
    listener.close()
    thread.join(10)


def test_a_uid_two_messages_share_is_not_trusted(masq, held, fake):
    replies = dict(LIST=b"+OK\r\n1 30\r\n2 30\r\n3 30\r\n.\r\n",
                   UIDL=b"+OK\r\n1 abc\r\n2 abc\r\n3 def\r\n.\r\n")
    server = fake(**replies)
    server.account(masq)
    masq.run(["masq-fetch"]).ok()
    assert [c for c in server.commands if c.startswith("RETR")] == ["RETR 1", "RETR 2", "RETR 3"]
    assert server.deleted == [1, 2, 3] and len(queued(masq)) == 3
    # with keep the shared id could not tell the next run: those two stay unread
    server = fake(**replies)
    with open(masq.conf) as f:
        text = f.read()
    masq.set_config(text[:text.index("[route.isp]")])
    server.account(masq, "keep = true")
    for _ in range(2):
        masq.run(["masq-fetch"]).ok()
    assert [c for c in server.commands if c.startswith("RETR")] == ["RETR 3"]
    assert server.deleted == [] and len(queued(masq)) == 4
    assert "message 2 left on the server: no unique id" in masq.log()


def test_a_uid_outside_printable_ascii_is_no_uid(masq, held, fake):
    server = fake(LIST=b"+OK\r\n1 30\r\n2 30\r\n.\r\n",
                  UIDL="+OK\r\n1 café\r\n2 ok\r\n.\r\n".encode())
    server.account(masq, "keep = true")
    for _ in range(2):
        masq.run(["masq-fetch"]).ok()
    assert [c for c in server.commands if c.startswith("RETR")] == ["RETR 2"]
    assert len(queued(masq)) == 1 and "message 1 left on the server: no unique id" in masq.log()
    [record] = os.listdir(os.path.join(masq.spool, "fetch"))
    assert open(os.path.join(masq.spool, "fetch", record), "rb").read() == b"ok\n"


def test_server_text_reaches_the_terminal_and_log_as_one_printable_line(masq, held, fake):
    server = fake(PASS=b"-ERR \x1b]0;owned\x07\x1b[2J bad\rpassword\r\n")
    server.account(masq)
    r = masq.run(["masq-fetch", "-v"])
    assert r.rc == 77 and b"bad password" in r.err, r
    assert not any(c in r.err for c in b"\x1b\x07\r")
    assert "bad password" in masq.log() and not any(c in masq.log() for c in "\x1b\x07\r")


def test_many_short_lines_are_read_in_linear_time(fake):
    from masq import pop3
    server = fake(RETR=b"+OK\r\n" + b"\r\n" * (8 << 20) + b"..x\r\n.\r\n")

    class Account:
        host, port, tls = "127.0.0.1", server.port, "none"
        label = f"u@127.0.0.1:{port}"
    session = pop3.Session(Account)
    try:
        stream = session.retr(1)
        started, data = time.monotonic(), []
        while chunk := stream.read(65536):
            data.append(chunk)
        elapsed = time.monotonic() - started
        session.quit()
    finally:
        session.close()
    assert b"".join(data) == b"\r\n" * (8 << 20) + b".x\r\n"
    assert elapsed < 4, f"{elapsed:.1f} s for 16 MB of empty lines (was 10 s)"


def test_a_link_in_the_uid_records_place_is_not_followed(masq, held, fake, tmp_path):
    server = fake(LIST=b"+OK\r\n1 30\r\n2 30\r\n.\r\n", UIDL=b"+OK\r\n1 abc\r\n2 def\r\n.\r\n")
    server.account(masq)
    victim = tmp_path / "victim"
    victim.write_bytes(b"abc\n")
    os.makedirs(os.path.join(masq.spool, "fetch"))
    os.symlink(victim, os.path.join(masq.spool, "fetch", f"isp.u@127.0.0.1:{server.port}"))
    r = masq.run(["masq-fetch"])
    assert r.rc == 75 and b"unable to use" in r.err and b"symbolic links" in r.err, r
    assert victim.read_bytes() == b"abc\n" and queued(masq) == {} and server.deleted == []


def test_root_fetches_as_the_spool_owner_in_system_mode(sysroot, fake):
    """sendmail -g by root: masq-fetch becomes masq (the spool's owner) first;
    a password file root:masq 0640 (as masq-setup system writes secrets) serves."""
    sysroot.adduser("alice")
    sysroot.run("rm -f /usr/sbin/sendmail /usr/lib/sendmail /usr/bin/mailq "
                "/usr/bin/newaliases /usr/bin/runq").ok()
    sysroot.run(["masq-setup", "system", "local-only", "--hostname", "test.example",
                 "--admin", "alice"]).ok()
    server = fake(LIST=b"+OK\r\n1 30\r\n2 30\r\n.\r\n", UIDL=b"+OK\r\n1 abc\r\n2 def\r\n.\r\n")
    fetch = "/var/spool/masq/fetch"
    record = f"{fetch}/isp.u@127.0.0.1:{server.port}"
    entry = (f'\n[route.isp]\nalways = true\n\n[[route.isp.fetch]]\n'
             f'server = "127.0.0.1:{server.port}"\ntls = "none"\nuser = "u"\n'
             'password_file = "pop.secret"\nkeep = true\n')
    sysroot.run("cat >> /etc/masq/masq.toml", input=entry.encode()).ok()
    sysroot.run(f"""set -e
echo pw > /etc/masq/pop.secret
chown root:masq /etc/masq/pop.secret; chmod 640 /etc/masq/pop.secret
echo abc > /etc/victim
install -d -o masq -g masq -m 700 {fetch}
ln -s /etc/victim {record}      # planted by the masq user
""").ok()
    fd = listen_trigger(sysroot.path("/var/spool/masq"))
    try:
        r = sysroot.run(["masq-fetch", "-C", "/etc/masq/masq.toml"])
        assert r.rc == 75 and b"unable to use" in r.err, r
        assert open(sysroot.path("/etc/victim"), "rb").read() == b"abc\n"
        assert os.listdir(sysroot.path("/var/spool/masq/incoming")) == []
        sysroot.run(["rm", record]).ok()
        sysroot.run(["masq-fetch", "-C", "/etc/masq/masq.toml"]).ok()
        incoming = sysroot.path("/var/spool/masq/incoming")
        paths = [sysroot.path(record)] + [os.path.join(incoming, q) for q in os.listdir(incoming)]
    finally:
        os.close(fd)
    assert len(paths) == 3
    owners = {(os.stat(p).st_uid, os.stat(p).st_gid) for p in paths}
    masq = (int(sysroot.run(["id", "-u", "masq"]).ok().out),   # the user exists only inside
            int(sysroot.run(["id", "-g", "masq"]).ok().out))
    assert owners == {masq}, owners
    assert open(sysroot.path(record)).read() == "abc\ndef\n"
