"""System mode end to end, as issue 8 words it: the machine's MTA for real users.

Each test runs in a throwaway root (tests/sysroot.py) made the machine's MTA
by the real `masq-setup system local-only`, with real users alice and bob.
Mail goes in through the links that setup made (/usr/sbin/sendmail, and
bsd-mailx's `mail`, which runs it), through SMTP to masq-smtpd under
masq-tcpserver -u or ucspi-tcp's tcpserver -u, and out into /var/mail as
its recipient; the daemon is masq-send started by root (it starts
masq-lspawn and becomes masq), or no daemon and root's runq.
"""
import mailbox
import os
import re
import shutil
import smtplib
import stat
import subprocess
import time

import pytest
from conftest import BIN

from masq import install

pytest_plugins = ["sysroot"]        # the sysroot fixture

SPOOL = "/var/spool/masq"
MAILX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     ".deps", "bsd-mailx", "usr", "bin", "bsd-mailx")
SENDMAIL = "printf 'Subject: hi\\n\\nthe body text\\n' | /usr/sbin/sendmail bob"
WAIT_SECONDS = 30
QUICK_SECONDS = 8           # a run that defers an odd lock at once, Python's starts included
LOCK_WAIT_SECONDS = 20      # masq-local(8): a live lock is waited for this long


def system(sysroot, *users):
    """masq as the MTA of the throwaway root, users alice and bob (and these) made first."""
    for user in ("alice", "bob", *users):
        sysroot.adduser(user)
    sysroot.run(["rm", "-f", *[path for path, _ in install.LINKS]]).ok()
    sysroot.run(["masq-setup", "system", "local-only", "--hostname", "test.example",
                 "--admin", "alice"]).ok()


def uid(sysroot, user):
    return int(sysroot.run(["id", "-u", user]).ok().out)


def start_daemon(sysroot, tmp_path):
    """masq-send started by root, as the unit does; ready once it answers on spool/control."""
    err = open(tmp_path / "daemon.err", "ab")
    p = sysroot.popen(["masq-send"], stdout=err, stderr=err)
    deadline = time.monotonic() + WAIT_SECONDS
    while sysroot.run("mailq", user="bob").rc != 0:
        assert time.monotonic() < deadline, (tmp_path / "daemon.err").read_text()
        assert p.poll() is None, (tmp_path / "daemon.err").read_text()
        time.sleep(0.1)
    return p


def wait_for(check, what):
    deadline = time.monotonic() + WAIT_SECONDS
    while not check():
        assert time.monotonic() < deadline, f"waited {WAIT_SECONDS} s for {what}"
        time.sleep(0.1)


def log(sysroot):
    with open(sysroot.path("/var/log/masq/masq.log")) as f:
        return f.read()


def read_mbox_as(sysroot, user):
    """The messages of /var/mail/USER as USER reads them (Python's mailbox module)."""
    script = ("import mailbox, sys\n"
              f"for m in mailbox.mbox('/var/mail/{user}', create=False):\n"
              "    sys.stdout.buffer.write(m.as_bytes() + b'\\0')\n")
    r = sysroot.run(["python3", "-c", script], user=user).ok()
    return [mailbox.mboxMessage(m) for m in r.out.split(b"\0")[:-1]]


def delivered(sysroot, user):
    return os.path.exists(sysroot.path(f"/var/mail/{user}")) and \
        os.path.getsize(sysroot.path(f"/var/mail/{user}")) > 0


def queued(sysroot):
    """Names of the message files in the queue's folders (root's view)."""
    found = []
    for folder in ("incoming", "active", "hold"):
        for dirpath, _, files in os.walk(sysroot.path(f"{SPOOL}/{folder}")):
            found += [os.path.join(dirpath, f) for f in files]
    return found


def assert_bobs_mail_from_alice(sysroot, subject="hi"):
    """/var/mail/bob: bob's, one message from alice that bob reads and alice cannot."""
    r = sysroot.run(["stat", "-c", "%U:%G %a", "/var/mail/bob"]).ok()
    assert r.out.decode().split() == ["bob:mail", "660"], r
    [msg] = read_mbox_as(sysroot, "bob")
    assert msg["Subject"] == subject
    assert "alice@test.example" in msg["From"], msg["From"]
    assert "from user alice" in msg["Received"], msg["Received"]
    r = sysroot.run(["cat", "/var/mail/bob"], user="alice")
    assert r.rc != 0 and b"Permission denied" in r.err, r


