"""The whole local path, as a user runs it: sendmail, then runq, then a mailbox."""
import mailbox
import os
import shutil

import pytest

from conftest import clean_env, run

BODY = b"8-bit \xe9\xe8\n" + b"y" * 5000 + b"\nFrom the top\n>From quoted\n.\n..two dots\nend\n"
MESSAGE = b"Subject: local path\r\nTo: bob@localhost\r\n\r\n" + BODY.replace(b"\n", b"\r\n")


def send_and_runq(masq):
    run([masq.bin("sendmail"), "-odq", "-i", "-t"], input=MESSAGE, env=clean_env()).ok()
    run([masq.bin("runq")], env=clean_env()).ok()
    assert masq.queue_ids() == []


def test_sendmail_runq_mbox_is_mboxrd_and_reads_back(masq):
    masq.use_mailbox("mbox")
    send_and_runq(masq)
    send_and_runq(masq)
    path = os.path.join(masq.dir, "mail", "bob")
    raw = open(path, "rb").read()
    assert raw.startswith(b"From ") and raw.count(b"\nFrom ") == 1   # two messages
    assert b"\n>From the top\n>>From quoted\n" in raw
    box = mailbox.mbox(path, create=False)
    msgs = list(box)
    assert len(msgs) == 2
    for msg in msgs:
        data = msg.as_bytes()
        assert msg["Subject"] == "local path" and msg["Delivered-To"] == "bob@localhost"
        # mailbox.mbox keeps the quoting (it reads mboxo); undo mboxrd's one level
        body = data.split(b"\n\n", 1)[1]
        lines = [line[1:] if line.lstrip(b">").startswith(b"From ") else line
                 for line in body.split(b"\n")]
        assert b"\n".join(lines).rstrip(b"\n") == BODY.rstrip(b"\n")


@pytest.mark.skipif(not shutil.which("procmail"), reason="procmail is not installed")
def test_sendmail_runq_procmail_as_the_mda(masq, tmp_path):
    target = tmp_path / "procmail-box"
    rc = tmp_path / "procmailrc"
    rc.write_text(f"LOGFILE={tmp_path}/procmail.log\n:0\n{target}/\n")   # a maildir: no lock
    masq.use_mailbox("mda", mda=f"procmail -p -m {rc}")
    send_and_runq(masq)
    box = mailbox.Maildir(str(target), create=False)
    (msg,) = list(box)
    assert msg.as_bytes().endswith(b"\n\n" + BODY)
    assert msg["Return-Path"] and msg["Delivered-To"] == "bob@localhost"
