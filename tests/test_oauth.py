"""OAuth 2.0 login to a smarthost: XOAUTH2 and OAUTHBEARER (RFC 7628) with a token command.

The smarthost is aiosmtpd with STARTTLS (a trustme CA) and a handler that
takes both mechanisms and checks user and token; the token command is a
small script that counts its runs in a file, so the cache in the spool can
be seen to work across processes.
"""
import base64
import json
import os
import stat
import time

import pytest
from conftest import enqueue
from smtp_helpers import AioServer, Recorder, tls_contexts

from masq import oauth
from masq.outcome import DeliveryError

MESSAGE = b"From: me@test.example\nTo: bob@remote.example\nSubject: oauth\n\nbody\n"
TOKEN = "ya29.a0-good_token"


class OAuthHandler(Recorder):
    """Recorder that takes AUTH XOAUTH2 and OAUTHBEARER with one user and token."""

    def __init__(self, user="me@test.example", token=TOKEN):
        super().__init__()
        self.user, self.token = user, token
        self.logins = []            # (mechanism, decoded initial response)
        self.answers = []           # what the client said to the error challenge

    async def auth_XOAUTH2(self, server, args):
        return await self._check(server, args, "XOAUTH2")

    async def auth_OAUTHBEARER(self, server, args):
        return await self._check(server, args, "OAUTHBEARER")

    async def _check(self, server, args, mechanism):
        from aiosmtpd.smtp import AuthResult
        data = base64.b64decode(args[1]) if len(args) > 1 else b""
        self.logins.append((mechanism, data))
        if mechanism == "XOAUTH2":
            fields = dict(f.split(b"=", 1) for f in data.split(b"\x01") if b"=" in f)
            user = fields.get(b"user", b"").decode()
        else:
            header, _, rest = data.partition(b"\x01")
            user = header.split(b",")[1].removeprefix(b"a=").decode()
            fields = dict(f.split(b"=", 1) for f in rest.split(b"\x01") if b"=" in f)
        if user == self.user and fields.get(b"auth") == b"Bearer " + self.token.encode():
            return AuthResult(success=True, auth_data=user)
        # RFC 7628 3.2.2: the error as a JSON challenge, then the final 535
        error = json.dumps({"status": "invalid_token", "schemes": "bearer"}).encode()
        self.answers.append(await server.challenge_auth(error))
        return AuthResult(success=False, handled=False)


@pytest.fixture
def smarthost(tmp_path, servers):
    """(handler, server, CA file): aiosmtpd over STARTTLS that wants AUTH."""
    context, ca_file = tls_contexts(tmp_path)
    handler = OAuthHandler()
    server = AioServer(handler, tls_context=context, require_starttls=True, auth_required=True)
    servers.append(server)
    return handler, server, ca_file


def token_script(masq, token=TOKEN, expiry="3600", code=0, error="", sleep=0):
    """A token command that counts its runs in DIR/runs; its argv for token_command."""
    path = os.path.join(masq.dir, "token.sh")
    with open(path, "w") as f:
        f.write("#!/bin/sh\necho run >> runs\n")
        if sleep:
            f.write(f"sleep {sleep}\n")
        if error:
            f.write(f"echo 'refreshing the token...' >&2\necho '{error}' >&2\n")
        if token:
            f.write(f"echo '{token}'\n")
        if expiry:
            f.write(f"echo '{expiry}'\n")
        f.write(f"exit {code}\n")
    os.chmod(path, 0o755)
    return "./token.sh"         # relative: run in the configuration's folder


def runs(masq):
    try:
        with open(os.path.join(masq.dir, "runs")) as f:
            return len(f.read().split())
    except FileNotFoundError:
        return 0


def oauth_route(masq, server, ca_file, mechanism, command, user="me@test.example", **more):
    extra = "".join(f"{k} = {v}\n" for k, v in more.items())
    masq.config(f'[route.isp]\nhost = "127.0.0.1:{server.port}"\ntls_ca_file = "{ca_file}"\n'
                f'auth = {{ user = "{user}", mechanism = "{mechanism}", '
                f'token_command = "{command}" }}\n{extra}')


def smtp(masq):
    r = masq.run(["masq-smtp", "--route", "isp", "me@test.example", "bob@remote.example"],
                 input=MESSAGE)
    r.ok()
    return r.out.decode().splitlines()


def cache_file(masq):
    return os.path.join(masq.spool, "oauth", "isp")


# -- relaying with each mechanism -----------------------------------------------------

@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_a_message_is_relayed_with_each_mechanism_over_starttls(masq, smarthost, mechanism):
    handler, server, ca_file = smarthost
    oauth_route(masq, server, ca_file, mechanism, token_script(masq))
    assert smtp(masq)[0].startswith("K ")
    [(sender, rcpts, content, _)] = handler.messages
    assert (sender, rcpts) == ("me@test.example", ["bob@remote.example"])
    assert content == MESSAGE.replace(b"\n", b"\r\n")
    [(used, data)] = handler.logins
    assert used == mechanism.upper()
    if mechanism == "xoauth2":
        assert data == f"user=me@test.example\x01auth=Bearer {TOKEN}\x01\x01".encode()
    else:   # RFC 7628 3.1: GS2 header, host and port of the server
        assert data == (f"n,a=me@test.example,\x01host=127.0.0.1\x01port={server.port}"
                        f"\x01auth=Bearer {TOKEN}\x01\x01").encode()


