"""masq-queue: the spool writer and the queue's tool for people."""
import os

from conftest import enqueue


def test_enqueue_makes_one_complete_file_in_incoming(masq):
    enqueue(masq, b"Subject: hi\r\n\r\nbody\r\n", "a@example.org", ["bob@localhost"]).ok()
    ids = masq.queue_ids("incoming")
    assert len(ids) == 1
    with open(os.path.join(masq.spool, "incoming", ids[0]), "rb") as f:
        data = f.read()
    assert data.startswith(b"masq-spool 1 ")
    assert b"Subject: hi\n\nbody\nsender a@example.org\nrcpt bob@localhost\n" in data
    assert os.listdir(os.path.join(masq.spool, "tmp")) == []


def test_envelope_cut_short_queues_nothing(masq):
    import subprocess
    r, w = os.pipe()
    os.write(w, b"Fa@example.org\0Tbob@localhost\0")      # no final NUL
    os.close(w)
    p = subprocess.run(["masq-queue"], input=b"x\n", stdout=r, stderr=subprocess.PIPE,
                       env=masq.env())
    os.close(r)
    assert p.returncode == 65, p.stderr
    assert b"masq-queue: fatal: envelope ends early" in p.stderr
    assert masq.queue_ids() == []
    assert os.listdir(os.path.join(masq.spool, "tmp")) == []


def test_list_of_empty_queue(masq):
    r = masq.run(["masq-queue", "list"]).ok()
    assert r.out == b"Mail queue is empty\n"


def test_list_show_hold_release_remove(masq):
    enqueue(masq, b"Subject: x\n\nhello\n", "a@example.org", ["bob@localhost"]).ok()
    qid = masq.queue_ids()[0]
    out = masq.run(["masq-queue", "list"]).ok().out.decode()
    assert qid in out and "a@example.org" in out and "bob@localhost" in out
    shown = masq.run(["masq-queue", "show", qid]).ok().out
    assert shown.endswith(b"Subject: x\n\nhello\n")
    masq.run(["masq-queue", "hold", qid]).ok()
    assert masq.queue_ids("hold") == [qid]
    masq.run(["masq-queue", "release", qid]).ok()
    assert masq.queue_ids("incoming") == [qid]
    masq.run(["masq-queue", "remove", qid]).ok()
    assert masq.queue_ids() == []
    r = masq.run(["masq-queue", "remove", qid])
    assert r.rc == 67 and b"no such message" in r.err


def test_check_finds_and_repairs_an_orphan(masq):
    orphan = os.path.join(masq.spool, "tmp", "1234-1")
    with open(orphan, "wb") as f:
        f.write(b"masq-spool 1 0000000000000000\npartial")
    young = orphan + "0"                    # its writer may be about to lock it
    with open(young, "wb") as f:
        f.write(b"masq-spool 1 0000000000000000\n")
    os.utime(orphan, (1, 1))                # an old file nobody holds: an orphan
    r = masq.run(["masq-queue", "check"])
    assert r.rc == 65 and b"tmp/1234-1: orphan" in r.out, r
    assert b"1234-10" not in r.out
    masq.run(["masq-queue", "check", "--repair"]).ok()
    assert not os.path.exists(orphan) and os.path.exists(young)
    masq.run(["masq-queue", "check"]).ok()


def test_bad_usage_is_64(masq):
    r = masq.run(["masq-queue", "frobnicate"])
    assert r.rc == 64 and b"Usage:" in r.err


def test_check_repair_writes_a_missing_version_and_reports_what_it_cannot_mend(masq):
    os.unlink(os.path.join(masq.spool, "VERSION"))
    with open(os.path.join(masq.spool, "stray"), "w") as f:
        f.write("not ours")
    r = masq.run(["masq-queue", "check", "--repair"])
    assert r.rc == 65, r
    assert b"VERSION: missing: written" in r.out and b"still: stray: not part" in r.out
    os.unlink(os.path.join(masq.spool, "stray"))
    masq.run(["masq-queue", "check"]).ok()


def test_check_knows_the_stores_masq_keeps_in_the_spool(masq):
    for name in ("hoststat.db", "anvil.db", "anvil.db-wal", "greylist.db", "greylist.db-shm"):
        open(os.path.join(masq.spool, name), "w").close()
    for name in ("oauth", "fetch", "auth-slots"):
        os.mkdir(os.path.join(masq.spool, name))
    masq.run(["masq-queue", "check"]).ok()
    open(os.path.join(masq.spool, "greylist.db-x"), "w").close()
    r = masq.run(["masq-queue", "check"])
    assert r.rc == 65 and b"greylist.db-x: not part" in r.out, r


def test_lock_is_refused_for_a_message_moved_or_removed_after_listing(masq):
    from masq import spool
    enqueue(masq, b"Subject: x\n\nhello\n", "a@example.org", ["bob@localhost"]).ok()
    queue = spool.Spool(masq.spool)
    [msg] = list(queue.messages())
    masq.run(["masq-queue", "hold", msg.id]).ok()          # moved after we listed it
    assert msg.lock() is False
    [held] = list(queue.messages(("hold",)))
    masq.run(["masq-queue", "remove", held.id]).ok()
    assert held.lock() is False


