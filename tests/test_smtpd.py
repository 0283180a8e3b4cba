"""masq-smtpd on pipes (inetd style): transcripts, relay control, smuggling, limits."""
import glob
import os
import subprocess
import time

import pytest
from conftest import BIN
from smtpd_helpers import (body, parse_transcript, prepend_config, replies_match,
                           reply_lines, spool_messages, tmp_files)

DATA = os.path.join(os.path.dirname(__file__), "data", "smtpd")
TRANSCRIPTS = sorted(glob.glob(os.path.join(DATA, "*.txt")))
EHLO = b"EHLO client.example\r\n"


pytestmark = pytest.mark.usefixtures("daemon_listens")


def smtpd(masq, data, **env):
    """Run masq-smtpd with `data` on stdin; (result, reply lines)."""
    env.setdefault("TCPREMOTEIP", "192.0.2.1")
    r = masq.run(["masq-smtpd"], input=data, env=masq.env(**env))
    return r, reply_lines(r.out)


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[os.path.basename(p)[:-4] for p in TRANSCRIPTS])
def test_transcript(masq, path):
    directives, client, expected = parse_transcript(path)
    env = {}
    queued = None
    for word, rest in directives:
        if word == "env":
            for item in rest.split():
                name, _, value = item.partition("=")
                env[name] = value
        elif word == "top":
            prepend_config(masq, rest)
        elif word == "config":
            masq.config(rest.replace("\\n", "\n"))
        elif word == "queued":
            count, _, content = rest.partition(" ")
            queued = (int(count), content)
    r = masq.run(["masq-smtpd"], input=client, env=masq.env(**env))
    got = reply_lines(r.out)
    assert replies_match(got, expected), diff(got, expected) + f"\n{r}"
    assert r.rc == 0, r
    assert b"Traceback" not in r.err, r
    if queued is not None:
        messages = spool_messages(masq)
        assert len(messages) == queued[0], messages
        if queued[1]:
            want = queued[1].encode().decode("unicode_escape").encode("latin-1")
            assert [body(d) for d, _ in messages.values()] == [want]
    assert tmp_files(masq) == []


def diff(got, expected):
    """Reply lines side by side, `!!` where they differ."""
    rows = []
    for i in range(max(len(got), len(expected))):
        g = got[i] if i < len(got) else "-"
        e = expected[i] if i < len(expected) else "-"
        rows.append(f"{'  ' if replies_match([g], [e]) else '!!'} got {g!r:60} want {e!r}")
    return "\n".join(rows)


def test_help_and_bad_usage(masq):
    r = masq.run(["masq-smtpd", "--help"]).ok()
    assert b"masq-smtpd [-C FILE]" in r.out
    r = masq.run(["masq-smtpd", "--bogus"])
    assert r.rc == 100, r
    assert r.out == b""


@pytest.mark.parametrize("setting, key", [('max_recipients = "many"', b"smtpd.max_recipients"),
                                          ('relay_nets = ["10.0.0.0/33"]', b"smtpd.relay_nets"),
                                          ('relay_nets = ["lan"]', b"smtpd.relay_nets"),
                                          ('pregreet = "maybe"', b"smtpd.pregreet")])
def test_bad_configuration_is_a_421_and_code_78(masq, setting, key):
    masq.config(f"[smtpd]\n{setting}")
    r, lines = smtpd(masq, EHLO)
    assert lines == ["421 4.3.5 Error: server configuration error"]
    assert r.rc == 78 and key in r.err, r


# -- what lands in the queue

def session(*commands):
    return b"".join(c if c.endswith(b"\r\n") else c + b"\r\n" for c in commands)


def test_trace_data_and_received_line(masq):
    r, lines = smtpd(masq, session(EHLO, b"MAIL FROM:<a@client.example>",
                                   b"RCPT TO:<bob@test.example>", b"DATA", b"hi", b".", b"QUIT"),
                     TCPREMOTEIP="192.0.2.9", TCPREMOTEHOST="mx.client.example")
    [(qid, (data, records))] = spool_messages(masq).items()
    assert lines[-2] == f"250 2.0.0 Ok: queued as {qid}"
    first = data.split(b";")[0].decode()
    assert first == ("Received: from client.example (mx.client.example [192.0.2.9])\n"
                     f"\tby test.example (masq) with ESMTP id {qid}\n\tfor <bob@test.example>")
    assert "helo client.example\n" in records and "client 192.0.2.9\n" in records
    assert "proto esmtp\n" in records and "sender a@client.example\n" in records


