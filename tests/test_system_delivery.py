"""System mode's local delivery: every delivery as its recipient, none as root (issue 8).

Each test runs in a throwaway root (tests/sysroot.py) made by `masq-setup
system`: real users, /var/mail as Debian has it, masq-send started as root
(it starts masq-lspawn, then becomes masq).  Mail is queued by the masq user
itself (masq-inject writes the spool directly then), so these tests need
nothing of the drop folder.
"""
import os
import stat
import time

import pytest

from masq import install

pytest_plugins = ["sysroot"]        # the sysroot fixture

MESSAGE = b"From: someone@example.org\nSubject: hello\n\nbody line\n"


def system(sysroot, mailbox="mbox", aliases=""):
    """masq-setup system local-only, users bob, alice and mallory, and these aliases."""
    sysroot.run(["rm", "-f", *[path for path, _ in install.LINKS]]).ok()
    for name in ("alice", "bob", "mallory"):
        sysroot.adduser(name)
    sysroot.run(["sh", "-c", 'printf "%s" "$1" > /etc/aliases', "sh",
                 f"postmaster: alice\nroot: alice\n{aliases}"]).ok()
    sysroot.run(["masq-setup", "system", "local-only", "--hostname", "test.example",
                 "--mailbox", mailbox]).ok()


def send(sysroot, *recipients, message=MESSAGE):
    """Queue a message (as masq: straight into the spool), then runq as root."""
    sysroot.run(["masq-inject", "-f", "someone@example.org", "--", *recipients],
                user="masq", input=message).ok()
    return sysroot.run(["masq-send", "--once"]).ok()


def log(sysroot):
    with open(sysroot.path("/var/log/masq/masq.log")) as f:
        return f.read()


def owner(sysroot, path):
    r = sysroot.run(["stat", "-c", "%U:%G %a", path]).ok()
    return r.out.decode().strip()


def mbox_count(sysroot, user):
    """Messages in /var/mail/USER, read by USER with Python's mailbox module."""
    r = sysroot.run(["python3", "-c", "import mailbox, sys; "
                     f"print(len(mailbox.mbox('/var/mail/{user}', create=False)))"],
                    user=user).ok()
    return int(r.out)


def test_mail_to_bob_lands_in_var_mail_bob_owned_by_bob(sysroot):
    system(sysroot)
    send(sysroot, "bob@localhost")
    assert owner(sysroot, "/var/mail/bob") == "bob:mail 660"
    assert mbox_count(sysroot, "bob") == 1
    r = sysroot.run(["cat", "/var/mail/bob"], user="alice")
    assert r.rc != 0 and b"Permission denied" in r.err, r
    assert "status=sent" in log(sysroot) or "delivered to mbox /var/mail/bob" in log(sysroot)


def test_a_forward_command_runs_as_bob(sysroot):
    system(sysroot)
    sysroot.run("printf '%s\\n' '\"|id -u > $HOME/ran\"' > ~/.forward", user="bob").ok()
    send(sysroot, "bob@localhost")
    bob = sysroot.run(["id", "-u", "bob"]).ok().out.decode().strip()
    with open(sysroot.path("/home/bob/ran")) as f:
        assert f.read().strip() == bob
    assert not os.path.exists(sysroot.path("/var/mail/bob"))     # .forward replaces it


def test_a_forward_writable_by_others_is_ignored_with_a_log_line(sysroot):
    system(sysroot)
    sysroot.run("printf '%s\\n' '\"|id -u > $HOME/ran\"' > ~/.forward; chmod 666 ~/.forward",
                user="bob").ok()
    r = send(sysroot, "bob@localhost")
    assert b"/home/bob/.forward ignored: it is writable by group or others" in r.err, r
    assert not os.path.exists(sysroot.path("/home/bob/ran"))
    assert mbox_count(sysroot, "bob") == 1


def test_an_include_files_command_runs_as_its_owner(sysroot):
    system(sysroot, aliases="list: :include:/home/mallory/list.txt\n")
    sysroot.run("echo '\"|id -u > /home/mallory/ran\", bob' > /home/mallory/list.txt",
                user="mallory").ok()
    send(sysroot, "list@localhost")
    mallory = sysroot.run(["id", "-u", "mallory"]).ok().out.decode().strip()
    with open(sysroot.path("/home/mallory/ran")) as f:
        assert f.read().strip() == mallory
    assert mbox_count(sysroot, "bob") == 1


@pytest.mark.parametrize("unsafe", ["chmod 664 list.txt", "chmod 777 .", "chmod 775 ."])
def test_an_include_file_others_can_change_is_refused(sysroot, unsafe):
    system(sysroot, aliases="list: :include:/home/mallory/list.txt\n")
    sysroot.run("cd; echo '\"|id -u > /var/tmp/ran\"' > list.txt; " + unsafe,
                user="mallory").ok()
    send(sysroot, "list@localhost")
    assert not os.path.exists(sysroot.path("/var/tmp/ran"))
    assert "refused, as whoever can change it could choose what runs" in log(sysroot)
    assert "status=deferred" in log(sysroot)


