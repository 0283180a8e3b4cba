"""The operator's view (issue 9, part 5): why mail waits, what a queue run does.

mailq and `masq-queue show` give each recipient's reason to wait from the
spool's records; runq -v prints a line per attempt; a long run on a terminal
counts on stderr; an address that does not parse is refused alike everywhere.
"""
import io
import os
import re

import pytest

from conftest import enqueue

MESSAGE = b"From: alice@test.example\nSubject: hello\n\nbody line\n"


def offline_route(masq, host="127.0.0.1:1"):
    """[route.isp], up only when the folder's online file names it (detect = "file")."""
    text = open(masq.conf).read().replace('detect = "always"', 'detect = "file"')
    masq.set_config(text + f'\n[route.isp]\nhost = "{host}"\n')


def go_online(masq):
    with open(os.path.join(masq.dir, "online"), "w") as f:
        f.write("isp\n")


def mailq(masq):
    return masq.run(["masq-queue", "list"]).ok().out.decode()


def shown(masq, qid):
    return masq.run(["masq-queue", "show", qid]).ok().out.partition(b"\n\n")[0].decode()


def records(masq, stage, qid, word):
    with open(os.path.join(masq.spool, stage, qid), "rb") as f:
        return [line for line in f.read().split(b"\n") if line.startswith(word + b" ")]