def test_a_strange_remote_host_name_is_not_written(masq):
    smtpd(masq, session(EHLO, b"MAIL FROM:<a@client.example>", b"RCPT TO:<bob@test.example>",
                        b"DATA", b"hi", b".", b"QUIT"),
          TCPREMOTEHOST="evil\nX-Injected: yes")
    [(data, records)] = spool_messages(masq).values()
    assert b"X-Injected" not in data and "client_name unknown\n" in records


def test_eight_bit_and_smtputf8_are_kept_byte_exact(masq):
    text = "Subject: Grüße\r\n\r\n".encode() + b"caf\xc3\xa9 \xff\xfe raw\r\n"
    r, lines = smtpd(masq, session(
        EHLO, "MAIL FROM:<jörg@client.example> SMTPUTF8 BODY=8BITMIME".encode(),
        "RCPT TO:<bjørn@test.example>".encode(), b"DATA", text + b".", b"QUIT"))
    assert lines[-2].startswith("250 2.0.0 Ok: queued as"), lines
    [(data, records)] = spool_messages(masq).values()
    assert body(data) == text.replace(b"\r\n", b"\n")
    assert "rcpt bjørn@test.example\n" in records and "proto utf8smtp\n" in records


def test_non_ascii_address_needs_smtputf8(masq):
    r, lines = smtpd(masq, session(EHLO, "MAIL FROM:<jörg@client.example>".encode(),
                                   b"MAIL FROM:<a@client.example>",
                                   "RCPT TO:<bjørn@test.example>".encode(), b"QUIT"))
    assert lines[-4:] == ["553 5.6.7 Error: non-ASCII address needs SMTPUTF8 (RFC 6531)",
                          "250 2.1.0 Ok",
                          "553 5.6.7 Error: non-ASCII address needs SMTPUTF8 (RFC 6531)",
                          "221 2.0.0 Bye"]


def test_pipelined_messages_in_one_write(masq):
    messages = b"".join(session(b"MAIL FROM:<a@client.example>", b"RCPT TO:<bob@test.example>",
                                b"DATA", b"Subject: %d" % i, b"", b"body", b".")
                        for i in range(20))
    r, lines = smtpd(masq, EHLO + messages + b"QUIT\r\n")
    assert sum(line.startswith("250 2.0.0 Ok: queued as") for line in lines) == 20
    bodies = sorted(body(d) for d, _ in spool_messages(masq).values())
    assert bodies == sorted(b"Subject: %d\n\nbody\n" % i for i in range(20))


def test_bdat_chunks_are_joined_byte_exact(masq):
    part1, part2 = b"Subject: chunks\r\n\r\nfirst\r", b"\n.second\r\n"
    r, lines = smtpd(masq, EHLO + b"MAIL FROM:<a@client.example>\r\nRCPT TO:<bob@test.example>\r\n"
                     + b"BDAT %d\r\n" % len(part1) + part1
                     + b"BDAT %d LAST\r\n" % len(part2) + part2 + b"QUIT\r\n")
    assert lines[-5:-1] == ["250 2.1.0 Ok", "250 2.1.5 Ok", f"250 2.0.0 Ok: {len(part1)} octets",
                            lines[-2]]
    assert lines[-2].startswith("250 2.0.0 Ok: queued as "), lines
    [(data, _)] = spool_messages(masq).values()
    assert body(data) == b"Subject: chunks\n\nfirst\n.second\n"


