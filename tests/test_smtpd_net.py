"""masq-smtpd behind real listeners: masq-tcpserver, ucspi-tcp's tcpserver, systemd.

Real clients (smtplib, swaks, raw sockets); the queue is checked byte for byte.
"""
import os
import re
import shutil
import smtplib
import socket
import subprocess

import pytest
from conftest import BIN, free_port, run
from smtpd_helpers import Listener, body, reply_lines, spool_messages, tmp_files

KINDS = ["masq", "ucspi"]
MESSAGE = b"From: a@client.example\r\nTo: bob@test.example\r\nSubject: hi\r\n\r\n.dot\r\nbody\r\n"


@pytest.fixture(autouse=True)
def exact_bytes(masq, daemon_listens):
    """Messages stay queued (daemon_listens), and loopback, a relay_net, gets no
    Date: or Message-ID: here: the bytes stay exact."""
    masq.config('[smtpd]\nadd_missing_headers = "none"')


def bodies(masq):
    return sorted(body(d) for d, _ in spool_messages(masq).values())


def talk(port, data, host="127.0.0.1"):
    """Send `data` in one write, read replies until the server closes."""
    with socket.create_connection((host, port), timeout=20) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return reply_lines(out)


@pytest.mark.parametrize("kind", KINDS)
def test_smtplib_plain_message(masq, kind):
    with Listener(masq, kind) as srv, smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
        refused = c.sendmail("a@client.example", ["bob@test.example"], MESSAGE)
        assert refused == {}
    [(data, records)] = spool_messages(masq).values()
    assert body(data) == MESSAGE.replace(b"\r\n", b"\n")
    assert "client 127.0.0.1\n" in records and "proto esmtp\n" in records


@pytest.mark.parametrize("kind", KINDS)
def test_smtplib_8bit_and_smtputf8(masq, kind):
    msg = "From: jörg@client.example\r\nSubject: Grüße\r\n\r\nçà va \r\n".encode() + b"\xff\r\n"
    with Listener(masq, kind) as srv, smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
        c.ehlo("client.example")
        assert c.has_extn("smtputf8") and c.has_extn("8bitmime") and c.has_extn("chunking")
        c.sendmail("jörg@client.example", ["bjørn@test.example"], msg,
                   mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    [(data, records)] = spool_messages(masq).values()
    assert body(data) == msg.replace(b"\r\n", b"\n")
    assert "rcpt bjørn@test.example\n" in records and "proto utf8smtp\n" in records


@pytest.mark.parametrize("kind", KINDS)
def test_pipelined_session_in_one_write(masq, kind):
    one = (b"MAIL FROM:<a@client.example>\r\nRCPT TO:<bob@test.example>\r\nDATA\r\n"
           b"Subject: %d\r\n\r\n..x\r\n.\r\n")
    with Listener(masq, kind) as srv:
        lines = talk(srv.port, b"EHLO c\r\n" + b"".join(one % i for i in range(50))
                     + b"QUIT\r\n")
    assert sum(line.startswith("250 2.0.0 Ok: queued as ") for line in lines) == 50
    assert bodies(masq) == sorted(b"Subject: %d\n\n.x\n" % i for i in range(50))


@pytest.mark.parametrize("kind", KINDS)
def test_bdat_chunks_over_a_socket(masq, kind):
    chunks = [b"Subject: bdat\r\n", b"\r\n8bit \xe9\r", b"\n.last line\r\n"]
    data = b"EHLO c\r\nMAIL FROM:<a@client.example> BODY=8BITMIME\r\nRCPT TO:<bob@test.example>\r\n"
    for i, chunk in enumerate(chunks):
        data += b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if i == len(chunks) - 1 else b"") + chunk
    with Listener(masq, kind) as srv:
        lines = talk(srv.port, data + b"QUIT\r\n")
    assert lines[-2].startswith("250 2.0.0 Ok: queued as "), lines
    assert bodies(masq) == [b"Subject: bdat\n\n8bit \xe9\n.last line\n"]