def test_issue9_mailq_says_a_recipient_waits_for_its_route(masq):
    offline_route(masq)
    enqueue(masq, MESSAGE, "alice@test.example", ["x@remote.example"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    [qid] = masq.queue_ids("active")
    assert "x@remote.example (waiting for route isp to come online)" in mailq(masq)
    assert "rcpt x@remote.example (waiting for route isp to come online)" in shown(masq, qid)
    masq.run(["masq-queue", "check"]).ok()          # the new record is part of the format


def test_issue9_a_waiting_recipient_is_recorded_once_not_at_every_run(masq):
    offline_route(masq)
    enqueue(masq, MESSAGE, "alice@test.example", ["x@remote.example"]).ok()
    for _ in range(3):
        masq.run(["masq-send", "--once"]).ok()
    [qid] = masq.queue_ids("active")
    assert records(masq, "active", qid, b"waiting") == [
        records(masq, "active", qid, b"waiting")[0]]
    assert records(masq, "active", qid, b"waiting")[0].endswith(
        b" waiting for route isp to come online")


def test_issue9_mailq_says_until_when_a_recipient_is_deferred_and_the_last_reply(masq):
    offline_route(masq)
    go_online(masq)
    enqueue(masq, MESSAGE, "alice@test.example", ["x@remote.example"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    [qid] = masq.queue_ids("active")
    line = re.compile(r"x@remote\.example \(deferred: until \w{3} \w{3} \d\d \d\d:\d\d:\d\d: "
                      r".*Connection refused\)")
    assert line.search(mailq(masq)), mailq(masq)
    assert line.search(shown(masq, qid)), shown(masq, qid)


def test_issue9_mailq_tells_a_hold_by_a_filter_from_one_by_the_admin(masq, tmp_path):
    spam = tmp_path / "spam"
    spam.write_text("#!/bin/sh\ncat >/dev/null; echo 'looks like spam' >&2; exit 1\n")
    spam.chmod(0o755)
    masq.config(f'[queue]\nfilters = ["{spam}"]')
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    [filtered] = masq.queue_ids("hold")
    assert f"bob@localhost (on hold by filter {spam}: exit 1: looks like spam)" in mailq(masq)
    masq.set_config(open(masq.conf).read().replace(f'filters = ["{spam}"]', "filters = []"))
    enqueue(masq, MESSAGE, "alice@test.example", ["carol@localhost"]).ok()
    [held] = [q for q in masq.queue_ids() if q != filtered]
    masq.run(["masq-queue", "hold", held]).ok()
    listing = mailq(masq)
    assert re.search(r"carol@localhost \(held by the admin \(\S+\)\)", listing), listing
    assert "(held by the admin (" in shown(masq, held)
    masq.run(["masq-queue", "check"]).ok()


@pytest.mark.parametrize("argv", [["masq-send", "--once", "-v"], ["bin/runq", "-v"],
                                  ["bin/sendmail", "-q", "-v"]])
def test_issue9_runq_v_prints_one_line_per_attempt(masq, argv):
    offline_route(masq)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost", "x@remote.example"]).ok()
    [qid] = masq.queue_ids()
    if argv[0].startswith("bin/"):
        argv = [masq.bin(argv[0][4:]), *argv[1:]]
    err = masq.run(argv).ok().err.decode()
    name = os.path.basename(argv[0])
    assert f"{name}: {qid}: <bob@localhost> local: sent: delivered to maildir " in err, err
    assert f"{name}: {qid}: <x@remote.example>: waiting for route isp to come online\n" in err
    assert "msg/s" not in err                       # no terminal: no progress line


def test_issue9_runq_without_v_is_quiet(masq):
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost"]).ok()
    assert masq.run(["masq-send", "--once"]).ok().err == b""


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Msg:
    id = "q1"
    recipients = ["bob@localhost"]


def test_issue9_progress_on_a_terminal_is_rewritten_in_place_a_few_times_a_second():
    from masq import attempt
    clock = Clock()
    report = attempt.Report(Terminal(), "runq", verbose=True, clock=clock)
    report.add(4)
    report.finished()                               # within the first second: nothing
    assert report.stream.getvalue() == ""
    clock.now += 1.0
    report.finished()
    assert report.stream.getvalue() == "\r\x1b[Krunq: 2/4, 2.0 msg/s"
    clock.now += 0.1
    report.finished()                               # too soon to draw again
    assert report.stream.getvalue().count("msg/s") == 1
    report.outcome(Msg(), 0, "sent", "delivered", "local")   # above the count, count again
    assert report.stream.getvalue().endswith(
        "\r\x1b[Krunq: q1: <bob@localhost> local: sent: delivered\nrunq: 3/4, 2.7 msg/s")
    clock.now += 0.4
    report.finished()
    report.close()
    assert report.stream.getvalue().endswith("\r\x1b[Krunq: 4/4, 2.7 msg/s\n")


def test_issue9_no_progress_when_stderr_is_not_a_terminal():
    from masq import attempt
    clock = Clock()
    report = attempt.Report(io.StringIO(), "runq", clock=clock)
    report.add(2)
    clock.now += 5
    report.finished()
    report.finished()
    report.close()
    assert report.stream.getvalue() == ""


# --- addresses that do not parse ---------------------------------------------------

BAD = "bad address, does not parse: bob@: nothing after the @"


def nothing_delivered(masq):
    assert masq.queue_ids() == []
    assert not os.path.exists(os.path.join(masq.dir, "mail", "bob@"))


@pytest.mark.parametrize("args, message, extra", [
    (["bob@"], MESSAGE, ""),
    (["-t"], b"To: bob@\n\nx\n", " (address in To)"),
    (["-bv", "bob@"], MESSAGE, ""),
])
def test_issue9_sendmail_refuses_an_address_without_a_domain_after_the_at(
        masq, args, message, extra):
    r = masq.run([masq.bin("sendmail"), *args], input=message)
    assert r.rc == 65, r
    assert r.err.decode() == f"sendmail: fatal: {BAD}{extra}\n", r
    nothing_delivered(masq)


def test_issue9_sendmail_f_refuses_the_same_way(masq):
    r = masq.run([masq.bin("sendmail"), "-f", "bob@", "carol"], input=MESSAGE)
    assert r.rc == 65 and r.err.decode() == f"sendmail: fatal: {BAD} (the sender)\n", r
    assert masq.queue_ids() == []


def test_issue9_masq_route_refuses_with_the_same_words(masq):
    r = masq.run(["masq-route", "bob@"])
    assert r.rc == 65 and r.out.decode() == f"bob@: bounce: {BAD}\n", r
    r = masq.run(["masq-route", "--from", "bob@", "carol@localhost"])
    assert r.rc == 65 and r.err.decode() == f"masq-route: fatal: {BAD} (--from)\n", r


def test_issue9_masq_queue_refuses_an_envelope_address_that_does_not_parse(masq):
    r = enqueue(masq, MESSAGE, "alice@test.example", ["bob@"])
    assert r.rc == 65 and r.err.decode() == f"masq-queue: fatal: {BAD}\n", r
    assert masq.queue_ids() == [] and os.listdir(os.path.join(masq.spool, "tmp")) == []


def test_issue9_smtpd_refuses_it_too(masq):
    dialogue = (b"HELO x\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@>\r\n"
                b"MAIL FROM:<bob@>\r\nQUIT\r\n")
    r = masq.run(["masq-smtpd"], input=dialogue, env=masq.env(TCPREMOTEIP="127.0.0.1"))
    replies = r.out.split(b"\r\n")
    assert any(line.startswith(b"501 ") or line.startswith(b"553 ") for line in replies), r
