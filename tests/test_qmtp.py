"""Issue 12, QMTP: masq-qmtpd, and routes with protocol = "qmtp" in masq-send and masq-smtp.

Mail goes from one masq folder to another over loopback: masq-send (or
masq-smtp) with a qmtp route -> masq-tcpserver + masq-qmtpd of the second
folder -> its queue, and its masq-send -> its maildir.  A reader on the
receiving side's trigger stands for its daemon, so what it accepted stays
queued to be looked at.  Malformed packages go to masq-qmtpd on pipes or a
socketpair, and nothing may be left in its queue.
"""
import hashlib
import os
import resource
import socket
import subprocess
import sys
import time

import dns_helpers
import pytest
from conftest import BIN, Masq, listen_trigger, reap, run
from queue_helpers import offline, queued_for
from smtpd_helpers import spool_messages, tmp_files

from masq import qmtp

dns = dns_helpers.dns               # the fixture: dnsmasq on loopback with test zones

MESSAGE = (b"From: alice@laptop.example\nTo: bob@lan.example\nSubject: over QMTP\n\n"
           b".a line that starts with a dot\n.\n\xc3\xa9t\xc3\xa9 8-bit\n"
           + b"x" * 5000 + b"\nno line end at the end")
MEASURE = """import os, resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write("%d\\n" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
sys.exit(code)
"""


def ns(data):
    return b"%d:%s," % (len(data), data)


def package(message, sender=b"alice@laptop.example", rcpts=(b"bob@lan.example",), mark=b"\n"):
    return ns(mark + message) + ns(sender) + ns(b"".join(ns(r) for r in rcpts))


def responses(data):
    """The response strings in a server's output."""
    return qmtp.parse_netstrings(data)


class QmtpListener:
    """masq-tcpserver on 127.0.0.1 port 0 running masq-qmtpd (or `program`)."""

    def __init__(self, masq, program=None):
        program = program or [os.path.join(BIN, "masq-qmtpd")]
        self.proc = subprocess.Popen([os.path.join(BIN, "masq-tcpserver"), "-1", "127.0.0.1",
                                      "0", *program], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=masq.env())
        line = self.proc.stdout.readline()
        assert line.strip().isdigit(), (line, self.proc.stderr.read1(4096))
        self.port = int(line)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        finally:
            reap(self.proc)


def make_folder(tmp_path, name, profile="local-only", extra=()):
    folder = str(tmp_path / name)
    run(["masq-setup", profile, folder, "--hostname", f"{name}.example", *extra]).ok()
    return Masq(folder)


def edit(masq, old, new):
    with open(masq.conf) as f:
        text = f.read()
    assert old in text, text
    masq.set_config(text.replace(old, new, 1))


def qmtp_route(masq, port, name="smarthost"):
    """The smarthost route of a masq-setup folder made a QMTP route to 127.0.0.1:port."""
    with open(masq.conf) as f:
        text = f.read()
    head, _, _ = text.partition(f"[route.{name}]")
    masq.set_config(head + f'[route.{name}]\nhost = "127.0.0.1:{port}"\nprotocol = "qmtp"\n')


@pytest.fixture
def lan(tmp_path, servers):
    """(laptop, server, listener): the server's masq-qmtpd listening, the laptop's
    smarthost a QMTP route to it."""
    server = make_folder(tmp_path, "lan")
    trigger = listen_trigger(server.spool)
    listener = QmtpListener(server)
    servers.append(listener)
    laptop = make_folder(tmp_path, "laptop", "smarthost", ["--relay", "127.0.0.1:1"])
    qmtp_route(laptop, listener.port)
    yield laptop, server, listener
    os.close(trigger)


def send(laptop, message, recipients, sender="alice@laptop.example"):
    run([laptop.bin("sendmail"), "-odq", "-i", "-f", sender, *recipients], input=message,
        env=laptop.env()).ok()


def deliver(masq):
    """Run the folder's queue once."""
    masq.run(["masq-send", "--once"]).ok()


def without_trace(data):
    """A message without the Received: lines the two hops put on top."""
    lines = data.split(b"\n")
    i = 0
    while lines[i].startswith(b"Received: ") or lines[i].startswith(b"\t"):
        i += 1
    return b"\n".join(lines[i:])


# -- masq to masq -----------------------------------------------------------

