"""DNSBL and DNSWL in masq-smtpd, against dnsmasq on loopback serving test zones
(dns_helpers: bl.test, wl.test, clean.test, broken.test).

Clients come over masq-tcpserver on 127.0.0.1 (relay_nets = [] makes them
outsiders), or on pipes with TCPREMOTEIP.
"""
import os
import socket
import sys
import time

import pytest
from conftest import run
import dns_helpers
from dns_helpers import REASON, configure, free_port
from smtpd_helpers import Listener, reply_lines

from masq import dnsbl

dns = dns_helpers.dns               # the fixture: dnsmasq on loopback

LISTED = f"554 5.7.1 Service unavailable; client [127.0.0.1] blocked using bl.test; {REASON}"

pytestmark = pytest.mark.usefixtures("daemon_listens")


def swaks(port, to="bob@test.example"):
    r = run(["swaks", "--server", f"127.0.0.1:{port}", "--from", "a@sender.example",
             "--to", to, "--helo", "client.example"], timeout=60)
    return r.rc, r.out.decode("utf-8", "replace")


def session(masq, ip, rcpt="bob@test.example"):
    r = masq.run(["masq-smtpd"], input=f"EHLO c\r\nMAIL FROM:<a@b.example>\r\n"
                 f"RCPT TO:<{rcpt}>\r\nQUIT\r\n".encode(), env=masq.env(TCPREMOTEIP=ip))
    assert r.rc == 0, r
    return reply_lines(r.out)


def test_a_listed_client_is_refused_with_the_zone_reason(masq, dns):
    configure(masq, dns, 'relay_nets = []\ndnsbl = ["clean.test", "bl.test"]')
    with Listener(masq) as srv:
        rc, out = swaks(srv.port)
    assert rc != 0 and LISTED in out, out
    assert masq.queue_ids() == []
    assert f"dnsbl: client=127.0.0.1 listed by bl.test: {REASON}" in masq.log()


def test_an_unlisted_client_is_accepted(masq, dns):
    configure(masq, dns, 'relay_nets = []\ndnsbl = ["clean.test"]')
    with Listener(masq) as srv:
        rc, out = swaks(srv.port)
    assert rc == 0 and "queued as" in out, out
    assert "dnsbl" not in masq.log()


def test_an_ipv6_client_is_asked_for_by_nibbles(masq, dns):
    configure(masq, dns, 'relay_nets = []\ndnsbl = ["bl.test"]')
    lines = session(masq, "2001:db8::7")
    assert lines[-2] == ("554 5.7.1 Service unavailable; client [2001:db8::7] blocked using "
                         "bl.test; listed by bl.test")          # no TXT record: the zone
    assert session(masq, "2001:db8::8")[-2] == "250 2.1.5 Ok"


def test_relay_and_authenticated_clients_are_not_checked(masq, dns):
    configure(masq, dns, 'dnsbl = ["bl.test"]\nauth_without_tls = true')  # relay_nets: loopback
    with Listener(masq) as srv:
        rc, out = swaks(srv.port)
        assert rc == 0 and "queued as" in out, out
    masq.run(["masq-setup", "passwd", masq.dir, "alice"], input=b"pw 12345678\n").ok()
    with open(masq.conf) as f:
        text = f.read()
    masq.set_config(text.replace("[smtpd]\n", "[smtpd]\nrelay_nets = []\n"))
    with Listener(masq) as srv:
        r = run(["swaks", "--server", f"127.0.0.1:{srv.port}", "--from", "a@sender.example",
                 "--to", "bob@test.example", "--auth", "PLAIN", "--auth-user", "alice",
                 "--auth-password", "pw 12345678"], timeout=60)
        assert r.rc == 0 and b"queued as" in r.out, r
        rc, out = swaks(srv.port)               # the same client without AUTH
        assert rc != 0 and LISTED in out, out
    assert masq.log().count("dnsbl: client=127.0.0.1 listed") == 1


def test_a_dns_server_that_is_down_lets_the_client_through_and_is_logged(masq):
    dead = free_port()                  # nothing listens there
    configure(masq, f"127.0.0.1:{dead}", 'relay_nets = []\ndnsbl = ["bl.test"]')
    with Listener(masq) as srv:
        rc, out = swaks(srv.port)
    assert rc == 0 and "queued as" in out, out
    assert "dnsbl: client=127.0.0.1 zone=bl.test lookup failed, let through: " in masq.log()


def test_a_dns_server_that_never_answers_costs_one_timeout(masq):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))   # reads nothing, answers nothing
        configure(masq, f"127.0.0.1:{silent.getsockname()[1]}",
                  'relay_nets = []\ndnsbl = ["bl.test"]')
        start = time.monotonic()
        r = masq.run(["masq-smtpd"], input=b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n"
                     b"RCPT TO:<bob@test.example>\r\nRCPT TO:<carol@test.example>\r\nQUIT\r\n",
                     env=masq.env(TCPREMOTEIP="192.0.2.7"))
        elapsed = time.monotonic() - start
    assert reply_lines(r.out)[-3:] == ["250 2.1.5 Ok", "250 2.1.5 Ok", "221 2.0.0 Bye"], r
    assert dnsbl.LOOKUP_SECONDS - 1 < elapsed < 2 * dnsbl.LOOKUP_SECONDS + 10   # not two
    assert masq.log().count("lookup failed, let through") == 1


def test_an_error_code_from_the_list_is_no_listing(masq, dns):
    configure(masq, dns, 'relay_nets = []\ndnsbl = ["broken.test"]')
    assert session(masq, "127.0.0.1")[-2] == "250 2.1.5 Ok"
    assert "127.255.255.254, an error code, not a listing" in masq.log()


def test_a_dnswl_listed_client_skips_greylisting_and_the_dnsbl(masq, dns):
    configure(masq, dns, 'relay_nets = []\ngreylist = true\ndnswl = ["wl.test"]\n'
              'dnsbl = ["bl.test"]')
    with Listener(masq) as srv:
        rc, out = swaks(srv.port)
    assert rc == 0 and "queued as" in out, out
    assert "dnswl: client=127.0.0.1 listed by wl.test: no dnsbl, no greylisting" in masq.log()
    assert "dnsbl: client" not in masq.log()
    # a client the dnswl does not list is greylisted
    assert session(masq, "192.0.2.7")[-2].startswith("451 4.7.1")


def test_query_names():
    assert dnsbl.query_name("192.0.2.99", "bl.example") == "99.2.0.192.bl.example"
    # RFC 5782 section 2.4
    assert dnsbl.query_name("2001:db8:1:2:3:4:567:89ab", "ugly.example.com.") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com")
    assert dnsbl.query_name("", "bl.example") is None


def test_a_session_without_zones_does_not_import_dnspython(masq):
    smtpd = os.path.join(os.path.dirname(sys.executable), "masq-smtpd")
    r = masq.run([sys.executable, "-X", "importtime", smtpd],
                 input=b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<bob@test.example>\r\n"
                       b"QUIT\r\n", env=masq.env(TCPREMOTEIP="192.0.2.7"))
    assert b"250 2.1.5 Ok" in r.out, r
    assert b" dns." not in r.err and b"sqlite3" not in r.err, r.err
