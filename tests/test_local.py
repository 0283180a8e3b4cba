"""masq-local, black-box: message on stdin, one K/Z/D line per recipient.

Each test writes the [local] table it needs, runs .venv/bin/masq-local and
reads back what landed on disk with Python's mailbox module (or the queue
with masq-queue show).
"""
import io
import mailbox
import os
import resource
import shutil
import stat
import time

import pytest

MESSAGE = (b"Received: by test.example (masq) id 1; Wed, 25 Nov 2026 19:40:03 +0100\n"
           b"From: Alice <alice@example.org>\n"
           b"To: bob@test.example\n"
           b"Subject: caf\xc3\xa9 \xff 8-bit header\n"
           b"\n"
           b"From the start of a line\n"
           b">From already quoted\n"
           b">>From twice\n"
           b".\n"
           b"..\n"
           b"8-bit body: \xe9\xe0\xff\xfe\x00\x01 end\n"
           + b"L" * 5000 + b"\n"
           b"Fromage is not a From_ line\n"
           b"last line\n")


def head(sender, rcpt):
    return f"Return-Path: <{sender}>\nDelivered-To: {rcpt}\n".encode()


def configure(masq, **local):
    """Replace the [local] table (and what follows it) with these keys."""
    with open(masq.conf) as f:
        top = f.read().split("[local]")[0]
    body = "".join(f"{key} = {toml(value)}\n" for key, value in local.items())
    masq.set_config(top + "[local]\n" + body)


def toml(value):
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def aliases(masq, text):
    with open(os.path.join(masq.dir, "aliases"), "w") as f:
        f.write(text)


def local(masq, sender, *rcpts, message=MESSAGE, env=None, **kw):
    return masq.run(["masq-local", "--", sender, *rcpts], input=message, env=env, **kw)


def lines(result):
    result.ok()
    return result.out.decode().splitlines()


def script(path, text):
    """Write an executable shell script."""
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + text)
    os.chmod(path, 0o755)
    return str(path)


def mbox_messages(path):
    """Each message of an mbox as bytes, without its From_ line, mboxrd unquoted."""
    box = mailbox.mbox(str(path), create=False)
    out = []
    for key in box.keys():
        data = box.get_bytes(key)
        out.append(b"".join(line[1:] if line.lstrip(b">").startswith(b"From ")
                            and line.startswith(b">") else line
                            for line in data.splitlines(keepends=True)))
    box.close()
    return out


def maildir_messages(masq, user):
    box = masq.maildir(user)
    return [box.get_bytes(key) for key in box.keys()]


# -- maildir


def test_maildir_keeps_every_byte_after_the_added_headers(masq):
    out = lines(local(masq, "alice@example.org", "bob@TEST.example"))
    assert len(out) == 1 and out[0].startswith("K delivered to maildir ")
    got = maildir_messages(masq, "bob")
    assert got == [head("alice@example.org", "bob@test.example") + MESSAGE]
    folder = os.path.join(masq.dir, "mail", "bob")
    assert sorted(os.listdir(folder)) == ["cur", "new", "tmp"]
    assert os.listdir(os.path.join(folder, "tmp")) == []
    name = os.listdir(os.path.join(folder, "new"))[0]
    assert name.endswith("." + os.uname().nodename)
    assert f"P{os.getpid()}" not in name and ".M" in name


def test_maildir_null_sender_gets_empty_return_path(masq):
    assert lines(local(masq, "", "bob@localhost"))[0].startswith("K ")
    assert maildir_messages(masq, "bob")[0].startswith(b"Return-Path: <>\n"
                                                       b"Delivered-To: bob@localhost\n")


def test_maildir_path_template_and_unwritable_folder(masq, tmp_path):
    configure(masq, mailbox="maildir", path=str(tmp_path / "boxes" / "{user}" / "Maildir/"))
    assert lines(local(masq, "a@b.example", "carol@localhost"))[0].startswith("K ")
    box = mailbox.Maildir(str(tmp_path / "boxes" / "carol" / "Maildir"), create=False)
    assert len(box) == 1
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")
    configure(masq, mailbox="maildir", path=str(blocked / "{user}/"))
    out = lines(local(masq, "a@b.example", "carol@localhost"))
    assert out[0].startswith("Z unable to create maildir ")


