"""Crash safety: kill -9 at random points; accepted mail is never lost or torn."""
import mailbox
import os
import random
import signal
import subprocess
import time

from conftest import BIN

pytest_plugins = ["sysroot"]        # the sysroot fixture (the system-mode trial)

TRIALS = 40
COUNT = 300          # messages per delivery crash test: a run takes longer than a kill


def start_queue(masq, message_path, envelope):
    """masq-queue with the message from a file on fd 0 and the envelope on fd 1."""
    r, w = os.pipe()
    os.write(w, envelope)
    os.close(w)
    with open(message_path, "rb") as stdin:
        p = subprocess.Popen([os.path.join(BIN, "masq-queue")], stdin=stdin, stdout=r,
                             stderr=subprocess.DEVNULL, env=masq.env())
    os.close(r)
    return p


def test_masq_queue_killed_at_random_points_accepts_all_or_nothing(masq, tmp_path):
    rng = random.Random(1)
    accepted, killed = [], 0
    for n in range(TRIALS):
        body = b"".join(b"trial %d line %d\n" % (n, i) for i in range(20000))
        path = tmp_path / f"msg{n}"
        path.write_bytes(b"Subject: trial %d\n\n" % n + body)
        p = start_queue(masq, path, b"Fa@test.example\0Tbob@localhost\0\0")
        time.sleep(rng.uniform(0, 0.08))
        p.send_signal(signal.SIGKILL)
        rc = p.wait()
        if rc == 0:
            accepted.append(n)
        else:
            killed += 1
    assert killed > 0 and accepted, (killed, accepted)   # both sides were exercised
    check = masq.run(["masq-queue", "check", "--repair"]).ok()
    assert b"unreadable" not in check.out and b"torn" not in check.out, check
    masq.run(["masq-queue", "check"]).ok()
    masq.run(["masq-send", "--once"]).ok()
    delivered = {}
    for msg in masq.maildir("bob"):
        subject = msg["Subject"]
        n = int(subject.split()[1])
        assert msg.get_payload().count("\n") == 20000, "a torn message was delivered"
        delivered[n] = delivered.get(n, 0) + 1
    # every accepted message arrives once; a message killed after its commit
    # but before exit 0 may arrive too (the caller would retry: a duplicate)
    assert set(accepted) <= set(delivered)
    assert all(count == 1 for count in delivered.values())
    assert masq.queue_ids() == []


FILL = """
import io, sys
from masq import config, envelope
from masq.handoff import enqueue
conf = config.load(None)
tag, count = sys.argv[1], int(sys.argv[2])
for i in range(count):
    data = b"Subject: %s %d\\n\\nFrom the start\\n.\\nmessage %d\\n" % (tag.encode(), i, i)
    enqueue(conf, io.BytesIO(data), envelope.Envelope("a@test.example", ["bob@localhost"]),
            {"proto": "local", "user": "test"})
"""


def queue_many(masq, count, tag):
    """Fill the queue through the spool library, in one process (fast)."""
    import sys
    masq.run([sys.executable, "-c", FILL, tag, str(count)]).ok()
    assert len(masq.queue_ids()) == count


def delivered_counts(messages):
    counts = {}
    for msg in messages:
        key = msg["Subject"]
        counts[key] = counts.get(key, 0) + 1
    return counts


def kill_runs_until_empty(masq, rng):
    """Start runq, kill -9 it at a random moment, until one run ends by itself."""
    kills = 0
    for _ in range(50):
        p = subprocess.Popen([os.path.join(BIN, "masq-send"), "--once"], env=masq.env(),
                             stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.02, 0.25))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        if not masq.queue_ids():
            break
    masq.run(["masq-send", "--once"]).ok()
    return kills


