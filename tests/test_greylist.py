"""Greylisting in masq-smtpd, and the cap on refused recipients.

Real clients (swaks, smtplib) talk to masq-smtpd under masq-tcpserver on
127.0.0.1, with relay_nets = [] so that the loopback client counts as one
from outside; greylist_delay is 2 s.  Other sessions run masq-smtpd on
pipes with TCPREMOTEIP set, as tcpserver would.  The table is read with
the real `masq-queue greylist`.
"""
import concurrent.futures
import os
import smtplib
import socket
import sqlite3
import time

import pytest
from conftest import run
from smtpd_helpers import Listener, reply_lines

from masq import greylist

GREYLISTED = "451 4.7.1 <bob@test.example>: Recipient address rejected: greylisted"
PASSWORD = "correct horse 42"

pytestmark = pytest.mark.usefixtures("daemon_listens")


@pytest.fixture
def grey(masq):
    masq.config("[smtpd]\nrelay_nets = []\ngreylist = true\ngreylist_delay = 2\n"
                "auth_without_tls = true")
    return masq


def replace_config(masq, old, new):
    with open(masq.conf) as f:
        text = f.read()
    assert old in text
    masq.set_config(text.replace(old, new))


def swaks(port, sender="alice@sender.example", to="bob@test.example", *extra):
    r = run(["swaks", "--server", f"127.0.0.1:{port}", "--from", sender, "--to", to,
             "--helo", "client.example", "--header", "Subject: grey", *extra], timeout=60)
    return r.rc, r.out.decode("utf-8", "replace")


def table(masq):
    """The triplets as (client, sender, recipient, passed?) from the database itself."""
    path = os.path.join(masq.spool, greylist.FILE)
    if not os.path.exists(path):
        return []
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT client, sender, recipient, passed FROM triplets").fetchall()
    return sorted((c, s, r, bool(p)) for c, s, r, p in rows)


def session(masq, ip, *commands):
    """Reply lines of a masq-smtpd session on pipes from `ip`."""
    data = b"EHLO client.example\r\n" + b"".join(c.encode() + b"\r\n" for c in commands) \
        + b"QUIT\r\n"
    r = masq.run(["masq-smtpd"], input=data, env=masq.env(TCPREMOTEIP=ip))
    assert r.rc == 0, r
    return reply_lines(r.out)


# -- greylisting over the network --------------------------------------------------------

def test_swaks_is_greylisted_then_accepted_after_the_delay_then_at_once(grey):
    with Listener(grey) as srv:
        first = time.monotonic()
        rc, out = swaks(srv.port)
        assert rc != 0 and GREYLISTED in out, out
        rc, out = swaks(srv.port)               # too early: still refused
        assert rc != 0 and GREYLISTED in out, out
        assert grey.queue_ids() == []
        time.sleep(max(0, first + 2.2 - time.monotonic()))
        rc, out = swaks(srv.port)
        assert rc == 0 and "250 2.0.0 Ok: queued as" in out, out
        rc, out = swaks(srv.port)               # the same triplet: at once
        assert rc == 0 and "250 2.0.0 Ok: queued as" in out, out
        rc, out = swaks(srv.port, "carol@sender.example")   # a new sender: a new triplet
        assert rc != 0 and GREYLISTED in out, out
    assert len(grey.queue_ids()) == 2
    assert table(grey) == [("127.0.0.0/24", "alice@sender.example", "bob@test.example", True),
                           ("127.0.0.0/24", "carol@sender.example", "bob@test.example", False)]
    log = grey.log()
    assert ("greylist: client=127.0.0.1 net=127.0.0.0/24 from=<alice@sender.example> "
            "to=<bob@test.example> greylisted (new), retry in 2 s") in log
    assert "to=<bob@test.example> greylisted (early)" in log
    assert "from=<alice@sender.example> to=<bob@test.example> passed after 2 s" in log


def test_a_relay_nets_client_is_never_greylisted(grey):
    replace_config(grey, "relay_nets = []", 'relay_nets = ["127.0.0.0/8"]')
    with Listener(grey) as srv:
        rc, out = swaks(srv.port)
    assert rc == 0 and "queued as" in out, out
    assert table(grey) == []