def test_masq_send_over_qmtp_delivers_byte_for_byte(lan):
    laptop, server, _ = lan
    send(laptop, MESSAGE, ["bob@lan.example"])
    deliver(laptop)
    assert laptop.queue_ids() == [], laptop.log()
    assert "relay=smarthost" in laptop.log() and "status=sent" in laptop.log()
    [(data, records)] = spool_messages(server).values()
    assert "proto qmtp" in records and "rcpt bob@lan.example" in records
    assert b"by lan.example (masq) with QMTP id " in data
    # the laptop's sendmail added Date: and Message-ID: under its own Received:
    sent = without_trace(data)
    assert sent.endswith(MESSAGE.split(b"\n\n", 1)[1]), sent[-200:]
    assert b"From: alice@laptop.example\nTo: bob@lan.example\nSubject: over QMTP\n" in sent
    deliver(server)
    with open(os.path.join(server.dir, "mail", "bob", "new",
                           os.listdir(os.path.join(server.dir, "mail", "bob", "new"))[0]),
              "rb") as f:
        delivered = f.read()
    assert delivered.endswith(b"\n" + sent)     # under Return-Path: and the trace
    assert all(line.split(b":")[0] in (b"Return-Path", b"Delivered-To", b"Received")
               or line.startswith(b"\t") for line in delivered[:-len(sent)].splitlines())


def test_masq_to_masq_both_ways(tmp_path, servers):
    """Each folder has a masq-qmtpd and a QMTP route to the other's."""
    a = make_folder(tmp_path, "a", "smarthost", ["--relay", "127.0.0.1:1"])
    b = make_folder(tmp_path, "b", "smarthost", ["--relay", "127.0.0.1:1"])
    listeners, triggers = {}, []
    for masq in (a, b):
        triggers.append(listen_trigger(masq.spool))
        listeners[masq.dir] = QmtpListener(masq)
        servers.append(listeners[masq.dir])
    qmtp_route(a, listeners[b.dir].port)
    qmtp_route(b, listeners[a.dir].port)
    send(a, b"Subject: a to b\n\nfrom a\n", ["bob@b.example"], "alice@a.example")
    send(b, b"Subject: b to a\n\nfrom b\n", ["alice@a.example"], "bob@b.example")
    deliver(a)          # a's message to b's queue
    deliver(b)          # b's to a's queue, and a's into b's maildir
    deliver(a)          # b's into a's maildir
    for masq, user, text in ((b, "bob", b"from a\n"), (a, "alice", b"from b\n")):
        assert masq.queue_ids() == [], masq.log()
        [msg] = list(masq.maildir(user))
        assert msg.get_payload(decode=True) == text
        assert "with QMTP" in msg["Received"]
    for fd in triggers:
        os.close(fd)


def test_several_messages_go_over_one_connection(lan, tmp_path):
    laptop, server, listener = lan
    count = tmp_path / "connections"
    with open(laptop.conf) as f:
        head = f.read().partition("[route.smarthost]")[0]
    # the route's wrapper is its connection: one line in `count` per connection made
    laptop.set_config(head + '[route.smarthost]\nprotocol = "qmtp"\n'
                      f'wrapper = "echo >> {count}; exec socat - TCP:127.0.0.1:{listener.port}"\n')
    for n in range(5):
        send(laptop, b"Subject: %d\n\nbody %d\n" % (n, n), ["bob@lan.example", "root@lan.example"])
    deliver(laptop)
    assert laptop.queue_ids() == [], laptop.log()
    assert count.read_text() == "\n"
    queued = spool_messages(server)
    assert len(queued) == 5
    assert all("rcpt bob@lan.example\nrcpt root@lan.example" in r for _, r in queued.values())
    assert sorted(data.rsplit(b"\n", 2)[-2] for data, _ in queued.values()) == \
        [b"body %d" % n for n in range(5)]


def test_masq_smtp_with_a_qmtp_route_prints_one_answer_per_recipient(lan):
    laptop, server, _ = lan
    server.config("[smtpd]\nrelay_nets = []")      # the laptop on 127.0.0.1 may not relay
    r = laptop.run(["masq-smtp", "--route", "smarthost", "--", "alice@laptop.example",
                    "bob@lan.example", "eve@elsewhere.example", "carol@lan.example"],
                   input=b"Subject: x\n\nhello\r\nworld\n")
    r.ok()
    lines = r.out.decode().splitlines()
    assert [line[0] for line in lines] == ["K", "D", "K"], r
    assert "relaying denied" in lines[1]
    [(data, records)] = spool_messages(server).values()
    assert data.endswith(b"\nhello\nworld\n")
    assert "eve@" not in records


