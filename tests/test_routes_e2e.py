"""Routes end to end: masq-send (runq, sendmail -q) through real SMTP servers.

aiosmtpd with STARTTLS (trustme) and AUTH as the smarthost, a small counting
sink, socat as a wrapper, dnsmasq for MX, and a second masq behind
masq-tcpserver.  Every server listens on loopback on a port picked here.
"""
import email
import email.policy
import io
import os
import subprocess
import threading

import pytest
from conftest import BIN, Masq, clean_env, enqueue, free_port, listen_trigger, reap, run
from smtp_helpers import AioServer, Recorder, Sink, authenticator, tls_contexts, top_config
from test_smtp_client import dns  # noqa: F401 -- the dnsmasq fixture

MESSAGE = (b"From: Alice <alice@laptop.example.org>\nTo: bob@remote.example\n"
           b"Subject: hello\n\n.a line with a dot\nbody from alice@laptop.example.org\n")
REWRITE = '{ "*@laptop.example.org" = "me@isp.example" }'


def serve(servers, handler=None, **kw):
    server = AioServer(handler or Recorder(), **kw)
    servers.append(server)
    return server


class CountingSink(Sink):
    """The sink of smtp_helpers that also counts connections."""

    def __init__(self, **kw):
        self.connections = 0
        super().__init__(**kw)

    def _serve(self, conn):
        with self.lock:
            self.connections += 1
        super()._serve(conn)


@pytest.fixture
def sinks():
    made = []

    def make(**kw):
        sink = CountingSink(**kw)
        made.append(sink)
        return sink
    yield make
    for sink in made:
        sink.stop()


def setup(tmp_path, *args, name="laptop", input=b""):
    folder = str(tmp_path / name)
    run(["masq-setup", *args[:1], folder, *args[1:]], input=input).ok()
    return Masq(folder)


def folder_env():
    """No MASQ_CONF: DIR/bin/* find DIR/masq.toml by themselves."""
    return clean_env()


def cmd(masq, name, *args, input=b""):
    return run([masq.bin(name), *args], input=input, env=folder_env())


def edit(masq, old, new):
    text = open(masq.conf).read()
    assert old in text, old
    masq.set_config(text.replace(old, new))


