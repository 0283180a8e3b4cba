"""The daemon shares a burst with a helper process (masq-send(8)): every message is
delivered, once, and a helper killed mid-run loses nothing."""
import os
import signal
import subprocess
import threading
import time

from conftest import BIN, enqueue, free_port, wait_for


def queue_burst(masq, count):
    for i in range(count):
        enqueue(masq, f"From: a@test.example\nSubject: burst {i}\n\nbody {i}\n".encode(),
                "a@test.example", ["bob@test.example"]).ok()


def start(masq):
    proc = subprocess.Popen([os.path.join(BIN, "masq-send")], env=masq.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert wait_for(lambda: "daemon started" in masq.log()), proc.kill()
    return proc


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    return proc.stderr.read().decode()


def children(pid):
    """The pids of pid's children that are Python: the helper, not its MDA commands."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid and "python" in os.readlink(f"/proc/{entry}/exe"):
                found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def subjects(folder):
    """How many times each "burst N" subject arrived, from the MDA's files."""
    counts = {}
    for name in os.listdir(folder):
        if name.endswith(".tmp"):       # still being written
            continue
        with open(os.path.join(folder, name), "rb") as f:
            for line in f.read().split(b"\n"):
                if line.startswith(b"Subject: burst "):
                    n = int(line.split()[-1])
                    counts[n] = counts.get(n, 0) + 1
    return counts


def delivered(masq):
    folder = os.path.join(masq.dir, "mail", "bob", "new")
    return len(os.listdir(folder)) if os.path.isdir(folder) else 0


def sent_by(masq):
    """The pids that logged a delivery (status=sent)."""
    return {line.split("[", 1)[1].split("]", 1)[0]
            for line in masq.log().splitlines() if "status=sent" in line}


def test_a_burst_is_delivered_by_two_processes_each_message_once(masq):
    queue_burst(masq, 40)
    proc = start(masq)
    try:
        assert wait_for(lambda: delivered(masq) == 40), masq.log()
        assert wait_for(lambda: not masq.queue_ids())
    finally:
        err = stop(proc)
    assert len(sent_by(masq)) == 2, masq.log()
    bodies = sorted(m.get_payload() for m in masq.maildir("bob"))
    assert bodies == sorted(f"body {i}\n" for i in range(40)), err


def test_a_helper_killed_in_the_middle_loses_nothing(masq, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mda = tmp_path / "slow-mda"
    mda.write_text(f"#!/bin/sh\nsleep 0.1\ncat > {out}/$$.tmp && mv {out}/$$.tmp {out}/$$\n")
    mda.chmod(0o755)
    masq.set_config(open(masq.conf).read().replace('mailbox = "maildir"', 'mailbox = "mda"')
                    .replace('mda = "procmail -d {user}"', f'mda = "{mda}"')
                    + "\n[queue]\nretry_min = 1\n")
    queue_burst(masq, 24)
    proc = start(masq)
    try:
        assert wait_for(lambda: children(proc.pid)), masq.log()
        assert wait_for(lambda: len(os.listdir(out)) >= 3)
        for pid in children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: len(subjects(out)) == 24 and not masq.queue_ids(), 60), \
            masq.log()
    finally:
        err = stop(proc)
    counts = subjects(out)
    assert sorted(counts) == list(range(24)), counts
    assert max(counts.values()) <= 2, counts       # at most one duplicate: the one cut short
    assert "Traceback" not in err, err


def test_stopping_the_daemon_stops_its_helper(masq, tmp_path):
    mda = tmp_path / "slow-mda"
    mda.write_text("#!/bin/sh\nsleep 0.2\ncat > /dev/null\n")
    mda.chmod(0o755)
    masq.set_config(open(masq.conf).read().replace('mailbox = "maildir"', 'mailbox = "mda"')
                    .replace('mda = "procmail -d {user}"', f'mda = "{mda}"'))
    queue_burst(masq, 40)
    proc = start(masq)
    try:
        assert wait_for(lambda: children(proc.pid)), masq.log()
        helpers = children(proc.pid)
    except BaseException:
        stop(proc)
        raise
    started = time.monotonic()
    stop(proc)
    assert time.monotonic() - started < 5          # not the 20 deliveries of each half
    assert not [p for p in helpers if os.path.exists(f"/proc/{p}")
                and open(f"/proc/{p}/stat").read().split()[2] != "Z"]
    assert masq.queue_ids()                        # what was not tried waits in the queue


def test_mail_for_a_route_is_not_shared(masq):
    """The helper opens no connection: queue.parallel holds for a burst to a smarthost."""
    masq.set_config(open(masq.conf).read()
                    + f'\n[route.isp]\nhost = "127.0.0.1:{free_port()}"\n')     # refused
    for i in range(20):
        enqueue(masq, f"Subject: out {i}\n\nbody\n".encode(), "a@test.example",
                ["carol@far.example"]).ok()
    proc = start(masq)
    try:
        assert wait_for(lambda: masq.log().count("status=deferred") >= 20), masq.log()
    finally:
        stop(proc)
    pids = {line.split("[", 1)[1].split("]", 1)[0]
            for line in masq.log().splitlines() if "status=deferred" in line}
    assert pids == {str(proc.pid)}, masq.log()


def daemon_with_burst(masq, count):
    from masq import config, spool
    from masq.cmd import send
    from masq.filter import promote
    queue_burst(masq, count)
    conf = config.load(masq.conf)
    queue = spool.Spool(conf.path("spool"))
    promote(conf, queue, ())
    return send.Daemon(conf, queue), [spool.Message(queue, "active", q)
                                      for q in queue.ids("active")]


def test_a_fork_that_fails_leaves_the_run_to_the_daemon(masq, monkeypatch, capsys):
    daemon, messages = daemon_with_burst(masq, 20)

    def no_fork():
        raise BlockingIOError(11, "Resource temporarily unavailable")
    before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fork", no_fork)
    # threads other tests left in this process would make split() not even try
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    assert daemon.split(messages) is None
    assert set(os.listdir("/proc/self/fd")) == before          # the pipe is closed again
    assert "unable to start a helper for the queue run" in capsys.readouterr().err


def test_the_helpers_answers_are_read_whole_lines_only(masq):
    daemon, messages = daemon_with_burst(masq, 4)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    r, w = os.pipe()
    os.write(w, b"0 -\n1 1733360000.5\nx y\n9 -\n-1 -\n3 ")       # junk, and a cut last line
    os.close(w)
    results = {}
    daemon.join(pid, r, messages, results)
    later = time.time() + daemon.conf.get("queue.retry_min")
    assert results[messages[0].id] is None
    assert results[messages[1].id] == 1733360000.5
    assert later - 5 < results[messages[2].id] <= later          # not reported: tried later
    assert later - 5 < results[messages[3].id] <= later
    assert daemon.helper is None
