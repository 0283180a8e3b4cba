"""masq-send: queue runs, the daemon, retries and bounces, through the real programs."""
import email
import email.policy
import os
import signal
import subprocess

import pytest

from conftest import BIN, enqueue, reap, wait_for

MESSAGE = b"From: alice@test.example\nSubject: hello\n\nbody line\n"


def runq(masq, *args):
    return masq.run(["masq-send", "--once", *args]).ok()


def set_mda(masq, script, tmp_path):
    """Deliver through an MDA stub: a shell script that exits as told."""
    stub = tmp_path / "mda"
    stub.write_text("#!/bin/sh\n" + script + "\n")
    stub.chmod(0o755)
    masq.use_mailbox("mda", mda=str(stub))


def test_runq_delivers_into_the_maildir_and_empties_the_queue(masq):
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost"]).ok()
    runq(masq)
    box = masq.maildir("bob")
    [msg] = list(box)
    assert msg.as_bytes().endswith(b"Subject: hello\n\nbody line\n")
    assert msg["Delivered-To"] == "bob@localhost"
    assert masq.queue_ids() == []
    assert "to=<bob@localhost> relay=local" in masq.log()
    assert "status=sent" in masq.log()


def test_no_route_bounces_to_the_sender_with_a_dsn(masq):
    enqueue(masq, MESSAGE, "alice@test.example", ["x@remote.example"]).ok()
    runq(masq)
    assert masq.queue_ids() == []
    [bounce] = list(masq.maildir("alice"))
    parsed = email.message_from_bytes(bounce.as_bytes(), policy=email.policy.default)
    assert parsed["Return-Path"] == "<>"
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    parts = list(parsed.iter_parts())
    assert "x@remote.example" in parts[0].get_content()
    status = parts[1].as_string()
    assert "Final-Recipient: rfc822; x@remote.example" in status
    assert "Action: failed" in status and "Status: 5.4.4" in status
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert "Subject: hello" in parts[2].as_string()
    assert "status=bounced" in masq.log()


def test_a_bounce_is_never_bounced(masq):
    enqueue(masq, MESSAGE, "", ["x@remote.example"]).ok()
    runq(masq)
    assert masq.queue_ids() == []
    assert "status=dropped" in masq.log()
    assert not os.path.exists(os.path.join(masq.dir, "mail", "postmaster"))


def test_temporary_failure_is_deferred_recorded_and_retried(masq, tmp_path):
    set_mda(masq, "cat >/dev/null; echo 'mailbox busy' >&2; exit 75", tmp_path)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost"]).ok()
    runq(masq)
    [qid] = masq.queue_ids("active")
    listing = masq.run(["masq-queue", "list"]).ok().out.decode()
    assert "bob@localhost (deferred:" in listing
    runq(masq)
    with open(os.path.join(masq.spool, "active", qid), "rb") as f:
        assert f.read().count(b"\ndeferred 0 ") == 2
    set_mda(masq, f"cat >> {tmp_path}/got; exit 0", tmp_path)
    runq(masq)
    assert masq.queue_ids() == []
    assert (tmp_path / "got").read_bytes().endswith(MESSAGE)


def test_deferred_too_long_bounces(masq, tmp_path):
    set_mda(masq, "cat >/dev/null; exit 75", tmp_path)
    masq.config("[queue]\nmax_age = 0")
    enqueue(masq, MESSAGE, "someone@remote.example", ["bob@localhost"]).ok()
    runq(masq)
    # the bounce for someone@remote.example has no route either, and a bounce
    # of a bounce is dropped: the queue ends empty
    assert masq.queue_ids() == []
    assert "gave up after" in masq.log()


def test_permanent_mda_failure_bounces_one_recipient_and_delivers_the_other(masq, tmp_path):
    set_mda(masq, f'cat >> {tmp_path}/got-$USER; [ "$USER" = bob ] && exit 0; exit 1',
            tmp_path)
    enqueue(masq, MESSAGE, "x@remote.example", ["bob@localhost", "carol@localhost"]).ok()
    runq(masq)
    assert (tmp_path / "got-bob").exists()
    assert "to=<carol@localhost> relay=local" in masq.log()
    assert "status=bounced" in masq.log()