def test_the_token_is_cached_in_the_spool_until_its_expiry(masq, smarthost):
    handler, server, ca_file = smarthost
    oauth_route(masq, server, ca_file, "xoauth2", token_script(masq, expiry="3600"))
    assert smtp(masq)[0].startswith("K ")
    assert smtp(masq)[0].startswith("K ")       # a second process, within the expiry
    assert runs(masq) == 1 and len(handler.messages) == 2
    st = os.stat(cache_file(masq))
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(cache_file(masq))).st_mode) == 0o700


def test_an_iso_expiry_is_a_moment(masq, smarthost):
    handler, server, ca_file = smarthost
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    oauth_route(masq, server, ca_file, "oauthbearer", token_script(masq, expiry=later))
    smtp(masq)
    smtp(masq)
    assert runs(masq) == 1 and len(handler.messages) == 2


@pytest.mark.parametrize("expiry", ["", "30", "2001-01-01T00:00:00Z"])
def test_a_token_without_expiry_or_expiring_soon_is_not_cached(masq, smarthost, expiry):
    handler, server, ca_file = smarthost
    oauth_route(masq, server, ca_file, "xoauth2", token_script(masq, expiry=expiry))
    smtp(masq)
    smtp(masq)
    assert runs(masq) == 2 and len(handler.messages) == 2
    assert not os.path.exists(cache_file(masq))


def test_a_changed_token_command_misses_the_cache(masq, smarthost):
    handler, server, ca_file = smarthost
    oauth_route(masq, server, ca_file, "xoauth2", token_script(masq))
    smtp(masq)
    text = open(masq.conf).read().replace('token_command = "./token.sh"',
                                          'token_command = "./token.sh --other"')
    masq.set_config(text)
    smtp(masq)
    assert runs(masq) == 2 and len(handler.messages) == 2


# -- failures ---------------------------------------------------------------------------

def test_a_wrong_token_is_refused_deferred_and_not_kept(masq, smarthost):
    handler, server, ca_file = smarthost
    oauth_route(masq, server, ca_file, "oauthbearer", token_script(masq, token="ya29.revoked"))
    [line] = smtp(masq)
    assert line.startswith("Z ") and "refused the OAUTHBEARER token of me@test.example" in line
    assert "535" in line and "invalid_token" in line and "ya29.revoked" not in line
    assert handler.messages == [] and handler.mails == 0
    assert handler.answers == [b"\x01"]         # RFC 7628 3.2.3
    assert not os.path.exists(cache_file(masq))     # the next attempt asks anew
    smtp(masq)
    assert runs(masq) == 2


def test_xoauth2_answers_the_error_challenge_with_an_empty_line(masq, smarthost):
    handler, server, ca_file = smarthost
    oauth_route(masq, server, ca_file, "xoauth2", token_script(masq, token="ya29.revoked"))
    [line] = smtp(masq)
    assert line.startswith("Z ") and "535" in line
    assert handler.answers == [b""]


def test_a_failing_token_command_defers_with_its_message_in_mailq_and_log(masq, smarthost):
    handler, server, ca_file = smarthost
    oauth_route(masq, server, ca_file, "xoauth2",
                token_script(masq, token="", code=2, error="oama: refresh token expired"))
    enqueue(masq, MESSAGE, "me@test.example", ["bob@remote.example"]).ok()
    r = masq.run(["masq-send", "--once"]).ok()
    assert b"Traceback" not in r.err
    assert len(masq.queue_ids("active")) == 1 and handler.mails == 0
    said = "token_command of route isp failed (exit 2): oama: refresh token expired"
    assert said in masq.run(["masq-queue", "list"]).ok().out.decode()
    assert said in masq.log() and "status=deferred" in masq.log()


@pytest.mark.parametrize("script, said", [
    (dict(token="", expiry=""), "token_command of route isp printed no token"),
    (dict(token="two words"), "printed a first line that is no token"),
    (dict(code=75, error="no network"), "failed (exit 75): no network"),
])
def test_token_command_failures_are_temporary(masq, smarthost, script, said):
    handler, server, ca_file = smarthost
    oauth_route(masq, server, ca_file, "xoauth2", token_script(masq, **script))
    [line] = smtp(masq)
    assert line.startswith("Z ") and said in line, line
    assert handler.mails == 0


def test_a_token_command_that_cannot_start_defers(masq, smarthost):
    handler, server, ca_file = smarthost
    oauth_route(masq, server, ca_file, "xoauth2", "/nonexistent/oauth2-helper me")
    [line] = smtp(masq)
    assert line == ("Z token_command of route isp cannot run /nonexistent/oauth2-helper: "
                    "No such file or directory")