def test_bdat_with_bare_lf_is_refused_and_later_chunks_consumed(masq):
    bad, more = b"Subject: x\n\nbody\r\n", b"QUIT\r\n"
    r, lines = smtpd(masq, EHLO + b"MAIL FROM:<a@client.example>\r\nRCPT TO:<bob@test.example>\r\n"
                     + b"BDAT %d\r\n" % len(bad) + bad + b"BDAT %d LAST\r\n" % len(more) + more
                     + b"NOOP\r\nQUIT\r\n")
    assert lines[-4:] == ["550 5.6.0 Error: bare CR or LF in the message (RFC 5321 section 2.3.8)",
                          "503 5.5.1 Error: need MAIL command", "250 2.0.0 Ok", "221 2.0.0 Bye"]
    assert spool_messages(masq) == {} and tmp_files(masq) == []


def test_bdat_interrupted_by_rset_queues_nothing(masq):
    part = b"Subject: x\r\n\r\n"
    r, lines = smtpd(masq, EHLO + b"MAIL FROM:<a@client.example>\r\nRCPT TO:<bob@test.example>\r\n"
                     + b"BDAT %d\r\n" % len(part) + part + b"RSET\r\nQUIT\r\n")
    assert lines[-3:] == [f"250 2.0.0 Ok: {len(part)} octets", "250 2.0.0 Ok", "221 2.0.0 Bye"]
    assert spool_messages(masq) == {} and tmp_files(masq) == []


def test_bad_bdat_size_closes_the_session(masq):
    r, lines = smtpd(masq, EHLO + b"BDAT lots\r\nQUIT\r\n")
    assert lines[-1] == "501 5.5.4 Syntax: BDAT size [LAST]"


# -- SMTP smuggling: nothing but CRLF . CRLF ends the data, bare line ends are refused

SMUGGLE = b"MAIL FROM:<admin@bank.example>\r\nRCPT TO:<bob@test.example>\r\nDATA\r\n" \
          b"Subject: smuggled\r\n\r\nevil\r\n"


@pytest.mark.parametrize("end", [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n",
                                 b"\r\n.\r", b"\r\n\x00.\r\n", b"\n..\n"])
def test_smuggled_end_of_data_is_never_an_end(masq, end):
    data = (EHLO + b"MAIL FROM:<a@client.example>\r\nRCPT TO:<bob@test.example>\r\nDATA\r\n"
            b"Subject: first\r\n\r\nline" + end + SMUGGLE + b".\r\nQUIT\r\n")
    r, lines = smtpd(masq, data)
    if b"\x00" in end:      # NUL is no line end: one message, refused for its NUL
        assert lines[-2:] == ["550 5.6.0 Error: NUL byte in the message "
                              "(RFC 5322 section 2.3)", "221 2.0.0 Bye"], lines
        assert spool_messages(masq) == {}
    else:
        assert lines[-2:] == ["550 5.6.0 Error: bare CR or LF in the message "
                              "(RFC 5321 section 2.3.8)", "221 2.0.0 Bye"], lines
        assert spool_messages(masq) == {}
    assert lines.count("354 End data with <CR><LF>.<CR><LF>") == 1
    assert tmp_files(masq) == []


def test_bare_lf_in_data_is_refused_then_session_goes_on(masq):
    good = b"MAIL FROM:<a@client.example>\r\nRCPT TO:<bob@test.example>\r\nDATA\r\nok\r\n.\r\n"
    r, lines = smtpd(masq, EHLO + good.replace(b"ok\r\n", b"bad\nline\r\n") + good + b"QUIT\r\n")
    assert lines[-6] == "550 5.6.0 Error: bare CR or LF in the message (RFC 5321 section 2.3.8)"
    assert lines[-2].startswith("250 2.0.0 Ok: queued as")
    assert [body(d) for d, _ in spool_messages(masq).values()] == [b"ok\n"]


def test_bare_lf_in_a_command_is_refused(masq):
    r, lines = smtpd(masq, b"EHLO x\nMAIL FROM:<a@b.example>\r\nQUIT\r\n")
    assert lines[1:] == ["500 5.5.2 Error: command line not ended by CRLF",
                         "503 5.5.1 Error: send HELO/EHLO first", "221 2.0.0 Bye"]


# -- limits

