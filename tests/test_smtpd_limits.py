"""masq-smtpd's deadlines: a whole command line, a whole DATA or BDAT, a whole session.

A timeout per read lets a client that sends a byte a second hold a
connection for ever (issue 10); these clients trickle on real sockets
under masq-tcpserver and must get 421 4.4.2 within the deadline.  The
waits here are the behaviour under test (how slowly a client talks), so
they are sleeps; every check of a reply still reads it from the socket.
"""
import select
import socket
import threading
import time

import pytest
from smtpd_helpers import HOST, Listener

TOO_SLOW = "421 4.4.2 " + HOST + " Error: too slow, {} deadline exceeded"
DEADLINE_SECONDS = 2
SLACK_SECONDS = 1.5             # process start, poll granularity, a loaded machine
EARLIEST_SECONDS = DEADLINE_SECONDS - 0.1   # the server's clock starts at a byte sent before ours


pytestmark = pytest.mark.usefixtures("daemon_listens")


@pytest.fixture
def limits(masq):
    """Short deadlines, long timeouts: only a deadline can end these sessions."""
    masq.config(f"[smtpd]\ncommand_timeout = 60\ndata_timeout = 60\n"
                f"command_deadline = {DEADLINE_SECONDS}\ndata_deadline = {DEADLINE_SECONDS}")
    return masq


def connect(port, source="127.0.0.1"):
    s = socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0))
    f = s.makefile("rb")
    assert f.readline().startswith(b"220 ")
    return s, f


def command(s, f, line):
    """Send a whole command line; its reply's last line."""
    s.sendall(line + b"\r\n")
    while (reply := f.readline())[3:4] == b"-":
        pass
    return reply


def trickle(s, data, every=0.25):
    """Send `data` a byte at a time until the server answers; (answer, seconds taken)."""
    start = time.monotonic()
    for i in range(len(data)):
        s.sendall(data[i:i + 1])
        if select.select([s], [], [], every)[0]:
            break
    else:
        select.select([s], [], [], 30)
    return s.recv(4096), time.monotonic() - start


def test_a_trickled_command_line_is_dropped_at_the_command_deadline(limits):
    with Listener(limits) as srv:
        s, _ = connect(srv.port)
        with s:
            answer, took = trickle(s, b"EHLO client.example.with.a.long.name\r\n" * 2)
            assert answer == (TOO_SLOW.format("command") + "\r\n").encode()
            assert EARLIEST_SECONDS <= took < DEADLINE_SECONDS + SLACK_SECONDS
            assert s.recv(100) == b""               # and closed
    assert "too slow: client=127.0.0.1 deadline=command" in limits.log()


def test_time_between_commands_is_under_the_timeout_not_the_deadline(limits):
    with Listener(limits) as srv:
        s, f = connect(srv.port)
        with s:
            time.sleep(DEADLINE_SECONDS + 0.5)      # idle, as RFC 5321 4.5.3.2.7 allows
            assert command(s, f, b"EHLO client.example").startswith(b"250 ")
            time.sleep(DEADLINE_SECONDS + 0.5)
            assert command(s, f, b"NOOP") == b"250 2.0.0 Ok\r\n"


def test_a_trickled_message_is_dropped_at_the_data_deadline_and_not_queued(limits):
    with Listener(limits) as srv:
        s, f = connect(srv.port)
        with s:
            command(s, f, b"EHLO client.example")
            command(s, f, b"MAIL FROM:<a@client.example>")
            assert command(s, f, b"RCPT TO:<bob@test.example>").startswith(b"250 ")
            assert command(s, f, b"DATA").startswith(b"354 ")
            # whole lines, each in time for data_timeout: only the deadline stops it
            answer, took = trickle(s, b"Subject: slow\r\n\r\n" + b"line\r\n" * 100, every=0.1)
    assert answer == (TOO_SLOW.format("data") + "\r\n").encode()
    assert EARLIEST_SECONDS <= took < DEADLINE_SECONDS + SLACK_SECONDS
    assert limits.queue_ids() == []


def test_a_trickled_bdat_run_is_dropped_at_the_data_deadline(limits):
    with Listener(limits) as srv:
        s, f = connect(srv.port)
        with s:
            command(s, f, b"EHLO client.example")
            command(s, f, b"MAIL FROM:<a@client.example>")
            command(s, f, b"RCPT TO:<bob@test.example>")
            s.sendall(b"BDAT 400 LAST\r\n")
            answer, took = trickle(s, b"x" * 400, every=0.1)
    assert answer == (TOO_SLOW.format("data") + "\r\n").encode()
    assert took < DEADLINE_SECONDS + SLACK_SECONDS
    assert limits.queue_ids() == []


def test_a_session_of_quick_commands_ends_at_the_session_deadline(masq):
    masq.config("[smtpd]\nsession_deadline = 2")
    with Listener(masq) as srv:
        s, f = connect(srv.port)
        start = time.monotonic()
        with s:
            command(s, f, b"EHLO client.example")
            while (reply := command(s, f, b"NOOP")) == b"250 2.0.0 Ok\r\n":
                assert time.monotonic() - start < 2 + SLACK_SECONDS
                time.sleep(0.2)
    assert reply == (TOO_SLOW.format("session") + "\r\n").encode()
    assert "too slow: client=127.0.0.1 deadline=session" in masq.log()


def test_a_deadline_of_0_is_none(masq):
    masq.config("[smtpd]\ncommand_deadline = 0\ncommand_timeout = 60")
    with Listener(masq) as srv:
        s, f = connect(srv.port)
        with s:
            answer, _ = trickle(s, b"NOOP\r\n", every=0.5)      # 3 s for one line
    assert answer == b"250 2.0.0 Ok\r\n"


def test_40_tricklers_do_not_keep_another_client_out_for_long(limits):
    """masq-tcpserver -c 40 full of slow clients from 127.0.0.1: one from 127.0.0.2
    gets its greeting once the deadline has dropped them, not after command_timeout."""
    with Listener(limits, limit=40) as srv:
        slow = [connect(srv.port)[0] for _ in range(40)]
        stop = threading.Event()

        def drip():
            while not stop.is_set():
                for s in slow:
                    try:
                        s.send(b"x")
                    except OSError:
                        pass
                time.sleep(0.5)

        dripper = threading.Thread(target=drip)
        dripper.start()
        try:
            start = time.monotonic()
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=30,
                                         source_address=("127.0.0.2", 0))
            with s:
                greeting = s.makefile("rb").readline()
                waited = time.monotonic() - start
        finally:
            stop.set()
            dripper.join()
            for s in slow:
                s.close()
    assert greeting.startswith(b"220 ")
    # held while the 40 were there (the listener was full), let in once they went
    assert DEADLINE_SECONDS - 0.5 <= waited < DEADLINE_SECONDS + 0.5 + SLACK_SECONDS
