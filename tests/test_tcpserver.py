"""masq-tcpserver under file-descriptor exhaustion: it pauses, never spins."""
import os
import resource
import socket
import subprocess
import time

from conftest import BIN


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_emfile_on_accept_pauses_instead_of_spinning(masq):
    def few_fds():
        resource.setrlimit(resource.RLIMIT_NOFILE, (6, 6))   # 0-5 in use: accept fails
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
