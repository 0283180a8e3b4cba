"""Issue 10's "What must hold", where the other test files left a part unshown.

- 40 trickling clients from one address, under masq-tcpserver -c 40 -C 10:
  another address is served at once, not after the deadline.
- A good client logs in with its usual latency while another address guesses.
- RLIMIT_FSIZE at the first write for masq-queue and masq-smtpd (sendmail's
  case is in test_crash.py): exit 75 or 451, spool/tmp empty.
- Backscatter: a client that relayed for its tls_client_ca certificate or for
  RELAYCLIENT is no stranger: its mail loop is bounced to its sender, as
  from relay_nets; a client without either still gets no bounce.
"""
import base64
import os
import resource
import select
import smtplib
import socket
import ssl
import subprocess
import threading
import time

import pytest
import trustme

from conftest import BIN, reap
from smtpd_helpers import HOST, Listener, reply_lines

pytestmark = pytest.mark.usefixtures("daemon_listens")

DEADLINE_SECONDS = 2
SLACK_SECONDS = 1.5             # process start, poll granularity, a loaded machine
TOO_MANY = b"421 4.7.0 Error: too many connections from your address\r\n"
TOO_SLOW = f"421 4.4.2 {HOST} Error: too slow, command deadline exceeded\r\n".encode()


# -- slow clients: -C keeps one address's tricklers from filling -c

def listener(masq, *options):
    server = subprocess.Popen([os.path.join(BIN, "masq-tcpserver"), *options, "-1",
                               "127.0.0.1", "0", os.path.join(BIN, "masq-smtpd")],
                              env=masq.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return server, int(server.stdout.readline())


def greeting(port, source):
    """Connect from `source`; (socket, its reader, the first line, seconds it took)."""
    start = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0))
    f = s.makefile("rb")
    line = f.readline()
    return s, f, line, time.monotonic() - start


def command(s, f, line):
    s.sendall(line + b"\r\n")
    while (reply := f.readline())[3:4] == b"-":
        pass
    return reply


def test_40_tricklers_from_one_address_leave_another_address_served_at_once(masq):
    masq.config(f"[smtpd]\ncommand_timeout = 60\ncommand_deadline = {DEADLINE_SECONDS}")
    server, port = listener(masq, "-c", "40", "-C", "10")
    slow, refused, stop = [], 0, threading.Event()
    try:
        for _ in range(40):
            s, _, line, _ = greeting(port, "127.0.0.1")
            if line.startswith(b"220 "):
                slow.append(s)
            else:
                assert line == TOO_MANY, line
                refused += 1
                s.close()
        assert (len(slow), refused) == (10, 30)

        def drip():                     # a byte a second from each: never a whole line
            while not stop.wait(1):
                for s in slow:
                    try:
                        s.send(b"x")
                    except OSError:
                        pass

        dripper = threading.Thread(target=drip)
        dripper.start()
        try:
            s, f, line, waited = greeting(port, "127.0.0.2")
            with s:
                assert line.startswith(b"220 ") and waited < 1, (line, waited)
                assert command(s, f, b"EHLO other.example").startswith(b"250 ")
                assert command(s, f, b"MAIL FROM:<a@other.example>").startswith(b"250 ")
                assert command(s, f, b"RCPT TO:<bob@test.example>").startswith(b"250 ")
                assert command(s, f, b"DATA").startswith(b"354 ")
                assert command(s, f, b"Subject: in\r\n\r\nserved\r\n.").startswith(b"250 ")
            # the tricklers, meanwhile, are dropped at their deadline
            for t in slow:
                assert select.select([t], [], [], DEADLINE_SECONDS + SLACK_SECONDS)[0]
                assert t.recv(4096) == TOO_SLOW
        finally:
            stop.set()
            dripper.join()
    finally:
        for s in slow:
            s.close()
        server.terminate()
        server.wait(timeout=20)
        reap(server)
    assert len(masq.queue_ids()) == 1


# -- guessing: the address that guesses is shut out, another logs in as usual