def submit(sysroot, way):
    """alice sends bob a message: through sendmail (su alice -c ...) or bsd-mailx."""
    if way == "sendmail":
        sysroot.run(["su", "alice", "-c", SENDMAIL]).ok()
    else:
        mailx = MAILX if os.path.exists(MAILX) else "/usr/bin/mail"
        if not os.path.exists(sysroot.path(mailx)):
            pytest.skip(f"no bsd-mailx: make test unpacks it into {MAILX} (its package "
                        "Depends on an MTA, so it is not installed); it could not")
        sysroot.run(["su", "alice", "-c", f"echo 'the body text' | {mailx} -s hi bob"]).ok()


@pytest.mark.parametrize("way", ["sendmail", "mail"])
def test_alice_to_bob_while_the_daemon_runs(sysroot, tmp_path, way):
    system(sysroot)
    start_daemon(sysroot, tmp_path)
    submit(sysroot, way)
    wait_for(lambda: delivered(sysroot, "bob"), "/var/mail/bob")
    wait_for(lambda: not queued(sysroot), "an empty queue")
    assert_bobs_mail_from_alice(sysroot)


@pytest.mark.parametrize("way", ["sendmail", "mail"])
def test_alice_to_bob_while_the_daemon_is_down_then_roots_runq(sysroot, way):
    system(sysroot)
    submit(sysroot, way)
    assert not os.path.exists(sysroot.path("/var/mail/bob"))
    sysroot.run("runq").ok()
    assert_bobs_mail_from_alice(sysroot)
    assert queued(sysroot) == [] and os.listdir(sysroot.path(f"{SPOOL}/drop")) == []


def test_alices_mailq_shows_a_waiting_message_but_not_its_body_and_her_runq_sends_it(
        sysroot, tmp_path):
    system(sysroot)
    # a FIFO where bob's dot-lock goes: every delivery to bob defers at once
    sysroot.run("mkfifo /var/mail/bob.lock").ok()
    start_daemon(sysroot, tmp_path)
    sysroot.run(["su", "alice", "-c", SENDMAIL]).ok()
    wait_for(lambda: b"deferred" in sysroot.run("mailq", user="alice").out, "a deferral")
    r = sysroot.run("mailq", user="alice").ok()
    text = r.out.decode()
    assert "alice@test.example" in text and "bob@test.example (deferred" in text, text
    assert "/var/mail/bob.lock is a FIFO, not a lock" in text, text
    assert "the body text" not in text and "Subject" not in text, text
    # the queued file is masq's alone: alice can neither read nor find it
    [path] = queued(sysroot)
    st = os.stat(path)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid(sysroot, "masq"), 0o600)
    inside = path[len(sysroot.path("")):]
    for argv in (["cat", inside], ["ls", os.path.dirname(inside)]):
        r = sysroot.run(argv, user="alice")
        assert r.rc != 0 and b"Permission denied" in r.err, r
    r = sysroot.run(["cat", "/var/mail/bob"], user="alice")
    assert r.rc != 0, r
    sysroot.run(["rm", "/var/mail/bob.lock"]).ok()
    sysroot.run("runq", user="alice").ok()
    assert f"control: uid {uid(sysroot, 'alice')}: 'flush': ok" in log(sysroot)
    wait_for(lambda: delivered(sysroot, "bob"), "/var/mail/bob after alice's runq")
    wait_for(lambda: not queued(sysroot), "an empty queue")
    assert_bobs_mail_from_alice(sysroot)


def test_alice_cannot_submit_as_bob(sysroot):
    """A forged envelope sender and From: are hers to write; the trace names her all the same."""
    system(sysroot)
    forged = "printf 'From: bob@test.example\\nSubject: forged\\n\\nbody\\n' | " \
             "/usr/sbin/sendmail -f bob@test.example bob"
    sysroot.run(["su", "alice", "-c", forged]).ok()
    sysroot.run("runq").ok()
    [msg] = read_mbox_as(sysroot, "bob")
    assert msg["From"] == "bob@test.example"           # what she wrote
    assert msg["Received"].startswith("by test.example (masq, from user alice)"), \
        msg["Received"]
    [line] = [li for li in log(sysroot).splitlines() if "from=<bob@test.example>" in li]
    assert "client=alice" in line and "proto=local" in line, line