def test_an_authenticated_client_is_never_greylisted(grey):
    grey.run(["masq-setup", "passwd", grey.dir, "alice"], input=PASSWORD.encode() + b"\n").ok()
    with Listener(grey) as srv:
        rc, out = swaks(srv.port, "alice@sender.example", "bob@test.example",
                        "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", PASSWORD)
        assert rc == 0 and "235 2.7.0" in out and "queued as" in out, out
        rc, out = swaks(srv.port)               # the same client without AUTH is
        assert rc != 0 and GREYLISTED in out, out
    assert [row[1] for row in table(grey)] == ["alice@sender.example"]


def test_parallel_sessions_store_each_new_triplet_once(grey):
    """20 sessions at once (20 masq-smtpd processes), each with the same 5
    recipients from one of 2 senders: 10 triplets, each stored once, every
    RCPT refused; after the delay each triplet passes."""
    recipients = [f"r{i}@test.example" for i in range(5)]

    def one(i):
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=60) as client:
            client.ehlo("client.example")
            client.mail(f"s{i % 2}@sender.example")
            codes = [client.rcpt(r)[0] for r in recipients]
            client.rset()
        return codes

    with Listener(grey, limit=40) as srv:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            codes = [c for result in pool.map(one, range(20)) for c in result]
        assert codes == [451] * 100
        rows = table(grey)
        assert len(rows) == len(set(rows)) == 10
        assert {(s, r) for _, s, r, _ in rows} == {(f"s{i}@sender.example", r)
                                                    for i in range(2) for r in recipients}
        time.sleep(2.2)
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            codes = [c for result in pool.map(one, range(20)) for c in result]
        assert codes == [250] * 100
    rows = table(grey)
    assert len(rows) == 10 and all(passed for *_, passed in rows)
    assert grey.log().count(" passed after ") == 10


# -- the whitelist, the table's edges ------------------------------------------------------

def test_whitelist_entries_skip_greylisting(grey):
    with open(os.path.join(grey.dir, "greylist-whitelist"), "w") as f:
        f.write("# friends\nfriend@example.net\n@trusted.example\n.partner.example\n"
                "198.51.100.0/24  # the backup MX\nlists@test.example\n")
    grey.config('greylist_whitelist = "greylist-whitelist"')
    client = "192.0.2.7"
    cases = [("198.51.100.9", "stranger@elsewhere.example", "bob@test.example", 250),
             (client, "Friend@Example.NET", "bob@test.example", 250),
             (client, "anyone@trusted.example", "bob@test.example", 250),
             (client, "x@mail.partner.example", "bob@test.example", 250),
             (client, "stranger@elsewhere.example", "lists@test.example", 250),
             (client, "stranger@elsewhere.example", "bob@test.example", 451),
             (client, "x@partner.example", "bob@test.example", 451)]
    for ip, sender, rcpt, code in cases:
        lines = session(grey, ip, f"MAIL FROM:<{sender}>", f"RCPT TO:<{rcpt}>")
        assert lines[-2].startswith(str(code)), (ip, sender, rcpt, lines)
    assert [(s, r) for _, s, r, _ in table(grey)] == [
        ("stranger@elsewhere.example", "bob@test.example"), ("x@partner.example",
                                                             "bob@test.example")]


def test_an_ipv6_client_is_greylisted_by_its_64(grey):
    assert session(grey, "2001:db8:1:2::7", "MAIL FROM:<a@b.example>",
                   "RCPT TO:<bob@test.example>")[-2].startswith("451 4.7.1")
    time.sleep(2.1)
    # another host of the same /64 retries: passes
    assert session(grey, "2001:db8:1:2:ffff::1", "MAIL FROM:<a@b.example>",
                   "RCPT TO:<bob@test.example>")[-2] == "250 2.1.5 Ok"
    assert table(grey) == [("2001:db8:1:2:0:0:0:0/64", "a@b.example", "bob@test.example",
                            True)]


def test_a_broken_database_lets_mail_through_and_is_logged(grey):
    os.mkdir(os.path.join(grey.spool, greylist.FILE))     # cannot be opened as a database
    r = grey.run(["masq-smtpd"], input=b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n"
                 b"RCPT TO:<bob@test.example>\r\nRCPT TO:<carol@test.example>\r\nQUIT\r\n",
                 env=grey.env(TCPREMOTEIP="192.0.2.7"))
    lines = reply_lines(r.out)
    assert lines[-3:] == ["250 2.1.5 Ok", "250 2.1.5 Ok", "221 2.0.0 Bye"], lines
    assert r.err.decode().count("warning: greylisting off for this session") == 1, r
    assert "greylist: client=192.0.2.7 not checked, let through" in grey.log()