def test_seekable_stdin_read_again_for_each_mailbox(masq, tmp_path):
    source = tmp_path / "msg"
    source.write_bytes(b"junk before" + MESSAGE)
    with open(source, "rb") as f:
        f.seek(len(b"junk before"))
        out = lines(local(masq, "a@b.example", "bob@localhost", "carol@localhost",
                          message=None, stdin=f))
    assert [line[:2] for line in out] == ["K ", "K "]
    assert maildir_messages(masq, "bob") == [head("a@b.example", "bob@localhost") + MESSAGE]
    assert maildir_messages(masq, "carol") == [head("a@b.example", "carol@localhost") + MESSAGE]


def test_piped_stdin_spooled_once_for_several_mailboxes(masq):
    rcpts = [f"user{i}@localhost" for i in range(5)]
    out = lines(local(masq, "a@b.example", *rcpts))
    assert len(out) == 5 and all(line.startswith("K ") for line in out)
    for i, rcpt in enumerate(rcpts):
        assert maildir_messages(masq, f"user{i}") == [head("a@b.example", rcpt) + MESSAGE]


def test_empty_message_and_message_without_final_newline(masq):
    configure(masq, mailbox="mbox", path="mbox/{user}")
    assert lines(local(masq, "a@b.example", "bob@localhost", message=b""))[0][0] == "K"
    no_eol = b"Subject: x\n\nno eol"
    assert lines(local(masq, "a@b.example", "bob@localhost", message=no_eol))[0][0] == "K"
    got = mbox_messages(os.path.join(masq.dir, "mbox", "bob"))
    assert got == [head("a@b.example", "bob@localhost"),
                   head("a@b.example", "bob@localhost") + b"Subject: x\n\nno eol\n"]


# -- mbox


def test_mbox_mboxrd_round_trip_and_from_lines(masq):
    configure(masq, mailbox="mbox", path="mbox/{user}/")
    assert lines(local(masq, "alice@example.org", "bob@localhost"))[0] == \
        f"K delivered to mbox {masq.dir}/mbox/bob"
    assert lines(local(masq, "", "bob@localhost"))[0].startswith("K ")
    path = os.path.join(masq.dir, "mbox", "bob")
    raw = open(path, "rb").read()
    assert raw.startswith(b"From alice@example.org ")
    assert b"\n\nFrom MAILER-DAEMON " in raw
    assert b"\n>From the start of a line\n>>From already quoted\n>>>From twice\n" in raw
    assert b"\nFromage is not" in raw and raw.endswith(b"last line\n\n")
    assert not os.path.exists(path + ".lock")
    assert mbox_messages(path) == [head("alice@example.org", "bob@localhost") + MESSAGE,
                                   head("", "bob@localhost") + MESSAGE]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_mbox_appends_after_a_file_without_final_blank_line(masq):
    configure(masq, mailbox="mbox", path="mbox/{user}")
    os.makedirs(os.path.join(masq.dir, "mbox"))
    path = os.path.join(masq.dir, "mbox", "bob")
    with open(path, "wb") as f:
        f.write(b"From x@y Mon Jan  1 00:00:00 2024\nSubject: old\n\nold body")
    assert lines(local(masq, "a@b.example", "bob@localhost"))[0].startswith("K ")
    got = mbox_messages(path)
    assert got[0] == b"Subject: old\n\nold body\n"
    assert got[1] == head("a@b.example", "bob@localhost") + MESSAGE


def test_mbox_is_cut_back_when_a_write_fails(masq):
    configure(masq, mailbox="mbox", path="mbox/{user}")
    assert lines(local(masq, "a@b.example", "bob@localhost"))[0].startswith("K ")
    path = os.path.join(masq.dir, "mbox", "bob")
    before = open(path, "rb").read()
    big = MESSAGE + b"x" * 200000 + b"\n"
    limit = len(before) + 30000

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = lines(local(masq, "a@b.example", "bob@localhost", message=big, preexec_fn=small_files))
    assert out[0].startswith("Z unable to write to mbox ") and "left as it was" in out[0]
    assert open(path, "rb").read() == before
    assert not os.path.exists(path + ".lock")
    assert lines(local(masq, "a@b.example", "bob@localhost", message=big))[0].startswith("K ")
    assert len(mbox_messages(path)) == 2


