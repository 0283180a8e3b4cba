"""Issue 10: no backscatter.  A loop or a policy failure of mail a stranger sent
is not bounced to its (likely forged) sender; a bounce carries headers only."""

import pytest

from conftest import enqueue
from queue_helpers import offline, queued_for

FORGED = (b"EHLO spammer.example\r\nMAIL FROM:<victim@elsewhere.example>\r\n"
          b"RCPT TO:<bob@localhost>\r\nDATA\r\n"
          b"Delivered-To: bob@localhost\r\nSubject: hi\r\n\r\nbuy now\r\n.\r\nQUIT\r\n")


def receive(masq, client):
    out = masq.run(["masq-smtpd"], input=FORGED, env=masq.env(TCPREMOTEIP=client)).ok().out
    assert b"250 2.0.0" in out or b"queued as" in out, out


def test_issue10_a_loop_from_outside_is_dropped_not_bounced(masq, daemon_listens):
    offline(masq)
    receive(masq, "203.0.113.5")
    masq.run(["masq-send", "--once"]).ok()
    assert queued_for(masq, "victim@elsewhere.example") == []
    assert masq.queue_ids() == []
    log = masq.log()
    assert "mail loop" in log and "status=dropped" in log and "bounce=" not in log, log


def test_issue10_a_loop_from_relay_nets_is_bounced_as_before(masq, daemon_listens):
    offline(masq)
    receive(masq, "127.0.0.1")
    masq.run(["masq-send", "--once"]).ok()
    assert len(queued_for(masq, "victim@elsewhere.example")) == 1
    assert "status=bounced" in masq.log()


@pytest.mark.parametrize("how, stage", [("hold", "hold"), ("bounce", None)])
def test_issue10_outside_failures_hold_or_bounce(masq, daemon_listens, how, stage):
    offline(masq)
    text = open(masq.conf).read()
    masq.set_config(text.replace("[online]", f'[queue]\noutside_failures = "{how}"\n\n[online]'))
    receive(masq, "203.0.113.5")
    masq.run(["masq-send", "--once"]).ok()
    bounced = queued_for(masq, "victim@elsewhere.example")
    if stage == "hold":
        assert bounced == [] and len(masq.queue_ids("hold")) == 1
        assert "status=hold" in masq.log()
    else:
        assert len(bounced) == 1


def test_issue10_a_bounce_returns_at_most_16_KiB_of_headers_and_no_body(masq):
    huge = b"".join(b"X-Filler-%d: %s\n" % (n, b"y" * 200) for n in range(500))
    message = b"Subject: big\n" + huge + b"\nsecret body line\n"
    enqueue(masq, message, "alice@test.example", ["bob@nowhere.example"]).ok()
    masq.run(["masq-send", "--once"]).ok()          # local-only: no route, a bounce
    [report] = list(masq.maildir("alice"))
    data = report.as_bytes()
    assert b"X-Filler-0: " in data and b"secret body line" not in data
    assert len(data) < 16384 + 4096, len(data)