def test_the_token_is_never_sent_without_tls(masq, servers):
    handler = OAuthHandler()
    server = AioServer(handler, auth_require_tls=False)
    servers.append(server)
    masq.config(f'[route.isp]\nhost = "127.0.0.1:{server.port}"\ntls = "none"\n'
                f'auth = {{ user = "me@test.example", mechanism = "xoauth2", '
                f'token_command = "{token_script(masq)}" }}\n')
    [line] = smtp(masq)
    assert line.startswith("Z not sending the access token for route isp")
    assert runs(masq) == 0 and handler.logins == []


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_without_tls_when_the_route_allows_it(masq, servers):
    handler = OAuthHandler()
    server = AioServer(handler, auth_require_tls=False, auth_required=True)
    servers.append(server)
    masq.config(f'[route.isp]\nhost = "127.0.0.1:{server.port}"\ntls = "none"\n'
                "allow_auth_without_tls = true\n"
                f'auth = {{ user = "me@test.example", mechanism = "oauthbearer", '
                f'token_command = "{token_script(masq)}" }}\n')
    assert smtp(masq)[0].startswith("K ")


def test_the_token_is_in_no_log_line_or_output(masq, smarthost):
    handler, server, ca_file = smarthost
    oauth_route(masq, server, ca_file, "xoauth2", token_script(masq))
    enqueue(masq, MESSAGE, "me@test.example", ["bob@remote.example"]).ok()
    r = masq.run(["masq-send", "--once"]).ok()
    assert masq.queue_ids() == [] and len(handler.messages) == 1
    assert TOKEN not in masq.log() and TOKEN.encode() not in r.err + r.out


@pytest.mark.parametrize("auth, said", [
    ('{ user = "me", mechanism = "xoauth2" }', "auth needs user and token_command"),
    ('{ user = "me", mechanism = "xoauth2", token_command = "x", password_file = "p" }',
     'auth mechanism must be "xoauth2" or "oauthbearer", with token_command and without '
     "password_file"),
])
def test_incomplete_oauth_settings_are_a_config_error(masq, auth, said):
    masq.config(f'[route.isp]\nhost = "127.0.0.1:25"\nauth = {auth}\n')
    r = masq.run(["masq-smtp", "--route", "isp", "a@test.example", "b@remote.example"])
    assert r.rc == 111 and said.encode() in r.err, r


def test_a_mechanism_masq_does_not_know_is_refused_by_check(masq):
    masq.config('[route.isp]\nhost = "h.example"\n'
                'auth = { user = "me", mechanism = "xoauth3", token_command = "x" }\n')
    r = masq.run(["masq-setup", "check"])
    assert r.rc == 78 and b'mechanism is one of "xoauth2", "oauthbearer"' in r.err, r


# -- the pieces -------------------------------------------------------------------------

def test_oauthbearer_escapes_comma_and_equals_in_the_user():
    data = oauth.initial_response("OAUTHBEARER", "a,b=c@x", "T", None, None)
    assert data == b"n,a=a=2Cb=3Dc@x,\x01auth=Bearer T\x01\x01"


def test_expiry_is_seconds_from_now_or_an_iso_time():
    assert oauth.parse_expiry("3600", now=1000) == 4600
    assert oauth.parse_expiry("2026-12-07T08:00:00Z") == 1796630400
    assert oauth.parse_expiry("2026-12-07T08:00:00") == 1796630400     # UTC
    assert oauth.parse_expiry("soon") is None and oauth.parse_expiry("") is None


class _Route:
    label = "route isp"
    user = "me"
    token_cwd = None

    def __init__(self, command, cache):
        self.token_command, self.token_cache = command, cache


def test_a_token_command_that_hangs_is_killed(tmp_path, monkeypatch):
    monkeypatch.setattr(oauth, "TOKEN_TIMEOUT_SECONDS", 1)
    started = time.monotonic()
    route = _Route("sh -c 'echo waiting >&2; sleep 30'", str(tmp_path / "oauth" / "isp"))
    with pytest.raises(DeliveryError) as e:
        oauth.get(route)
    assert str(e.value) == "token_command of route isp ran longer than 1 s: waiting"
    assert time.monotonic() - started < 20


def test_a_cache_others_can_read_is_not_used(tmp_path):
    route = _Route("echo fresh", str(tmp_path / "oauth" / "isp"))
    os.mkdir(tmp_path / "oauth", 0o700)
    oauth._store(route, "cached", time.time() + 3600)
    assert oauth.get(route) == "cached"
    os.chmod(route.token_cache, 0o644)
    assert oauth.get(route) == "fresh"


def test_the_command_runs_without_a_shell(tmp_path):
    route = _Route("echo tok$HOME;x", str(tmp_path / "oauth" / "isp"))
    assert oauth.get(route) == "tok$HOME;x"     # a shell would expand $HOME and run x