def test_size_at_mail_and_while_streaming(masq):
    prepend_config(masq, "max_size = 1000")
    big = b"x" * 70 + b"\r\n"
    r, lines = smtpd(masq, session(EHLO, b"MAIL FROM:<a@client.example> SIZE=1001",
                                   b"MAIL FROM:<a@client.example> SIZE=1000",
                                   b"RCPT TO:<bob@test.example>", b"DATA")
                     + big * 20 + b".\r\nNOOP\r\nQUIT\r\n")
    assert "250-SIZE 1000" in lines
    assert lines[-7:] == [
        "552 5.3.4 Error: message too big for system", "250 2.1.0 Ok", "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>", "552 5.3.4 Error: message too big for system",
        "250 2.0.0 Ok", "221 2.0.0 Bye"]
    assert spool_messages(masq) == {} and tmp_files(masq) == []


@pytest.mark.parametrize("param, reply", [
    (b"BODY=8BITMIME", "250 2.1.0 Ok"), (b"BODY=7bit", "250 2.1.0 Ok"),
    (b"BODY=BINARYMIME", "501 5.5.4 Syntax: BODY=7BIT|8BITMIME"),
    (b"SMTPUTF8=yes", "501 5.5.4 Syntax: SMTPUTF8 takes no value"),
    (b"SIZE=lots", "501 5.5.4 Syntax: SIZE=number"),
    (b"AUTH=<>", "555 5.5.4 Error: unsupported parameter AUTH"),
    (b"X-FOO", "555 5.5.4 Error: unsupported parameter X-FOO"),
    (b"BODY=8BITMIME BODY=7BIT", "501 5.5.4 Syntax: bad or repeated parameter BODY=7BIT"),
])
def test_mail_parameters(masq, param, reply):
    r, lines = smtpd(masq, session(EHLO, b"MAIL FROM:<a@client.example> " + param, b"QUIT"))
    assert lines[-2] == reply


def test_max_recipients(masq):
    masq.config("[smtpd]\nmax_recipients = 2")
    r, lines = smtpd(masq, session(EHLO, b"MAIL FROM:<a@client.example>",
                                   *[b"RCPT TO:<u%d@test.example>" % i for i in range(3)], b"QUIT"))
    assert lines[-4:] == ["250 2.1.5 Ok", "250 2.1.5 Ok", "452 4.5.3 Error: too many recipients",
                          "221 2.0.0 Bye"]


def test_too_many_errors_ends_the_session(masq):
    masq.config("[smtpd]\nmax_errors = 3")
    r, lines = smtpd(masq, session(EHLO, b"FOO", b"BAR", b"BAZ", b"NOOP", b"QUIT"))
    assert lines[-4:] == ["502 5.5.2 Error: command not recognized"] * 3 + [
        "421 4.7.0 test.example Error: too many errors"]


def test_long_command_line_is_refused_and_session_goes_on(masq):
    r, lines = smtpd(masq, session(b"NOOP " + b"x" * 600, b"MAIL FROM:<a@client.example> "
                                   + b"X" * 2000, EHLO, b"QUIT"))
    assert lines[1:3] == ["500 5.5.2 Error: line too long"] * 2
    assert lines[-1] == "221 2.0.0 Bye"


def test_long_text_lines_are_kept(masq):
    line = b"y" * 100000 + b"\r\n"
    head = session(EHLO, b"MAIL FROM:<a@client.example>", b"RCPT TO:<bob@test.example>", b"DATA")
    r, lines = smtpd(masq, head + line + b".\r\nQUIT\r\n")
    assert lines[-2].startswith("250 2.0.0 Ok: queued as")
    [(data, _)] = spool_messages(masq).values()
    assert body(data) == line.replace(b"\r\n", b"\n")


def test_eof_in_data_queues_nothing(masq):
    r, lines = smtpd(masq, session(EHLO, b"MAIL FROM:<a@client.example>",
                                   b"RCPT TO:<bob@test.example>", b"DATA", b"partial"))
    assert lines[-1] == "354 End data with <CR><LF>.<CR><LF>" and r.rc == 0
    assert spool_messages(masq) == {} and tmp_files(masq) == []


