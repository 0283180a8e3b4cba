"""masq-tcpserver under file-descriptor exhaustion: it pauses, never spins."""
import os
import resource
import shutil
import smtplib
import socket
import subprocess
import time

import pytest

from conftest import BIN, free_port


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_emfile_on_accept_pauses_instead_of_spinning(masq):
    def few_fds():
        # 0-9 in use (stdio, the socket, the wake-up, alive and status pipes): accept fails
        resource.setrlimit(resource.RLIMIT_NOFILE, (10, 10))
    server = subprocess.Popen([os.path.join(BIN, "masq-tcpserver"), "-1", "127.0.0.1", "0",
                               os.path.join(BIN, "masq-smtpd")], env=masq.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              preexec_fn=few_fds)
    clients = []
    try:
        port = int(server.stdout.readline())
        for _ in range(3):                  # each accept fails: no descriptor left
            clients.append(socket.create_connection(("127.0.0.1", port)))
        start = cpu_seconds(server.pid)
        time.sleep(1.0)                     # measuring CPU over a second, not waiting
        assert cpu_seconds(server.pid) - start < 0.3
    finally:
        for c in clients:
            c.close()
        server.terminate()
        server.wait(timeout=20)
    assert b"unable to accept" in server.stderr.read()


def start(masq, *options):
    server = subprocess.Popen([os.path.join(BIN, "masq-tcpserver"), *options, "-1", "127.0.0.1",
                               "0", os.path.join(BIN, "masq-smtpd")], env=masq.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return server, int(server.stdout.readline())


def send_one(port, n):
    import smtplib
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo()
        s.mail("a@client.example")
        s.rcpt("bob@test.example")
        code, text = s.data(b"Subject: %d\r\n\r\nhello\r\n" % n)
        assert code == 250, text
        return text.split()[-1].decode()       # "... queued as QID"


def test_with_m_one_child_serves_several_connections_in_turn(masq, daemon_listens):
    server, port = start(masq, "-m", "20")
    try:
        # the listener and a waiting child race for each connection: over 12
        # connections in turn the child takes some (all to the listener: 2**-12)
        ids = [send_one(port, n) for n in range(12)]
    finally:
        server.terminate()
        server.wait(timeout=20)
    pids = {qid.split("-")[1] for qid in ids}  # a queue id holds its writer's pid
    assert len(pids) < len(ids), ids
    assert sorted(masq.queue_ids()) == sorted(ids)


def test_with_m_1_every_connection_has_its_own_process(masq):
    server, port = start(masq, "-m", "1")
    try:
        ids = [send_one(port, n) for n in range(3)]
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert len({qid.split("-")[1] for qid in ids}) == 3


def test_sigterm_with_m_stops_the_waiting_children_too(masq):
    server, port = start(masq, "-m", "50")
    send_one(port, 0)                           # leaves a child waiting for more
    server.terminate()
    assert server.wait(timeout=20) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:          # the child sees the listener's EOF
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.05)
    raise AssertionError("a child still listens after the listener stopped")


def test_sigterm_with_m_frees_the_port_while_a_session_goes_on(masq):
    server, port = start(masq, "-m", "50")
    with socket.create_connection(("127.0.0.1", port), timeout=20) as session:
        assert session.recv(100).startswith(b"220 ")      # a child holds the socket
        server.terminate()
        assert server.wait(timeout=20) == 0
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            raise AssertionError("the port still listens while a -m session goes on")
        except ConnectionRefusedError:
            pass
        session.sendall(b"QUIT\r\n")
        assert session.recv(100).startswith(b"221 ")


TOO_MANY = b"421 4.7.0 Error: too many connections from your address\r\n"