def test_mail_for_an_offline_route_waits_without_bouncing(masq):
    text = open(masq.conf).read().replace('detect = "always"', 'detect = "file"')
    masq.set_config(text + '\n[route.isp]\nhost = "127.0.0.1:1"\n')
    enqueue(masq, MESSAGE, "alice@test.example", ["x@remote.example"]).ok()
    runq(masq)
    runq(masq)
    [qid] = masq.queue_ids("active")
    assert not os.path.exists(os.path.join(masq.dir, "mail", "alice"))
    held = masq.run(["masq-queue", "hold", qid]).ok()
    assert held.rc == 0 and masq.queue_ids("hold") == [qid]
    runq(masq)
    assert masq.queue_ids("hold") == [qid]



def test_daemon_is_woken_by_each_enqueue_and_stops_on_sigterm(masq):
    daemon = subprocess.Popen([os.path.join(BIN, "masq-send")], env=masq.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: "daemon started" in masq.log()), masq.log()
        for n in range(3):
            enqueue(masq, MESSAGE + b"%d\n" % n, "alice@test.example", ["bob@localhost"]).ok()
        assert wait_for(lambda: len(os.listdir(os.path.join(masq.dir, "mail/bob/new"))) == 3
                        if os.path.isdir(os.path.join(masq.dir, "mail/bob/new")) else False)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
        assert "daemon stopped" in masq.log()
    finally:
        reap(daemon)
    assert masq.queue_ids() == []


def test_bad_usage(masq):
    r = masq.run(["masq-send", "--bogus"])
    assert r.rc == 64
    assert masq.run(["masq-send", "--help"]).rc == 0


def test_daemon_keeps_running_when_online_detection_fails(masq):
    text = open(masq.conf).read().replace('detect = "always"', 'detect = "command"')
    masq.set_config(text)           # no online.command: detection fails every time
    daemon = subprocess.Popen([os.path.join(BIN, "masq-send")], env=masq.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: "daemon started" in masq.log()), masq.log()
        enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost"]).ok()
        new = os.path.join(masq.dir, "mail/bob/new")
        assert wait_for(lambda: os.path.isdir(new) and len(os.listdir(new)) == 1)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert b"online.command" in daemon.stderr.read()


def test_days_spent_waiting_do_not_count_against_max_age(masq, tmp_path):
    set_mda(masq, "cat >/dev/null; exit 75", tmp_path)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost"]).ok()
    [qid] = masq.queue_ids("incoming")
    path = os.path.join(masq.spool, "incoming", qid)
    data = open(path, "rb").read()
    head, _, rest = data.rpartition(b"\narrived ")
    stamp, _, tail = rest.partition(b"\n")
    old = b"%.3f" % (float(stamp) - 6 * 86400)      # arrived six days ago
    with open(path, "wb") as f:
        f.write(head + b"\narrived " + old + b"\n" + tail)
    runq(masq)
    assert masq.queue_ids("active") == [qid]         # deferred, not bounced
    assert "status=bounced" not in masq.log()


def test_one_delay_warning_when_a_recipient_fails_long_enough(masq, tmp_path):
    set_mda(masq, f'if [ "$USER" = alice ]; then cat >> {tmp_path}/alice; exit 0; fi; '
            'cat >/dev/null; echo "mailbox busy" >&2; exit 75', tmp_path)
    masq.config("[queue]\nwarn_after = 0.001")
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost"]).ok()
    for _ in range(4):
        runq(masq)
    warnings = (tmp_path / "alice").read_bytes()
    assert warnings.count(b"Subject: Delayed Mail (still being retried)") == 1
    assert b"Action: delayed" in warnings and b"Status: 4.0.0" in warnings
    assert b"mailbox busy" in warnings
    assert len(masq.queue_ids("active")) == 1          # still being retried
    assert "status=delayed" in masq.log()


def test_a_bounce_that_cannot_be_queued_does_not_deliver_the_others_twice(masq):
    import resource
    headers = b"".join(b"X-Filler-%d: %s\n" % (n, b"f" * 60) for n in range(20))
    enqueue(masq, headers + b"Subject: x\n\nhi\n", "alice@test.example",
            ["bob@localhost", "x@remote.example"]).ok()

    def small_files():              # the delivery (1.8 KB) fits, the bounce (3 KB) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (2300, 2300))
    masq.run(["masq-send", "--once"], preexec_fn=small_files)
    assert len(list(masq.maildir("bob"))) == 1
    assert len(masq.queue_ids()) == 1                   # x@remote.example still to bounce
    runq(masq)
    assert len(list(masq.maildir("bob"))) == 1          # not delivered again
    [bounce] = list(masq.maildir("alice"))
    assert b"x@remote.example" in bounce.as_bytes()
    assert masq.queue_ids() == []