def test_mbox_stale_dot_lock_is_removed(masq):
    configure(masq, mailbox="mbox", path="mbox/{user}")
    os.makedirs(os.path.join(masq.dir, "mbox"))
    lock = os.path.join(masq.dir, "mbox", "bob.lock")
    with open(lock, "w") as f:
        f.write("99999\n")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert lines(local(masq, "a@b.example", "bob@localhost"))[0].startswith("K ")
    assert not os.path.exists(lock)


def test_mbox_refuses_a_symbolic_link(masq, tmp_path):
    configure(masq, mailbox="mbox", path="mbox/{user}")
    os.makedirs(os.path.join(masq.dir, "mbox"))
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious\n")
    os.symlink(target, os.path.join(masq.dir, "mbox", "bob"))
    out = lines(local(masq, "a@b.example", "bob@localhost"))
    assert out[0].startswith("Z ") and "symbolic link" in out[0]
    assert target.read_bytes() == b"precious\n"


# -- MDA


def test_procmail_as_mda_delivers_into_a_maildir(masq, tmp_path):
    procmail = shutil.which("procmail") or "/usr/bin/procmail"
    if not os.path.exists(procmail):
        pytest.skip("procmail is not installed")
    rc = tmp_path / "procmailrc"
    rc.write_text(f"SHELL=/bin/sh\n:0\n{tmp_path}/pm/$LOCAL/\n")
    (tmp_path / "pm").mkdir()
    configure(masq, mailbox="mda", mda=f"{procmail} -p -m {rc}")  # -p: keep LOCAL
    out = lines(local(masq, "alice@example.org", "dave@localhost"))
    assert out == ["K delivered to program procmail"]
    box = mailbox.Maildir(str(tmp_path / "pm" / "dave"), create=False)
    got = [box.get_bytes(key) for key in box.keys()]
    assert got == [head("alice@example.org", "dave@localhost") + MESSAGE]


def test_mda_arguments_are_substituted_after_splitting(masq, tmp_path):
    record = tmp_path / "args"
    stub = script(tmp_path / "mda", f'for a in "$@"; do printf "%s|" "$a"; done > {record}\n'
                  f'echo >> {record}\n'
                  f'echo "$SENDER $RECIPIENT $USER $LOGNAME $LOCAL $DOMAIN" >> {record}\n'
                  f"cat > {tmp_path}/message\n")
    configure(masq, mailbox="mda",
              mda=f"{stub} -u {{user}} '{{local}} x' {{domain}} -f {{sender}} {{recipient}}")
    rcpt = '"x; rm -rf {home} $(id)"@Localhost'
    out = lines(local(masq, "a b@c.example", rcpt))
    assert out[0].startswith("K delivered to program mda")
    args, env = record.read_text().split("\n")[:2]
    user = "x; rm -rf {home} $(id)"
    assert args == (f"-u|{user}|{user} x|localhost|-f|a b@c.example|"
                    '"x; rm -rf {home} $(id)"@localhost|')
    delivered = '"x; rm -rf {home} $(id)"@localhost'
    assert env == f"a b@c.example {delivered} {user} {user} {user} localhost"
    assert (tmp_path / "message").read_bytes() == head("a b@c.example", delivered) + MESSAGE


@pytest.mark.parametrize("code, letter", [(75, "Z"), (1, "D"), (100, "D"), (67, "D")])
def test_mda_exit_codes(masq, tmp_path, code, letter):
    stub = script(tmp_path / "mda", "cat >/dev/null; echo noise >&2\n"
                  f"echo 'mailbox {code} full' >&2; exit {code}\n")
    configure(masq, mailbox="mda", mda=stub)
    assert lines(local(masq, "a@b.example", "bob@localhost")) == [f"{letter} mailbox {code} full"]


