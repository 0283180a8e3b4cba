"""masq-smtpd STARTTLS (RFC 3207) and AUTH (RFC 4954) with real clients on loopback.

A CA and a certificate for localhost/127.0.0.1 come from trustme; the
password file from the real `masq-setup passwd`.  relay_nets = [] so that
127.0.0.1 is an outside client: only AUTH lets it relay.
"""
import base64
import os
import smtplib
import socket
import ssl
import stat
import subprocess

import pytest
import trustme
from conftest import BIN, run
from smtpd_helpers import Listener, reply_lines, spool_messages

PASSWORD = "correct horse 42"
REMOTE = "carol@remote.example"
LOCAL = "bob@test.example"
MESSAGE = b"From: alice@client.example\r\nSubject: tls\r\n\r\nover TLS\r\n"


pytestmark = pytest.mark.usefixtures("daemon_listens")


@pytest.fixture
def tls(masq, tmp_path):
    """A CA the clients trust; masq-smtpd configured with its server certificate."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(os.path.join(masq.dir, "key.pem"))
    cert.cert_chain_pems[0].write_to_path(os.path.join(masq.dir, "cert.pem"))
    ca_file = str(tmp_path / "ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    masq.config('[smtpd]\ntls_cert = "cert.pem"\ntls_key = "key.pem"\nrelay_nets = []')
    set_password(masq, "alice", PASSWORD)
    return ca_file


def set_password(masq, user, password):
    return masq.run(["masq-setup", "passwd", masq.dir, user],
                    input=password.encode() + b"\n").ok()


def client_context(ca_file):
    return ssl.create_default_context(cafile=ca_file)


def pipes_session(masq, data, env=None):
    """masq-smtpd on a pair of pipes (as `sendmail -bs` runs it): reply lines, stderr."""
    r = masq.run(["masq-smtpd"], input=data, env=env)
    assert r.rc == 0, r
    return reply_lines(r.out), r.err


def plain_auth(user, password):
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()


def show(masq, qid):
    return masq.run(["masq-queue", "show", qid]).ok().out


# -- STARTTLS

@pytest.mark.parametrize("kind", ["masq", "ucspi"])
def test_starttls_offered_before_tls_and_auth_only_after(masq, tls, kind):
    with Listener(masq, kind) as srv, smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
        c.ehlo("client.example")
        assert c.has_extn("starttls") and not c.has_extn("auth")
        code, _ = c.starttls(context=client_context(tls))
        assert code == 220
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
        c.ehlo("client.example")
        assert not c.has_extn("starttls")
        assert c.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]


def test_starttls_forgets_the_helo(masq, tls):
    with Listener(masq) as srv, smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
        c.ehlo("client.example")
        c.starttls(context=client_context(tls))
        code, text = c.docmd("MAIL", "FROM:<a@client.example>")   # RFC 3207 4.2: EHLO again
        assert (code, text) == (503, b"5.5.1 Error: send HELO/EHLO first")
        c.ehlo("client.example")
        code, text = c.docmd("STARTTLS")
        assert (code, text) == (503, b"5.5.1 Error: TLS already active")


def test_openssl_s_client_shows_the_certificate(masq, tls):
    with Listener(masq) as srv:
        r = run(["openssl", "s_client", "-starttls", "smtp", "-connect",
                 f"127.0.0.1:{srv.port}", "-CAfile", tls, "-verify_return_error",
                 "-servername", "localhost", "-ign_eof"], input=b"QUIT\r\n")
    out = r.out.decode()
    assert "-----BEGIN CERTIFICATE-----" in out, r
    assert "Verify return code: 0 (ok)" in out, r
    assert "New, TLSv1.3, Cipher is" in out or "New, TLSv1.2, Cipher is" in out, r
    assert "221 2.0.0 Bye" in out, r


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_1_1_is_refused(masq, tls):
    context = client_context(tls)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")     # this client would speak TLS 1.1
    context.minimum_version = ssl.TLSVersion.TLSv1_1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    with Listener(masq) as srv, smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, OSError)):
            c.starttls(context=context)
        with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
            c.ehlo("client.example")


def test_starttls_command_injection_is_refused(masq, tls):
    """CVE-2011-0411: RSET sent in clear text with STARTTLS must not run after TLS."""
    with Listener(masq) as srv, socket.create_connection(("127.0.0.1", srv.port),
                                                         timeout=20) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(b"EHLO client.example\r\n")
        while not (line := f.readline()).startswith(b"250 "):
            assert line.startswith(b"250-")
        s.sendall(b"STARTTLS\r\nRSET\r\n")
        rest = f.read()                     # the server closes
    assert rest == b"501 5.5.4 Error: nothing may follow STARTTLS before the TLS handshake\r\n"


def test_failed_handshake_ends_the_session_with_a_warning(masq, tls):
    with Listener(masq) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO client.example\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            s.sendall(b"STARTTLS\r\n")
            assert f.readline() == b"220 2.0.0 Ready to start TLS\r\n"
            s.sendall(b"this is not a TLS client hello\r\n" * 4)
            try:
                assert f.read() == b""      # closed, no reply in clear text
            except ConnectionResetError:    # closed with our bytes unread
                pass
        srv.proc.terminate()
        err = srv.proc.stderr.read().decode()
    assert "masq-smtpd: warning: TLS handshake with 127.0.0.1 failed" in err


def test_starttls_not_offered_on_pipes_even_when_configured(masq, tls):
    lines, _ = pipes_session(masq, b"EHLO client.example\r\nSTARTTLS\r\nQUIT\r\n")
    assert not any("STARTTLS" in line for line in lines)
    assert "502 5.5.1 Error: command not implemented" in lines


def test_starttls_not_offered_without_a_certificate(masq):
    masq.config("[smtpd]\nrelay_nets = []")
    with Listener(masq) as srv, smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
        c.ehlo("client.example")
        assert not c.has_extn("starttls")
        assert c.docmd("STARTTLS")[0] == 502


def test_maxuse_child_closes_the_tls_connection_after_quit(masq, tls):
    server = subprocess.Popen([os.path.join(BIN, "masq-tcpserver"), "-m", "5", "-1",
                               "127.0.0.1", "0", os.path.join(BIN, "masq-smtpd")],
                              env=masq.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        port = int(server.stdout.readline())
        for _ in range(3):
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
                c.starttls(context=client_context(tls))
                c.ehlo("client.example")
                assert c.docmd("QUIT")[0] == 221
                assert c.sock.recv(100) == b""      # EOF now, not at the child's exit
    finally:
        server.terminate()
        server.wait(timeout=20)
        server.stdout.close()
        server.stderr.close()


# -- AUTH and relaying

@pytest.mark.parametrize("kind", ["masq", "ucspi"])
def test_authenticated_client_may_relay_and_received_says_esmtpsa(masq, tls, kind):
    with Listener(masq, kind) as srv, smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
        c.starttls(context=client_context(tls))
        c.ehlo("client.example")
        assert c.docmd("MAIL", "FROM:<a@client.example>")[0] == 250
        code, text = c.docmd("RCPT", f"TO:<{REMOTE}>")
        assert (code, text) == (554, f"5.7.1 <{REMOTE}>: Relay access denied".encode())
        c.rset()
        assert c.login("alice", PASSWORD) == (235, b"2.7.0 Authentication successful")
        assert c.sendmail("a@client.example", [REMOTE], MESSAGE) == {}
    [qid] = masq.queue_ids()
    out = show(masq, qid)
    assert b"by test.example (masq) with ESMTPSA id " + qid.encode() in out
    assert b"\nauth alice\n" in out and b"\nproto esmtpsa\n" in out
    assert PASSWORD.encode() not in out
    [(data, records)] = spool_messages(masq).values()
    assert PASSWORD not in records and PASSWORD.encode() not in data


def test_tls_without_auth_says_esmtps_and_may_not_relay(masq, tls):
    with Listener(masq) as srv, smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
        c.starttls(context=client_context(tls))
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            c.sendmail("a@client.example", [REMOTE], MESSAGE)
        c.rset()
        assert c.sendmail("a@client.example", [LOCAL], MESSAGE) == {}
    [qid] = masq.queue_ids()
    assert b" with ESMTPS id " in show(masq, qid)


def test_auth_login_mechanism(masq, tls):
    with Listener(masq) as srv, smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
        c.starttls(context=client_context(tls))
        c.ehlo("client.example")
        c.user, c.password = "alice", PASSWORD
        assert c.auth("LOGIN", c.auth_login) == (235, b"2.7.0 Authentication successful")
        assert c.sendmail("a@client.example", [REMOTE], MESSAGE) == {}


def test_wrong_password_gets_535_and_no_relay(masq, tls):
    with Listener(masq) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
            c.starttls(context=client_context(tls))
            c.ehlo("client.example")
            with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                c.auth("PLAIN", lambda challenge=None: "\0alice\0wrong password")
            assert (e.value.smtp_code, e.value.smtp_error) == (
                535, b"5.7.8 Error: authentication credentials invalid")
            with pytest.raises(smtplib.SMTPAuthenticationError):
                c.auth("PLAIN", lambda challenge=None: "\0mallory\0" + PASSWORD)
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                c.sendmail("a@client.example", [REMOTE], MESSAGE)
        srv.proc.terminate()
        err = srv.proc.stderr.read().decode()
    assert "AUTH PLAIN failed for 127.0.0.1" in err
    assert "wrong password" not in err and PASSWORD not in err and "mallory" not in err
    assert masq.queue_ids() == []


def test_auth_protocol_errors(masq, tls):
    good = plain_auth("alice", PASSWORD)
    with Listener(masq) as srv, smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
        c.starttls(context=client_context(tls))
        c.ehlo("client.example")
        assert c.docmd("AUTH", "CRAM-MD5") == (504, b"5.5.4 Error: unsupported authentication "
                                                    b"mechanism")
        assert c.docmd("AUTH", "PLAIN not!base64") == (501, b"5.5.2 Error: cannot decode the "
                                                             b"response (base64)")
        assert c.docmd("AUTH", "PLAIN") == (334, b"")
        assert c.docmd("*") == (501, b"5.0.0 Error: authentication cancelled")
        assert c.docmd("AUTH", "LOGIN") == (334, b"VXNlcm5hbWU6")
        assert c.docmd("*") == (501, b"5.0.0 Error: authentication cancelled")
        assert c.docmd("MAIL", "FROM:<a@client.example>")[0] == 250
        assert c.docmd("AUTH", "PLAIN " + good) == (503, b"5.5.1 Error: MAIL transaction "
                                                         b"in progress")
        c.rset()
        assert c.docmd("AUTH", "PLAIN " + good) == (235, b"2.7.0 Authentication successful")
        assert c.docmd("AUTH", "PLAIN " + good) == (503, b"5.5.1 Error: already authenticated")
        assert c.docmd("MAIL", "FROM:<a@client.example> AUTH=<>")[0] == 250


def test_auth_refused_without_starttls(masq, tls):
    with Listener(masq) as srv, smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
        c.ehlo("client.example")
        assert not c.has_extn("auth")
        code, text = c.docmd("AUTH", "PLAIN " + plain_auth("alice", PASSWORD))
        assert (code, text) == (503, b"5.5.1 Error: authentication not enabled")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            c.sendmail("a@client.example", [REMOTE], MESSAGE)


def test_swaks_starttls_and_auth_plain(masq, tls):
    with Listener(masq) as srv:
        r = run(["swaks", "--server", f"127.0.0.1:{srv.port}", "--tls", "--tls-verify",
                 "--tls-ca-path", tls, "--auth", "PLAIN", "--auth-user", "alice",
                 "--auth-password", PASSWORD, "--from", "a@client.example", "--to", REMOTE,
                 "--ehlo", "client.example", "--timeout", "20"])
    assert r.rc == 0, r
    assert b"<~  235 2.7.0 Authentication successful" in r.out, r
    [qid] = masq.queue_ids()
    assert b" with ESMTPSA id " in show(masq, qid)


def test_swaks_without_auth_cannot_relay(masq, tls):
    with Listener(masq) as srv:
        r = run(["swaks", "--server", f"127.0.0.1:{srv.port}", "--tls", "--tls-verify",
                 "--tls-ca-path", tls, "--from", "a@client.example", "--to", REMOTE,
                 "--timeout", "20"])
    assert r.rc != 0
    assert b"554 5.7.1" in r.out, r
    assert masq.queue_ids() == []


# -- the password file

def test_password_file_readable_by_others_is_refused(masq, tls):
    masq.config("auth_without_tls = true")      # AUTH on pipes: the mode is what is tested
    os.chmod(os.path.join(masq.dir, "passwd"), 0o644)
    lines, err = pipes_session(masq, b"EHLO client.example\r\nAUTH PLAIN "
                               + plain_auth("alice", PASSWORD).encode() + b"\r\nQUIT\r\n")
    assert not any("AUTH" in line for line in lines)
    assert "503 5.5.1 Error: authentication not enabled" in lines
    assert "masq-smtpd: warning: no AUTH: " in err.decode() and "0644" in err.decode()


def test_password_file_0600_allows_auth(masq, tls):
    masq.config("auth_without_tls = true")
    lines, err = pipes_session(masq, b"EHLO client.example\r\nAUTH PLAIN "
                               + plain_auth("alice", PASSWORD).encode() + b"\r\nQUIT\r\n")
    assert "250-AUTH PLAIN LOGIN" in lines or "250 AUTH PLAIN LOGIN" in lines
    assert "235 2.7.0 Authentication successful" in lines
    assert err == b""


def test_masq_setup_passwd_writes_0600_and_replaces_the_line(masq, tls):
    path = os.path.join(masq.dir, "passwd")
    set_password(masq, "dave", "first")
    set_password(masq, "alice", "second one")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    assert sorted(line.split(b":")[0] for line in lines) == [b"alice", b"dave"]
    for line in lines:
        scheme, salt, digest = line.split(b":", 1)[1].split(b"$")
        assert scheme in (b"scrypt", b"pbkdf2_sha256") and len(base64.b64decode(digest)) == 32
    data = b"".join(lines)
    assert b"first" not in data and b"second" not in data and PASSWORD.encode() not in data
    masq.config("auth_without_tls = true")
    lines, _ = pipes_session(masq, b"EHLO c\r\nAUTH PLAIN "
                             + plain_auth("alice", PASSWORD).encode() + b"\r\nAUTH PLAIN "
                             + plain_auth("alice", "second one").encode() + b"\r\nQUIT\r\n")
    assert lines[-3:] == ["535 5.7.8 Error: authentication credentials invalid",
                          "235 2.7.0 Authentication successful", "221 2.0.0 Bye"]


def test_masq_setup_passwd_bad_input(masq, tmp_path):
    r = masq.run(["masq-setup", "passwd", masq.dir, "a:b"], input=b"pw\n")
    assert r.rc == 64 and b"bad user name" in r.err
    r = masq.run(["masq-setup", "passwd", masq.dir, "alice"], input=b"")
    assert r.rc == 64 and b"first line of stdin" in r.err
    assert not os.path.exists(os.path.join(masq.dir, "passwd"))


# -- require_tls (a submission port)

def test_require_tls_refuses_mail_before_starttls(masq, tls):
    masq.config("require_tls = true")
    with Listener(masq) as srv, smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
        c.ehlo("client.example")
        code, text = c.docmd("MAIL", "FROM:<a@client.example>")
        assert (code, text) == (530, b"5.7.0 Must issue a STARTTLS command first")
        c.starttls(context=client_context(tls))
        c.ehlo("client.example")
        assert c.docmd("MAIL", "FROM:<a@client.example>")[0] == 250


def test_require_tls_leaves_a_local_user_on_pipes_alone(masq, tls):
    masq.config("require_tls = true")
    lines, _ = pipes_session(masq, b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\n"
                             b"QUIT\r\n")
    assert "250 2.1.0 Ok" in lines


# -- client certificates as identity (tls_client_ca)

@pytest.fixture
def client_ca(masq, tls, tmp_path):
    """masq-smtpd trusts client certificates from a second CA: (that CA, another CA)."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(os.path.join(masq.dir, "clients.pem"))
    masq.config('tls_client_ca = "clients.pem"')
    return ca, trustme.CA()