def test_a_message_over_max_size_is_refused_before_it_is_sent(lan):
    laptop, server, _ = lan
    edit(server, "max_size = 52428800", "max_size = 100000")
    started = time.monotonic()
    r = laptop.run(["masq-smtp", "--route", "smarthost", "--", "alice@laptop.example",
                    "bob@lan.example", "root@lan.example"],
                   input=b"Subject: big\n\n" + b"y" * 4000 + b"\n" * 1 + b"z\n" * 10_000_000)
    r.ok()
    lines = r.out.decode().splitlines()
    assert [line[0] for line in lines] == ["D", "D"], r
    assert "max_size" in lines[0]
    assert time.monotonic() - started < 30
    assert server.queue_ids() == [] and tmp_files(server) == []


def test_under_ucspi_tcpserver(tmp_path, servers):
    server = make_folder(tmp_path, "lan")
    trigger = listen_trigger(server.spool)
    proc = subprocess.Popen(["tcpserver", "-1", "-H", "-R", "-l", "localhost", "127.0.0.1", "0",
                             os.path.join(BIN, "masq-qmtpd")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=server.env())
    try:
        port = int(proc.stdout.readline())
        laptop = make_folder(tmp_path, "laptop", "smarthost", ["--relay", "127.0.0.1:1"])
        qmtp_route(laptop, port)
        r = laptop.run(["masq-smtp", "--route", "smarthost", "--", "alice@laptop.example",
                        "bob@lan.example"], input=b"Subject: ucspi\n\nhello\n")
        assert r.out.startswith(b"K "), r
        [(data, records)] = spool_messages(server).values()
        assert b"[127.0.0.1])\n\tby lan.example (masq) with QMTP" in data, data
        assert "client 127.0.0.1" in records
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        reap(proc)
        os.close(trigger)


# -- masq-qmtpd on pipes: packages good and bad -------------------------------

def qmtpd(masq, data, **env):
    return masq.run(["masq-qmtpd"], input=data, env=masq.env(**env))


@pytest.fixture
def server(tmp_path):
    masq = make_folder(tmp_path, "lan")
    fd = listen_trigger(masq.spool)
    yield masq
    os.close(fd)


def test_two_packages_on_one_connection_each_get_their_answers(server):
    r = qmtpd(server, package(b"Subject: 1\n\none\n", rcpts=(b"bob@lan.example",
                                                             b"root@lan.example"))
              + package(b"Subject: 2\n\ntwo\n"))
    r.ok()
    got = responses(r.out)
    assert [g[:1] for g in got] == [b"K", b"K", b"K"], r
    assert got[0] == got[1]             # one message, two recipients
    assert len(server.queue_ids()) == 2


def test_crlf_encoding_is_taken_and_stored_with_lf(server):
    r = qmtpd(server, package(b"Subject: dos\r\n\r\nline\r\nlast", mark=b"\r"))
    assert responses(r.out)[0].startswith(b"K"), r
    [(data, _)] = spool_messages(server).values()
    assert data.endswith(b"\nSubject: dos\n\nline\nlast")


def test_null_sender_is_taken(server):
    r = qmtpd(server, package(b"Subject: bounce\n\nx\n", sender=b""))
    assert responses(r.out)[0].startswith(b"K"), r
    [(_, records)] = spool_messages(server).values()
    assert "sender \n" in records


BAD_PACKAGES = {
    "a length that is no number": b"x5:\nabcd,",
    "a leading zero": b"05:\nabcd," + ns(b"a@b") + ns(ns(b"bob@lan.example")),
    "no comma after the message": b"5:\nabcdX" + ns(b"a@b") + ns(ns(b"bob@lan.example")),
    "a length of too many digits": b"1" * 30 + b":\n",
    "a message marked neither LF nor CR": ns(b"Xabc") + ns(b"a@b") + ns(ns(b"bob@lan.example")),
    "an empty message": b"0:," + ns(b"a@b") + ns(ns(b"bob@lan.example")),
    "a recipient that is no netstring": ns(b"\nhi\n") + ns(b"a@b") + ns(b"15:bob@lan.example"),
    "no recipient": ns(b"\nhi\n") + ns(b"a@b") + b"0:,",
    "no comma after the recipients": ns(b"\nhi\n") + ns(b"a@b") + b"19:"
                                     + ns(b"bob@lan.example") + b";",
}


@pytest.mark.parametrize("case", BAD_PACKAGES)
def test_a_malformed_package_is_refused_and_nothing_is_queued(server, case):
    r = qmtpd(server, BAD_PACKAGES[case] + package(b"Subject: after\n\nx\n"))
    r.ok()
    [got] = responses(r.out)        # one D, and the session is over
    assert got.startswith(b"Dprotocol error: "), r
    assert server.queue_ids() == [] and tmp_files(server) == []


CUT_OFF = {
    "in the message": b"1000:\nSubject: cut\n\nonly this",
    "before the sender": ns(b"\nhi\n"),
    "before the recipients' comma": ns(b"\nhi\n") + ns(b"a@b") + b"19:" + ns(b"bob@lan.example"),
}


@pytest.mark.parametrize("case", CUT_OFF)
def test_a_package_cut_off_is_thrown_away(server, case):
    r = qmtpd(server, package(b"Subject: first\n\nx\n") + CUT_OFF[case])
    r.ok()
    assert [g[:1] for g in responses(r.out)] == [b"K"], r
    assert len(server.queue_ids()) == 1 and tmp_files(server) == []


@pytest.mark.parametrize("message, mark", [(b"Subject: x\n\nbare\rCR\n", b"\n"),
                                           (b"Subject: x\r\n\r\nbare\nLF\r\n", b"\r"),
                                           (b"Subject: x\r\n\r\nends in CR\r", b"\r")])
def test_a_line_end_the_encoding_does_not_allow_is_refused(server, message, mark):
    r = qmtpd(server, package(message, mark=mark, rcpts=(b"bob@lan.example",
                                                          b"root@lan.example"))
              + package(b"Subject: next\n\nfine\n"))
    r.ok()
    got = responses(r.out)
    assert [g[:1] for g in got] == [b"D", b"D", b"K"], r
    assert b"bare CR or LF" in got[0]
    assert len(server.queue_ids()) == 1 and tmp_files(server) == []


def test_a_nul_byte_is_refused(server):
    r = qmtpd(server, package(b"Subject: x\n\nnul \0 here\n"))
    assert responses(r.out)[0].startswith(b"DNUL"), r
    assert server.queue_ids() == [] and tmp_files(server) == []


def test_relaying_is_refused_to_an_outside_client(server):
    r = qmtpd(server, package(b"Subject: x\n\nx\n",
                              rcpts=(b"eve@elsewhere.example", b"bob@lan.example",
                                     b"bad address", b"postmaster")),
              TCPREMOTEIP="192.0.2.7")
    got = responses(r.out)
    assert [g[:1] for g in got] == [b"D", b"K", b"D", b"K"], r
    assert got[0] == b"Dsorry, relaying denied from your location (#5.7.1)"
    [(data, records)] = spool_messages(server).values()
    assert "rcpt bob@lan.example\nrcpt postmaster@lan.example\n" in records
    assert b"Received: from unknown (unknown [192.0.2.7])\n\tby lan.example (masq) with QMTP" \
        in data


def test_only_refused_recipients_queue_nothing(server):
    r = qmtpd(server, package(b"Subject: x\n\nx\n", rcpts=(b"eve@elsewhere.example",)),
              TCPREMOTEIP="192.0.2.7")
    assert responses(r.out) == [b"Dsorry, relaying denied from your location (#5.7.1)"]
    assert server.queue_ids() == [] and tmp_files(server) == []


def test_unknown_users_are_refused_with_users_system(server):
    edit(server, 'users = "any"', 'users = "system"')
    r = qmtpd(server, package(b"Subject: x\n\nx\n",
                              rcpts=(b"nobody-such@lan.example", b"root@lan.example")))
    got = responses(r.out)
    assert [g[:1] for g in got] == [b"D", b"K"], r
    assert b"no mailbox" in got[0]


def test_a_bad_sender_refuses_every_recipient(server):
    r = qmtpd(server, package(b"Subject: x\n\nx\n", sender=b"no at sign here <>",
                              rcpts=(b"bob@lan.example", b"root@lan.example")))
    assert [g[:2] for g in responses(r.out)] == [b"Db", b"Db"], r
    assert server.queue_ids() == []


def test_too_large_is_refused_at_its_length_without_reading_it(server):
    edit(server, "max_size = 52428800", "max_size = 1000")
    ours, theirs = socket.socketpair()
    p = subprocess.Popen([os.path.join(BIN, "masq-qmtpd")], stdin=theirs, stdout=theirs,
                         stderr=subprocess.PIPE, env=server.env())
    theirs.close()
    try:
        ours.sendall(b"200000000:\n" + b"z" * 10000)      # 200 MB said, 10 kB sent
        ours.settimeout(30)
        got = b""
        while chunk := ours.recv(4096):
            got += chunk
        assert responses(got) == [qmtp.TOO_BIG.encode()]
        assert p.wait(timeout=30) == 0
    finally:
        ours.close()
        reap(p)
    assert server.queue_ids() == [] and tmp_files(server) == []


def test_a_client_too_slow_is_dropped_and_its_package_thrown_away(server):
    server.config("[smtpd]\ndata_timeout = 1")
    ours, theirs = socket.socketpair()
    p = subprocess.Popen([os.path.join(BIN, "masq-qmtpd")], stdin=theirs, stdout=theirs,
                         stderr=subprocess.PIPE, env=server.env())
    theirs.close()
    try:
        ours.sendall(package(b"Subject: first\n\nx\n") + b"100:\nSubject: slow\n")
        ours.settimeout(30)
        got = b""
        while chunk := ours.recv(4096):     # the end comes after data_timeout, unasked
            got += chunk
        assert [g[:1] for g in responses(got)] == [b"K"]
        assert p.wait(timeout=30) == 0
    finally:
        ours.close()
        reap(p)
    assert len(server.queue_ids()) == 1 and tmp_files(server) == []
    assert "too slow" in server.log()


def test_a_full_disk_is_a_temporary_failure(server):
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50000, 50000))
    p = subprocess.run([os.path.join(BIN, "masq-qmtpd")], env=server.env(),
                       input=package(b"Subject: x\n\n" + b"w" * 200000 + b"\n"),
                       capture_output=True, preexec_fn=small_files, timeout=60)
    got = responses(p.stdout)
    assert [g[:1] for g in got] == [b"Z"], (p.stdout, p.stderr)
    assert b"queue file write error" in got[0]
    assert server.queue_ids() == [] and tmp_files(server) == []