def test_mda_killed_missing_or_too_slow_is_temporary(masq, tmp_path):
    configure(masq, mailbox="mda", mda=script(tmp_path / "mda", "kill -9 $$\n"))
    out = lines(local(masq, "a@b.example", "bob@localhost"))
    assert out[0].startswith("Z mda killed by signal 9")
    configure(masq, mailbox="mda", mda=str(tmp_path / "no-such-mda"))
    assert lines(local(masq, "a@b.example", "bob@localhost"))[0].startswith("Z unable to run ")
    configure(masq, mailbox="mda", mda=script(tmp_path / "slow", "sleep 30\n"), mda_timeout=1)
    started = time.monotonic()
    out = lines(local(masq, "a@b.example", "bob@localhost"))
    assert out == ["Z slow timed out after 1.0 seconds"]
    assert time.monotonic() - started < 20


def test_mda_that_does_not_read_its_input(masq, tmp_path):
    configure(masq, mailbox="mda", mda=script(tmp_path / "mda", "exit 0\n"))
    big = MESSAGE + b"y" * 1000000 + b"\n"
    assert lines(local(masq, "a@b.example", "bob@localhost", message=big))[0].startswith("K ")


# -- aliases


def test_alias_list_with_continuation_and_comments(masq):
    aliases(masq, "# the team\nteam: bob,\n  carol ,\n\n# a comment inside\n\tDave\n"
                  "Bob: \\bob\n")
    out = lines(local(masq, "a@b.example", "TEAM@localhost"))
    assert out[0].startswith("K delivered to maildir ")
    for user in ("bob", "carol", "dave"):
        assert maildir_messages(masq, user) == [head("a@b.example", "TEAM@localhost") + MESSAGE]


def test_pipe_alias_gets_message_and_environment(masq, tmp_path):
    aliases(masq, f'logger: "|cat > {tmp_path}/piped; '
                  f'echo $SENDER,$RECIPIENT,$LOCAL,$USER,$HOME > {tmp_path}/env"\n'
                  f"fail: |echo no thanks >&2; exit 2\nlater: |exit 75\n")
    out = lines(local(masq, "a@b.example", "Logger@localhost", "fail@localhost", "later@localhost"))
    assert out[0] == "K delivered to program cat"
    assert out[1] == "D no thanks"
    assert out[2].startswith("Z ")
    assert (tmp_path / "piped").read_bytes() == head("a@b.example", "Logger@localhost") + MESSAGE
    sender, rcpt, localpart, user, home = (tmp_path / "env").read_text().strip().split(",")
    assert (sender, rcpt, localpart) == ("a@b.example", "Logger@localhost", "Logger")
    assert user and home


def test_file_alias_appends_to_mbox_and_dev_null_discards(masq, tmp_path):
    aliases(masq, f"archive: {tmp_path}/archive.mbox, {tmp_path}/archive.d/\n"
                  "nobody: /dev/null\n")
    out = lines(local(masq, "a@b.example", "archive@localhost", "nobody@localhost"))
    assert out[0].startswith("K delivered to mbox ") and "maildir" in out[0]
    assert out[1] == "K discarded (/dev/null)"
    assert mbox_messages(tmp_path / "archive.mbox") == [
        head("a@b.example", "archive@localhost") + MESSAGE]
    assert len(mailbox.Maildir(str(tmp_path / "archive.d"), create=False)) == 1


def test_include_alias(masq, tmp_path):
    (tmp_path / "members").write_text("# members\nbob, carol\n\ndave\n")
    (tmp_path / "empty").write_text("# nobody yet\n")
    aliases(masq, f"list: :include:{tmp_path}/members\nempty: :include:{tmp_path}/empty\n"
                  f"gone: :include:{tmp_path}/missing\n")
    out = lines(local(masq, "a@b.example", "list@localhost", "empty@localhost", "gone@localhost"))
    assert out[0].startswith("K ")
    assert out[1] == "D alias empty expands to nothing (5.1.1)"
    assert out[2].startswith("Z unable to read include file ")
    for user in ("bob", "carol", "dave"):
        assert len(maildir_messages(masq, user)) == 1