def first_line(port, source="127.0.0.1"):
    """A connection from `source` and the first line the server says on it."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=20,
                                    source_address=(source, 0))
    line = b""
    while not line.endswith(b"\n"):
        more = conn.recv(1)
        if not more:
            break
        line += more
    return conn, line


def quit_session(conn):
    """QUIT, then wait until the server has closed the connection."""
    conn.sendall(b"QUIT\r\n")
    while conn.recv(100):
        pass
    conn.close()


def test_C_refuses_a_client_over_its_limit_and_serves_others(masq):
    server, port = start(masq, "-c", "50", "-C", "10")
    held = []
    try:
        for n in range(1, 41):
            conn, line = first_line(port)
            held.append(conn)
            if n <= 10:
                assert line.startswith(b"220 "), (n, line)
            else:                                       # from the listener, closed at once
                assert line == TOO_MANY, (n, line)
                assert conn.recv(100) == b""
        other, line = first_line(port, "127.0.0.2")
        held.append(other)
        assert line.startswith(b"220 "), line
    finally:
        for conn in held:
            conn.close()
        server.terminate()
        server.wait(timeout=20)


def test_C_with_m_counts_the_connections_a_child_takes_itself(masq):
    server, port = start(masq, "-m", "5", "-C", "1")
    try:
        for _ in range(8):              # each ends before the next: never one too many
            conn, line = first_line(port)
            assert line.startswith(b"220 "), line
            quit_session(conn)
        held, line = first_line(port)
        assert line.startswith(b"220 "), line
        for _ in range(4):              # the listener or a waiting child takes these
            extra, line = first_line(port)
            assert line == TOO_MANY, line
            extra.close()
        quit_session(held)
        conn, line = first_line(port)
        assert line.startswith(b"220 "), line
        quit_session(conn)
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_by_default_children_serve_many_connections_and_a_spare_waits(masq, daemon_listens):
    server, port = start(masq)
    try:
        ids = [send_one(port, n) for n in range(12)]
        # the first connection's child, and the spare forked when it took it:
        # the children waiting take every later one, the listener forks no more
        pids = {qid.split("-")[1] for qid in ids}
        assert len(pids) <= 3, ids
        with open(f"/proc/{server.pid}/task/{server.pid}/children") as f:
            children = f.read().split()
        assert 1 <= len(children) <= 3, children
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert sorted(masq.queue_ids()) == sorted(ids)


def test_a_session_served_after_another_starts_afresh(masq, daemon_listens):
    # -c 1: one child, so the same process serves every session in turn
    server, port = start(masq, "-c", "1")
    try:
        conn, line = first_line(port)
        conn.sendall(b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\n")
        reply = b""
        while not reply.endswith(b"\r\n") or b"\r\n250 2.1.0" not in b"\r\n" + reply:
            reply += conn.recv(4096)
        conn.close()                            # gone in the middle of a transaction
        first = send_one(port, 0)
        conn, line = first_line(port)
        assert line.startswith(b"220 ")
        conn.sendall(b"MAIL FROM:<a@client.example>\r\n")
        assert conn.recv(4096).startswith(b"503 ")     # no HELO in this session
        quit_session(conn)
        second = send_one(port, 1)
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert first.split("-")[1] == second.split("-")[1]     # one process served them all
    assert sorted(masq.queue_ids()) == sorted([first, second])


@pytest.mark.skipif(not shutil.which("systemd-socket-activate"),
                    reason="no systemd-socket-activate")
def test_a_socket_systemd_passes_is_served_and_host_port_not_bound(masq, daemon_listens):
    port = free_port()                          # for systemd's socket
    # Accept=no, as masq-smtpd.socket: the listening socket is masq-tcpserver's fd 3
    server = subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{port}",
                               "-E", f"MASQ_CONF={masq.env()['MASQ_CONF']}",
                               os.path.join(BIN, "masq-tcpserver"), "127.0.0.1", str(port),
                               os.path.join(BIN, "masq-smtpd")], env=masq.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                ids = [send_one(port, n) for n in range(3)]
                break
            except (ConnectionRefusedError, smtplib.SMTPServerDisconnected):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert sorted(masq.queue_ids()) == sorted(ids)
    # binding HOST PORT itself would have failed: systemd holds that port
    assert b"unable to bind" not in server.stderr.read()
