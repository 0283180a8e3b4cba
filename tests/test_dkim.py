"""DKIM signing on a route (masq.dkim, masq-setup dkim), checked by two verifiers.

A message goes through masq-send (or masq-smtp) to aiosmtpd on loopback; the
bytes it received are checked by dkimpy's verifier, asking a dnsmasq on
loopback for the TXT record `masq-setup dkim` printed, and by OpenDKIM's
opendkim-testmsg.  opendkim-testmsg has no option for a DNS server: it
asks the libc resolver, which reads /etc/resolv.conf and speaks to port 53
only.  So it runs in a namespace of its own (`unshare -rmn`: a user, mount
and network namespace, no privilege needed where user namespaces are
allowed) with a resolv.conf naming 127.0.0.1 bind-mounted over
/etc/resolv.conf and dnsmasq on that namespace's own loopback, port 53.
Nothing leaves the machine and the host's resolver is not touched.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import Masq, enqueue, run
from smtp_helpers import AioServer, Recorder
from test_smtp_client import dns  # noqa: F401 -- the dnsmasq fixture

MESSAGE = ("From: Alice <alice@laptop.example.org>\nTo: bob@remote.example\n"
           "Subject: signed\nDate: Mon, 7 Dec 2026 10:00:00 +0000\n"
           "Message-ID: <dkim-test@laptop.example.org>\nMIME-Version: 1.0\n"
           "Content-Type: text/plain; charset=utf-8\n\n"
           ".a line with a dot\ntrailing blanks   \ntabs\tand  spaces\nGr\u00fc\u00dfe\n\n\n"
           ).encode()
OPENDKIM_TESTMSG = shutil.which("opendkim-testmsg") or "/usr/sbin/opendkim-testmsg"
DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"

# run inside `unshare -rmn`: argv = folder, dnsmasq --txt-record value; message on stdin
NAMESPACE_CHECK = r"""
import subprocess, sys
folder, record = sys.argv[1], sys.argv[2]
with open(folder + "/resolv.conf", "w") as f:
    f.write("nameserver 127.0.0.1\n")
subprocess.run(["mount", "--bind", folder + "/resolv.conf", "/etc/resolv.conf"], check=True)
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
# --no-daemon also keeps dnsmasq from changing user and group, which a user
# namespace does not allow
dnsmasq = subprocess.Popen([DNSMASQ, "--no-daemon", "--no-resolv", "--no-hosts",
                            "--log-facility=-", "--listen-address=127.0.0.1",
                            "--bind-interfaces", "--port=53", "--txt-record=" + record],
                           stderr=subprocess.PIPE)
for line in dnsmasq.stderr:         # readiness: "started" once it listens
    if b"started" in line:
        break
else:
    sys.exit("dnsmasq did not start")
try:
    sys.exit(subprocess.run([OPENDKIM_TESTMSG]).returncode)
finally:
    dnsmasq.terminate()
    dnsmasq.wait()