@pytest.mark.parametrize("kind", KINDS)
def test_swaks_plain_and_pipelined(masq, kind):
    with Listener(masq, kind) as srv:
        for extra in ([], ["--pipeline"]):
            r = run(["swaks", "--server", f"127.0.0.1:{srv.port}", "--from", "a@client.example",
                     "--to", "bob@test.example", "--helo", "client.example",
                     "--body", "8-bit body: \xe9t\xe9", "--header", "Subject: swaks", *extra])
            assert r.rc == 0, r
            assert b"250 2.0.0 Ok: queued as" in r.out
    found = bodies(masq)
    assert len(found) == 2 and all(b"Subject: swaks\n" in b for b in found)
    assert all("8-bit body: \xe9t\xe9".encode() in b for b in found)


@pytest.mark.parametrize("kind", KINDS)
def test_not_an_open_relay_over_tcp(masq, kind):
    masq.config("relay_nets = []")     # in [smtpd], the last table
    with Listener(masq, kind) as srv, smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            c.sendmail("a@client.example", ["victim@elsewhere.example"], MESSAGE)
        assert e.value.recipients["victim@elsewhere.example"][0] == 554
    assert spool_messages(masq) == {}


def test_tcpserver_rules_set_relayclient(masq, tmp_path):
    masq.config("relay_nets = []")     # in [smtpd], the last table
    rules = tmp_path / "rules"
    rules.write_text('127.0.0.1:allow,RELAYCLIENT=""\n:allow\n')
    cdb = tmp_path / "rules.cdb"
    subprocess.run(["tcprules", str(cdb), str(tmp_path / "rules.tmp")],
                   stdin=rules.open("rb"), check=True)
    proc = subprocess.Popen(["tcpserver", "-1", "-H", "-R", "-x", str(cdb), "127.0.0.1", "0",
                             os.path.join(BIN, "masq-smtpd")],
                            stdout=subprocess.PIPE, env=masq.env())
    port = int(proc.stdout.readline())
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            assert c.sendmail("a@client.example", ["friend@elsewhere.example"], MESSAGE) == {}
    finally:
        proc.terminate()
        proc.wait()
        proc.stdout.close()
    [(_, records)] = spool_messages(masq).values()
    assert "rcpt friend@elsewhere.example\n" in records


def test_masq_tcpserver_ipv6(masq):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 here")
    with Listener(masq, "masq", host="::1") as srv:
        lines = talk(srv.port, b"EHLO c\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<x@elsewhere.example>"
                     b"\r\nQUIT\r\n", host="::1")
    assert lines[-2] == "250 2.1.5 Ok"       # ::1 is in the default relay_nets


def test_masq_tcpserver_environment_for_any_program(masq, tmp_path):
    script = tmp_path / "show"
    script.write_text("#!/bin/sh\nenv | grep -E '^(PROTO|TCP)' | sort\n")
    script.chmod(0o755)
    proc = subprocess.Popen([os.path.join(BIN, "masq-tcpserver"), "-1", "127.0.0.1", "0",
                             str(script)], stdout=subprocess.PIPE, env=masq.env(
                                 TCPREMOTEHOST="stale.example"))
    port = int(proc.stdout.readline())
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            local_port = s.getsockname()[1]
            out = b""
            while chunk := s.recv(4096):
                out += chunk
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        proc.stdout.close()
    assert out.decode().splitlines() == [
        "PROTO=TCP", "TCPLOCALIP=127.0.0.1", f"TCPLOCALPORT={port}",
        "TCPREMOTEIP=127.0.0.1", f"TCPREMOTEPORT={local_port}"]


