"""A DNS server on loopback for the DNS list tests (test_dnsbl, test_qmtp): dnsmasq
serving test zones.

bl.test lists 127.0.0.1 and 2001:db8::7 (A 127.0.0.2 and, for 127.0.0.1, a
TXT reason), wl.test lists 127.0.0.1, broken.test answers 127.0.0.1 with an
error code, and every other name under .test is NXDOMAIN (clean.test lists
nobody).  A test module uses the fixture with `from dns_helpers import dns`;
one that needs other records starts its own server with start(records).
"""
import os
import shutil
import socket
import subprocess

import pytest
from conftest import reap

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
REASON = "Listed for testing: see https://bl.test/lookup?127.0.0.1"
V6_NAME = "7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
RECORDS = ["--address=/1.0.0.127.bl.test/127.0.0.2",
           f"--txt-record=1.0.0.127.bl.test,{REASON}",
           f"--address=/{V6_NAME}.bl.test/127.0.0.2",
           "--address=/1.0.0.127.wl.test/127.0.0.2",
           "--address=/1.0.0.127.broken.test/127.255.255.254"]


def free_port():
    """A port free on 127.0.0.1 for both UDP and TCP (dnsmasq binds both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, socket.socket() as t:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            try:
                t.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def start(records):
    """dnsmasq on 127.0.0.1 answering for .test from these records (dnsmasq
    options), NXDOMAIN for the rest: (its Popen, "127.0.0.1:port"); stop() it."""
    if not os.path.exists(DNSMASQ):
        pytest.skip("dnsmasq is not installed (Debian package dnsmasq-base)")
    for _ in range(5):
        port = free_port()
        argv = [DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-daemon",
                "--log-facility=-", "--pid-file=", "--listen-address=127.0.0.1",
                "--bind-interfaces", f"--port={port}", "--local=/test/", *records]
        if os.geteuid() == 0:
            argv.append("--user=root")
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for line in p.stderr:           # readiness: "started" once it listens
            if b"failed" in line.lower() or b"error" in line.lower():
                break
            if b"started" in line:
                return p, f"127.0.0.1:{port}"
        reap(p)
    pytest.fail("dnsmasq would not start")


def stop(p):
    p.terminate()
    p.wait(10)
    reap(p)


@pytest.fixture(scope="module")
def dns():
    """dnsmasq on 127.0.0.1 with the test zones; "127.0.0.1:port"."""
    p, server = start(RECORDS)
    yield server
    stop(p)


def configure(masq, dns_server, smtpd):
    """dns_servers at the top, [smtpd] lines at the end."""
    with open(masq.conf) as f:
        text = f.read()
    masq.set_config(f'dns_servers = ["{dns_server}"]\n' + text + "\n[smtpd]\n" + smtpd + "\n")
