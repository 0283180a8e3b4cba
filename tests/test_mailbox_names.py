"""A local part names a mailbox and nothing else: never a command, a file or a lock."""
import os
import shutil
import tempfile

import pytest

from conftest import clean_env, run


@pytest.fixture
def short_dir():
    """A folder with a short name: a local part holds at most 64 bytes."""
    folder = tempfile.mkdtemp(prefix="mq", dir="/tmp")
    yield folder
    shutil.rmtree(folder)


def smtpd(masq, lines, ip="203.0.113.5"):
    dialogue = "".join(f"{line}\r\n" for line in ["EHLO client.example", *lines, "QUIT"])
    r = masq.run(["masq-smtpd"], input=dialogue.encode(),
                 env=masq.env(TCPREMOTEIP=ip)).ok()
    return r.out.decode().split("\r\n")


def test_smtpd_refuses_local_parts_that_only_an_aliases_file_may_use(masq, short_dir):
    replies = smtpd(masq, ["MAIL FROM:<a@client.example>",
                           f'RCPT TO:<"|touch {short_dir}/pwned"@localhost>',
                           f'RCPT TO:<"{short_dir}/box"@localhost>',
                           'RCPT TO:<":include:/etc/passwd"@localhost>',
                           'RCPT TO:<"-oQ/tmp"@localhost>',
                           "RCPT TO:<bob@localhost>"])
    rcpt = [r for r in replies if r[:3] in ("250", "550", "554")][-5:]
    assert [r[:9] for r in rcpt] == ["550 5.1.1"] * 4 + ["250 2.1.5"], replies


def test_a_pipe_or_path_local_part_from_sendmail_bounces_and_runs_nothing(masq, short_dir):
    target = os.path.join(short_dir, "pwned")
    box = os.path.join(short_dir, "box")
    for rcpt in (f'"|touch {target}"@localhost', f'"{box}"@localhost'):
        run([masq.bin("sendmail"), "-odq", "-f", "alice@test.example", rcpt],
            input=b"Subject: x\n\nhi\n", env=clean_env()).ok()
    run([masq.bin("runq")], env=clean_env()).ok()
    assert not os.path.exists(target) and not os.path.exists(box)
    bounces = list(masq.maildir("alice"))
    assert len(bounces) == 2
    assert all(b"unusable mailbox name" in b.as_bytes() for b in bounces)


def test_mbox_mail_for_name_dot_lock_bounces_and_never_touches_the_lock(masq):
    masq.use_mailbox("mbox")
    for rcpt in ("bob.lock@localhost", "bob@localhost"):
        run([masq.bin("sendmail"), "-odq", "-f", "alice@test.example", rcpt],
            input=b"Subject: x\n\nhi\n", env=clean_env()).ok()
    run([masq.bin("runq")], env=clean_env()).ok()
    mail = os.path.join(masq.dir, "mail")
    assert not os.path.exists(os.path.join(mail, "bob.lock"))
    assert open(os.path.join(mail, "bob"), "rb").read().count(b"\nSubject: x\n") == 1
    assert b"ends in .lock" in open(os.path.join(mail, "alice"), "rb").read()


def test_system_users_with_a_detail_are_known_to_smtpd(masq):
    masq.set_config(open(masq.conf).read().replace('users = "any"', 'users = "system"'))
    replies = smtpd(masq, ["MAIL FROM:<a@client.example>", "RCPT TO:<root+tag@localhost>",
                           "RCPT TO:<no-such-user+tag@localhost>"])
    assert any(r.startswith("250 2.1.5") for r in replies)
    assert any(r.startswith("550 5.1.1") for r in replies)


def test_background_delivery_after_sendmail_can_queue_a_bounce(masq):
    """The -odb child closes the caller's descriptors and must not reuse the spool's."""
    import time
    run([masq.bin("sendmail"), "-f", "alice@test.example", "bob@localhost",
         "x@remote.example"], input=b"Subject: x\n\nhi\n", env=clean_env()).ok()
    deadline = time.monotonic() + 30
    alice = os.path.join(masq.dir, "mail", "alice", "new")
    while time.monotonic() < deadline:          # the background run has no readiness signal
        if os.path.isdir(alice) and os.listdir(alice) and not masq.queue_ids():
            break
        time.sleep(0.05)
    assert masq.queue_ids() == []
    assert len(list(masq.maildir("bob"))) == 1
    [bounce] = list(masq.maildir("alice"))
    assert b"x@remote.example" in bounce.as_bytes()


def test_issue7_smtpd_refuses_a_dot_lock_name_at_rcpt_when_masq_local_would(masq):
    """masq-smtpd and masq-local share one mailbox-name rule: with mbox, NAME.lock is
    the lock of the mbox NAME, refused in the dialogue rather than bounced later."""
    masq.use_mailbox("mbox")
    replies = smtpd(masq, ["MAIL FROM:<a@client.example>", "RCPT TO:<bob.lock@localhost>",
                           "RCPT TO:<bob@localhost>"])
    rcpt = [r for r in replies if r[:3] in ("250", "550")][-2:]
    assert [r[:9] for r in rcpt] == ["550 5.1.1", "250 2.1.5"], replies


def test_smtpd_takes_an_include_alias_at_rcpt_without_reading_the_file(masq):
    """The file is its owner's, read as them at delivery: a missing one or a FIFO
    must neither end the session (421) nor hang it."""
    fifo = os.path.join(masq.dir, "fifo")
    os.mkfifo(fifo)
    with open(os.path.join(masq.dir, "aliases"), "a") as f:
        f.write(f"gone: :include:/nonexistent/list\nstuck: :include:{fifo}\n")
    replies = smtpd(masq, ["MAIL FROM:<a@client.example>", "RCPT TO:<gone@localhost>",
                           "RCPT TO:<stuck@localhost>", "RCPT TO:<bob@localhost>"])
    rcpt = [r for r in replies if r[:3] in ("250", "421", "550")][-3:]
    assert [r[:9] for r in rcpt] == ["250 2.1.5"] * 3, replies


def test_a_detail_that_could_not_be_a_path_component_is_refused(masq):
    replies = smtpd(masq, ["MAIL FROM:<a@client.example>", "RCPT TO:<bob+/x@localhost>",
                           "RCPT TO:<bob+x@localhost>"])
    rcpt = [r for r in replies if r[:3] in ("250", "550")][-2:]
    assert [r[:9] for r in rcpt] == ["550 5.1.1", "250 2.1.5"], replies