def test_command_timeout_answers_421_and_closes(masq):
    masq.config("[smtpd]\ncommand_timeout = 1")
    p = subprocess.Popen([os.path.join(BIN, "masq-smtpd")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, env=masq.env(TCPREMOTEIP="192.0.2.1"))
    p.stdin.write(EHLO)
    p.stdin.flush()
    start = time.monotonic()
    out = p.stdout.read()        # until masq-smtpd closes: it must do so by itself
    p.wait(timeout=10)
    p.stdin.close()
    assert reply_lines(out)[-1] == "421 4.4.2 test.example Error: timeout exceeded"
    assert 0.9 < time.monotonic() - start < 5


def test_data_timeout_queues_nothing(masq):
    masq.config("[smtpd]\ndata_timeout = 1")
    p = subprocess.Popen([os.path.join(BIN, "masq-smtpd")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, env=masq.env(TCPREMOTEIP="192.0.2.1"))
    p.stdin.write(session(EHLO, b"MAIL FROM:<a@client.example>", b"RCPT TO:<bob@test.example>",
                          b"DATA", b"half a message"))
    p.stdin.flush()
    out = p.stdout.read()
    p.wait(timeout=10)
    p.stdin.close()
    assert reply_lines(out)[-1] == "421 4.4.2 test.example Error: timeout exceeded"
    assert spool_messages(masq) == {} and tmp_files(masq) == []


def test_pregreet_talker_is_rejected(masq):
    masq.config("[smtpd]\ngreet_delay = 2")
    start = time.monotonic()
    r, lines = smtpd(masq, session(EHLO, b"MAIL FROM:<a@client.example>",
                                   b"RCPT TO:<bob@test.example>", b"DATA", b"hi", b".", b"QUIT"))
    assert lines == ["521 5.5.1 test.example Error: protocol error, talked before the greeting"]
    assert time.monotonic() - start < 1.5      # the talker is seen at once, not after the delay
    assert spool_messages(masq) == {}


def test_pregreet_waits_for_a_polite_client(masq):
    masq.config("[smtpd]\ngreet_delay = 0.3")
    p = subprocess.Popen([os.path.join(BIN, "masq-smtpd")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, env=masq.env(TCPREMOTEIP="192.0.2.1"))
    assert p.stdout.readline() == b"220 test.example ESMTP masq\r\n"
    p.stdin.write(b"QUIT\r\n")
    p.stdin.close()
    assert p.stdout.read() == b"221 2.0.0 Bye\r\n"
    p.stdout.close()
    assert p.wait(timeout=10) == 0


# -- users = "system"

def test_system_users_unknown_user_is_550(masq):
    with open(masq.conf) as f:
        text = f.read()
    masq.set_config(text.replace('users = "any"', 'users = "system"'))
    r, lines = smtpd(masq, session(EHLO, b"MAIL FROM:<a@client.example>",
                                   b"RCPT TO:<no-such-user-here@test.example>",
                                   b"RCPT TO:<root@test.example>",
                                   b"RCPT TO:<postmaster@localhost>",
                                   b"QUIT"))
    assert lines[-4:] == [
        "550 5.1.1 <no-such-user-here@test.example>: Recipient address rejected: user unknown",
        "250 2.1.5 Ok", "250 2.1.5 Ok", "221 2.0.0 Bye"]


def test_system_users_aliases_count_as_users(masq):
    with open(masq.conf) as f:
        text = f.read()
    masq.set_config(text.replace('users = "any"', 'users = "system"'))
    with open(os.path.join(masq.dir, "aliases"), "a") as f:
        f.write("team-list: root, someone@elsewhere.example\n")
    r, lines = smtpd(masq, session(EHLO, b"MAIL FROM:<a@client.example>",
                                   b"RCPT TO:<Team-List@test.example>", b"QUIT"))
    assert lines[-2] == "250 2.1.5 Ok"
    os.chmod(os.path.join(masq.dir, "aliases"), 0)
    if os.geteuid() != 0:       # root reads it anyway
        r, lines = smtpd(masq, session(EHLO, b"MAIL FROM:<a@client.example>",
                                       b"RCPT TO:<nobody-here@test.example>", b"QUIT"))
        assert lines[-2] == "451 4.3.0 Error: alias table unavailable, try again later"


# -- MASQ_QUEUE: another program queues the message

def queue_stub(tmp_path, code):
    script = tmp_path / "stub"
    script.write_text(f"#!/bin/sh\ncat > {tmp_path}/message\ncat <&1 > {tmp_path}/envelope\n"
                      f"env | grep ^MASQ_ | sort > {tmp_path}/env\nexit {code}\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("code, reply", [
    (0, "250 2.0.0 Ok: queued"), (111, "451 4.3.0 Error: queue file write error"),
    (75, "451 4.3.0 Error: queue file write error"),
    (100, "554 5.6.0 Error: message rejected by the queue"),
])
def test_masq_queue_program(masq, tmp_path, code, reply):
    stub = queue_stub(tmp_path, code)
    r, lines = smtpd(masq, session(EHLO, b"MAIL FROM:<a@client.example>",
                                   b"RCPT TO:<bob@test.example>", b"DATA", b"..hi", b".",
                                   b"QUIT"), MASQ_QUEUE=stub)
    assert replies_match([lines[-2]], [reply]), lines
    assert (tmp_path / "message").read_bytes() == b".hi\n"
    assert (tmp_path / "envelope").read_bytes() == b"Fa@client.example\0Tbob@test.example\0\0"
    env = (tmp_path / "env").read_text()
    assert "MASQ_CLIENT=192.0.2.1\n" in env and "MASQ_HELO=client.example\n" in env
    assert "MASQ_PROTO=esmtp\n" in env and "MASQ_FOR=bob@test.example\n" in env
    assert spool_messages(masq) == {}


def test_spool_failure_is_451(masq):
    tmp = os.path.join(masq.spool, "tmp")
    os.rename(tmp, tmp + ".away")           # masq-queue cannot create its file
    r, lines = smtpd(masq, session(EHLO, b"MAIL FROM:<a@client.example>",
                                   b"RCPT TO:<bob@test.example>", b"DATA", b"hi", b".", b"NOOP",
                                   b"QUIT"))
    os.rename(tmp + ".away", tmp)
    assert lines[-3:] == ["451 4.3.0 Error: queue file write error", "250 2.0.0 Ok",
                          "221 2.0.0 Bye"]
    assert b"masq-smtpd: warning: unable to queue" in r.err
    assert spool_messages(masq) == {}


def test_local_user_on_pipes_may_relay(masq):
    r, lines = smtpd(masq, session(b"HELO me", b"MAIL FROM:<me@test.example>",
                                   b"RCPT TO:<friend@elsewhere.example>", b"QUIT"),
                     TCPREMOTEIP=None)
    assert lines[-2] == "250 2.1.5 Ok"


def test_a_client_that_never_reads_is_dropped(masq):
    masq.config("[smtpd]\ncommand_timeout = 1\nmax_errors = 1000000")
    import socket
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    p = subprocess.Popen([os.path.join(BIN, "masq-smtpd")], stdin=b, stdout=b,
                         env=masq.env(TCPREMOTEIP="192.0.2.1"))
    b.close()
    a.settimeout(20)
    try:
        a.sendall(b"NOOP\r\n" * 200000)     # replies pile up: we never read them
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert p.wait(timeout=20) != 0          # ended by its write deadline
    a.close()


# -- issue 9: policy answers are no errors; Date and Message-ID; delivery without a daemon

def test_issue9_unknown_users_do_not_end_the_session(masq):
    with open(masq.conf) as f:
        text = f.read()
    masq.set_config(text.replace('users = "any"', 'users = "system"'))
    unknown = [b"RCPT TO:<nobody-%d@test.example>" % n for n in range(12)]
    r, lines = smtpd(masq, session(EHLO, b"MAIL FROM:<a@client.example>",
                                   b"RCPT TO:<root@test.example>", *unknown,
                                   b"DATA", b"hi\r\n.", b"QUIT"))
    assert lines.count("250 2.1.5 Ok") == 1
    assert sum(" user unknown" in line for line in lines) == 12
    assert lines[-2].startswith("250 2.0.0 Ok: queued as"), lines
    assert len(spool_messages(masq)) == 1


def test_issue9_client_errors_still_count(masq):
    masq.config("[smtpd]\nmax_errors = 3")
    r, lines = smtpd(masq, session(EHLO, b"BOGUS", b"BOGUS", b"BOGUS", b"NOOP"))
    assert lines[-1] == "421 4.7.0 test.example Error: too many errors"


@pytest.mark.parametrize("ip, setting, added", [
    ("127.0.0.1", None, True), ("192.0.2.1", None, False),
    ("192.0.2.1", "all", True), ("127.0.0.1", "none", False)])
def test_issue9_date_and_message_id_for_trusted_clients(masq, ip, setting, added):
    if setting:
        masq.config(f'[smtpd]\nadd_missing_headers = "{setting}"')
    r, lines = smtpd(masq, session(EHLO, b"MAIL FROM:<a@client.example>",
                                   b"RCPT TO:<bob@test.example>", b"DATA",
                                   b"Subject: hi\r\n\r\nbody\r\n.", b"QUIT"), TCPREMOTEIP=ip)
    qid = lines[-2].rsplit(" ", 1)[1]
    [(data, _)] = spool_messages(masq).values()
    head = data.split(b"\n\n")[0].decode()
    assert ("\nDate: " in head) == added, head
    assert (f"\nMessage-ID: <{qid}@test.example>\n" in head + "\n") == added, head
    assert body(data).endswith(b"Subject: hi\n\nbody\n")


def test_issue9_present_date_and_message_id_are_kept(masq):
    message = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <x@y>\r\n\r\nbody\r\n"
    r, lines = smtpd(masq, session(EHLO, b"MAIL FROM:<a@client.example>",
                                   b"RCPT TO:<bob@test.example>", b"DATA",
                                   message + b".", b"QUIT"), TCPREMOTEIP="127.0.0.1")
    [(data, _)] = spool_messages(masq).values()
    assert data.count(b"Date:") == 1 and data.count(b"Message-ID:") == 1
    assert body(data) == message.replace(b"\r\n", b"\n")


def test_issue9_bad_add_missing_headers_is_a_configuration_error(masq):
    masq.config('[smtpd]\nadd_missing_headers = "sometimes"')
    r, lines = smtpd(masq, EHLO)
    assert lines == ["421 4.3.5 Error: server configuration error"]


def test_issue9_nul_in_bdat_is_refused(masq):
    chunk = b"Subject: x\r\n\r\na\0b\r\n"
    r, lines = smtpd(masq, session(EHLO, b"MAIL FROM:<a@client.example>",
                                   b"RCPT TO:<bob@test.example>",
                                   b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"QUIT"))
    assert lines[-2] == "550 5.6.0 Error: NUL byte in the message (RFC 5322 section 2.3)"
    assert spool_messages(masq) == {} and tmp_files(masq) == []


def test_issue9_without_a_daemon_the_message_is_delivered_at_once(masq, daemon_listens):
    os.close(daemon_listens)            # no reader on the trigger: no daemon
    r, lines = smtpd(masq, session(EHLO, b"MAIL FROM:<a@client.example>",
                                   b"RCPT TO:<bob@test.example>", b"DATA",
                                   b"Subject: now\r\n\r\nbody\r\n.", b"QUIT"))
    assert lines[-2].startswith("250 2.0.0 Ok: queued as"), lines
    deadline = time.monotonic() + 30
    while not (os.path.isdir(os.path.join(masq.dir, "mail", "bob"))
               and len(masq.maildir("bob"))) and time.monotonic() < deadline:
        time.sleep(0.05)                # the detached run reports to no one
    assert [m["Subject"] for m in masq.maildir("bob")] == ["now"]
    assert spool_messages(masq) == {}


def test_issue9_nul_from_sendmail_exits_65(masq):
    r = masq.run([masq.bin("sendmail"), "-odq", "bob"], input=b"Subject: x\n\na\0b\n")
    assert r.rc == 65 and b"NUL byte" in r.err, r
    assert spool_messages(masq) == {} and tmp_files(masq) == []