def test_greylist_states_in_time():
    """The table's rules, with the clock given: delay, window, expire."""
    def check(t):
        return table.check("192.0.2.0/24", "A@B.example", "c@d.example", now=t)

    import tempfile
    with tempfile.TemporaryDirectory() as spool:
        table = greylist.Greylist(spool, delay=300, window=3600, expire=86400 * 3)
        assert check(1000) == (greylist.NEW, 300)
        assert check(1299) == (greylist.EARLY, 1)
        assert check(1300) == (greylist.PASSED, 300)
        assert check(1400) == (greylist.KNOWN, 400)
        assert check(1300 + 86400 * 3 - 1)[0] == greylist.KNOWN
        assert check(1300 + 86400 * 6)[0] == greylist.NEW          # forgotten
        # a retry after the window counts as a first sight again
        assert check(1300 + 86400 * 6 + 3601)[0] == greylist.NEW
        table.close()


def test_client_network():
    assert greylist.client_network("192.0.2.77") == "192.0.2.0/24"
    assert greylist.client_network("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert greylist.client_network("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2:0:0:0:0/64"


# -- masq-queue greylist ----------------------------------------------------------------

def test_masq_queue_greylist_lists_and_clears(grey):
    for ip, sender in (("192.0.2.7", "a@one.example"), ("198.51.100.1", "b@two.example")):
        session(grey, ip, f"MAIL FROM:<{sender}>", "RCPT TO:<bob@test.example>")
    r = grey.run(["masq-queue", "greylist"]).ok()
    lines = r.out.decode().splitlines()
    assert lines[0].split()[:2] == ["client", "first"] and len(lines) == 3
    assert "192.0.2.0/24" in lines[1] and "waiting" in lines[1]
    assert "<a@one.example> -> <bob@test.example>" in lines[1]
    assert "<b@two.example>" in lines[2]
    r = grey.run(["masq-queue", "greylist", "*@TWO.example"]).ok()
    assert len(r.out.decode().splitlines()) == 2 and b"two.example" in r.out
    r = grey.run(["masq-queue", "greylist", "--clear", "192.0.2.*"]).ok()
    assert r.out == b"1 triplet(s) cleared\n"
    assert [row[1] for row in table(grey)] == ["b@two.example"]
    assert "greylist: 1 triplet(s) cleared by" in grey.log()
    r = grey.run(["masq-queue", "greylist", "--clear"]).ok()
    assert r.out == b"1 triplet(s) cleared\n" and table(grey) == []


def test_masq_queue_greylist_without_a_table_lists_nothing(masq):
    r = masq.run(["masq-queue", "greylist"]).ok()
    assert len(r.out.splitlines()) == 1
    assert not os.path.exists(os.path.join(masq.spool, greylist.FILE))


# -- the cap on refused recipients (max_refused_recipients) --------------------------------

def test_refused_recipients_beyond_the_cap_end_the_session_with_421(masq):
    replace_config(masq, 'users = "any"', 'users = "system"')
    masq.config("[smtpd]\nrelay_nets = []\nmax_refused_recipients = 5")
    with Listener(masq) as srv, socket.create_connection(("127.0.0.1", srv.port)) as s:
        f = s.makefile("rb")

        def say(line):
            s.sendall(line.encode() + b"\r\n")
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            return reply.decode().rstrip("\r\n")

        assert f.readline().startswith(b"220 ")
        say("EHLO client.example")
        assert say("MAIL FROM:<guess@sender.example>").startswith("250")
        assert say("RCPT TO:<postmaster@test.example>").startswith("250")
        for i in range(4):
            assert say(f"RCPT TO:<nosuchuser{i}@test.example>").startswith("550 5.1.1")
        assert say("RCPT TO:<someone@elsewhere.example>").startswith("554 5.7.1")   # 5th
        assert say("RCPT TO:<nosuchuser9@test.example>") == \
            "421 4.7.0 test.example Error: too many refused recipients"
        s.settimeout(10)
        assert f.read() == b""                  # the server closed the connection
    assert "too many refused recipients: client=127.0.0.1 refused=6" in masq.log()


def test_greylisted_recipients_do_not_count_towards_the_cap(grey):
    grey.config("max_refused_recipients = 2")
    lines = session(grey, "192.0.2.7", "MAIL FROM:<a@b.example>",
                    *[f"RCPT TO:<r{i}@test.example>" for i in range(5)])
    assert [line[:3] for line in lines[-6:]] == ["451"] * 5 + ["221"], lines


# -- the review's findings: caps on new rows, a busy database, control characters ----------

def test_a_session_stores_at_most_max_recipients_new_triplets_then_counts_them(grey):
    """One client must not fill greylist.db: past max_recipients new triplets a
    session's new ones are refused (451) without a row and count as refused."""
    grey.config("max_recipients = 5\nmax_refused_recipients = 3")
    lines = session(grey, "192.0.2.7", "MAIL FROM:<a@b.example>",
                    *[f"RCPT TO:<r{i}@test.example>" for i in range(12)])
    assert [line[:3] for line in lines[-10:]] == ["250"] + ["451"] * 8 + ["421"], lines
    assert lines[-1] == "421 4.7.0 test.example Error: too many refused recipients"
    assert len(table(grey)) == 5
    log = grey.log()
    assert log.count("deferred, not stored (unrecorded: 5 new triplets this session)") == 1
    assert "too many refused recipients: client=192.0.2.7 refused=4" in log


def test_new_triplets_of_one_network_are_capped_within_the_window(tmp_path):
    table = greylist.Greylist(str(tmp_path), delay=300, window=3600, network_max=3)
    net = "192.0.2.0/24"
    assert [table.check(net, "a@b.example", f"r{i}@x.example", now=1000)[0]
            for i in range(5)] == [greylist.NEW] * 3 + [greylist.NETWORK_FULL] * 2
    assert table.check("198.51.100.0/24", "a@b.example", "r9@x.example", now=1000) == \
        (greylist.NEW, 300)
    assert table.check(net, "a@b.example", "r0@x.example", now=1400)[0] == greylist.PASSED
    assert table.check(net, "a@b.example", "r0@x.example", now=1500)[0] == greylist.KNOWN
    assert table.check(net, "a@b.example", "r1@x.example", now=1500)[0] == greylist.PASSED
    assert table.check(net, "a@b.example", "r3@x.example", now=1000 + 3601)[0] == greylist.NEW
    # r2 and the other network's expired; r3 stored only now, r4 never
    assert sorted(t.recipient for t in table.triplets(now=1000 + 3601)) == \
        ["r0@x.example", "r1@x.example", "r3@x.example"]
    table.close()


def test_a_full_table_stores_no_new_triplet_but_known_ones_pass(tmp_path):
    table = greylist.Greylist(str(tmp_path), delay=300, window=3600, max_bytes=1)
    table._open().execute("INSERT INTO triplets VALUES ('192.0.2.0/24', 'a@b.example', "
                          "'c@d.example', 900, 1000, 99999)")
    assert table.check("192.0.2.0/24", "x@y.example", "c@d.example", now=1000) == \
        (greylist.TABLE_FULL, 300)
    assert table.check("192.0.2.0/24", "A@b.example", "c@d.example", now=1000)[0] == \
        greylist.KNOWN
    assert [t.sender for t in table.triplets(now=1000)] == ["a@b.example"]
    table.close()


def test_expired_rows_are_deleted_a_batch_at_a_time_at_most_once_a_minute(tmp_path):
    table = greylist.Greylist(str(tmp_path), delay=300, window=3600)
    db = table._open()
    db.executemany("INSERT INTO triplets VALUES ('192.0.2.0/24', ?, 'c@d.example', 1, 0, 2)",
                   [(f"s{i}@old.example",) for i in range(1200)])

    def expired():
        return db.execute("SELECT count(*) FROM triplets WHERE expires < 100").fetchone()[0]

    assert table.check("198.51.100.0/24", "a@b.example", "n1@x.example", now=1000)[0] == \
        greylist.NEW
    assert expired() == 1200 - greylist.PURGE_ROWS
    table.check("198.51.100.0/24", "a@b.example", "n2@x.example", now=1030)
    assert expired() == 1200 - greylist.PURGE_ROWS            # not again within a minute
    table.check("198.51.100.0/24", "a@b.example", "n3@x.example", now=1061)
    assert expired() == 1200 - 2 * greylist.PURGE_ROWS
    table.close()


def test_masq_queue_greylist_clear_works_in_short_transactions(tmp_path, monkeypatch):
    monkeypatch.setattr(greylist, "CLEAR_ROWS", 100)
    table = greylist.Greylist(str(tmp_path))
    table._open().executemany(
        "INSERT INTO triplets VALUES ('192.0.2.0/24', ?, 'c@d.example', 1, 0, 9e9)",
        [(f"s{i}@{'spam' if i % 2 else 'ham'}.example",) for i in range(1000)])
    statements = []
    table.db.set_trace_callback(statements.append)
    assert table.clear("*@spam.example") == 500
    assert statements.count("BEGIN IMMEDIATE") >= 5        # a batch each, never all at once
    assert len(table.triplets(now=0)) == 500
    statements.clear()
    assert table.clear() == 500 and table.triplets(now=0) == []
    assert statements.count("BEGIN IMMEDIATE") >= 5
    table.close()


def test_a_busy_database_defers_the_recipient_and_leaves_greylisting_on(grey):
    """A database another process holds locked is busy, not broken: that RCPT gets
    451 (not 250), and the next one is greylisted as usual."""
    import subprocess

    from conftest import BIN, reap
    path = os.path.join(grey.spool, greylist.FILE)
    greylist.Greylist(grey.spool)._open().close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")               # the write lock, held
    p = subprocess.Popen([os.path.join(BIN, "masq-smtpd")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=grey.env(TCPREMOTEIP="192.0.2.7"))
    try:
        def say(line):
            p.stdin.write(line.encode() + b"\r\n")
            p.stdin.flush()
            reply = p.stdout.readline()
            while reply[3:4] == b"-":
                reply = p.stdout.readline()
            return reply.decode().rstrip("\r\n")

        assert p.stdout.readline().startswith(b"220 ")
        say("EHLO client.example")
        assert say("MAIL FROM:<a@b.example>").startswith("250")
        started = time.monotonic()
        assert say("RCPT TO:<bob@test.example>") == (
            "451 4.7.1 <bob@test.example>: Recipient address rejected: greylisted, try again "
            "in 60 seconds")
        assert time.monotonic() - started >= greylist.BUSY_TIMEOUT_SECONDS - 1
        holder.execute("ROLLBACK")
        assert say("RCPT TO:<carol@test.example>").startswith(
            "451 4.7.1 <carol@test.example>: Recipient address rejected: greylisted, try "
            "again in 2 seconds")
        say("QUIT")
        assert p.wait(timeout=30) == 0
    finally:
        holder.close()
        p.kill()
        reap(p)
    assert [r for _, _, r, _ in table(grey)] == ["carol@test.example"]
    log = grey.log()
    assert "greylist: client=192.0.2.7 to=<bob@test.example> deferred, the database is busy" \
        in log
    assert "not checked, let through" not in log


def test_an_address_with_a_control_character_is_refused(grey):
    lines = session(grey, "192.0.2.7", 'MAIL FROM:<"a\\\x1b]2;X"@example.org>',
                    "MAIL FROM:<a\u0085b@example.org> SMTPUTF8",
                    "MAIL FROM:<a@example.org> SMTPUTF8",
                    "RCPT TO:<\"x\\\x07\"@test.example>", "RCPT TO:<r\u009b@test.example>",
                    "RCPT TO:<r\u2028s@test.example>")
    assert [line[:9] for line in lines[-7:]] == ["501 5.1.7", "501 5.1.7", "250 2.1.0",
                                                 "501 5.1.3", "501 5.1.3", "501 5.1.3",
                                                 "221 2.0.0"], lines
    assert table(grey) == []
    assert "\x1b" not in grey.log() and "\x85" not in grey.log()


def test_masq_queue_greylist_prints_controls_escaped():
    rows = [greylist.Triplet("192.0.2.0/24", "a\x1b]2;X\u0085@b.example", "c\u2028@d.example",
                             1000, 0, 2000)]
    [_, line] = greylist.describe(rows)
    assert "<a\\x1b]2;X\\x85@b.example> -> <c\\u2028@d.example>" in line
    assert line.isprintable() or line[:-1].isprintable()