def test_a_masq_queue_hook_gets_the_message_and_its_envelope(server, tmp_path):
    r = qmtpd(server, package(b"Subject: hook\n\nx\n", rcpts=(b"bob@lan.example",
                                                               b"eve@elsewhere.example")),
              MASQ_QUEUE=os.path.join(BIN, "masq-queue"), TCPREMOTEIP="192.0.2.7")
    assert responses(r.out) == [b"Kok, queued (#2.0.0)",
                                b"Dsorry, relaying denied from your location (#5.7.1)"], r
    [(data, records)] = spool_messages(server).values()
    assert data.endswith(b"\nSubject: hook\n\nx\n") and "rcpt bob@lan.example\n" in records
    refuse = tmp_path / "refuse"
    refuse.write_text("#!/bin/sh\ncat >/dev/null\nexit 100\n")
    refuse.chmod(0o755)
    r = qmtpd(server, package(b"Subject: hook\n\nx\n"), MASQ_QUEUE=str(refuse))
    assert responses(r.out) == [qmtp.REJECTED.encode()], r


# -- from strangers: backscatter, greylisting, DNS lists, refused recipients --------

LOOP = b"Delivered-To: bob@lan.example\nSubject: hi\n\nbuy now\n"


def test_a_loop_from_a_stranger_over_qmtp_is_dropped_not_bounced(server):
    offline(server)
    r = qmtpd(server, package(LOOP, sender=b"victim@example.net"), TCPREMOTEIP="203.0.113.5")
    assert responses(r.out)[0].startswith(b"K"), r
    deliver(server)
    assert queued_for(server, "victim@example.net") == [] and server.queue_ids() == []
    log = server.log()
    assert "mail loop" in log and "status=dropped" in log and "bounce=" not in log, log