def test_runq_and_the_daemon_agree_on_messages_that_vanish(masq):
    import subprocess
    from conftest import BIN
    for n in range(30):
        enqueue(masq, b"Subject: %d\n\nhello\n" % n, "a@example.org", ["bob@localhost"]).ok()
    runs = [subprocess.Popen([os.path.join(BIN, "masq-send"), "--once"], env=masq.env(),
                             stderr=subprocess.PIPE) for _ in range(3)]
    for p in runs:
        assert p.wait(timeout=60) == 0, p.stderr.read()
        assert b"Traceback" not in p.stderr.read()
    assert masq.queue_ids() == []
    assert len(list(masq.maildir("bob"))) == 30


def test_max_size_counts_what_the_sender_sent_not_the_received_line(masq):
    masq.set_config(open(masq.conf).read().replace("max_size = 52428800", "max_size = 1000"))
    exact = b"Subject: x\n\n" + b"y" * (1000 - 13) + b"\n"
    assert len(exact) == 1000
    enqueue(masq, exact, "a@example.org", ["bob@localhost"]).ok()
    r = enqueue(masq, exact + b"z", "a@example.org", ["bob@localhost"])
    assert r.rc == 65 and b"larger than the limit" in r.err, r
    assert len(masq.queue_ids()) == 1


def test_an_empty_recipient_in_the_envelope_queues_nothing(masq):
    import subprocess
    r, w = os.pipe()
    os.write(w, b"Fa@example.org\0T\0\0")
    os.close(w)
    p = subprocess.run(["masq-queue"], input=b"x\n", stdout=r, stderr=subprocess.PIPE,
                       env=masq.env())
    os.close(r)
    assert p.returncode == 65 and b"empty recipient" in p.stderr
    assert masq.queue_ids() == []


def write_message(masq, stage, qid, records):
    """A spool file as masq-spool(5) describes it, its records given as text."""
    data = b"Subject: x\n\nhello\n"
    with open(os.path.join(masq.spool, stage, qid), "wb") as f:
        f.write(b"masq-spool 1 %016d\n" % len(data) + data + records.encode())


def test_show_says_each_recipients_state_in_mailq_words(masq):
    write_message(masq, "active", "1234-5", (
        "sender a@example.org\nrcpt done@localhost\nrcpt late@example.org\n"
        "rcpt off@example.org\nrcpt new@example.org\narrived 1.000\n"
        "done 0 2.000 delivered to maildir mail/done/\n"
        "deferred 1 2.000 421 4.3.2 busy\n"
        "deferred 2 2.000 421 4.3.2 busy\nwaiting 2 3.000 waiting for route isp to come online\n"
        "frobbed 3 4.000 a word from a newer masq: ignored\n"))
    masq.run(["masq-queue", "check"]).ok()
    meta = masq.run(["masq-queue", "show", "1234-5"]).ok().out.decode()
    assert "rcpt done@localhost (done: delivered to maildir mail/done/)\n" in meta
    assert "rcpt late@example.org (deferred: retry due now: 421 4.3.2 busy)\n" in meta
    assert "rcpt off@example.org (waiting for route isp to come online)\n" in meta
    assert "rcpt new@example.org (not tried yet)\n" in meta
    listing = masq.run(["masq-queue", "list"]).ok().out.decode()
    assert "done@localhost" not in listing
    for line in ("late@example.org (deferred: retry due now: 421 4.3.2 busy)",
                 "off@example.org (waiting for route isp to come online)",
                 "new@example.org (not tried yet)"):
        assert line in listing, listing


def test_hold_records_who_held_the_message_and_show_says_it(masq):
    enqueue(masq, b"Subject: x\n\nhello\n", "a@example.org", ["bob@localhost"]).ok()
    qid = masq.queue_ids()[0]
    masq.run(["masq-queue", "hold", qid]).ok()
    with open(os.path.join(masq.spool, "hold", qid), "rb") as f:
        assert b"\nheld " in f.read()
    assert "rcpt bob@localhost (held by the admin (" in masq.run(
        ["masq-queue", "show", qid]).ok().out.decode()
    masq.run(["masq-queue", "release", qid]).ok()
    assert "bob@localhost (not picked up by masq-send yet)" in masq.run(
        ["masq-queue", "list"]).ok().out.decode()


def test_a_symbolic_link_in_the_queue_is_never_followed(masq, tmp_path):
    """From the review: root's mailq and masq-queue read a spool masq owns."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"masq-spool 1 0000000000000006\nsecret\nsender a@b\nrcpt c@d\n")
    os.symlink(secret, os.path.join(masq.spool, "active", "6620aaaaaaaaa-1"))
    out = masq.run(["masq-queue", "list"]).ok().out.decode()
    assert "unreadable" in out and "symbolic link" in out and "a@b" not in out, out
    r = masq.run(["masq-queue", "hold", "6620aaaaaaaaa-1"])
    assert r.rc != 0 and b"Traceback" not in r.err, r
    assert secret.read_bytes().endswith(b"rcpt c@d\n")      # nothing appended through it
