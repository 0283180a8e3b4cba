"""masq-route: the decision per address, printed without sending."""
import pytest

ROUTES = """
[route.lan]
host = "mail.lan.example:25"
always = true
allowed_recipients = ["*@lan.example"]

[route.isp]
host = "smtp.isp.example:587"
allowed_recipients = ["*"]
denied_recipients = ["*@LAN.example"]
rewrite_sender = { "*@test.example" = "me@isp.example" }

[route.work]
host = "smtp.work.example:587"
allowed_senders = ["*@work.example"]
"""


@pytest.fixture
def routed(masq):
    text = open(masq.conf).read().replace('detect = "always"', 'detect = "file"')
    masq.set_config(text + ROUTES)
    return masq


def route(masq, *args):
    return masq.run(["masq-route", *args])


def test_local_domain_goes_to_the_mailbox(masq):
    r = route(masq, "bob@localhost", "Bob@TEST.example", "carol").ok()
    lines = r.out.decode().splitlines()
    assert lines[0].startswith("bob@localhost: local, maildir ")
    assert lines[0].endswith("/mail/bob/")
    assert lines[1].startswith("Bob@TEST.example: local, maildir ")
    assert lines[2].startswith("carol: local")


def test_no_routes_means_remote_mail_bounces(masq):
    r = route(masq, "x@remote.example")
    assert r.rc == 69, r
    assert b"x@remote.example: bounce: no route for mail to remote.example" in r.out


def test_offline_routes_make_mail_wait(routed):
    r = route(routed, "x@remote.example").ok()
    assert r.out == b"x@remote.example: wait: waiting for route isp to come online\n"


def test_online_file_names_the_route_and_sender_is_rewritten(routed):
    with open(f"{routed.dir}/online", "w") as f:
        f.write("isp\n")
    r = route(routed, "--from", "alice@test.example", "x@remote.example").ok()
    assert r.out == (b"x@remote.example: route isp, via smtp.isp.example:587, "
                     b"sender rewritten to <me@isp.example>\n")


def test_always_route_is_up_without_the_online_file(routed):
    r = route(routed, "x@lan.example").ok()
    assert r.out == b"x@lan.example: route lan, via mail.lan.example:25\n"


def test_denied_recipient_pattern_is_case_blind_on_the_domain(routed):
    with open(f"{routed.dir}/online", "w") as f:
        f.write("isp")
    # lan.example is denied on isp, but allowed on lan (always up)
    r = route(routed, "y@Lan.Example").ok()
    assert b"route lan" in r.out


def test_sender_pattern_picks_its_own_route(routed):
    with open(f"{routed.dir}/online", "w") as f:
        f.write("work")
    assert b"route work" in route(routed, "--from", "a@work.example", "x@r.example").ok().out
    assert b"wait" in route(routed, "--from", "a@home.example", "x@r.example").ok().out


def test_forced_route_as_sendmail_qo(routed):
    r = route(routed, "--route", "isp", "x@remote.example").ok()
    assert b"route isp" in r.out
    r = route(routed, "--route", "nosuch", "x@remote.example")
    assert r.rc == 64 and b"no route named nosuch" in r.err


def test_unknown_system_user_is_67(masq):
    masq.set_config(open(masq.conf).read().replace('users = "any"', 'users = "system"'))
    r = route(masq, "no-such-user-here@localhost")
    assert r.rc == 67 and b"no such user" in r.out
    route(masq, "root@localhost").ok()


def test_address_that_does_not_parse_is_65(masq):
    r = route(masq, "a..b@localhost")
    assert r.rc == 65 and b"does not parse" in r.out


def test_bad_usage_is_64(masq):
    assert route(masq).rc == 64
    assert route(masq, "--help").rc == 0


def test_aliases_are_followed_to_their_final_targets(masq):
    with open(f"{masq.dir}/aliases", "a") as f:
        f.write("team: bob, carol@localhost, x@remote.example, |/bin/cat, /tmp/box\n"
                "bob: \\bob\n")
    r = route(masq, "team@localhost").ok()
    line = r.out.decode()
    assert line.startswith("team@localhost: alias team -> local, maildir ")
    assert "/mail/bob/; local, maildir " in line and "/mail/carol/" in line
    assert "forward to <x@remote.example>; pipe to /bin/cat; append to /tmp/box" in line


def test_route_max_size_sends_big_mail_another_way_or_bounces(masq):
    from conftest import enqueue
    text = open(masq.conf).read()
    masq.set_config(text + '\n[route.small]\nhost = "127.0.0.1:1"\nmax_size = 100\n')
    enqueue(masq, b"Subject: big\n\n" + b"x" * 500 + b"\n", "alice@test.example",
            ["x@remote.example"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    [bounce] = list(masq.maildir("alice"))
    assert b"larger than route small takes (100 bytes)" in bounce.as_bytes()


def test_address_literal_patterns_match_themselves(masq):
    text = open(masq.conf).read()
    masq.set_config(text + '\n[route.lan]\nhost = "127.0.0.1:1"\n'
                    'allowed_recipients = ["*"]\ndenied_recipients = ["*@[192.0.2.1]"]\n')
    assert b"bounce: no route may carry" in route(masq, "x@[192.0.2.1]").out
    assert b"route lan" in route(masq, "x@2").ok().out


FALL_THROUGH = """
[route.primary]
host = "127.0.0.1:1"
{extra}
[route.backup]
host = "127.0.0.1:2"
"""


@pytest.mark.parametrize("extra, then", [
    ("", b"; if deferred, route backup, via 127.0.0.1:2"),
    ("last_route = true", b""),
])
def test_issue9_the_routes_tried_in_turn_end_at_last_route(masq, extra, then):
    masq.config(FALL_THROUGH.format(extra=extra))
    r = route(masq, "x@remote.example").ok()
    assert r.out == b"x@remote.example: route primary, via 127.0.0.1:1" + then + b"\n"


def test_issue9_a_route_that_is_down_is_not_in_the_order(masq):
    masq.set_config(open(masq.conf).read().replace('detect = "always"', 'detect = "file"')
                    + FALL_THROUGH.format(extra=""))
    with open(f"{masq.dir}/online", "w") as f:
        f.write("backup")
    assert route(masq, "x@remote.example").ok().out == \
        b"x@remote.example: route backup, via 127.0.0.1:2\n"