def test_a_loop_from_a_relayclient_over_qmtp_is_bounced(server):
    offline(server)
    r = qmtpd(server, package(LOOP, sender=b"victim@example.net"), TCPREMOTEIP="203.0.113.5",
              RELAYCLIENT="")
    assert responses(r.out)[0].startswith(b"K"), r
    [(_, records)] = spool_messages(server).values()
    assert "trusted relayclient" in records
    deliver(server)
    assert len(queued_for(server, "victim@example.net")) == 1
    assert "status=bounced" in server.log()


def test_qmtp_from_a_stranger_is_greylisted(server):
    server.config("[smtpd]\ngreylist = true\ngreylist_delay = 2")
    pkg = package(b"Subject: grey\n\nx\n", sender=b"a@sender.example",
                  rcpts=(b"bob@lan.example", b"root@lan.example"))
    first = time.monotonic()
    r = qmtpd(server, pkg, TCPREMOTEIP="192.0.2.7")
    assert responses(r.out) == [b"Zgreylisted, try again in 2 seconds (#4.7.1)"] * 2, r
    assert server.queue_ids() == []
    time.sleep(max(0, first + 2.2 - time.monotonic()))
    r = qmtpd(server, pkg, TCPREMOTEIP="192.0.2.7")
    assert [g[:1] for g in responses(r.out)] == [b"K", b"K"], r
    assert len(server.queue_ids()) == 1
    assert "greylist: client=192.0.2.7 net=192.0.2.0/24 from=<a@sender.example> " \
           "to=<bob@lan.example> passed after 2 s" in server.log()
    # a RELAYCLIENT client is never greylisted
    r = qmtpd(server, package(b"Subject: x\n\nx\n", sender=b"new@sender.example"),
              TCPREMOTEIP="192.0.2.7", RELAYCLIENT="")
    assert responses(r.out)[0].startswith(b"K"), r