PASSWORD = "correct horse 42"
GUESSER, OTHER = "192.0.2.7", "192.0.2.8"
AUTH_FAILED = "535 5.7.8 Error: authentication credentials invalid"
AUTH_LOCKED = "454 4.7.0 Error: too many failed authentications from your address, try later"
AUTH_OK = b"235 2.7.0 Authentication successful\r\n"


def plain(user, password):
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def smtpd(masq, ip):
    return subprocess.Popen([os.path.join(BIN, "masq-smtpd")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=masq.env(TCPREMOTEIP=ip))


def login_seconds(masq):
    """From OTHER, a session past EHLO: how long AUTH PLAIN with the right password takes."""
    p = smtpd(masq, OTHER)
    try:
        p.stdin.write(b"EHLO good.example\r\n")
        p.stdin.flush()
        while not p.stdout.readline().startswith(b"250 "):
            pass
        start = time.monotonic()
        p.stdin.write(plain("alice", PASSWORD).encode() + b"\r\n")
        p.stdin.flush()
        answer = p.stdout.readline()
        took = time.monotonic() - start
        p.stdin.write(b"QUIT\r\n")
        p.stdin.close()
        p.wait(timeout=30)
    finally:
        reap(p)
    assert answer == AUTH_OK, answer
    return took


def test_a_good_client_logs_in_as_fast_as_usual_while_another_address_guesses(masq):
    masq.config("[smtpd]\nauth_without_tls = true\nrelay_nets = []\nmax_errors = 20")
    masq.run(["masq-setup", "passwd", masq.dir, "alice"], input=PASSWORD.encode() + b"\n").ok()
    usual = login_seconds(masq)
    guessing = "".join(plain("alice", f"guess{i}") + "\r\n" for i in range(5))
    guessers = [smtpd(masq, GUESSER) for _ in range(10)]
    try:
        for p in guessers:              # started and past EHLO: then all guess at once
            p.stdin.write(b"EHLO guesser.example\r\n")
            p.stdin.flush()
        for p in guessers:
            while not p.stdout.readline().startswith(b"250 "):
                pass
        for p in guessers:
            p.stdin.write(guessing.encode() + b"QUIT\r\n")
            p.stdin.flush()
        during = login_seconds(masq)            # while their checks run
        lines = []
        for p in guessers:
            out, _ = p.communicate(timeout=120)
            lines += reply_lines(out)
    finally:
        for p in guessers:
            reap(p)
    assert lines.count(AUTH_FAILED) == 10 and lines.count(AUTH_LOCKED) == 40
    # 10 checks at most, 2 at once (auth_max_concurrent): a wait of a few of them
    assert during < max(3 * usual, usual + 1.5), (usual, during)


# -- a full disk at the first write, for masq-queue and masq-smtpd

def no_file_may_grow():
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def nothing_left(masq):
    assert os.listdir(os.path.join(masq.spool, "tmp")) == []
    assert masq.queue_ids() == []


def test_masq_queue_at_rlimit_fsize_0_exits_75_and_leaves_tmp_empty(masq):
    masq.run(["masq-queue", "list"]).ok()       # the config cache exists before the limit
    r, w = os.pipe()
    os.write(w, b"Falice@test.example\0Tbob@localhost\0\0")
    os.close(w)
    try:
        p = subprocess.run([os.path.join(BIN, "masq-queue")], input=b"Subject: x\n\nbody\n",
                           stdout=r, stderr=subprocess.PIPE, env=masq.env(), timeout=60,
                           preexec_fn=no_file_may_grow)
    finally:
        os.close(r)
    assert p.returncode == 75, p.stderr
    assert b"masq-queue: fatal: " in p.stderr and b"File too large" in p.stderr, p.stderr
    nothing_left(masq)


def test_masq_smtpd_at_rlimit_fsize_0_says_451_and_leaves_tmp_empty(masq):
    masq.run(["masq-queue", "list"]).ok()
    dialogue = (b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\n"
                b"RCPT TO:<bob@test.example>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
                b"QUIT\r\n")
    r = masq.run(["masq-smtpd"], input=dialogue, env=masq.env(TCPREMOTEIP="127.0.0.1"),
                 preexec_fn=no_file_may_grow)
    assert r.rc == 0 and b"Traceback" not in r.err, r
    assert reply_lines(r.out)[-2:] == ["451 4.3.0 Error: queue file write error",
                                       "221 2.0.0 Bye"], r
    nothing_left(masq)


# -- backscatter: clients trusted for a certificate or RELAYCLIENT get their bounces

LOOP = (b"Delivered-To: bob@localhost\r\nSubject: loop\r\n\r\nround and round\r\n")
SENDER = "victim@elsewhere.example"


def offline_route(masq):
    """Remote mail waits (no route is up): a bounce to elsewhere stays in the queue."""
    text = open(masq.conf).read().replace('detect = "always"', 'detect = "file"')
    masq.set_config(text + '\n[route.isp]\nhost = "smtp.isp.example:587"\n')


def bounced_to_sender(masq):
    """How many queued messages are for SENDER (bounces wait: the route is down)."""
    found = 0
    for stage in ("incoming", "active", "hold"):
        for qid in masq.queue_ids(stage):
            with open(os.path.join(masq.spool, stage, qid), "rb") as f:
                found += b"\nrcpt " + SENDER.encode() + b"\n" in f.read()
    return found


def pipes_loop(masq, **env):
    dialogue = (b"EHLO client.example\r\nMAIL FROM:<" + SENDER.encode() + b">\r\n"
                b"RCPT TO:<bob@localhost>\r\nDATA\r\n" + LOOP + b".\r\nQUIT\r\n")
    out = masq.run(["masq-smtpd"], input=dialogue, env=masq.env(**env)).ok().out
    assert b"250 2.0.0" in out, out


@pytest.mark.parametrize("relayclient, bounces", [("", 1), (None, 0)])
def test_a_loop_from_a_relayclient_is_bounced_not_dropped(masq, relayclient, bounces):
    offline_route(masq)
    pipes_loop(masq, TCPREMOTEIP="203.0.113.5", RELAYCLIENT=relayclient)
    masq.run(["masq-send", "--once"]).ok()
    assert bounced_to_sender(masq) == bounces
    assert ("status=bounced" in masq.log()) == bool(bounces), masq.log()


@pytest.fixture
def cert_listener(masq, tmp_path):
    """masq-smtpd with STARTTLS and tls_client_ca, 127.0.0.1 outside relay_nets:
    (its port, a context with a client certificate, one without)."""
    server_ca, client_ca = trustme.CA(), trustme.CA()
    cert = server_ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(os.path.join(masq.dir, "key.pem"))
    cert.cert_chain_pems[0].write_to_path(os.path.join(masq.dir, "cert.pem"))
    client_ca.cert_pem.write_to_path(os.path.join(masq.dir, "clients.pem"))
    offline_route(masq)
    masq.config('[smtpd]\ntls_cert = "cert.pem"\ntls_key = "key.pem"\nrelay_nets = []\n'
                'tls_client_ca = "clients.pem"')
    server_ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    with_cert = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    client_ca.issue_cert("laptop.client.example",
                         common_name="laptop.client.example").configure_cert(with_cert)
    without = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    with Listener(masq) as srv:
        yield srv.port, with_cert, without


@pytest.mark.parametrize("certificate, bounces", [(True, 1), (False, 0)])
def test_a_loop_from_a_client_certificate_is_bounced_not_dropped(masq, cert_listener,
                                                                 certificate, bounces):
    port, with_cert, without = cert_listener
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        c.starttls(context=with_cert if certificate else without)
        c.ehlo("client.example")
        assert c.sendmail(SENDER, ["bob@localhost"], LOOP) == {}
    [qid] = masq.queue_ids()
    records = open(os.path.join(masq.spool, "incoming", qid)).read().rsplit("\nrcpt ", 1)[1]
    assert ("\ntrusted cert\n" in records) == certificate, records
    masq.run(["masq-send", "--once"]).ok()
    assert bounced_to_sender(masq) == bounces
    log = masq.log()
    assert "mail loop" in log and ("status=bounced" in log) == certificate, log