def test_sendmail_bs_by_a_user_says_to_use_smtp_to_localhost(sysroot):
    system(sysroot)
    r = sysroot.run(["/usr/sbin/sendmail", "-bs"], user="alice", input=b"QUIT\r\n")
    assert r.rc == 77 and r.out == b"", r
    assert r.err == b"sendmail: fatal: -bs runs as the masq user in system mode: other " \
                    b"users submit with sendmail, or SMTP to localhost port 25\n", r


def test_sendmail_bs_by_root_serves_as_masq(sysroot, tmp_path):
    system(sysroot)
    start_daemon(sysroot, tmp_path)     # see the listener test: no run of masq-smtpd's own
    dialogue = b"HELO me\r\nMAIL FROM:<root@test.example>\r\nRCPT TO:<bob@test.example>\r\n" \
               b"DATA\r\nSubject: bs\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    r = sysroot.run(["/usr/sbin/sendmail", "-bs"], input=dialogue).ok()
    assert re.search(rb"\r\n250 2\.0\.0 Ok: queued as \S+\r\n221 ", r.out), r
    wait_for(lambda: delivered(sysroot, "bob"), "/var/mail/bob")
    [msg] = read_mbox_as(sysroot, "bob")
    assert msg["Subject"] == "bs"
    assert "client=masq" in log(sysroot)       # root's session ran as masq


# ~/.forward, the mbox locks and the crash trials as the daemon meets them


def test_bobs_forward_to_an_address_resubmits_as_bob_with_the_original_sender(sysroot):
    system(sysroot, "carol")
    sysroot.run("echo carol > ~/.forward", user="bob").ok()
    sysroot.run(["su", "alice", "-c", SENDMAIL]).ok()
    sysroot.run("runq").ok()        # picks alice's drop file up, delivers to bob's .forward
    sysroot.run("runq").ok()        # the resubmitted copy (bob's drop file)
    assert not os.path.exists(sysroot.path("/var/mail/bob"))
    [msg] = read_mbox_as(sysroot, "carol")
    assert msg["Subject"] == "hi" and "alice@test.example" in msg["From"]
    assert msg["Return-Path"] == "<alice@test.example>", msg["Return-Path"]
    assert "bob@test.example" in msg.get_all("Delivered-To"), msg.get_all("Delivered-To")
    received = msg.get_all("Received")
    assert any("from user bob" in r for r in received), received
    assert any("from user alice" in r for r in received), received
    assert queued(sysroot) == []


def make_fifo(sysroot, lock):
    sysroot.run(["mkfifo", lock]).ok()


def make_dangling(sysroot, lock):
    sysroot.run(["ln", "-s", "/nonexistent/x", lock]).ok()


ODD_LOCKS = {"dangling symlink": ("a symbolic link", make_dangling),
             "fifo": ("a FIFO", make_fifo)}


@pytest.mark.parametrize("case", ODD_LOCKS)
def test_an_odd_mbox_lock_defers_at_once_and_mailq_says_why(sysroot, case):
    system(sysroot)
    kind, make = ODD_LOCKS[case]
    make(sysroot, "/var/mail/bob.lock")
    sysroot.run(["su", "alice", "-c", SENDMAIL]).ok()
    start = time.monotonic()
    sysroot.run("runq", timeout=QUICK_SECONDS * 4).ok()
    assert time.monotonic() - start < QUICK_SECONDS
    text = sysroot.run("mailq").ok().out.decode()
    assert "bob@test.example (deferred" in text, text
    assert f"/var/mail/bob.lock is {kind}, not a lock" in text, text
    assert os.path.lexists(sysroot.path("/var/mail/bob.lock"))
    assert not delivered(sysroot, "bob")
    sysroot.run(["rm", "/var/mail/bob.lock"]).ok()
    sysroot.run("runq").ok()
    assert_bobs_mail_from_alice(sysroot)


def test_a_live_pid_mbox_lock_defers_after_one_bounded_wait(sysroot):
    # One message: each delivery is its own masq-local here, so the "wait
    # once per run" memory of masq.mailbox does not span messages (reported)
    system(sysroot)
    holder = sysroot.popen(["sleep", "300"])
    sysroot.run(f"echo {holder.pid} > /var/mail/bob.lock").ok()
    sysroot.run(["su", "alice", "-c", SENDMAIL]).ok()
    start = time.monotonic()
    sysroot.run("runq", timeout=LOCK_WAIT_SECONDS * 3).ok()
    elapsed = time.monotonic() - start
    assert LOCK_WAIT_SECONDS - 2 < elapsed < LOCK_WAIT_SECONDS + QUICK_SECONDS, elapsed
    text = sysroot.run("mailq").ok().out.decode()
    assert "/var/mail/bob is locked by another program" in text, text
    with open(sysroot.path("/var/mail/bob.lock")) as f:
        assert f.read() == f"{holder.pid}\n"        # someone else's lock: left alone
    sysroot.run(["rm", "/var/mail/bob.lock"]).ok()
    sysroot.run("runq").ok()
    assert_bobs_mail_from_alice(sysroot)