def route(masq, name, **keys):
    """Append [route.NAME] (values as TOML text)."""
    masq.config(f"[route.{name}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))


def spool_data(masq):
    """The one queued message's bytes as stored."""
    from masq import spool
    [qid] = masq.queue_ids()
    for stage in ("incoming", "active"):
        path = os.path.join(masq.spool, stage, qid)
        if os.path.exists(path):
            msg = spool.Message(spool.Spool(masq.spool), stage, qid)
            with msg.open_data() as f:
                return f.read()


@pytest.fixture
def smarthost(tmp_path, servers):
    """masq-setup smarthost against aiosmtpd with STARTTLS and AUTH; detect = "file"."""
    context, ca_file = tls_contexts(tmp_path)
    handler = Recorder()
    server = serve(servers, handler, tls_context=context, require_starttls=True,
                   authenticator=authenticator("me", "s3cret"), auth_required=True)
    masq = setup(tmp_path, "smarthost", "--relay", f"127.0.0.1:{server.port}",
                 "--user", "me", "--hostname", "laptop.example.org", input=b"s3cret\n")
    edit(masq, 'detect = "always"', 'detect = "file"')
    masq.config(f'tls_ca_file = "{ca_file}"\nrewrite_sender = {REWRITE}')
    return masq, handler


def test_offline_mail_waits_then_runq_delivers_rewritten(smarthost):
    masq, handler = smarthost
    cmd(masq, "sendmail", "-odq", "-f", "alice@laptop.example.org", "bob@remote.example",
        input=MESSAGE).ok()
    stored = spool_data(masq)
    cmd(masq, "runq").ok()
    assert handler.messages == [] and len(masq.queue_ids()) == 1
    assert not os.path.exists(os.path.join(masq.dir, "mail", "alice"))   # no bounce
    assert b"wait: waiting for route smarthost" in cmd(
        masq, "sendmail", "-bv", "bob@remote.example").ok().out
    with open(os.path.join(masq.dir, "online"), "w") as f:
        f.write("smarthost\n")
    cmd(masq, "runq").ok()
    assert masq.queue_ids() == []
    [(sender, rcpts, content, _)] = handler.messages
    assert sender == "me@isp.example" and rcpts == ["bob@remote.example"]
    # From: rewritten on the wire, every other byte as stored (CRLF line ends)
    expected = stored.replace(b"From: Alice <alice@laptop.example.org>",
                              b"From: Alice <me@isp.example>", 1)
    assert expected != stored and content == expected.replace(b"\n", b"\r\n")
    assert "relay=smarthost" in masq.log() and "status=sent" in masq.log()


def test_sendmail_qo_delivers_without_the_online_file(smarthost):
    masq, handler = smarthost
    cmd(masq, "sendmail", "-odq", "-f", "alice@laptop.example.org", "bob@remote.example",
        input=MESSAGE).ok()
    cmd(masq, "sendmail", "-qo", "smarthost").ok()
    assert masq.queue_ids() == [] and len(handler.messages) == 1
    assert handler.messages[0][0] == "me@isp.example"


def plain_route(masq, port, **keys):
    route(masq, "isp", host=f'"127.0.0.1:{port}"', tls='"none"', **keys)


def test_4xx_greeting_defers_shows_in_mailq_and_hoststat_and_backs_off(masq, sinks):
    sink = sinks(greeting=b"421 4.3.2 too busy, come back later")
    masq.config("[queue]\nhoststat_timeout = 1800")    # runq too believes it, however slow
    plain_route(masq, sink.port)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@remote.example"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    [qid] = masq.queue_ids("active")
    assert sink.connections == 1
    assert b"421 4.3.2 too busy" in cmd(masq, "mailq").ok().out
    status = cmd(masq, "hoststat").ok().out.decode()
    assert f"127.0.0.1:{sink.port}" in status and " down " in status and "421" in status
    # within its back-off the host is not tried again: the reason says why
    masq.run(["masq-send", "--once"]).ok()
    assert sink.connections == 1 and masq.queue_ids("active") == [qid]
    assert b"not tried, failed" in cmd(masq, "mailq").ok().out
    assert not os.path.exists(os.path.join(masq.dir, "mail", "alice"))
    cmd(masq, "purgestat").ok()
    assert f"127.0.0.1:{sink.port}" not in cmd(masq, "hoststat").ok().out.decode()
    masq.run(["masq-send", "--once"]).ok()
    assert sink.connections == 2


def test_hoststat_timeout_zero_lets_runq_try_at_once(masq, sinks):
    sink = sinks(greeting=b"451 not now")
    masq.config("[queue]\nhoststat_timeout = 0")
    plain_route(masq, sink.port)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@remote.example"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    assert sink.connections == 2


def test_5xx_bounces_to_the_local_sender_as_a_report(masq, servers):
    handler = Recorder(refuse={"bob@remote.example": "550 5.1.1 no such user here"})
    server = serve(servers, handler)
    plain_route(masq, server.port)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@remote.example"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    assert masq.queue_ids() == [] and handler.messages == []
    [bounce] = list(masq.maildir("alice"))
    parsed = email.message_from_bytes(bounce.as_bytes(), policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    status = list(parsed.iter_parts())[1].as_string()
    assert "Final-Recipient: rfc822; bob@remote.example" in status
    assert "Status: 5.1.1" in status and "no such user here" in status
    assert "up" in cmd(masq, "hoststat").ok().out.decode()


def test_starttls_route_to_a_server_without_starttls_sends_nothing(masq, servers, tmp_path):
    _, ca_file = tls_contexts(tmp_path)
    handler = Recorder()
    server = serve(servers, handler)
    route(masq, "isp", host=f'"127.0.0.1:{server.port}"', tls='"starttls"',
          tls_ca_file=f'"{ca_file}"')
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@remote.example"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    assert handler.mails == 0 and handler.messages == []
    assert len(masq.queue_ids("active")) == 1
    assert b"does not offer STARTTLS" in cmd(masq, "mailq").ok().out


def test_wrapper_route_through_socat(masq, servers):
    handler = Recorder()
    server = serve(servers, handler)
    route(masq, "tunnel", wrapper=f'"socat - TCP:127.0.0.1:{server.port}"',
          rewrite_sender='{ "*@test.example" = "*@isp.example" }')
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@remote.example"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    assert masq.queue_ids() == []
    [(sender, rcpts, content, _)] = handler.messages
    assert sender == "alice@isp.example" and rcpts == ["bob@remote.example"]
    # the From: of this message is not matched by the pattern: left alone
    assert b"\r\nFrom: Alice <alice@laptop.example.org>\r\n" in content
    assert b"\r\n..a line with a dot\r\n" not in content      # aiosmtpd unstuffs


def test_local_and_remote_recipients_of_one_message_each_go_once(masq, sinks):
    dead = free_port()                  # nobody listens there: refused
    plain_route(masq, dead)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost", "x@remote.example"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    assert len(list(masq.maildir("bob"))) == 1
    [qid] = masq.queue_ids("active")
    listing = masq.run(["masq-queue", "list"]).ok().out.decode()
    assert "x@remote.example (deferred:" in listing and "bob@localhost" not in listing
    sink = sinks()
    edit(masq, f"127.0.0.1:{dead}", f"127.0.0.1:{sink.port}")
    masq.run(["masq-send", "--once"]).ok()
    assert masq.queue_ids() == [] and sink.messages == 1
    assert len(list(masq.maildir("bob"))) == 1


def test_issue7_from_condition_reads_the_address_not_a_quoted_display_name(masq, sinks):
    """allowed_from_headers sees me@b.example in `"x <evil@a.example>" <me@b.example>`."""
    sink = sinks()
    plain_route(masq, sink.port, allowed_from_headers='["*@b.example"]')
    message = (b'From: "x <evil@a.example>" <me@b.example>\nTo: bob@remote.example\n'
               b"Subject: quoted\n\nbody\n")
    enqueue(masq, message, "alice@test.example", ["bob@remote.example"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    assert sink.messages == 1 and masq.queue_ids() == [], masq.log()


def test_a_route_that_cannot_work_defers_with_the_reason(masq, sinks):
    sink = sinks()
    secret = os.path.join(masq.dir, "isp.secret")
    with open(secret, "w") as f:
        f.write("pw\n")
    os.chmod(secret, 0o644)
    plain_route(masq, sink.port, auth='{ user = "me", password_file = "isp.secret" }')
    enqueue(masq, MESSAGE, "alice@test.example", ["x@remote.example"]).ok()
    r = masq.run(["masq-send", "--once"]).ok()
    assert b"Traceback" not in r.err
    assert sink.connections == 0 and len(masq.queue_ids("active")) == 1
    assert b"readable by others" in cmd(masq, "mailq").ok().out


@pytest.mark.parametrize("reuse, connections", [(True, 1), (False, 5)])
def test_one_connection_carries_every_message_of_a_run(masq, sinks, reuse, connections):
    sink = sinks()
    plain_route(masq, sink.port, **({} if reuse else {"reuse_connection": "false"}))
    for n in range(5):
        enqueue(masq, MESSAGE + b"%d\n" % n, "alice@test.example", ["bob@remote.example"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    assert masq.queue_ids() == []
    assert sink.messages == 5 and sink.connections == connections


class Meeting(Recorder):
    """A handler whose DATA waits (bounded) until `parties` deliveries are under way."""

    def __init__(self, shared):
        super().__init__()
        self.shared = shared

    async def handle_DATA(self, server, session, envelope):
        s = self.shared
        with s["lock"]:
            s["active"] += 1
            s["most"] = max(s["most"], s["active"])
            s["arrived"] += 1
            first_two = s["arrived"] <= 2
        try:
            if first_two:       # blocks this server's loop only: each has its own thread
                s["barrier"].wait()
        except threading.BrokenBarrierError:
            s["broken"] = True
        finally:
            with s["lock"]:
                s["active"] -= 1
        return await super().handle_DATA(server, session, envelope)


def test_deliveries_to_two_slow_destinations_overlap_up_to_queue_parallel(masq, servers):
    shared = {"lock": threading.Lock(), "active": 0, "most": 0, "arrived": 0,
              "broken": False, "barrier": threading.Barrier(2, timeout=20)}
    made = [serve(servers, Meeting(shared)) for _ in range(3)]
    masq.config("[queue]\nparallel = 2")
    for n, server in enumerate(made):
        route(masq, f"r{n}", host=f'"127.0.0.1:{server.port}"', tls='"none"',
              allowed_recipients=f'["*@d{n}.example"]')
    for n in range(3):
        enqueue(masq, MESSAGE, "alice@test.example", [f"bob@d{n}.example"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    assert masq.queue_ids() == []
    assert sum(len(s.handler.messages) for s in made) == 3
    # the first two met inside DATA at the same time; never more than two at once
    assert shared["most"] == 2 and not shared["broken"], shared


def test_two_masq_instances_by_mx_from_dnsmasq(masq, tmp_path, dns):  # noqa: F811
    second = setup(tmp_path, "local-only", "--hostname", "b.test", name="second")
    trigger = listen_trigger(second.spool)      # a daemon there: the message waits for us
    listener = subprocess.Popen([os.path.join(BIN, "masq-tcpserver"), "-1", "127.0.0.1", "0",
                                 "masq-smtpd"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=second.env())
    try:
        port = int(listener.stdout.readline())
        dns_server = dns("--mx-host=b.test,mx.b.test,10", "--host-record=mx.b.test,127.0.0.1")
        top_config(masq, f'dns_servers = ["{dns_server}"]\nmy_addresses = ["127.0.0.100"]')
        route(masq, "direct", port=port)
        enqueue(masq, MESSAGE, "alice@test.example", ["carol@b.test"]).ok()
        masq.run(["masq-send", "--once"]).ok()
        assert masq.queue_ids() == [], masq.run(["masq-queue", "list"]).out
        assert len(second.queue_ids()) == 1
        second.run(["masq-send", "--once"]).ok()
    finally:
        listener.terminate()
        listener.wait(timeout=10)
        listener.stdout.close()
        listener.stderr.close()
        os.close(trigger)
    [got] = list(second.maildir("carol"))
    assert got.as_bytes().endswith(b"\n.a line with a dot\nbody from "
                                   b"alice@laptop.example.org\n")
    assert second.queue_ids() == []
    assert "relay=direct" in masq.log() and "status=sent" in masq.log()
    status = cmd(masq, "hoststat").ok().out.decode()
    assert "b.test" in status and " up " in status


# -- rewrite_sender on headers: bytes in, bytes out --------------------------------------

@pytest.mark.parametrize("head, want", [
    (b"From: Alice <a@laptop.example.org>\n", b"From: Alice <me@isp.example>\n"),
    (b"from: a@LAPTOP.example.org (Alice)\n", b"from: me@isp.example (Alice)\n"),
    (b"Sender: x@laptop.example.org\nReply-To: y@other.example,\n\tz@laptop.example.org\n",
     b"Sender: me@isp.example\nReply-To: y@other.example,\n\tme@isp.example\n"),
    (b'From: "a@laptop.example.org" <a@laptop.example.org>\n',
     b'From: "a@laptop.example.org" <me@isp.example>\n'),
    (b"To: a@laptop.example.org\nCc: a@laptop.example.org\n",
     b"To: a@laptop.example.org\nCc: a@laptop.example.org\n"),
    (b"From: a@other.example\n", b"From: a@other.example\n"),
    # a line that is no field does not end the rewriting before the empty line
    (b"Received: x\nno colon here\nX Bad: y\nFrom: a@laptop.example.org\n",
     b"Received: x\nno colon here\nX Bad: y\nFrom: me@isp.example\n"),
])
def test_rewrite_headers(head, want):
    from masq import headers, route
    table = {"rewrite_sender": {"*@laptop.example.org": "me@isp.example"}}
    assert route.rewrite_headers(table, headers.scan(io.BytesIO(head))) == want


# -- masq-setup profiles ------------------------------------------------------------------

def test_setup_smarthost_keeps_the_password_private(tmp_path):
    masq = setup(tmp_path, "smarthost", "--relay", "smtp.isp.example:465", "--user", "me",
                 input=b"pw\n")
    secret = os.path.join(masq.dir, "smarthost.secret")
    assert os.stat(secret).st_mode & 0o777 == 0o600
    assert open(secret).read() == "pw\n"
    text = open(masq.conf).read()
    assert 'host = "smtp.isp.example:465"' in text and 'tls = "tls"' in text
    assert 'relay_nets = ["127.0.0.0/8", "::1/128"]' in text
    assert masq.run(["masq-route", "x@remote.example"]).ok().out.startswith(
        b"x@remote.example: route smarthost")
    for name in ("hoststat", "purgestat"):
        assert os.path.islink(masq.bin(name))


def test_setup_direct_and_lan_server(tmp_path):
    direct = setup(tmp_path, "direct", name="d")
    assert b"straight to the MX" in direct.run(["masq-route", "x@remote.example"]).ok().out
    lan = setup(tmp_path, "lan-server", "--lan", "192.168.7.0/24", name="l")
    assert '"192.168.7.0/24"' in open(lan.conf).read()


def test_issue10_direct_refuses_unknown_users_at_rcpt_instead_of_bouncing(tmp_path):
    direct = setup(tmp_path, "direct", "--hostname", "mx.test.example", name="d")
    dialogue = (b"EHLO client.example\r\nMAIL FROM:<someone@elsewhere.example>\r\n"
                b"RCPT TO:<nosuchuser-x7q@mx.test.example>\r\n"
                b"RCPT TO:<postmaster@mx.test.example>\r\n"
                b"QUIT\r\n")
    out = direct.run(["masq-smtpd"], input=dialogue,
                     env=direct.env(TCPREMOTEIP="203.0.113.5")).ok().out
    replies = [line for line in out.split(b"\r\n") if line[:1] in (b"2", b"5")]
    assert replies[-3].startswith(b"550 5.1.1 <nosuchuser-x7q@mx.test.example>"), out
    assert replies[-2].startswith(b"250 "), out        # an alias still takes mail
    for profile, args in (("local-only", ()), ("smarthost", ("--relay", "h.example:587"))):
        text = open(setup(tmp_path, profile, *args, name=profile).conf).read()
        assert 'users = "any"' in text, profile


@pytest.mark.parametrize("args", [
    ["lan-server", "--lan", "0.0.0.0/0"], ["lan-server", "--lan", "8.8.8.0/24"],
    ["lan-server", "--lan", "nonsense"], ["smarthost", "--relay", "nohost"],
    ["smarthost", "--relay", "h:99999"], ["smarthost"]])
def test_setup_refuses_open_relays_and_bad_values(tmp_path, args):
    r = run(["masq-setup", args[0], str(tmp_path / "x"), *args[1:]])
    assert r.rc == 64, r
    assert not os.path.exists(tmp_path / "x" / "masq.toml")


def test_setup_user_without_password_is_refused(tmp_path):
    r = run(["masq-setup", "smarthost", str(tmp_path / "x"), "--relay", "h:25",
             "--user", "me"], input=b"")
    assert r.rc == 64 and b"password" in r.err


def test_the_daemon_sends_by_route_over_one_connection(masq, sinks):
    import signal
    import time
    sink = sinks()
    plain_route(masq, sink.port)
    for n in range(3):
        enqueue(masq, MESSAGE + b"%d\n" % n, "alice@test.example", ["bob@remote.example"]).ok()
    daemon = subprocess.Popen([os.path.join(BIN, "masq-send")], env=masq.env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # no readiness fd: poll what it leaves behind, with a deadline
        deadline = time.monotonic() + 20
        while masq.queue_ids() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert masq.queue_ids() == []
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
    finally:
        reap(daemon)
    assert sink.messages == 3 and sink.connections == 1


# -- issue 9: routes coming up, fall-through, last_route, connect_error_fail --------------


def two_routes(masq, primary_port, backup_port, **primary_keys):
    route(masq, "primary", host=f'"127.0.0.1:{primary_port}"', tls='"none"', **primary_keys)
    route(masq, "backup", host=f'"127.0.0.1:{backup_port}"', tls='"none"')


def test_issue9_mail_deferred_on_one_route_goes_by_the_next_in_the_same_run(masq, sinks):
    refusing, backup = sinks(greeting=b"421 4.3.2 not now"), sinks()
    two_routes(masq, refusing.port, backup.port)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@remote.example"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    assert masq.queue_ids() == [] and backup.messages == 1 and refusing.connections == 1
    log = masq.log()
    assert "relay=primary,backup" in log and "status=sent" in log
    assert "route primary: " in log and "421 4.3.2 not now" in log
    assert not os.path.exists(os.path.join(masq.dir, "mail", "alice"))    # no bounce


def test_issue9_last_route_keeps_mail_deferred_on_its_route(masq, sinks):
    refusing, backup = sinks(greeting=b"421 4.3.2 not now"), sinks()
    two_routes(masq, refusing.port, backup.port, last_route="true")
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@remote.example"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    assert len(masq.queue_ids("active")) == 1 and backup.connections == 0
    assert "relay=primary " in masq.log() and "status=deferred" in masq.log()
    assert b"421 4.3.2 not now" in cmd(masq, "mailq").ok().out


def test_issue9_deferred_on_every_route_names_each_in_mailq(masq):
    two_routes(masq, free_port(), free_port())
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@remote.example"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    listing = cmd(masq, "mailq").ok().out.decode()
    assert "route primary: connect to" in listing and "; route backup: connect to" in listing
    assert masq.log().count("status=deferred") == 1 and "relay=primary,backup" in masq.log()


@pytest.mark.parametrize("greeting, bounced", [(None, True), (b"421 4.3.2 busy", False)])
def test_issue9_connect_error_fail_bounces_a_connection_error_only(masq, sinks,
                                                                    greeting, bounced):
    port = sinks(greeting=greeting).port if greeting else free_port()
    plain_route(masq, port, connect_error_fail="true")
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@remote.example"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    if bounced:
        assert masq.queue_ids() == []
        [report] = list(masq.maildir("alice"))
        assert b"connect_error_fail" in report.as_bytes()
    else:
        assert len(masq.queue_ids("active")) == 1
        assert not os.path.exists(os.path.join(masq.dir, "mail", "alice"))


def test_issue9_connect_error_fail_must_be_a_boolean(masq):
    plain_route(masq, free_port(), connect_error_fail='"yes"')
    r = masq.run(["masq-send", "--once"])      # the schema refuses the file at start
    assert r.rc == 78 and b"connect_error_fail must be true or false" in r.err, r


def test_issue9_sendmail_qo_right_after_a_failure_of_its_host_delivers(masq, sinks):
    sink = sinks(greeting=b"421 4.3.2 line not up yet")
    edit(masq, 'detect = "always"', 'detect = "file"')
    masq.config("[queue]\nhoststat_timeout = 1800")    # only coming up may clear it
    plain_route(masq, sink.port)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@remote.example"]).ok()
    cmd(masq, "sendmail", "-qo", "isp").ok()
    assert sink.connections == 1 and len(masq.queue_ids("active")) == 1
    sink.greeting = b"220 sink ESMTP"
    cmd(masq, "sendmail", "-qo", "isp").ok()
    assert masq.queue_ids() == [] and sink.messages == 1


def seed_down(masq, port, ago):
    """hoststat: route isp's host failed `ago` seconds ago (within its back-off)."""
    import time
    from masq import hoststat
    store = hoststat.HostStat(masq.spool)
    store.record("isp", f"127.0.0.1:{port}", "down", "421 earlier", now=time.time() - ago)
    store.close()


def test_issue9_runq_tries_a_host_that_failed_more_than_a_few_seconds_ago(masq, sinks):
    sink = sinks()
    plain_route(masq, sink.port)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@remote.example"]).ok()
    seed_down(masq, sink.port, 60)         # retry_min 300: the daemon would still wait
    cmd(masq, "runq").ok()
    assert masq.queue_ids() == [] and sink.messages == 1


def test_issue9_the_daemon_tries_a_route_that_comes_up_at_once(masq, sinks):
    import signal
    import time
    sink = sinks()
    edit(masq, 'detect = "always"', 'detect = "file"')
    plain_route(masq, sink.port)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@remote.example"]).ok()
    seed_down(masq, sink.port, 0)
    daemon = subprocess.Popen([os.path.join(BIN, "masq-send")], env=masq.env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while "daemon started" not in masq.log() and time.monotonic() < deadline:
            time.sleep(0.02)
        with open(os.path.join(masq.dir, "online"), "w") as f:
            f.write("isp\n")
        fd = os.open(os.path.join(masq.spool, "trigger"), os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"\0")                 # wake it: it looks at the online routes
        os.close(fd)
        while masq.queue_ids() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert masq.queue_ids() == [] and sink.messages == 1
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
    finally:
        reap(daemon)