def test_masq_tcpserver_connection_limit(masq):
    with Listener(masq, "masq", limit=1) as srv:
        first = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
        assert first.recv(100).startswith(b"220 ")
        second = socket.create_connection(("127.0.0.1", srv.port), timeout=0.5)
        with pytest.raises(socket.timeout):
            second.recv(100)        # waits in the backlog while the first is served
        first.sendall(b"QUIT\r\n")
        assert first.recv(100) == b"221 2.0.0 Bye\r\n"
        first.close()
        second.settimeout(20)
        assert second.recv(100).startswith(b"220 ")
        second.close()


def test_masq_tcpserver_usage(masq):
    assert run(["masq-tcpserver", "--help"]).ok().out.startswith(b"masq-tcpserver:")
    assert run(["masq-tcpserver", "127.0.0.1"]).rc == 64
    assert run(["masq-tcpserver", "-c", "x", "127.0.0.1", "0", "true"]).rc == 64
    r = run(["masq-tcpserver", "no.such.host", "0", "true"])
    assert r.rc == 64 and b"masq-tcpserver: fatal: bad address" in r.err


@pytest.mark.skipif(not shutil.which("systemd-socket-activate"),
                    reason="no systemd-socket-activate")
def test_systemd_socket_activation(masq):
    port = free_port()
    proc = subprocess.Popen(["systemd-socket-activate", "--inetd", "--accept",
                             "-E", f"MASQ_CONF={masq.conf}",
                             "-l", f"127.0.0.1:{port}", os.path.join(BIN, "masq-smtpd")],
                            stderr=subprocess.PIPE, env=masq.env())
    try:
        assert b"Listening on" in proc.stderr.readline()
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            assert c.sendmail("a@client.example", ["bob@test.example"], MESSAGE) == {}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stderr.close()
    [(data, records)] = spool_messages(masq).values()
    assert body(data) == MESSAGE.replace(b"\r\n", b"\n")
    assert "client 127.0.0.1\n" in records     # from getpeername: no TCPREMOTEIP here


