"""[queue] filters between incoming/ and active/, and archive_bcc."""
import os

from conftest import enqueue

MESSAGE = b"From: alice@test.example\nSubject: hello\n\nbody line\r\nFrom x\n"


def script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def use_filters(masq, *commands):
    listed = ", ".join(f'"{c}"' for c in commands)
    masq.config(f"[queue]\nfilters = [{listed}]")


def test_a_filter_that_adds_a_header_changes_what_is_delivered(masq, tmp_path):
    tag = script(tmp_path, "tag",
                 'printf "X-Filtered: yes (%s %s)\\n" "$SENDER" "$RECIPIENTS"; cat')
    use_filters(masq, tag)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    [msg] = list(masq.maildir("bob"))
    assert msg["X-Filtered"] == "yes (alice@test.example bob@localhost)"
    assert msg.as_bytes().endswith(b"Subject: hello\n\nbody line\nFrom x\n")
    assert masq.queue_ids() == []


def test_a_filter_that_says_no_puts_the_message_on_hold(masq, tmp_path):
    spam = script(tmp_path, "spam", "cat >/dev/null; echo 'looks like spam' >&2; exit 1")
    use_filters(masq, spam)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    assert len(masq.queue_ids("hold")) == 1
    assert not os.path.exists(os.path.join(masq.dir, "mail", "bob"))
    log = open(os.path.join(masq.dir, "masq.log")).read()
    assert "looks like spam" in log and "status=hold" in log


def test_a_filter_that_fails_for_now_keeps_the_message_in_incoming(masq, tmp_path):
    flag = tmp_path / "ok"
    later = script(tmp_path, "later", f"cat >/dev/null; [ -e {flag} ] && exit 0; exit 75")
    use_filters(masq, later)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    assert len(masq.queue_ids("incoming")) == 1
    flag.write_text("")
    masq.run(["masq-send", "--once"]).ok()
    assert masq.queue_ids() == [] and len(list(masq.maildir("bob"))) == 1


def test_archive_bcc_gets_a_copy_of_every_message(masq):
    masq.config('[queue]\narchive_bcc = "archive@localhost"')
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    assert len(list(masq.maildir("bob"))) == 1
    assert len(list(masq.maildir("archive"))) == 1