def cert_context(tls, ca, tmp_path, name="laptop.client.example"):
    """A client context that trusts the server's CA and shows a certificate from `ca`."""
    context = client_context(tls)
    if ca is not None:
        ca.issue_cert(name, common_name=name).configure_cert(context)
    return context


def test_a_client_certificate_from_tls_client_ca_may_relay(masq, tls, client_ca, tmp_path):
    with Listener(masq) as srv, smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
        c.starttls(context=cert_context(tls, client_ca[0], tmp_path))
        c.ehlo("client.example")
        assert c.sendmail("a@client.example", [REMOTE], MESSAGE) == {}
    [qid] = masq.queue_ids()
    out = show(masq, qid)
    assert b"\t(cert CN=laptop.client.example" in out
    assert b"with ESMTPS id" in out
    assert "tls: client=127.0.0.1 cert=CN=laptop.client.example" in masq.log()


def test_no_client_certificate_may_not_relay(masq, tls, client_ca, tmp_path):
    with Listener(masq) as srv, smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
        c.starttls(context=cert_context(tls, None, tmp_path))
        c.ehlo("client.example")
        c.docmd("MAIL", "FROM:<a@client.example>")
        code, _ = c.docmd("RCPT", f"TO:<{REMOTE}>")
        assert code == 554
        assert c.docmd("RCPT", f"TO:<{LOCAL}>")[0] == 250       # still a client for us