def deliver_by(masq, way):
    """Set [local] deliver: "in-process" (the default) or "child" (masq-local)."""
    text = open(masq.conf).read().replace("[local]\n", f'[local]\ndeliver = "{way}"\n')
    masq.set_config(text)


def test_child_local_delivery_puts_each_copy_in_the_maildir_once(masq):
    deliver_by(masq, "child")
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost", "carol@localhost"]).ok()
    enqueue(masq, MESSAGE + b"2\n", "alice@test.example", ["bob@localhost"]).ok()
    runq(masq)
    assert masq.queue_ids() == []
    bob, carol = list(masq.maildir("bob")), list(masq.maildir("carol"))
    assert sorted(m.as_bytes().endswith(MESSAGE) for m in bob) == [False, True]
    assert [m.as_bytes().endswith(MESSAGE) for m in carol] == [True]
    assert all(b"\nrcpt " not in m.as_bytes() for m in bob + carol)   # no spool records
    # written by masq-local, not by masq-send: a maildir name holds the writer's pid
    [send_pid] = {line.split("masq-send[")[1].split("]")[0]
                  for line in masq.log().splitlines() if "masq-send[" in line}
    names = os.listdir(os.path.join(masq.dir, "mail", "bob", "new"))
    assert all(f"P{send_pid}Q" not in name for name in names), (send_pid, names)
    assert masq.log().count("status=sent") == 3


def test_child_local_delivery_appends_to_an_mbox_once(masq):
    import mailbox
    masq.use_mailbox("mbox")
    deliver_by(masq, "child")
    for n in range(3):
        enqueue(masq, MESSAGE + b"%d\n" % n, "alice@test.example", ["bob@localhost"]).ok()
    runq(masq)
    runq(masq)
    assert masq.queue_ids() == []
    box = mailbox.mbox(os.path.join(masq.dir, "mail", "bob"))
    assert sorted(m.get_payload() for m in box) == [f"body line\n{n}\n" for n in range(3)]


@pytest.mark.parametrize("way", ["in-process", "child"])
def test_a_failing_mda_defers_or_bounces_the_same_in_process_or_as_a_child(masq, tmp_path,
                                                                          way):
    set_mda(masq, "cat >/dev/null; echo 'mailbox busy' >&2; exit 75", tmp_path)
    deliver_by(masq, way)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost"]).ok()
    runq(masq)
    assert len(masq.queue_ids("active")) == 1
    listing = masq.run(["masq-queue", "list"]).ok().out.decode()
    assert "bob@localhost (deferred:" in listing and "mailbox busy" in listing
    set_mda(masq, f'cat >> {tmp_path}/got-$USER; [ "$USER" = carol ] && exit 1; exit 0',
            tmp_path)
    enqueue(masq, MESSAGE, "x@remote.example", ["carol@localhost"]).ok()
    runq(masq)
    assert masq.queue_ids() == []           # bob delivered, carol bounced (bounce dropped)
    assert (tmp_path / "got-bob").read_bytes().endswith(MESSAGE)
    assert "to=<carol@localhost> relay=local" in masq.log()
    assert "status=bounced (mda exited with status 1)" in masq.log()


def test_what_masq_local_prints_and_its_status_become_one_answer_per_recipient():
    from masq.deliverer import answers
    assert answers(b"K delivered\nD no such user\n", 0, 2) == [("K", "delivered"),
                                                              ("D", "no such user")]
    [(z1, _), (z2, text)] = answers(b"K delivered\n", 0, 2)     # a line missing: Z
    assert (z1, z2) == ("K", "Z") and "no answer" in text
    assert [a[0] for a in answers(b"", -9, 2)] == ["Z", "Z"]     # killed: temporary
    assert [a[0] for a in answers(b"", 111, 2)] == ["Z", "Z"]
    assert [a[0] for a in answers(b"", 100, 2)] == ["D", "D"]    # it says: permanent
    assert [a[0] for a in answers(b"K ok\nwhat?\n", 0, 2)] == ["Z", "Z"]  # bad output
    assert [a[0] for a in answers(b"K a\nK b\nK c\n", 0, 2)] == ["Z", "Z"]
