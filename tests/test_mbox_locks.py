"""mbox dot-locks that are odd or held: a queue run defers quickly, without spinning.

Each case puts something at mail/bob.lock, runs `masq-send --once` and
checks the clock, the CPU time the run used, the queue and what
`masq-queue list` says; then removes the lock and checks one delivery.
"""
import mailbox
import os
import resource
import time

import pytest

from conftest import enqueue

MESSAGE = b"From: alice@test.example\nSubject: hello %d\n\nbody\n"
LOCK_WAIT_SECONDS = 20      # masq-local(8): a held lock is waited for this long, then Z
QUICK_SECONDS = 5           # a run that refuses an odd lock at once takes about 0.5 s
CPU_SECONDS = 3             # starting Python and one run; a spinning run uses all it gets


@pytest.fixture
def box(masq):
    """The mbox of bob@localhost: (its path, its dot-lock's path)."""
    masq.use_mailbox("mbox")
    os.makedirs(os.path.join(masq.dir, "mail"), exist_ok=True)
    path = os.path.join(masq.dir, "mail", "bob")
    return path, path + ".lock"


def timed_runq(masq, timeout):
    """masq-send --once; (result, seconds on the clock, CPU seconds it used)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    result = masq.run(["masq-send", "--once"], timeout=timeout)
    elapsed = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return result.ok(), elapsed, cpu


def queue(masq, count):
    for n in range(count):
        enqueue(masq, MESSAGE % n, "alice@test.example", ["bob@localhost"]).ok()


def listing(masq):
    return masq.run(["masq-queue", "list"]).ok().out.decode()


def delivered(path):
    return sorted(msg["Subject"] for msg in mailbox.mbox(path, create=False))


def stale_lock_target(tmp_path):
    """A regular file that would pass for a stale lock (a dead PID, an hour old)."""
    target = tmp_path / "elsewhere"
    target.write_text("999999999\n")
    old = time.time() - 3600
    os.utime(target, (old, old))
    return target


ODD = {
    "dangling symlink": ("a symbolic link", lambda lock, tmp: os.symlink("/nonexistent/x", lock)),
    "symlink to a stale lock": ("a symbolic link",
                                lambda lock, tmp: os.symlink(stale_lock_target(tmp), lock)),
    "fifo": ("a FIFO", lambda lock, tmp: os.mkfifo(lock)),
    "folder": ("a folder", lambda lock, tmp: os.mkdir(lock)),
}


@pytest.mark.parametrize("case", ODD)
def test_a_lock_that_is_no_regular_file_defers_at_once_without_spinning(masq, box, tmp_path,
                                                                         case):
    path, lock = box
    kind, make = ODD[case]
    make(lock, tmp_path)
    queue(masq, 1)
    _, elapsed, cpu = timed_runq(masq, timeout=30)
    assert elapsed < QUICK_SECONDS, elapsed
    assert cpu < CPU_SECONDS, cpu
    assert len(masq.queue_ids()) == 1
    text = listing(masq)
    assert "bob@localhost (deferred:" in text, text
    assert f"{lock} is {kind}, not a lock" in text, text
    assert os.path.lexists(lock), "the odd lock was removed"
    if case == "symlink to a stale lock":
        assert (tmp_path / "elsewhere").read_text() == "999999999\n"    # never followed
    if os.path.isdir(lock) and not os.path.islink(lock):
        os.rmdir(lock)
    else:
        os.unlink(lock)
    timed_runq(masq, timeout=30)
    assert masq.queue_ids() == []
    assert delivered(path) == ["hello 0"]
    assert not os.path.lexists(lock)


def test_a_lock_held_by_a_live_process_defers_after_one_bounded_wait_per_run(masq, box):
    path, lock = box
    with open(lock, "w") as f:
        f.write(f"{os.getpid()}\n")         # this test is alive: the lock is not stale
    queue(masq, 3)
    _, elapsed, cpu = timed_runq(masq, timeout=LOCK_WAIT_SECONDS * 3)
    # one wait for the first message; the others find the mbox still busy at once
    assert LOCK_WAIT_SECONDS - 2 < elapsed < LOCK_WAIT_SECONDS + QUICK_SECONDS, elapsed
    assert cpu < CPU_SECONDS, cpu
    assert len(masq.queue_ids()) == 3
    text = listing(masq)
    assert text.count("bob@localhost (deferred:") == 3, text
    assert text.count(f"{path} is locked by another program") == 3, text
    assert open(lock).read() == f"{os.getpid()}\n"     # someone else's lock: left alone
    os.unlink(lock)
    timed_runq(masq, timeout=30)
    assert masq.queue_ids() == []
    assert delivered(path) == ["hello 0", "hello 1", "hello 2"]
    assert not os.path.lexists(lock)


def test_an_mbox_that_is_a_hard_link_is_not_written(masq, box, tmp_path):
    """From the review: a hard link planted as the mbox took the mail to its other name."""
    other = tmp_path / "someone-elses-mbox"
    other.write_bytes(b"")
    os.link(other, box[0])
    queue(masq, 1)
    masq.run(["masq-send", "--once"]).ok()
    assert other.read_bytes() == b"" and masq.queue_ids()
    assert "links" in listing(masq)
