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


def test_a_filter_that_exits_100_bounces_the_message_with_its_last_line(masq, tmp_path):
    refuse = script(tmp_path, "refuse", 'cat >/dev/null; [ -z "$SENDER" ] && exit 0\n'
                    "echo 'scanning' >&2; echo 'Eicar-Test-Signature FOUND' >&2; exit 100")
    use_filters(masq, refuse)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    assert not os.path.exists(os.path.join(masq.dir, "mail", "bob"))
    [report] = list(masq.maildir("alice"))          # the bounce, delivered in the same run
    text = report.as_bytes()
    assert b"<bob@localhost>: Eicar-Test-Signature FOUND (5.7.1)" in text, text
    assert b"Status: 5.7.1" in text and b"scanning" not in text
    assert masq.queue_ids() == []
    assert "status=bounced" in masq.log()


def test_a_filter_that_exits_99_drops_the_message_silently(masq, tmp_path):
    drop = script(tmp_path, "drop", "cat >/dev/null; echo 'known junk' >&2; exit 99")
    use_filters(masq, drop)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    assert masq.queue_ids() == []
    for user in ("bob", "alice"):
        assert not os.path.exists(os.path.join(masq.dir, "mail", user)), user
    log = masq.log()
    assert "known junk" in log and "status=dropped" in log


def test_a_filter_gets_the_client_address_and_the_auth_user(masq, tmp_path):
    seen = tmp_path / "seen"
    show = script(tmp_path, "show", "cat >/dev/null; "
                  f'echo "$QUEUE_ID|$MASQ_CLIENT_IP|$MASQ_AUTH_USER|$SENDER" >> {seen}')
    use_filters(masq, show)
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost"],
            env=masq.env(MASQ_PROTO="esmtpa", MASQ_CLIENT="192.0.2.7", MASQ_AUTH="carol")).ok()
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    lines = sorted(line.split("|", 1)[1] for line in seen.read_text().splitlines())
    assert lines == ["192.0.2.7|carol|alice@test.example", "||alice@test.example"], lines


def recipe(tmp_path, name):
    """A shell script from the EXAMPLES of masq-filter(7), as a person would save it."""
    page = os.path.join(os.path.dirname(__file__), "..", "man", "masq-filter.7")
    text = open(page).read()
    marker = f".Pa /usr/local/lib/masq/{name}"
    block = text[text.index(marker):].split(".Bd -literal -offset indent\n", 1)[1]
    return script(tmp_path, name, block.split("\n.Ed\n", 1)[0].removeprefix("#!/bin/sh\n"))


def test_the_clamav_recipe_of_masq_filter_7_bounces_a_virus(masq, tmp_path):
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    script(stubs, "clamdscan", "cat >/dev/null; echo 'stdin: Eicar-Test-Signature FOUND'; "
           '[ -z "$SENDER" ] && exit 0; exit 1')
    use_filters(masq, recipe(tmp_path, "virus-refuse"))
    env = masq.env(PATH=f"{stubs}:{masq.env()['PATH']}")
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost"], env=env).ok()
    masq.run(["masq-send", "--once"], env=env).ok()
    [report] = list(masq.maildir("alice"))
    assert b"virus found: Eicar-Test-Signature FOUND (5.7.1)" in report.as_bytes()
    assert not os.path.exists(os.path.join(masq.dir, "mail", "bob"))


def test_the_spamassassin_recipe_of_masq_filter_7_skips_authenticated_users(masq, tmp_path):
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    script(stubs, "spamc", 'cat; [ -z "$SENDER" ] && exit 0; exit 1')   # all but bounces
    use_filters(masq, recipe(tmp_path, "spam-refuse"))
    env = masq.env(PATH=f"{stubs}:{masq.env()['PATH']}")
    enqueue(masq, MESSAGE, "alice@test.example", ["bob@localhost"],
            env=dict(env, MASQ_PROTO="esmtpa", MASQ_CLIENT="192.0.2.7", MASQ_AUTH="carol")).ok()
    masq.run(["masq-send", "--once"], env=env).ok()
    assert len(list(masq.maildir("bob"))) == 1
    enqueue(masq, MESSAGE, "carol@test.example", ["bob@localhost"], env=env).ok()
    masq.run(["masq-send", "--once"], env=env).ok()
    assert len(list(masq.maildir("bob"))) == 1
    assert b"refused as spam (5.7.1)" in list(masq.maildir("carol"))[0].as_bytes()
