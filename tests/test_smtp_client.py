"""masq-smtp against real servers on loopback: aiosmtpd, a sink, dnsmasq, socat, openssl."""
import io
import os
import socket

import dns_helpers
import pytest
from conftest import free_port
from smtp_helpers import AioServer, Recorder, Sink, authenticator, tls_contexts, top_config

MESSAGE = (b"From: a@b.example\nTo: ok@x.example\nSubject: hi\n\n"
           b".leading dot\nline\n..two dots\n.\n\nend\n")
WIRE = MESSAGE.replace(b"\n", b"\r\n")


def serve(servers, handler=None, **kw):
    server = AioServer(handler or Recorder(), **kw)
    servers.append(server)
    return server


def route(masq, name="isp", **keys):
    """Append [route.NAME] with these keys (strings quoted, others as TOML)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return str(v)
    masq.config(f"[route.{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in keys.items()))


def smtp(masq, *args, input=MESSAGE):
    return masq.run(["masq-smtp", *args], input=input)


def lines(result):
    result.ok()
    return result.out.decode().splitlines()


# -- a plain smarthost ----------------------------------------------------------

def test_plain_delivery_is_byte_exact(masq, servers):
    handler = Recorder()
    server = serve(servers, handler)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "ok@x.example"))
    assert out == ["K 127.0.0.1[127.0.0.1] said: 250 2.0.0 queued as 42"]
    [(sender, rcpts, content, options)] = handler.messages
    assert (sender, rcpts) == ("a@b.example", ["ok@x.example"])
    assert content == WIRE      # CRLF on the wire, dot-stuffing undone by the server
    assert f"SIZE={len(WIRE)}" in options and "BODY=8BITMIME" not in options


def test_last_line_without_newline_gets_crlf(masq, servers):
    handler = Recorder()
    server = serve(servers, handler)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    lines(smtp(masq, "--route", "isp", "a@b.example", "ok@x.example",
               input=b"Subject: x\n\nno newline"))
    assert handler.messages[0][2] == b"Subject: x\r\n\r\nno newline\r\n"


def test_null_sender_is_mail_from_empty(masq, servers):
    handler = Recorder()
    server = serve(servers, handler)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    out = lines(smtp(masq, "--route", "isp", "--", "", "ok@x.example"))
    assert out[0].startswith("K ")
    assert handler.messages[0][0] == "<>"


def test_mixed_recipients_get_mixed_lines_in_order(masq, servers):
    handler = Recorder(refuse={"bad@x.example": "550 5.1.1 no such user",
                               "later@x.example": "451 4.3.0 try later"})
    server = serve(servers, handler)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    out = lines(smtp(masq, "--route", "isp", "a@b.example",
                     "bad@x.example", "ok@x.example", "later@x.example"))
    assert out == ["D 127.0.0.1[127.0.0.1] said: 550 5.1.1 no such user",
                   "K 127.0.0.1[127.0.0.1] said: 250 2.0.0 queued as 42",
                   "Z 127.0.0.1[127.0.0.1] said: 451 4.3.0 try later"]
    assert handler.messages[0][1] == ["ok@x.example"]


@pytest.mark.parametrize("reply, letter", [("550 5.1.1 no such user", "D"),
                                           ("450 4.2.1 mailbox busy", "Z")])
def test_no_recipient_accepted_sends_no_data(masq, servers, reply, letter):
    handler = Recorder(refuse={"r@x.example": reply})
    server = serve(servers, handler)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "r@x.example"))
    assert out == [f"{letter} 127.0.0.1[127.0.0.1] said: {reply}"]
    assert handler.messages == []


def test_pipelining_sends_mail_rcpt_and_data_in_one_write(masq):
    sink = Sink()
    try:
        route(masq, host=f"127.0.0.1:{sink.port}", tls="none")
        out = lines(smtp(masq, "--route", "isp", "a@b.example", "r1@x.example", "r2@x.example"))
    finally:
        sink.stop()
    assert [o[0] for o in out] == ["K", "K"]
    batch = next(b for b in sink.batches if b.startswith(b"MAIL"))
    assert batch == (b"MAIL FROM:<a@b.example> SIZE=%d\r\nRCPT TO:<r1@x.example>\r\n"
                     b"RCPT TO:<r2@x.example>\r\nDATA\r\n" % len(WIRE))


def test_without_pipelining_commands_go_one_by_one(masq, servers):
    handler = Recorder(pipelining=False, refuse={"bad@x.example": "550 no"})
    server = serve(servers, handler)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "bad@x.example", "ok@x.example"))
    assert [o[0] for o in out] == ["D", "K"]
    assert handler.messages[0][2] == WIRE


def test_8bit_message_is_declared_8bitmime(masq, servers):
    handler = Recorder()
    server = serve(servers, handler)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    body = "Subject: caf\u00e9\n\n\u00e9t\u00e9\n".encode()
    lines(smtp(masq, "--route", "isp", "a@b.example", "ok@x.example", input=body))
    [(_, _, content, options)] = handler.messages
    assert content == body.replace(b"\n", b"\r\n")
    assert "BODY=8BITMIME" in options and "SMTPUTF8" not in options


def test_smtputf8_recipient_is_sent_to_a_server_that_offers_it(masq, servers):
    handler = Recorder()
    server = serve(servers, handler, enable_SMTPUTF8=True)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "j\u00f6rg@x.example"))
    assert out[0].startswith("K ")
    assert handler.messages[0][1] == ["j\u00f6rg@x.example"]
    assert "SMTPUTF8" in handler.messages[0][3]


@pytest.mark.parametrize("rcpt, body", [
    ("j\u00f6rg@x.example", MESSAGE),
    ("ok@x.example", "To: j\u00f6rg@x.example\n\nhi\n".encode())])
def test_smtputf8_needed_but_not_offered_fails_permanently(masq, servers, rcpt, body):
    handler = Recorder()
    server = serve(servers, handler)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    out = lines(smtp(masq, "--route", "isp", "a@b.example", rcpt, input=body))
    assert out[0].startswith("D ") and "does not support SMTPUTF8" in out[0]
    assert handler.mails == 0


def test_message_bigger_than_server_size_fails_permanently(masq, servers):
    handler = Recorder()
    server = serve(servers, handler, data_size_limit=100)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "ok@x.example",
                     input=b"Subject: big\n\n" + b"x" * 200 + b"\n"))
    assert out[0].startswith("D message too big for 127.0.0.1[127.0.0.1]")
    assert handler.mails == 0


def test_connection_refused_is_temporary(masq):
    port = free_port()                  # nobody listens there
    route(masq, host=f"127.0.0.1:{port}", tls="none")
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "r1@x.example", "r2@x.example"))
    assert len(out) == 2
    assert all(o.startswith(f"Z connect to 127.0.0.1[127.0.0.1]:{port}: ") for o in out)


def test_greeting_timeout_is_temporary(masq):
    with socket.socket() as s:          # listens, never greets
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        route(masq, host=f"127.0.0.1:{s.getsockname()[1]}", tls="none", greeting_timeout=1)
        out = lines(smtp(masq, "--route", "isp", "a@b.example", "r@x.example"))
    assert out[0].startswith("Z ") and "timeout after 1 s" in out[0]


def sink(servers, **kw):
    server = Sink(**kw)
    servers.append(server)
    return server


def test_helo_after_ehlo_is_refused(masq, servers):
    server = sink(servers, replies={b"EHLO": b"502 5.5.1 what?"})
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "r@x.example"))
    assert out == ["K 127.0.0.1[127.0.0.1] said: 250 ok"]
    assert any(b.startswith(b"HELO ") for b in server.batches)
    assert not any(b"SIZE=" in b for b in server.batches)     # plain SMTP: no parameters


@pytest.mark.parametrize("greeting, letter", [(b"554 5.7.1 go away", "D"),
                                              (b"421 4.3.2 busy", "Z")])
def test_refused_greeting(masq, servers, greeting, letter):
    server = sink(servers, greeting=greeting)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "r@x.example"))
    assert out == [f"{letter} 127.0.0.1[127.0.0.1] refused to talk to me: "
                   f"{greeting.decode()}"]


def test_421_in_a_session_makes_it_unusable(masq, servers):
    from masq import config, nexthop
    server = sink(servers, replies={b"MAIL": b"421 4.3.2 shutting down"})
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    session = nexthop.connect(config.load(masq.conf), "isp")
    results = session.send("a@b.example", ["r1@x.example", "r2@x.example"], io.BytesIO(b"x\n"))
    assert results == [("Z", "127.0.0.1[127.0.0.1] said: 421 4.3.2 shutting down")] * 2
    assert not session.usable
    session.close()


def test_opportunistic_tls_that_fails_falls_back_to_plaintext(masq, servers):
    # offers STARTTLS, says 220, then never answers the handshake
    server = sink(servers, extensions=["PIPELINING", "STARTTLS"],
                  replies={b"STAR": b"220 2.0.0 go ahead"})
    route(masq, host=f"127.0.0.1:{server.port}", tls="may", command_timeout=1)
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "r@x.example"))
    assert out == ["K 127.0.0.1[127.0.0.1] said: 250 ok"]
    assert server.messages == 1


def test_options_may_follow_the_addresses(masq, servers):
    handler = Recorder()
    server = serve(servers, handler)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    out = lines(smtp(masq, "a@b.example", "ok@x.example", "--route", "isp"))
    assert out[0].startswith("K ")


# -- STARTTLS, implicit TLS, AUTH ----------------------------------------------------

def secret(masq, mode=0o600, text="s3cret"):
    path = os.path.join(masq.dir, "isp.secret")
    with open(path, "w") as f:
        f.write(text + "\n")
    os.chmod(path, mode)
    return "isp.secret"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_starttls_then_auth(masq, servers, tmp_path, mechanism):
    context, ca_file = tls_contexts(tmp_path)
    handler = Recorder()
    server = serve(servers, handler, tls_context=context,
                   authenticator=authenticator("me", "s3cret"), auth_required=True)
    route(masq, host=f"127.0.0.1:{server.port}", tls_ca_file=ca_file,
          auth={"user": "me", "password_file": secret(masq)}, auth_mechanisms=[mechanism])
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "ok@x.example"))
    assert out[0].startswith("K ")
    assert handler.messages[0][2] == WIRE


def test_wrong_password_is_temporary_and_sends_nothing(masq, servers, tmp_path):
    context, ca_file = tls_contexts(tmp_path)
    handler = Recorder()
    server = serve(servers, handler, tls_context=context,
                   authenticator=authenticator("me", "other"), auth_required=True)
    route(masq, host=f"127.0.0.1:{server.port}", tls_ca_file=ca_file,
          auth={"user": "me", "password_file": secret(masq)})
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "ok@x.example"))
    assert out[0].startswith("Z ") and "refused authentication as me" in out[0]
    assert "s3cret" not in out[0] and handler.mails == 0


def test_starttls_route_to_a_server_without_starttls_sends_nothing(masq, servers):
    handler = Recorder()
    server = serve(servers, handler)
    route(masq, host=f"127.0.0.1:{server.port}")       # tls defaults to "starttls"
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "ok@x.example"))
    assert out == ["Z 127.0.0.1[127.0.0.1] does not offer STARTTLS, which route isp "
                   'requires (tls = "starttls")']
    assert handler.mails == 0


def test_untrusted_certificate_sends_nothing(masq, servers, tmp_path):
    context, _ = tls_contexts(tmp_path)
    handler = Recorder()
    server = serve(servers, handler, tls_context=context)
    route(masq, host=f"127.0.0.1:{server.port}")        # system CAs: trustme is not one
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "ok@x.example"))
    assert out[0].startswith("Z ") and "certificate" in out[0]
    assert handler.mails == 0


def test_auth_without_tls_is_refused(masq, servers):
    handler = Recorder()
    server = serve(servers, handler, auth_require_tls=False,
                   authenticator=authenticator("me", "s3cret"))
    route(masq, host=f"127.0.0.1:{server.port}", tls="none",
          auth={"user": "me", "password_file": secret(masq)})
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "ok@x.example"))
    assert out[0].startswith("Z not sending the password")
    assert handler.mails == 0


def test_auth_is_never_sent_over_unverified_tls(masq, servers, tmp_path):
    context, _ = tls_contexts(tmp_path)
    handler = Recorder()
    server = serve(servers, handler, tls_context=context,
                   authenticator=authenticator("me", "s3cret"), auth_required=True)
    route(masq, host=f"127.0.0.1:{server.port}", tls="may",       # not verified
          auth={"user": "me", "password_file": secret(masq)})
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "ok@x.example"))
    assert out[0].startswith("Z not sending the password") and "unverified TLS" in out[0]
    assert handler.mails == 0


def test_auth_on_a_route_without_host_is_a_config_error(masq):
    route(masq, auth={"user": "me", "password_file": secret(masq)})
    r = smtp(masq, "--route", "isp", "a@b.example", "ok@x.example")
    assert r.rc == 111 and b"auth needs a host or a wrapper" in r.err, r


def test_auth_without_tls_when_the_route_allows_it(masq, servers):
    handler = Recorder()
    server = serve(servers, handler, auth_require_tls=False, auth_required=True,
                   authenticator=authenticator("me", "s3cret"))
    route(masq, host=f"127.0.0.1:{server.port}", tls="none", allow_auth_without_tls=True,
          auth={"user": "me", "password_file": secret(masq)})
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "ok@x.example"))
    assert out[0].startswith("K ")


def test_password_file_readable_by_others_is_refused(masq, servers, tmp_path):
    handler = Recorder()
    server = serve(servers, handler)
    route(masq, host=f"127.0.0.1:{server.port}",
          auth={"user": "me", "password_file": secret(masq, mode=0o644)})
    r = smtp(masq, "--route", "isp", "a@b.example", "ok@x.example")
    assert r.rc == 111, r
    assert r.out == b""
    assert b"is readable by others (mode 0644): chmod 600" in r.err
    assert b"s3cret" not in r.err and handler.mails == 0


def test_implicit_tls(masq, servers, tmp_path):
    context, ca_file = tls_contexts(tmp_path)
    handler = Recorder()
    server = serve(servers, handler, ssl_context=context)
    route(masq, host=f"127.0.0.1:{server.port}", tls="tls", tls_ca_file=ca_file)
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "ok@x.example"))
    assert out[0].startswith("K ")
    assert handler.messages[0][2] == WIRE


# -- wrapper routes ------------------------------------------------------------------

def test_wrapper_socat(masq, servers):
    handler = Recorder()
    server = serve(servers, handler)
    route(masq, wrapper=f"socat - TCP:127.0.0.1:{server.port}")
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "ok@x.example"))
    assert out == ["K wrapper[wrapper] said: 250 2.0.0 queued as 42"]
    assert handler.messages[0][2] == WIRE


def test_wrapper_openssl_s_client_to_implicit_tls(masq, servers, tmp_path):
    context, ca_file = tls_contexts(tmp_path)
    handler = Recorder()
    server = serve(servers, handler, ssl_context=context)
    route(masq, host="smtp.isp.example",
          wrapper=f"openssl s_client -quiet -verify_return_error -CAfile {ca_file} "
                  f"-verify_ip 127.0.0.1 -connect 127.0.0.1:{server.port}")
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "ok@x.example"))
    assert out[0].startswith("K smtp.isp.example[wrapper] said: 250")
    assert handler.messages[0][2] == WIRE


def test_wrapper_that_fails_is_temporary(masq):
    route(masq, wrapper="echo no such host >&2; exit 1")
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "ok@x.example"))
    assert out[0].startswith("Z wrapper[wrapper]: lost connection")
    assert "no such host" in out[0]


# -- LMTP ------------------------------------------------------------------------------

def test_lmtp_gives_one_reply_per_recipient(masq, servers):
    class PerRecipient(Recorder):
        async def handle_DATA(self, server, session, envelope):
            await super().handle_DATA(server, session, envelope)
            return "\r\n".join("250 2.0.0 <%s> delivered" % r for r in envelope.rcpt_tos)

    handler = PerRecipient(refuse={"bad@x.example": "550 5.1.1 unknown"})
    server = serve(servers, handler, lmtp=True)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none", protocol="lmtp")
    out = lines(smtp(masq, "--route", "isp", "a@b.example",
                     "one@x.example", "bad@x.example", "two@x.example"))
    assert out == ["K 127.0.0.1[127.0.0.1] said: 250 2.0.0 <one@x.example> delivered",
                   "D 127.0.0.1[127.0.0.1] said: 550 5.1.1 unknown",
                   "K 127.0.0.1[127.0.0.1] said: 250 2.0.0 <two@x.example> delivered"]
    assert handler.messages[0][2] == WIRE


# -- the in-process API: one connection, several messages ------------------------------

def test_session_sends_several_messages_over_one_connection(masq, servers):
    from masq import config, nexthop
    handler = Recorder(refuse={"bad@x.example": "550 no"})
    server = serve(servers, handler)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    conf = config.load(masq.conf)
    session = nexthop.connect(conf, "isp")
    try:
        for n in range(3):
            body = b"Subject: %d\n\nbody %d\n" % (n, n)
            results = session.send("a@b.example", ["ok@x.example", "bad@x.example"],
                                   io.BytesIO(body))
            assert [r[0] for r in results] == ["K", "D"]
            assert session.usable
        # a message whose every recipient fails leaves the session usable (RSET)
        assert session.send("a@b.example", ["bad@x.example"], io.BytesIO(b"x\n"))[0][0] == "D"
        assert session.usable
        session.send("a@b.example", ["ok@x.example"], io.BytesIO(b"last\n"))
    finally:
        session.close()
    assert [m[2] for m in handler.messages] == [
        b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n) for n in range(3)] + [b"last\r\n"]


@pytest.mark.parametrize("data, wire", [
    (b"", b".\r\n"),
    (b".\n", b"..\r\n.\r\n"),
    (b"a\n.b\n..c\n", b"a\r\n..b\r\n...c\r\n.\r\n"),
    (b"no end", b"no end\r\n.\r\n"),
    (b"crlf\r\nline\n", b"crlf\r\nline\r\n.\r\n"),
])
def test_message_chunks_are_crlf_and_dot_stuffed(data, wire):
    from masq import wiremessage
    assert b"".join(wiremessage.WireMessage(io.BytesIO(data)).chunks()) == wire


def test_dot_stuffing_across_chunk_boundaries(monkeypatch):
    from masq import wiremessage
    monkeypatch.setattr(wiremessage, "WRITE_CHUNK_BYTES", 4)
    data = b"abc\n.de\n...\nx.\n.\n"
    assert b"".join(wiremessage.WireMessage(io.BytesIO(data)).chunks()) == \
        b"abc\r\n..de\r\n....\r\nx.\r\n..\r\n.\r\n"


@pytest.mark.parametrize("data, wire", [
    (b"cr\rin line\n", b"cr\r\nin line\r\n.\r\n"),
    (b"a\r.\rb\n", b"a\r\n..\r\nb\r\n.\r\n"),     # \r.\r typed into sendmail
    (b"x\0y\rz\r", b"x\0y\r\nz\r\n.\r\n"),
])
def test_issue9_bare_cr_goes_out_as_crlf(data, wire):
    from masq import wiremessage
    message = wiremessage.WireMessage(io.BytesIO(data))
    assert b"".join(message.chunks()) == wire
    assert message.size == len(wire.replace(b"\r\n..", b"\r\n.")) - 3    # SIZE: no ".\r\n"


def test_issue9_cr_at_a_chunk_boundary_is_one_line_end(monkeypatch):
    from masq import wiremessage
    monkeypatch.setattr(wiremessage, "WRITE_CHUNK_BYTES", 4)
    message = wiremessage.WireMessage(io.BytesIO(b"abc\r\n.ab\r\r.\r"))
    assert b"".join(message.chunks()) == b"abc\r\n..ab\r\n\r\n..\r\n.\r\n"


def test_issue9_bare_cr_reaches_the_next_hop_as_line_ends(masq, servers):
    handler = Recorder()
    server = serve(servers, handler)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    lines(smtp(masq, "--route", "isp", "a@b.example", "ok@x.example",
               input=b"Subject: x\n\none\r.\rtwo\n"))
    assert handler.messages[0][2] == b"Subject: x\r\n\r\none\r\n.\r\ntwo\r\n"


# -- recipients over the server's limit, and a 421 in the middle (issue 9) -----------

class Limited(Recorder):
    """Says 452 4.5.3 to each recipient after the first `limit` of a transaction."""

    def __init__(self, limit, limits_keyword=None, **kw):
        super().__init__(**kw)
        self.limit, self.limits_keyword = limit, limits_keyword

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        responses = await super().handle_EHLO(server, session, envelope, hostname, responses)
        if self.limits_keyword:
            responses.insert(1, f"250-{self.limits_keyword}")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if len(envelope.rcpt_tos) >= self.limit:
            return "452 4.5.3 Error: too many recipients"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


@pytest.mark.parametrize("pipelining", [True, False])
def test_issue9_recipients_over_a_452_go_in_the_next_transaction(masq, servers, pipelining):
    handler = Limited(3, refuse={"bad@x.example": "550 5.1.1 no such user"},
                      pipelining=pipelining)
    server = serve(servers, handler)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    rcpts = [f"r{n}@x.example" for n in range(7)]
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "bad@x.example", *rcpts))
    assert out[0] == "D 127.0.0.1[127.0.0.1] said: 550 5.1.1 no such user"
    assert out[1:] == ["K 127.0.0.1[127.0.0.1] said: 250 2.0.0 queued as 42"] * 7
    assert [m[1] for m in handler.messages] == [rcpts[:3], rcpts[3:6], rcpts[6:]]
    assert handler.mails == 3       # one connection, one MAIL per transaction


def test_issue9_a_452_with_nothing_accepted_is_a_deferral(masq, servers):
    handler = Limited(0)
    server = serve(servers, handler)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "r1@x.example", "r2@x.example"))
    assert out == ["Z 127.0.0.1[127.0.0.1] said: 452 4.5.3 Error: too many recipients"] * 2
    assert handler.messages == []


def test_issue9_limits_rcptmax_splits_the_recipients(masq, servers):
    handler = Limited(100, limits_keyword="LIMITS RCPTMAX=2")
    server = serve(servers, handler)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    rcpts = [f"r{n}@x.example" for n in range(5)]
    out = lines(smtp(masq, "--route", "isp", "a@b.example", *rcpts))
    assert [o[0] for o in out] == ["K"] * 5
    assert [m[1] for m in handler.messages] == [rcpts[:2], rcpts[2:4], rcpts[4:]]


@pytest.mark.parametrize("pipelining", [True, False])
def test_issue9_a_421_after_some_rcpt_replies_keeps_them(masq, servers, pipelining):
    handler = Recorder(refuse={"bad@x.example": "550 5.1.1 no such user",
                               "late@x.example": "450 4.2.1 mailbox busy",
                               "stop@x.example": "421 4.7.0 test.example Error: too many errors"},
                       pipelining=pipelining)
    server = serve(servers, handler)
    route(masq, host=f"127.0.0.1:{server.port}", tls="none")
    out = lines(smtp(masq, "--route", "isp", "a@b.example", "ok@x.example", "bad@x.example",
                     "late@x.example", "stop@x.example", "after@x.example"))
    closing = "Z 127.0.0.1[127.0.0.1] said: 421 4.7.0 test.example Error: too many errors"
    assert out == [closing, "D 127.0.0.1[127.0.0.1] said: 550 5.1.1 no such user",
                   "Z 127.0.0.1[127.0.0.1] said: 450 4.2.1 mailbox busy", closing, closing]
    assert handler.messages == []


# -- usage ---------------------------------------------------------------------------

def test_help_exits_0(masq):
    r = smtp(masq, "--help")
    assert r.rc == 0 and b"masq-smtp [-C FILE] [--route NAME]" in r.out


@pytest.mark.parametrize("args", [[], ["a@b.example"], ["--bogus", "a@b", "c@d"]])
def test_bad_usage_exits_100(masq, args):
    r = smtp(masq, *args)
    assert r.rc == 100 and r.out == b"" and r.err.startswith(b"masq-smtp"), r


def test_unknown_route_exits_111(masq):
    r = smtp(masq, "--route", "nowhere", "a@b.example", "c@d.example")
    assert r.rc == 111 and r.out == b"" and b"no [route.nowhere]" in r.err, r


# -- direct delivery by MX, with dnsmasq on loopback ------------------------------------

@pytest.fixture
def dns():
    """start(*records): dnsmasq on 127.0.0.1 with these records; "127.0.0.1:port"."""
    procs = []

    def start(*records):
        p, server = dns_helpers.start(records)
        procs.append(p)
        return server
    yield start
    for p in procs:
        dns_helpers.stop(p)


def loopback_servers(servers, hosts):
    """aiosmtpd on each of these loopback addresses, all on one port."""
    for _ in range(10):
        first = AioServer(Recorder(), host=hosts[0])
        made = [first]
        try:
            for host in hosts[1:]:
                made.append(AioServer(Recorder(), host=host, port=first.port))
        except OSError:
            for s in made:
                s.stop()
            continue
        servers.extend(made)
        return made
    pytest.fail("no common free port")


def direct(masq, server, dns_server, my_addresses=("127.0.0.100",)):
    top_config(masq, f'dns_servers = ["{dns_server}"]\n'
                     f'my_addresses = [{", ".join(repr(a) for a in my_addresses)}]'
                     .replace("'", '"'))
    route(masq, "direct", port=server.port)


def test_mx_preference_order(masq, servers, dns):
    best, worse = loopback_servers(servers, ["127.0.0.2", "127.0.0.3"])
    dns_server = dns("--mx-host=x.test,mx2.x.test,20", "--mx-host=x.test,mx1.x.test,10",
                     "--host-record=mx1.x.test,127.0.0.2", "--host-record=mx2.x.test,127.0.0.3")
    direct(masq, best, dns_server)
    out = lines(smtp(masq, "--route", "direct", "a@b.example", "ok@x.test"))
    assert out == ["K mx1.x.test[127.0.0.2] said: 250 2.0.0 queued as 42"]
    assert len(best.handler.messages) == 1 and worse.handler.messages == []


def test_first_mx_refusing_connections_means_the_next_is_used(masq, servers, dns):
    (second,) = loopback_servers(servers, ["127.0.0.3"])
    dns_server = dns("--mx-host=x.test,mx1.x.test,10", "--mx-host=x.test,mx2.x.test,20",
                     "--host-record=mx1.x.test,127.0.0.4", "--host-record=mx2.x.test,127.0.0.3")
    direct(masq, second, dns_server)
    out = lines(smtp(masq, "--route", "direct", "a@b.example", "ok@x.test"))
    assert out == ["K mx2.x.test[127.0.0.3] said: 250 2.0.0 queued as 42"]


def test_implicit_mx(masq, servers, dns):
    (server,) = loopback_servers(servers, ["127.0.0.2"])
    dns_server = dns("--host-record=plain.test,127.0.0.2")
    direct(masq, server, dns_server)
    out = lines(smtp(masq, "--route", "direct", "a@b.example", "ok@plain.test"))
    assert out == ["K plain.test[127.0.0.2] said: 250 2.0.0 queued as 42"]


def test_null_mx_fails_at_once(masq, servers, dns):
    (server,) = loopback_servers(servers, ["127.0.0.2"])
    dns_server = dns("--dns-rr=null.test,15,000000", "--host-record=null.test,127.0.0.2")
    direct(masq, server, dns_server)
    out = lines(smtp(masq, "--route", "direct", "a@b.example", "r1@null.test", "r2@null.test"))
    assert out == ["D domain null.test accepts no mail (null MX, RFC 7505)"] * 2
    assert server.handler.mails == 0


def test_domain_that_does_not_exist_fails_permanently(masq, servers, dns):
    (server,) = loopback_servers(servers, ["127.0.0.2"])
    direct(masq, server, dns("--host-record=other.test,127.0.0.2"))
    out = lines(smtp(masq, "--route", "direct", "a@b.example", "r@nowhere.test"))
    assert out == ["D domain nowhere.test does not exist (DNS: NXDOMAIN)"]


@pytest.mark.parametrize("mx_address, my_addresses", [
    ("127.0.0.2", ["127.0.0.2"]),             # the MX is one of my addresses
    ("127.0.0.5", ["127.0.0.0/8", "::1"]),    # the default: loopback is me
])
def test_mx_pointing_to_myself_is_a_loop(masq, servers, dns, mx_address, my_addresses):
    (server,) = loopback_servers(servers, ["127.0.0.2"])
    dns_server = dns("--mx-host=loop.test,mx.loop.test,10",
                     f"--host-record=mx.loop.test,{mx_address}")
    direct(masq, server, dns_server, my_addresses)
    out = lines(smtp(masq, "--route", "direct", "a@b.example", "r@loop.test"))
    assert out == ["D mail for loop.test loops back to myself"]
    assert server.handler.mails == 0


def test_mx_named_like_my_hostname_is_a_loop(masq, servers, dns):
    (server,) = loopback_servers(servers, ["127.0.0.2"])
    dns_server = dns("--mx-host=loop.test,test.example,10", "--host-record=test.example,127.0.0.2")
    direct(masq, server, dns_server)
    out = lines(smtp(masq, "--route", "direct", "a@b.example", "r@loop.test"))
    assert out == ["D mail for loop.test loops back to myself"]


def test_recipients_of_several_domains_each_go_to_their_mx(masq, servers, dns):
    one, two = loopback_servers(servers, ["127.0.0.2", "127.0.0.3"])
    dns_server = dns("--mx-host=one.test,mx.one.test,10", "--host-record=mx.one.test,127.0.0.2",
                     "--mx-host=two.test,mx.two.test,10", "--host-record=mx.two.test,127.0.0.3",
                     "--dns-rr=null.test,15,000000")
    direct(masq, one, dns_server)
    out = lines(smtp(masq, "--route", "direct", "a@b.example",
                     "a@two.test", "b@null.test", "c@one.test", "d@two.test"))
    assert [o[:20] for o in out] == ["K mx.two.test[127.0.", "D domain null.test a",
                                     "K mx.one.test[127.0.", "K mx.two.test[127.0."]
    assert one.handler.messages[0][1] == ["c@one.test"]
    assert two.handler.messages[0][1] == ["a@two.test", "d@two.test"]


def test_direct_delivery_uses_opportunistic_starttls(masq, servers, dns, tmp_path):
    context, _ = tls_contexts(tmp_path)        # not trusted: "may" does not check
    handler = Recorder()
    server = serve(servers, handler, host="127.0.0.2", tls_context=context)
    direct(masq, server, dns("--host-record=tls.test,127.0.0.2"))
    out = lines(smtp(masq, "--route", "direct", "a@b.example", "ok@tls.test"))
    assert out[0].startswith("K tls.test[127.0.0.2]")
    assert handler.messages[0][2] == WIRE


def test_dns_server_failure_is_temporary(masq, monkeypatch):
    from masq import config, mx, nexthop, outcome
    monkeypatch.setattr(mx, "DNS_LIFETIME_SECONDS", 1)     # keep the test short
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))               # a DNS server that never answers
        top_config(masq, f'dns_servers = ["127.0.0.1:{s.getsockname()[1]}"]')
        route(masq, "direct", port=25)
        with pytest.raises(outcome.DeliveryError) as e:
            nexthop.connect(config.load(masq.conf), "direct", "x.test")
    assert e.value.letter == "Z" and "DNS lookup of MX for x.test failed" in e.value.text


def test_lmtp_cut_off_after_some_replies_keeps_the_answers_it_got(masq):
    """An LMTP server that says 250 for the first recipient, then drops the line."""
    import threading
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as f:
            conn.sendall(b"220 lmtp\r\n")
            while line := f.readline():
                verb = line[:4].upper()
                if verb == b"LHLO":
                    conn.sendall(b"250-lmtp\r\n250 PIPELINING\r\n")
                elif verb in (b"MAIL", b"RCPT"):
                    conn.sendall(b"250 2.1.0 ok\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    while f.readline() not in (b".\r\n", b""):
                        pass
                    conn.sendall(b"250 2.0.0 <a@x.example> delivered\r\n")
                    return                      # and the second reply never comes
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    route(masq, host=f"127.0.0.1:{port}", tls="none", protocol="lmtp")
    out = lines(smtp(masq, "--route", "isp", "s@b.example", "a@x.example", "b@x.example"))
    thread.join(timeout=20)
    listener.close()
    assert out[0].startswith("K ") and "delivered" in out[0]
    assert out[1].startswith("Z ")