def test_masq_send_killed_during_maildir_delivery_delivers_everything_at_most_twice(masq):
    rng = random.Random(2)
    queue_many(masq, COUNT, "md")
    kills = kill_runs_until_empty(masq, rng)
    assert kills > 0
    assert masq.queue_ids() == []
    counts = delivered_counts(masq.maildir("bob"))
    assert set(counts) == {f"md {i}" for i in range(COUNT)}
    assert max(counts.values()) <= 2


# masq-send's group commit (masq.attempt): maildir deliveries are linked into
# new/, and their outcomes recorded only after one fsync of new/ for the group.
# These run a queue run in a process whose FolderSync.sync is replaced: by a
# kill -9 at the moment of the group's fsync (the widest point of the window
# between the links and the records), or by an fsync that fails.
RUN_WITH_SYNC = """
import errno, os, signal, sys
from masq import config, log, mailbox, spool
from masq.cmd import send
conf = config.load(None)
log.setup(conf)
real = mailbox.FolderSync.sync
def killed(self):
    os.kill(os.getpid(), signal.SIGKILL)
def failing(self):
    def eio(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    fsync, os.fsync = os.fsync, eio
    try:
        return real(self)
    finally:
        os.fsync = fsync
mailbox.FolderSync.sync = {"kill": killed, "fail": failing}[sys.argv[1]]
send.run_once(conf, spool.Spool(conf.path("spool")))
"""
GROUP_COUNT = 60


def test_masq_send_killed_at_the_group_fsync_of_new_records_nothing_and_delivers_again(masq):
    import sys

    from masq import attempt
    queue_many(masq, GROUP_COUNT, "gc")
    r = masq.run([sys.executable, "-c", RUN_WITH_SYNC, "kill"])
    assert r.rc == -signal.SIGKILL, r
    before = delivered_counts(masq.maildir("bob"))
    # the first group is linked into new/; not one outcome was recorded
    assert 1 <= len(before) <= attempt.GROUP_MESSAGES, before
    assert len(masq.queue_ids()) == GROUP_COUNT
    masq.run(["masq-send", "--once"]).ok()
    assert masq.queue_ids() == []
    counts = delivered_counts(masq.maildir("bob"))
    assert set(counts) == {f"gc {i}" for i in range(GROUP_COUNT)}
    # at most one duplicate, and only of what was linked before the kill
    assert {k for k, n in counts.items() if n == 2} == set(before)
    assert max(counts.values()) == 2


def test_a_failed_group_fsync_of_new_defers_the_deliveries_and_they_go_again(masq):
    import sys
    queue_many(masq, GROUP_COUNT, "ef")
    masq.run([sys.executable, "-c", RUN_WITH_SYNC, "fail"]).ok()
    assert len(masq.queue_ids()) == GROUP_COUNT          # deferred, none recorded done
    assert "unable to fsync" in masq.log() and "status=deferred" in masq.log()
    assert "status=sent" not in masq.log()
    assert len(delivered_counts(masq.maildir("bob"))) == GROUP_COUNT
    masq.run(["masq-send", "--once"]).ok()
    assert masq.queue_ids() == []
    counts = delivered_counts(masq.maildir("bob"))
    assert set(counts) == {f"ef {i}" for i in range(GROUP_COUNT)}
    assert set(counts.values()) == {2}      # each went twice: never reported unsynced


def test_masq_send_killed_during_mbox_delivery_never_leaves_half_a_message(masq):
    masq.use_mailbox("mbox")
    rng = random.Random(3)
    queue_many(masq, COUNT, "mb")
    kills = kill_runs_until_empty(masq, rng)
    assert kills > 0
    assert masq.queue_ids() == []
    box = mailbox.mbox(os.path.join(masq.dir, "mail", "bob"), create=False)
    counts = delivered_counts(box)
    assert set(counts) == {f"mb {i}" for i in range(COUNT)}
    assert max(counts.values()) <= 2
    for msg in box:
        n = msg["Subject"].split()[1]
        # mailbox.mbox does not undo mboxrd quoting: the body line reads ">From"
        assert msg.get_payload().rstrip("\n") == f">From the start\n.\nmessage {n}"