def test_qmtp_from_a_listed_client_is_refused_with_the_zone_reason(server, dns):
    dns_helpers.configure(server, dns, 'relay_nets = []\ndnsbl = ["bl.test"]')
    r = qmtpd(server, package(b"Subject: x\n\nx\n"), TCPREMOTEIP="127.0.0.1")
    assert responses(r.out) == [b"Dservice unavailable; client [127.0.0.1] blocked using "
                                + f"bl.test; {dns_helpers.REASON} (#5.7.1)".encode()], r
    assert server.queue_ids() == []
    assert "dnsbl: client=127.0.0.1 listed by bl.test" in server.log()
    r = qmtpd(server, package(b"Subject: x\n\nx\n"), TCPREMOTEIP="127.0.0.9")
    assert responses(r.out)[0].startswith(b"K"), r


def test_too_many_refused_recipients_end_the_qmtp_session(server):
    edit(server, 'users = "any"', 'users = "system"')
    server.config("[smtpd]\nmax_refused_recipients = 2")
    rcpts = (b"nosuch1@lan.example", b"nosuch2@lan.example", b"nosuch3@lan.example",
             b"root@lan.example", b"nosuch4@lan.example")
    r = qmtpd(server, package(b"Subject: x\n\nx\n", rcpts=rcpts)
              + package(b"Subject: next\n\nx\n"), TCPREMOTEIP="192.0.2.7")
    got = responses(r.out)          # none for the second package: the session ended
    assert [g[:1] for g in got] == [b"D", b"D", b"Z", b"Z", b"Z"], r
    assert got[2] == b"Ztoo many refused recipients (#4.7.0)"
    assert server.queue_ids() == []
    assert "too many refused recipients: client=192.0.2.7 refused=3" in server.log()


def test_help_and_bad_usage():
    r = run(["masq-qmtpd", "--help"])
    assert r.rc == 0 and b"masq-qmtpd [-C FILE]" in r.out
    assert run(["masq-qmtpd", "--bogus"]).rc == 100


def test_a_qmtp_route_with_tls_or_auth_is_a_configuration_error(lan):
    laptop, _, _ = lan
    laptop.config('tls = "starttls"')
    r = laptop.run(["masq-smtp", "--route", "smarthost", "--", "a@laptop.example",
                    "bob@lan.example"], input=b"Subject: x\n\nx\n")
    assert r.rc == 111 and b"takes no tls" in r.err, r


# -- the protocol pieces -------------------------------------------------------

def test_netstrings_round_trip():
    items = [b"", b"a", b"12:x,", b"\xff" * 300]
    assert qmtp.parse_netstrings(b"".join(qmtp.netstring(i) for i in items)) == items
    assert qmtp.netstring(b"hello world!") == b"12:hello world!,"
    assert qmtp.netstring(b"") == b"0:,"


@pytest.mark.parametrize("bad", [b"3:ab,", b"3:abcd", b"03:abc,", b"a:b,", b"3abc,", b"-1:,"])
def test_malformed_netstrings_are_refused(bad):
    with pytest.raises(qmtp.NetstringError):
        qmtp.parse_netstrings(bad)


