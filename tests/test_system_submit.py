"""System mode: sendmail, mailq and runq for every user (issue 8), black box.

Each test runs in a throwaway root (tests/sysroot.py) made the machine's MTA
by the real `masq-setup system local-only`, with real users alice and bob:
alice submits through the drop folder, mailq and runq through the daemon's
control socket; root's runq and a daemon started as masq pick drop files up.
"""
import os
import time

from conftest import BIN

pytest_plugins = ["sysroot"]        # the sysroot fixture

SPOOL = "/var/spool/masq"
DROP = f"{SPOOL}/drop"
MESSAGE = "printf 'Subject: hi\\n\\nthe body text\\n' | /usr/sbin/sendmail bob"
START_SECONDS = 30


def system(sysroot, *users):
    """masq as the MTA of the throwaway root, with these users made first."""
    for user in users:
        sysroot.adduser(user)
    sysroot.run("rm -f /usr/sbin/sendmail /usr/lib/sendmail /usr/bin/mailq "
                "/usr/bin/newaliases /usr/bin/runq").ok()
    sysroot.run(["masq-setup", "system", "local-only", "--hostname", "test.example",
                 "--admin", "alice"]).ok()


def drop_names(sysroot):
    return sorted(os.listdir(sysroot.path(DROP)))


def daemon(sysroot, tmp_path):
    """masq-send as the masq user; returns once it answers on spool/control.

    Started with setpriv, so the test does not depend on masq-send's own
    privilege drop.  Ready means the control socket exists: the daemon made
    it before its first queue run, and serves it only after that run.
    """
    err = open(tmp_path / "daemon.err", "wb")
    sysroot.popen(["setpriv", "--reuid=masq", "--regid=masq", "--clear-groups",
                   os.path.join(BIN, "masq-send"), "-C", "/etc/masq/masq.toml"],
                  stdout=err, stderr=err)
    deadline = time.monotonic() + START_SECONDS
    while not os.path.exists(sysroot.path(f"{SPOOL}/control")):
        assert time.monotonic() < deadline, (tmp_path / "daemon.err").read_text()
        time.sleep(0.05)


def log(sysroot):
    with open(sysroot.path("/var/log/masq/masq.log")) as f:
        return f.read()


def test_a_user_submits_while_no_daemon_runs_and_roots_runq_delivers(sysroot):
    system(sysroot, "alice", "bob")
    sysroot.run(MESSAGE, user="alice").ok()
    [name] = drop_names(sysroot)
    assert len(name) == 32
    st = os.stat(sysroot.path(f"{DROP}/{name}"))
    assert oct(st.st_mode & 0o777) == "0o640"
    r = sysroot.run(["ls", DROP], user="alice")
    assert r.rc != 0 and b"Permission denied" in r.err, r
    r = sysroot.run(["cat", f"{DROP}/{name}"], user="bob")
    assert r.rc != 0 and b"Permission denied" in r.err, r
    r = sysroot.run(["rm", "-f", f"{DROP}/{name}"], user="bob")
    assert r.rc != 0 and drop_names(sysroot) == [name], r
    r = sysroot.run("mailq", user="alice")
    assert (r.rc, r.out) == (69, b""), r
    assert r.err == b"mailq: fatal: the mail queue cannot be listed: masq-send is not running\n"
    r = sysroot.run("runq", user="alice")
    assert r.rc == 75 and r.err == b"runq: fatal: masq-send is not running: " \
                                   b"mail waits until it runs\n", r
    sysroot.run("runq").ok()
    assert drop_names(sysroot) == []
    with open(sysroot.path("/var/mail/bob")) as f:
        mbox = f.read()
    assert "Received: by test.example (masq, from user alice)" in mbox
    assert "\nFrom: alice@test.example\n" in mbox and "the body text" in mbox


def test_a_symlink_planted_in_drop_is_refused(sysroot):
    system(sysroot, "alice", "bob")
    name = "0123456789abcdef" * 2
    sysroot.run(["ln", "-s", "/etc/shadow", f"{DROP}/{name}"], user="alice").ok()
    sysroot.run("runq").ok()
    assert drop_names(sysroot) == []
    assert os.path.islink(sysroot.path(f"{SPOOL}/corrupt/drop-{name}"))
    assert f"drop/{name}: a symbolic link: moved to corrupt/drop-{name}" in log(sysroot)
    assert sysroot.run("mailq").ok().out == b"Mail queue is empty\n"


def test_with_the_daemon_every_user_lists_the_queue_and_asks_for_a_run(sysroot, tmp_path):
    system(sysroot, "alice", "bob")
    sysroot.run(MESSAGE, user="alice").ok()     # waits in drop/ for the daemon
    daemon(sysroot, tmp_path)
    uid = sysroot.run(["id", "-u", "alice"]).ok().out.decode().strip()
    r = sysroot.run("mailq", user="alice").ok()
    # masq cannot write /var/mail without masq-lspawn: the message waits, deferred
    assert b"alice@test.example" in r.out and b"bob@test.example" in r.out, r
    assert b"the body text" not in r.out and b"Subject" not in r.out, r
    sysroot.run("mailq", user="bob").ok()
    assert drop_names(sysroot) == []
    sysroot.run("runq", user="alice").ok()
    assert f"control: uid {uid}: 'flush': ok" in log(sysroot)
    r = sysroot.run("runq -qo isp", user="alice")
    assert r.rc == 77 and b"only root and masq" in r.err, r
    r = sysroot.run("sendmail -bp", user="bob").ok()
    assert b"bob@test.example" in r.out


def test_show_queue_admin_keeps_the_queue_from_users(sysroot, tmp_path):
    system(sysroot, "alice")
    sysroot.run("sed -i 's/^\\[online\\]/[queue]\\nshow_queue = \"admin\"\\n\\n[online]/' "
                "/etc/masq/masq.toml").ok()
    daemon(sysroot, tmp_path)
    r = sysroot.run("mailq", user="alice")
    assert (r.rc, r.out) == (77, b""), r
    assert r.err == b"mailq: fatal: the mail queue is shown only to root and masq\n"
    sysroot.run("runq", user="alice").ok()      # a run may still be asked for
    sysroot.run(["setpriv", "--reuid=masq", "--regid=masq", "--clear-groups",
                 "/usr/bin/mailq"]).ok()