"""


@pytest.fixture
def sink():
    server = AioServer(Recorder())
    yield server
    server.stop()


def setup(tmp_path):
    folder = str(tmp_path / "laptop")
    run(["masq-setup", "local-only", folder, "--hostname", "laptop.example.org"]).ok()
    return Masq(folder)


def make_key(masq, algorithm, selector="mail", domain="example.org"):
    """masq-setup dkim: (the TXT record's strings, the route keys it printed)."""
    out = run(["masq-setup", "dkim", masq.dir, domain, selector,
               "--algorithm", algorithm]).ok().out.decode()
    [record] = [line for line in out.splitlines() if " IN TXT " in line]
    assert record.startswith(f"{selector}._domainkey.{domain}. IN TXT ")
    strings = re.findall(r'"([^"]*)"', record.partition(" IN TXT ")[2])
    assert strings and all(len(s) <= 255 for s in strings), record
    keys = [line for line in out.splitlines() if line.startswith("dkim_")]
    return strings, keys


def add_route(masq, port, keys, extra=""):
    masq.config(f'[route.out]\nhost = "127.0.0.1:{port}"\ntls = "none"\n'
                + "".join(k + "\n" for k in keys) + extra)


def send(masq, message=MESSAGE, sender="alice@laptop.example.org"):
    enqueue(masq, message, sender, ["bob@remote.example"]).ok()
    return masq.run(["masq-send", "--once"]).ok()


def received(sink):
    [(_, _, content, _)] = sink.handler.messages
    return content


def dkimpy_verifies(message, server):
    """dkimpy's verifier, its key asked from the dnsmasq at `server`."""
    import dkim
    import dns.resolver
    host, port = server.split(":")

    def get_txt(name, timeout=5):
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port, resolver.lifetime = [host], int(port), timeout
        answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(answer[0].strings)
    return dkim.verify(message, dnsfunc=get_txt)


def opendkim_verifies(message, tmp_path, name, strings):
    """(exit code, stderr) of opendkim-testmsg verifying `message` in its namespace."""
    if not os.path.exists(OPENDKIM_TESTMSG):
        pytest.skip("opendkim-testmsg is not installed (Debian package opendkim-tools)")
    folder = tmp_path / "ns"
    folder.mkdir(exist_ok=True)
    script = f"DNSMASQ = {DNSMASQ!r}\nOPENDKIM_TESTMSG = {OPENDKIM_TESTMSG!r}\n" \
        + NAMESPACE_CHECK
    p = subprocess.run(["unshare", "-rmn", sys.executable, "-c", script, str(folder),
                        ",".join([name] + strings)], input=message, capture_output=True,
                       timeout=60)
    if b"unshare:" in p.stderr:
        pytest.skip(f"no user namespace for opendkim-testmsg: {p.stderr.decode().strip()}")
    return p.returncode, p.stderr.decode()


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_a_route_signs_and_both_verifiers_accept(tmp_path, sink, dns, algorithm):  # noqa: F811
    masq = setup(tmp_path)
    strings, keys = make_key(masq, algorithm)
    add_route(masq, sink.port, keys)
    send(masq)
    message = received(sink)
    assert message.startswith(b"DKIM-Signature: v=1; a=%s-sha256; c=relaxed/relaxed; "
                              b"d=example.org;" % algorithm.encode())
    signature = message.split(b"\r\nFrom:")[0].replace(b"\r\n", b"")
    assert re.search(rb"h=from : to : subject : date : message-id : mime-version\s*:"
                     rb"\s*content-type\s*:\s*from;", signature), signature
    assert b"\r\n..a line" not in message and b"\r\n.a line with a dot\r\n" in message
    server = dns(f"--txt-record=mail._domainkey.example.org,{','.join(strings)}")
    assert dkimpy_verifies(message, server)
    name = "mail._domainkey.example.org"
    assert opendkim_verifies(message, tmp_path, name, strings) == (0, "")
    # and both can fail: one changed byte in the body
    tampered = message.replace(b"spaces", b"spaced")
    assert not dkimpy_verifies(tampered, server)
    code, err = opendkim_verifies(tampered, tmp_path, name, strings)
    assert code != 0 and "Bad signature" in err
    assert masq.queue_ids() == []


def test_signed_after_rewrite_sender(tmp_path, sink, dns):  # noqa: F811
    """No dkim_domain: the domain of From: as sent, after rewriting, signs."""
    masq = setup(tmp_path)
    strings, keys = make_key(masq, "ed25519")
    keys = [k for k in keys if not k.startswith("dkim_domain")]
    add_route(masq, sink.port, keys,
              'rewrite_sender = { "*@laptop.example.org" = "*@example.org" }\n')
    send(masq)
    message = received(sink)
    assert b"\r\nFrom: Alice <alice@example.org>\r\n" in message
    assert b" d=example.org;" in message
    server = dns(f"--txt-record=mail._domainkey.example.org,{','.join(strings)}")
    assert dkimpy_verifies(message, server)
    assert opendkim_verifies(message, tmp_path, "mail._domainkey.example.org",
                             strings) == (0, "")


@pytest.mark.parametrize("problem", ["readable by others", "not a key", "missing"])
def test_a_bad_key_defers_the_message(tmp_path, sink, problem):
    masq = setup(tmp_path)
    _, keys = make_key(masq, "rsa")
    add_route(masq, sink.port, keys)
    key = os.path.join(masq.dir, "keys", "mail._domainkey.example.org.key")
    with open(key, "rb") as f:
        good = f.read()
    if problem == "readable by others":
        os.chmod(key, 0o644)
        reason = "is readable by others (mode 0644): chmod 600 it"
    elif problem == "not a key":
        with open(key, "wb") as f:
            f.write(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
        reason = "DKIM: unable to sign with"
    else:
        os.unlink(key)
        reason = "no such file; make one with masq-setup dkim"
    send(masq)
    assert sink.handler.messages == [] and sink.handler.mails == 0
    assert len(masq.queue_ids()) == 1
    log = masq.log()
    assert "status=deferred" in log and reason in log, log
    assert "status=bounced" not in log
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # fixed: it goes
    os.write(fd, good)
    os.close(fd)
    os.chmod(key, 0o600)
    masq.run(["masq-send", "--once"]).ok()
    assert received(sink).startswith(b"DKIM-Signature: ") and masq.queue_ids() == []


def test_masq_smtp_signs_and_a_bad_key_exits_111(tmp_path, sink, dns):  # noqa: F811
    masq = setup(tmp_path)
    strings, keys = make_key(masq, "rsa")
    add_route(masq, sink.port, keys)
    argv = ["masq-smtp", "--route", "out", "--", "alice@example.org", "bob@remote.example"]
    result = masq.run(argv, input=MESSAGE).ok()
    assert result.out.startswith(b"K ")
    server = dns(f"--txt-record=mail._domainkey.example.org,{','.join(strings)}")
    assert dkimpy_verifies(received(sink), server)
    os.chmod(os.path.join(masq.dir, "keys", "mail._domainkey.example.org.key"), 0o604)
    result = masq.run(argv, input=MESSAGE)
    assert result.rc == 111 and b"readable by others" in result.err, result
    assert len(sink.handler.messages) == 1


def test_a_key_per_sender_domain(tmp_path, sink, dns):  # noqa: F811
    """dkim_key with {domain}: each From: domain its own key; none: unsigned."""
    masq = setup(tmp_path)
    strings, _ = make_key(masq, "ed25519")
    add_route(masq, sink.port, ['dkim_key = "keys/mail._domainkey.{domain}.key"',
                                'dkim_selector = "mail"'])
    send(masq, MESSAGE.replace(b"laptop.example.org>", b"example.org>"))
    send(masq, MESSAGE.replace(b"laptop.example.org>", b"other.example>"))
    first, second = (content for _, _, content, _ in sink.handler.messages)
    server = dns(f"--txt-record=mail._domainkey.example.org,{','.join(strings)}")
    assert b" d=example.org;" in first and dkimpy_verifies(first, server)
    assert not second.startswith(b"DKIM-Signature") and masq.queue_ids() == []


def test_a_message_without_from_goes_unsigned_and_says_so(tmp_path, sink):
    masq = setup(tmp_path)
    _, keys = make_key(masq, "ed25519")
    add_route(masq, sink.port, keys)
    send(masq, b"Subject: no from\n\nbody\n", sender="")
    assert not received(sink).startswith(b"DKIM-Signature")
    assert "dkim=none" in masq.log() and "status=sent" in masq.log()


def test_setup_dkim_writes_a_private_key_and_refuses_to_replace_it(tmp_path):
    masq = setup(tmp_path)
    strings, keys = make_key(masq, "rsa", selector="s2026")
    path = os.path.join(masq.dir, "keys", "s2026._domainkey.example.org.key")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(path)).st_mode & 0o077 == 0
    assert "".join(strings).startswith("v=DKIM1; k=rsa; p=MIIB") and len(strings) == 2
    assert keys == ['dkim_key = "keys/s2026._domainkey.example.org.key"',
                    'dkim_selector = "s2026"', 'dkim_domain = "example.org"',
                    'dkim_algorithm = "rsa-sha256"']
    with open(path, "rb") as f:
        before = f.read()
    again = run(["masq-setup", "dkim", masq.dir, "example.org", "s2026"])
    assert again.rc == 73 and b"choose a new SELECTOR" in again.err, again
    with open(path, "rb") as f:
        assert f.read() == before
    for bad in (["example.org", "s1", "--algorithm", "dsa"], ["exa mple.org", "s1"],
                ["example.org", "s/1"], ["example.org", "s1", "--bits", "512"]):
        result = run(["masq-setup", "dkim", masq.dir, *bad])
        assert result.rc == 64 and b"masq-setup: " in result.err, result
    assert sorted(os.listdir(os.path.dirname(path))) == [os.path.basename(path)]


def test_one_signature_per_message_and_route(tmp_path):
    """Direct delivery sends a message once per domain: it is signed once."""
    import io

    from masq import config, relay, wiremessage
    calls = []

    class Signer:
        def sign(self, data, sender):
            calls.append(data)
            return b"DKIM-Signature: v=1; b=x\n"

    class Msg:
        id = "q1"
    run_ = relay.Relay(config.Config(str(tmp_path / "masq.toml"), {}), None)
    messages = [wiremessage.WireMessage(io.BytesIO(b"From: a@example.org\n\nhi\n"))
                for _ in range(2)]
    for message in messages:
        run_.sign("direct", Signer(), Msg(), message, "a@example.org")
    assert calls == [b"From: a@example.org\n\nhi\n"]
    for message in messages:
        assert b"".join(message.chunks()) == \
            b"DKIM-Signature: v=1; b=x\r\nFrom: a@example.org\r\n\r\nhi\r\n.\r\n"
        assert message.size == len(b"DKIM-Signature: v=1; b=x\r\nFrom: a@example.org\r\n\r\nhi\r\n")

    class Next:
        id = "q2"
    again = wiremessage.WireMessage(io.BytesIO(b"From: a@example.org\n\nagain\n"))
    run_.sign("direct", Signer(), Next(), again, "a@example.org")
    assert len(calls) == 2 and run_.signature[0] == ("q2", "direct")    # one kept, not all