# SMTP: masq-smtpd served as masq by a listener root started


def status_uids(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return [int(n) for n in line.split()[1:]]
    return None


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


LISTENERS = {
    "masq-tcpserver": lambda ids: ["masq-tcpserver", "-u", "masq", "-g", "masq", "-1",
                                   "127.0.0.1", "0", os.path.join(BIN, "masq-smtpd")],
    "masq-tcpserver -U": lambda ids: ["env", f"UID={ids[0]}", f"GID={ids[1]}",
                                      os.path.join(BIN, "masq-tcpserver"), "-U", "-1",
                                      "127.0.0.1", "0", os.path.join(BIN, "masq-smtpd")],
    "tcpserver": lambda ids: ["tcpserver", "-u", str(ids[0]), "-g", str(ids[1]), "-1",
                              "127.0.0.1", "0", os.path.join(BIN, "masq-smtpd")],
}


@pytest.mark.parametrize("listener", LISTENERS)
def test_masq_smtpd_under_a_listener_root_started_serves_as_masq(sysroot, tmp_path, listener):
    if listener == "tcpserver" and shutil.which("tcpserver") is None:
        pytest.skip("ucspi-tcp's tcpserver is not installed (make deps)")
    system(sysroot)
    # the daemon delivers: with none, masq-smtpd starts a queue run of its own,
    # as masq, which defers local mail and races a runq of root's (reported)
    start_daemon(sysroot, tmp_path)
    masq = uid(sysroot, "masq"), int(sysroot.run(["id", "-g", "masq"]).ok().out)
    p = sysroot.popen(LISTENERS[listener](masq), stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    port = int(p.stdout.readline())
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT_SECONDS) as client:
        client.ehlo("client.example")
        sessions = children(p.pid)              # nsenter execs: p.pid is the listener's
        assert sessions                         # (masq-tcpserver: and a spare, waiting)
        for session in sessions:
            assert status_uids(session) == [masq[0]] * 4
        if listener.startswith("masq-tcpserver"):
            assert status_uids(p.pid) == [masq[0]] * 4      # it dropped before accepting
        client.sendmail("carol@example.org", ["bob@test.example"],
                        b"From: carol@example.org\r\nSubject: smtp\r\n\r\nbody\r\n")
    wait_for(lambda: delivered(sysroot, "bob"), "/var/mail/bob")
    r = sysroot.run(["stat", "-c", "%U:%G", "/var/mail/bob"]).ok()
    assert r.out == b"bob:mail\n", r
    [msg] = read_mbox_as(sysroot, "bob")
    assert msg["Subject"] == "smtp"
    assert re.search(r"from client\.example .*127\.0\.0\.1", msg["Received"]), msg["Received"]
    assert "proto=esmtp client=127.0.0.1" in log(sysroot)


def test_masq_tcpserver_refuses_an_unknown_user_before_binding(sysroot):
    system(sysroot)
    r = sysroot.run(["masq-tcpserver", "-u", "nosuchuser", "127.0.0.1", "0", "true"])
    assert r.rc == 64 and b"no user nosuchuser (-u)" in r.err, r
    r = sysroot.run(["masq-tcpserver", "-u", "masq", "-g", "nosuchgroup", "127.0.0.1", "0",
                     "true"])
    assert r.rc == 64 and b"no group nosuchgroup (-g)" in r.err, r
    r = sysroot.run(["masq-tcpserver", "-g", "masq", "127.0.0.1", "0", "true"])
    assert r.rc == 64 and b"-g needs -u" in r.err, r
    r = sysroot.run(["masq-tcpserver", "-U", "127.0.0.1", "0", "true"])
    assert r.rc == 64 and b"-U needs $UID and $GID" in r.err, r
    r = sysroot.run(["masq-tcpserver", "-u", "masq", "127.0.0.1", "0", "true"], user="alice")
    assert r.rc == 111 and b"unable to become masq" in r.err, r
