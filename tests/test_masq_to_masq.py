"""Issue 9: mail between two masq hosts on loopback, as on a LAN.

The first (a smarthost profile) sends with masq-send --once; the second is
masq-smtpd behind masq-tcpserver with users = "system" and the default
max_recipients = 100.  A reader on the second's trigger stands for its
daemon, so what it accepted stays in its queue to be counted.
"""
import os

import pytest
from conftest import Masq, listen_trigger, run
from smtpd_helpers import Listener, spool_messages

MESSAGE = b"From: alice@laptop.example\nSubject: to many\n\nbody\n"


@pytest.fixture
def lan(tmp_path):
    """(laptop, server): the server listening, the laptop's smarthost pointing at it."""
    server_dir = str(tmp_path / "server")
    run(["masq-setup", "local-only", server_dir, "--hostname", "lan.example"]).ok()
    server = Masq(server_dir)
    with open(server.conf) as f:
        text = f.read()
    server.set_config(text.replace('users = "any"', 'users = "system"'))
    with open(os.path.join(server.dir, "aliases"), "a") as f:
        f.writelines(f"user{n}: root\n" for n in range(150))   # aliases count as users
    trigger = listen_trigger(server.spool)
    listener = Listener(server)
    laptop_dir = str(tmp_path / "laptop")
    run(["masq-setup", "smarthost", laptop_dir, "--relay", f"127.0.0.1:{listener.port}",
         "--hostname", "laptop.example"]).ok()
    laptop = Masq(laptop_dir)
    with open(laptop.conf) as f:
        text = f.read()
    laptop.set_config(text.replace('tls = "starttls"', 'tls = "none"'))
    yield laptop, server
    listener.stop()
    os.close(trigger)


def send(laptop, recipients):
    run([laptop.bin("sendmail"), "-odq", "-f", "alice@laptop.example", *recipients],
        input=MESSAGE, env=laptop.env()).ok()
    laptop.run(["masq-send", "--once"]).ok()


def received(server):
    """Every recipient of every message the server queued, in order."""
    return [line.split(" ", 1)[1] for _, records in spool_messages(server).values()
            for line in records.splitlines() if line.startswith("rcpt ")]


def test_issue9_150_recipients_arrive_once_each(lan):
    laptop, server = lan
    rcpts = [f"user{n}@lan.example" for n in range(150)]
    send(laptop, rcpts)
    assert sorted(received(server)) == sorted(rcpts)
    assert len(spool_messages(server)) == 2         # 100, then the 50 over the limit
    assert laptop.queue_ids() == [], laptop.run(["masq-queue", "list"]).out


def test_issue9_2_valid_and_10_unknown_deliver_2_and_bounce_10(lan):
    laptop, server = lan
    unknown = [f"nobody{n}@lan.example" for n in range(10)]
    send(laptop, ["root@lan.example", *unknown, "postmaster@lan.example"])
    assert sorted(received(server)) == ["postmaster@lan.example", "root@lan.example"]
    log = [line for line in laptop.log().splitlines() if "relay=smarthost" in line]
    assert sum("status=bounced" in line for line in log) == 10, log
    assert sum("status=sent" in line for line in log) == 2, log
    assert not any("status=deferred" in line for line in log), log
    [bounce] = list(laptop.maildir("alice"))        # one report for the ten, in the first run
    assert bounce.get_content_type() == "multipart/report"