def test_alias_cycle_ends_in_the_first_mailbox(masq):
    aliases(masq, "a: b\nb: a\nroot: \\root, bob\nme: me, carol\n")
    out = lines(local(masq, "x@y.example", "a@localhost", "root@localhost", "me@localhost"))
    assert [line[0] for line in out] == ["K", "K", "K"]
    assert len(maildir_messages(masq, "a")) == 1
    assert not os.path.exists(os.path.join(masq.dir, "mail", "b"))
    assert len(maildir_messages(masq, "root")) == 1
    assert len(maildir_messages(masq, "me")) == 1
    assert len(maildir_messages(masq, "carol")) == 1
    assert len(maildir_messages(masq, "bob")) == 1


def test_two_recipients_of_one_mailbox_get_one_copy(masq):
    aliases(masq, "alias1: bob\nalias2: bob, carol\n")
    out = lines(local(masq, "x@y.example", "alias1@localhost", "bob@test.example",
                      "alias2@localhost"))
    assert [line[0] for line in out] == ["K", "K", "K"]
    assert maildir_messages(masq, "bob") == [head("x@y.example", "alias1@localhost") + MESSAGE]
    assert len(maildir_messages(masq, "carol")) == 1


def test_remote_alias_target_is_forwarded_through_the_queue(masq):
    aliases(masq, "friend: far@Remote.Example, bob, other@test.example, "
                  "second@elsewhere.example\n")
    message = MESSAGE.replace(b"\0", b"")   # the queue refuses NUL bytes (issue 9)
    out = lines(local(masq, "", "friend@localhost", message=message))
    assert out[0].startswith("K forwarded to far@remote.example, second@elsewhere.example as ")
    assert "; delivered to maildir " in out[0]
    ids = masq.queue_ids()
    assert len(ids) == 1 and f" as {ids[0]}; " in out[0]
    shown = masq.run(["masq-queue", "show", ids[0]]).ok().out
    meta, data = shown.split(b"\n\n", 1)
    assert b"sender \n" in meta + b"\n" or b"sender\n" in meta + b"\n"
    assert b"rcpt far@remote.example" in meta and b"rcpt second@elsewhere.example" in meta
    assert b"proto local" in meta and b"for friend@localhost" in meta
    assert data.startswith(b"Received: by test.example")
    assert b"\nDelivered-To: friend@localhost\n" + message in data
    assert b"Return-Path" not in data
    assert len(maildir_messages(masq, "bob")) == 1
    assert len(maildir_messages(masq, "other")) == 1


def test_forwarding_loop_is_stopped_by_delivered_to(masq):
    looped = b"Delivered-To: Friend@LOCALHOST\n" + MESSAGE
    out = lines(local(masq, "a@b.example", "friend@localhost", "bob@localhost", message=looped))
    assert out[0] == "D mail loop: already delivered to friend@localhost (5.4.6)"
    assert out[1].startswith("K ")
    assert not os.path.exists(os.path.join(masq.dir, "mail", "friend"))
    body_only = MESSAGE + b"Delivered-To: bob@localhost\n"
    assert lines(local(masq, "a@b.example", "bob@localhost", message=body_only))[0][0] == "K"


def test_forward_through_masq_queue_hook(masq, tmp_path):
    aliases(masq, "friend: far@remote.example\n")
    hook = script(tmp_path / "hook", f"cat > {tmp_path}/msg; cat <&1 > {tmp_path}/env; "
                  f'echo "$MASQ_PROTO $MASQ_FOR" > {tmp_path}/trace; exit $CODE\n')
    out = lines(local(masq, "s@b.example", "friend@localhost",
                      env=masq.env(MASQ_QUEUE=hook, CODE=0)))
    assert out == ["K forwarded to far@remote.example"]
    assert (tmp_path / "env").read_bytes() == b"Fs@b.example\0Tfar@remote.example\0\0"
    assert (tmp_path / "msg").read_bytes() == b"Delivered-To: friend@localhost\n" + MESSAGE
    assert (tmp_path / "trace").read_text() == "local friend@localhost\n"
    out = lines(local(masq, "s@b.example", "friend@localhost",
                      env=masq.env(MASQ_QUEUE=hook, CODE=111)))
    assert out[0].startswith("Z unable to forward to far@remote.example")
    out = lines(local(masq, "s@b.example", "friend@localhost",
                      env=masq.env(MASQ_QUEUE=hook, CODE=100)))
    assert out[0].startswith("D unable to forward")
    assert masq.queue_ids() == []