def test_a_certificate_from_another_ca_may_not_relay(masq, tls, client_ca, tmp_path):
    with Listener(masq) as srv, smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
        try:
            c.starttls(context=cert_context(tls, client_ca[1], tmp_path))
            c.ehlo("client.example")
            c.docmd("MAIL", "FROM:<a@client.example>")
            code, _ = c.docmd("RCPT", f"TO:<{REMOTE}>")
        except (ssl.SSLError, smtplib.SMTPServerDisconnected, OSError):
            code = None                     # the handshake fails: no verify callback
        assert code in (None, 554)
    assert masq.queue_ids() == []


def test_openssl_s_client_with_a_client_certificate_relays(masq, tls, client_ca, tmp_path):
    leaf = client_ca[0].issue_cert("relay.client.example", common_name="relay.client.example")
    pem = str(tmp_path / "client.pem")
    leaf.private_key_and_cert_chain_pem.write_to_path(pem)
    dialogue = (b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\n"
                b"RCPT TO:<" + REMOTE.encode() + b">\r\nQUIT\r\n")
    with Listener(masq) as srv:
        r = run(["openssl", "s_client", "-starttls", "smtp", "-connect",
                 f"127.0.0.1:{srv.port}", "-CAfile", tls, "-cert", pem, "-quiet",
                 "-ign_eof"], input=dialogue)
    assert "250 2.1.5 Ok" in r.out.decode(), r