def test_an_aliases_own_command_runs_as_nobody(sysroot):
    system(sysroot, aliases='cmd: "|id -u > /var/tmp/ran"\n')
    send(sysroot, "cmd@localhost")
    with open(sysroot.path("/var/tmp/ran")) as f:
        assert f.read().strip() == "65534"
    assert owner(sysroot, "/var/tmp/ran").startswith("nobody:")


def test_maildir_new_swapped_for_a_link_to_a_root_folder_fails_safely(sysroot):
    system(sysroot, mailbox="maildir")
    sysroot.run("mkdir -p /root/secret && chmod 700 /root/secret").ok()
    sysroot.run("mkdir -p ~/Maildir/tmp ~/Maildir/cur && ln -s /root/secret ~/Maildir/new",
                user="bob").ok()
    send(sysroot, "bob@localhost")          # the run finishes
    assert os.listdir(sysroot.path("/root/secret")) == []
    assert "symbolic link" in log(sysroot) and "status=deferred" in log(sysroot)
    sysroot.run("rm ~/Maildir/new", user="bob").ok()
    sysroot.run(["masq-send", "--once"]).ok()
    assert len(os.listdir(sysroot.path("/home/bob/Maildir/new"))) == 1
    assert owner(sysroot, "/home/bob/Maildir/new") == "bob:bob 700"


def test_mail_for_root_without_an_alias_is_never_delivered_as_root(sysroot):
    system(sysroot)
    sysroot.run("sed -i /^root:/d /etc/aliases").ok()
    send(sysroot, "root@localhost")
    assert not os.path.exists(sysroot.path("/var/mail/root"))
    assert "masq delivers nothing as root" in log(sysroot)


def status_ids(pid):
    """{"Uid": [...], "Gid": [...]} of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        return {k: v.split() for k, _, v in (line.partition(":") for line in f)
                if k in ("Uid", "Gid", "PPid", "Groups")}


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_the_daemon_runs_as_masq_its_spawner_as_root_and_sigterm_stops_both(sysroot):
    system(sysroot)
    daemon = sysroot.popen(["masq-send"])
    masq = sysroot.run(["id", "-u", "masq"]).ok().out.decode().strip()
    deadline = time.monotonic() + 10
    # nsenter execs masq-send: the Popen's pid is masq-send's
    while (status_ids(daemon.pid)["Uid"] != [masq] * 4 or not children(daemon.pid)) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    ids = status_ids(daemon.pid)
    assert ids["Uid"] == [masq] * 4 and ids["Groups"] == [], ids
    [spawner] = children(daemon.pid)
    assert status_ids(spawner)["Uid"] == ["0"] * 4
    sysroot.run(["masq-inject", "-f", "someone@example.org", "bob@localhost"], user="masq",
                input=MESSAGE).ok()
    while not os.path.exists(sysroot.path("/var/mail/bob")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mbox_count(sysroot, "bob") == 1
    os.kill(daemon.pid, 15)
    assert daemon.wait(10) == 0
    while os.path.exists(f"/proc/{spawner}") and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(f"/proc/{spawner}/status") if os.path.exists(f"/proc/{spawner}") else \
            open(os.devnull) as f:
        assert "State:\tZ" in f.read() or not os.path.exists(f"/proc/{spawner}")


def test_started_as_masq_local_mail_waits(sysroot):
    system(sysroot)
    sysroot.run(["masq-inject", "-f", "someone@example.org", "bob@localhost"], user="masq",
                input=MESSAGE).ok()
    sysroot.run(["masq-send", "--once"], user="masq").ok()
    assert not os.path.exists(sysroot.path("/var/mail/bob"))
    assert "masq-send must start as root in system mode" in log(sysroot)


def test_bob_reads_his_mail_and_the_spool_folder_stays_root_mail(sysroot):
    system(sysroot)
    send(sysroot, "bob@localhost", "alice@localhost")
    assert owner(sysroot, "/var/mail") == "root:mail 2775"
    assert owner(sysroot, "/var/mail/alice") == "alice:mail 660"
    assert stat.S_ISREG(os.lstat(sysroot.path("/var/mail/bob")).st_mode)
    assert not os.path.exists(sysroot.path("/var/mail/bob.lock"))


def test_a_user_who_stops_his_delivery_holds_the_queue_one_timeout_not_one_a_message(sysroot):
    """From the review: `|kill -STOP $PPID` in ~/.forward froze every local delivery,
    mailq and runq for a day per message.  masq-lspawn kills the stopped delivery at
    local.mda_timeout + 30 s, and masq-send leaves the user's other mail for later."""
    system(sysroot)
    sysroot.run(["sed", "-i", "s/^\\[local\\]$/[local]\\nmda_timeout = 1/",
                 "/etc/masq/masq.toml"]).ok()
    sysroot.run("printf '%s\\n' '\"|kill -STOP $PPID\"' > ~/.forward", user="alice").ok()
    for _ in range(3):
        sysroot.run(["masq-inject", "-f", "someone@example.org", "--", "alice@localhost"],
                    user="masq", input=MESSAGE).ok()
    start = time.monotonic()
    send(sysroot, "bob@localhost")
    assert time.monotonic() - start < 60         # one timeout (31 s), not three
    assert mbox_count(sysroot, "bob") == 1
    assert "ran past local.mda_timeout lately" in log(sysroot)