def test_full_disk_at_the_first_write_is_75_and_leaves_no_tmp_file(masq):
    # masq-inject(8): nothing is left of a refused message.  A limit of 0 (or
    # below the spool header's size) fails the very first write, the one made
    # while the tmp file is being set up.
    import resource
    masq.run(["masq-queue", "list"]).ok()       # the config cache exists before the limit
    for limit in (0, 10):
        def small_files(limit=limit):
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        r = masq.run([masq.bin("sendmail"), "-odq", "bob"], input=b"Subject: x\n\nbody\n",
                     preexec_fn=small_files)
        assert r.rc == 75 and b"File too large" in r.err, r
        assert os.listdir(os.path.join(masq.spool, "tmp")) == [], limit
        assert masq.queue_ids() == []
    masq.run([masq.bin("sendmail"), "-odq", "bob"], input=b"Subject: x\n\nbody\n").ok()
    assert len(masq.queue_ids()) == 1


# System mode: the same trials where masq-send starts as root, starts
# masq-lspawn, becomes masq, and each delivery is a masq-local run as bob
# (tests/sysroot.py: a throwaway root made the MTA by masq-setup system).

SYSTEM_COUNT = 200          # each delivery starts a masq-local: a run takes a few seconds
SYSTEM_SPOOL = "/var/spool/masq"


def system_queue_size(sysroot):
    return sum(len(files) for folder in ("incoming", "active")
               for _, _, files in os.walk(sysroot.path(f"{SYSTEM_SPOOL}/{folder}")))


def spawner_of(pid):
    """masq-lspawn, masq-send's child, once it has one."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(p) for p in f.read().split()]
    except OSError:
        return None
    return kids[0] if kids else None


def test_system_mode_masq_send_and_masq_lspawn_killed_during_mbox_delivery(sysroot):
    import sys
    from sysroot import root_env

    from masq import install
    sysroot.run(["rm", "-f", *[path for path, _ in install.LINKS]]).ok()
    sysroot.adduser("bob")
    sysroot.run("printf 'postmaster: root\\nroot: bob\\n' > /etc/aliases").ok()
    sysroot.run(["masq-setup", "system", "local-only", "--hostname", "test.example"]).ok()
    fill = FILL.replace("bob@localhost", "bob@test.example")
    sysroot.run([sys.executable, "-c", fill, "sys", str(SYSTEM_COUNT)], user="masq",
                env=root_env(MASQ_CONF="/etc/masq/masq.toml")).ok()
    assert system_queue_size(sysroot) == SYSTEM_COUNT
    rng = random.Random(4)
    kills = {"masq-send": 0, "masq-lspawn": 0}
    for _ in range(40):
        p = sysroot.popen(["masq-send", "--once"], stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.1, 0.8))
        if p.poll() is None:
            victim = "masq-lspawn" if rng.random() < 0.3 else "masq-send"
            pid = spawner_of(p.pid) if victim == "masq-lspawn" else p.pid
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills[victim] += 1
                except ProcessLookupError:
                    pass
        p.wait(60)
        if not system_queue_size(sysroot):
            break
    sysroot.run(["masq-send", "--once"]).ok()
    assert kills["masq-send"] > 0 and kills["masq-lspawn"] > 0, kills
    assert system_queue_size(sysroot) == 0
    path = sysroot.path("/var/mail/bob")
    assert os.stat(path).st_uid == int(sysroot.run(["id", "-u", "bob"]).ok().out)
    box = mailbox.mbox(path, create=False)
    counts = delivered_counts(box)
    assert set(counts) == {f"sys {i}" for i in range(SYSTEM_COUNT)}
    assert max(counts.values()) <= 2
    for msg in box:
        n = msg["Subject"].split()[1]
        assert msg.get_payload().rstrip("\n") == f">From the start\n.\nmessage {n}"