def test_the_client_sends_lf_lines_and_says_their_length():
    import io

    from masq import wiremessage
    message = wiremessage.WireMessage(io.BytesIO(b"a\r\nb\rc\n" + b"d" * 70000 + b"\r"))
    body = qmtp.Body(message)
    data = b"".join(body.chunks())
    assert data == b"a\nb\nc\n" + b"d" * 70000 + b"\n"
    assert body.length == len(data)
    message.prepend(b"DKIM-Signature: v=1\n")      # what goes in front is counted too
    body = qmtp.Body(message)
    data = b"".join(body.chunks())
    assert data.startswith(b"DKIM-Signature: v=1\na\n") and body.length == len(data)


# -- a large message: memory stays bounded on both sides ------------------------

LARGE_BYTES = 200 * 1024 * 1024


def test_a_200_mib_message_with_bounded_memory_on_both_sides(tmp_path, servers):
    server = make_folder(tmp_path, "lan")
    edit(server, "max_size = 52428800", f"max_size = {LARGE_BYTES + 1_000_000}")
    trigger = listen_trigger(server.spool)
    rss_file = tmp_path / "server-rss"
    measure = tmp_path / "measure.py"
    measure.write_text(MEASURE)
    listener = QmtpListener(server, [sys.executable, str(measure), str(rss_file),
                                     os.path.join(BIN, "masq-qmtpd")])
    servers.append(listener)
    laptop = make_folder(tmp_path, "laptop", "smarthost", ["--relay", "127.0.0.1:1"])
    edit(laptop, "max_size = 52428800", f"max_size = {LARGE_BYTES + 1_000_000}")
    qmtp_route(laptop, listener.port)
    source = tmp_path / "large.eml"
    digest = write_large(source, LARGE_BYTES)
    with open(source, "rb") as f:
        run([laptop.bin("sendmail"), "-odq", "-i", "-f", "alice@laptop.example",
             "bob@lan.example"],
            stdin=f, env=laptop.env(), input=None).ok()
    # masq-send's peak is read by a small wrapper, as the server's: the rusage of
    # a child of this process would count this (large) process's own peak too,
    # which Linux carries over the exec of a vfork-ed child
    client_rss_file = tmp_path / "client-rss"
    client = subprocess.Popen([sys.executable, str(measure), str(client_rss_file),
                               os.path.join(BIN, "masq-send"), "--once"], env=laptop.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        client.wait()
        assert client.returncode == 0, client.stderr.read()
    finally:
        reap(client)
    assert laptop.queue_ids() == [], laptop.log()
    deadline = time.monotonic() + 60
    while not rss_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)    # the session ends at the client's close; its wrapper then writes
    [server_rss_kib] = [int(line) for line in rss_file.read_text().split()]
    [client_rss_kib] = [int(line) for line in client_rss_file.read_text().split()]
    assert client_rss_kib < 100 * 1024, client_rss_kib
    assert server_rss_kib < 100 * 1024, server_rss_kib
    [qid] = server.queue_ids()
    with open(os.path.join(server.spool, "incoming", qid), "rb") as f:
        header = f.readline()
        size = int(header.split()[2])
        h = hashlib.sha256()
        seen = 0
        in_trace = True
        while seen < size:
            line = f.readline()
            seen += len(line)
            if in_trace and (line.startswith(b"Received: ") or line.startswith(b"\t")):
                continue
            in_trace = False
            h.update(line[:len(line) - max(0, seen - size)])
    assert h.hexdigest() == digest
    os.close(trigger)


def write_large(path, size):
    """A message of `size` bytes (header, then lines of 76 bytes); its sha256 from
    its Subject: on (sendmail adds Date: and Message-ID: after Received: lines ...)."""
    head = b"From: alice@laptop.example\nTo: bob@lan.example\nSubject: large\n" \
           b"Date: Mon, 7 Dec 2026 00:00:00 +0000\nMessage-ID: <large@laptop.example>\n\n"
    line = b"0123456789" * 7 + b"abcde\n"
    h = hashlib.sha256(head)
    with open(path, "wb") as f:
        f.write(head)
        left = size - len(head)
        block = line * (65536 // len(line))
        while left > 0:
            piece = block[:left]
            f.write(piece)
            h.update(piece)
            left -= len(piece)
    return h.hexdigest()