# -- users


def test_system_users_only(masq):
    configure(masq, mailbox="maildir", path="mail/{user}/", users="system")
    aliases(masq, "postmaster: root\nghosts: nosuchuser-xyz\n")
    out = lines(local(masq, "a@b.example", "nosuchuser-xyz@localhost", "postmaster@localhost",
                      "ghosts@localhost", "root+tag@localhost"))
    assert out[0] == "D no such user: nosuchuser-xyz (5.1.1)"
    assert out[1].startswith("K ")
    assert out[2] == "D no such user: nosuchuser-xyz (5.1.1) (alias ghosts)"
    assert out[3].startswith("K ")
    assert len(maildir_messages(masq, "root")) == 1     # one copy for both
    assert not os.path.exists(os.path.join(masq.dir, "mail", "nosuchuser-xyz"))


def test_any_user_and_detail(masq):
    out = lines(local(masq, "a@b.example", "Any.Body@localhost", "bob+lists@localhost"))
    assert [line[0] for line in out] == ["K", "K"]
    assert len(maildir_messages(masq, "any.body")) == 1
    assert len(maildir_messages(masq, "bob")) == 1


@pytest.mark.parametrize("rcpt", [".hidden@localhost", "a/b@localhost", '"a\x01b"@localhost',
                                  '"../x"@localhost'])
def test_unsafe_mailbox_names_are_refused(masq, rcpt):
    out = lines(local(masq, "a@b.example", rcpt))
    assert out[0].startswith("D unusable mailbox name ")
    assert os.listdir(os.path.join(masq.dir, "mail")) == []


# -- the program


def test_help_usage_and_configuration_errors(masq):
    r = masq.run(["masq-local", "--help"]).ok()
    assert b"masq-local [-C FILE] [--id QID] [--] SENDER RECIPIENT..." in r.out
    for argv in (["masq-local"], ["masq-local", "only-sender"],
                 ["masq-local", "--bogus", "a", "b"]):
        r = masq.run(argv, input=MESSAGE)
        assert r.rc == 100 and r.out == b"", r
    r = masq.run(["masq-local", "-C", "/nonexistent/masq.toml", "a@b", "bob@localhost"],
                 input=MESSAGE)
    assert r.rc == 111 and r.out == b"" and r.err.startswith(b"masq-local: fatal: "), r
    r = masq.run(["masq-local", "-C", masq.conf, "--id", "q1", "--", "-odd@b.example",
                  "bob@localhost"], input=MESSAGE)
    assert lines(r)[0].startswith("K ")


def test_in_process_deliver(masq, monkeypatch):
    from masq import config
    from masq import local as masq_local
    conf = config.load(masq.conf)
    calls = []

    def factory():
        calls.append(1)
        return io.BytesIO(MESSAGE)

    got = masq_local.deliver(conf, "a@b.example", ["bob@localhost", "carol@localhost"], factory)
    assert [letter for letter, _ in got] == ["K", "K"]
    assert len(calls) == 3      # the header check, then one copy per mailbox
    assert maildir_messages(masq, "carol") == [head("a@b.example", "carol@localhost") + MESSAGE]


def test_folder_sync_holds_at_most_max_owed_folders_and_reports_an_early_failure(
        tmp_path, monkeypatch):
    from masq import mailbox
    sync = mailbox.FolderSync()
    real_fsync, bad = os.fsync, set()

    def fsync(fd):
        if os.fstat(fd).st_ino in bad:
            raise OSError(5, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    folders = []
    for i in range(mailbox.FolderSync.MAX_OWED + 6):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        folders.append(folder)
    bad.add(os.stat(folders[3]).st_ino)        # fsynced early, when the cap is reached
    for i, folder in enumerate(folders):
        sync.label = f"q{i}"
        sync.owe(os.open(folder, os.O_RDONLY | os.O_DIRECTORY), str(folder))
        assert len(sync.owed) < mailbox.FolderSync.MAX_OWED
    assert sync.pending()
    failed = sync.sync()
    assert list(failed) == ["q3"] and "Input/output error" in failed["q3"], failed
    assert not sync.pending() and sync.sync() == {}