def test_big_message_keeps_memory_flat(masq):
    """200 MiB through DATA: max RSS grows by a few MiB at most (streamed, never held)."""
    with open(masq.conf) as f:
        text = f.read()
    masq.set_config(text.replace("max_size = 52428800", "max_size = 300000000"))
    head = b"EHLO c\r\nMAIL FROM:<a@client.example>\r\nRCPT TO:<bob@test.example>\r\nDATA\r\n"

    def rss(total_lines):
        p = subprocess.Popen([os.path.join(BIN, "masq-smtpd")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, env=masq.env(TCPREMOTEIP="192.0.2.1"))
        p.stdin.write(head)
        line = b"0123456789" * 10 + b"\r\n"
        block = line * 10000
        for _ in range(total_lines // 10000):
            p.stdin.write(block)
        p.stdin.write(b".\r\nQUIT\r\n")
        p.stdin.close()
        out = p.stdout.read()
        p.stdout.close()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = 0
        assert status == 0 and b"queued as" in out, out
        return usage.ru_maxrss * 1024

    small = rss(10000)
    big = rss(2000000)      # 2,000,000 lines of 102 bytes: 204 MB
    assert big - small < 8 * 1024 * 1024, (small, big)
    sizes = sorted(len(d) for d, _ in spool_messages(masq).values())
    assert sizes[-1] > 200 * 1000 * 1000
    assert tmp_files(masq) == []


def test_forked_sessions_see_a_changed_configuration(masq):
    with Listener(masq, "masq") as srv:
        assert talk(srv.port, b"QUIT\r\n")[0] == "220 test.example ESMTP masq"
        with open(masq.conf) as f:
            text = f.read()
        masq.set_config(text.replace('hostname = "test.example"', 'hostname = "new.example"'))
        assert talk(srv.port, b"QUIT\r\n")[0] == "220 new.example ESMTP masq"


def test_sigterm_stops_listening_and_lets_sessions_finish(masq):
    srv = Listener(masq, "masq")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
        assert s.recv(100).startswith(b"220 ")
        srv.proc.terminate()
        assert srv.proc.wait(timeout=10) == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        s.sendall(b"NOOP\r\nQUIT\r\n")
        assert s.recv(100).startswith(b"250 2.0.0 Ok\r\n")
    srv.proc.stdout.close()
    srv.proc.stderr.close()


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_systemd_units_verify(tmp_path):
    units = os.path.join(os.path.dirname(__file__), "..", "etc", "systemd")
    for name in ("masq-smtpd.socket", "masq-smtpd.service"):
        with open(os.path.join(units, name)) as f:
            text = f.read().replace("/usr/bin/", BIN + "/")
        (tmp_path / name).write_text(text.replace("Documentation=man:masq-tcpserver(8)\n", ""))
    r = run(["systemd-analyze", "verify", str(tmp_path / "masq-smtpd.socket"),
             str(tmp_path / "masq-smtpd.service")])
    assert r.rc == 0 and r.err.strip() == b"", r


def test_usage_matches_the_man_pages():
    here = os.path.join(os.path.dirname(__file__), "..", "man")
    for prog, words in (("masq-smtpd", ["-C", "FILE"]),
                        ("masq-tcpserver", ["-c", "LIMIT", "-1", "HOST", "PORT", "PROGRAM"])):
        usage = run([prog, "--help"]).ok().out.decode()
        page = run(["mandoc", "-Tascii", os.path.join(here, f"{prog}.8")]).ok().out.decode()
        page = re.sub(".\b", "", page)          # overstrike bold and underline
        synopsis = page.split("SYNOPSIS")[1].split("DESCRIPTION")[0]
        for word in words:
            assert word in usage and word in synopsis, (word, usage, synopsis)


def test_all_kinds_arrive_byte_exact_in_the_maildir(masq):
    """plain, pipelined, BDAT, 8-bit and SMTPUTF8 over masq-tcpserver, then masq-send --once."""
    plain = b"Subject: plain\r\n\r\n.dot\r\nline\r\n"
    eight = b"Subject: 8bit\r\n\r\ncaf\xc3\xa9 \xff\r\n"
    utf8 = "Subject: utf8\r\nFrom: jörg@client.example\r\n\r\nGrüße\r\n".encode()
    chunked = [b"Subject: bdat\r\n\r\n", b"chunk\r", b"\n.two\r\n"]
    with Listener(masq, "masq") as srv:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
            c.sendmail("a@client.example", ["bob@test.example"], plain)
            c.sendmail("a@client.example", ["bob@test.example"], eight,
                       mail_options=["BODY=8BITMIME"])
            c.sendmail("jörg@client.example", ["bob@test.example"], utf8,
                       mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        one = (b"MAIL FROM:<a@client.example>\r\nRCPT TO:<bob@test.example>\r\nDATA\r\n"
               b"Subject: pipelined %d\r\n\r\n..x\r\n.\r\n")
        bdat = b"MAIL FROM:<a@client.example>\r\nRCPT TO:<bob@test.example>\r\n" + b"".join(
            b"BDAT %d%s\r\n" % (len(c), b" LAST" if i == 2 else b"") + c
            for i, c in enumerate(chunked))
        lines = talk(srv.port, b"EHLO c\r\n" + one % 1 + one % 2 + bdat + b"QUIT\r\n")
        assert sum(line.startswith("250 2.0.0 Ok: queued as") for line in lines) == 3
    run(["masq-send", "--once"], env=masq.env()).ok()
    box = masq.maildir("bob")
    got = sorted(body_after_received(box.get_bytes(key)) for key in box.keys())
    want = sorted(m.replace(b"\r\n", b"\n") for m in [
        plain, eight, utf8, b"".join(chunked),
        b"Subject: pipelined 1\r\n\r\n.x\r\n", b"Subject: pipelined 2\r\n\r\n.x\r\n"])
    assert got == want
    assert spool_messages(masq) == {} and tmp_files(masq) == []


def body_after_received(data):
    """A delivered message without the header lines masq added on top."""
    start = data.index(b"Received: from ")
    return body(data[start:])
