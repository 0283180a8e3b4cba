"""The SpamAssassin recipes of masq-filter(7), run with Debian's spamd and spamc.

One spamd for the module, on 127.0.0.1 and a port of its own, with local
tests only (-L: no DNS, no network) and no per-user configuration (-x);
as root its children run as nobody (spamd would fall back to nobody, and
first make ~root/.spamassassin).  The recipes are read out of the man page
and used byte for byte.  spamc finds spamd through a two-line `spamc` early
in PATH that adds `-d 127.0.0.1 -p PORT`, as /etc/spamassassin/spamc.conf
would on a real host.  GTUBE is SpamAssassin's test string (score 1000).
"""
import os
import shutil
import subprocess
import time
import tomllib

import pytest

from conftest import clean_env, enqueue, free_port, reap

PAGE = os.path.join(os.path.dirname(__file__), "..", "man", "masq-filter.7")
SPAMC = "/usr/bin/spamc"
START_SECONDS = 120             # spamd compiles its rules first: seconds on a loaded machine

GTUBE = (b"From: Mallory <mallory@test.example>\n"
         b"To: bob@localhost\n"
         b"Subject: Test spam mail (GTUBE)\n"
         b"Date: Mon, 07 Dec 2026 05:00:00 +0000\n"
         b"Message-ID: <gtube.1@test.example>\n"
         b"\n"
         b"This is the GTUBE, the Generic Test for Unsolicited Bulk Email.\n"
         b"\n"
         b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\n")
CLEAN = (b"From: Alice <alice@test.example>\n"
         b"To: bob@localhost\n"
         b"Subject: lunch on friday\n"
         b"Date: Mon, 07 Dec 2026 05:00:00 +0000\n"
         b"Message-ID: <lunch.1@test.example>\n"
         b"\n"
         b"Shall we meet at noon, at the usual place?\n"
         b"\n"
         b"Alice\n")


def literal_after(marker):
    """The text of the first literal display (.Bd -literal ... .Ed) after `marker`."""
    with open(PAGE) as f:
        text = f.read()
    block = text[text.index(marker):].split(".Bd -literal -offset indent\n", 1)[1]
    block = block.split("\n.Ed\n", 1)[0] + "\n"
    assert "\\" not in block and "\n." not in block, block     # no roff in it: byte for byte
    return block


def held_recipe():
    """The [queue] table of the first SpamAssassin example, as TOML text."""
    return literal_after("SpamAssassin, spam held")


def refuse_recipe(folder):
    """The spam-refuse script of the second example, saved and made executable."""
    path = os.path.join(folder, "spam-refuse")
    with open(path, "w") as f:
        f.write(literal_after(".Pa /usr/local/lib/masq/spam-refuse"))
    os.chmod(path, 0o755)
    return f'[queue]\nfilters = ["{path}"]'


def spamc_for(folder, port):
    """A folder whose `spamc` is the real one talking to 127.0.0.1:port."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "spamc")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nexec {SPAMC} -d 127.0.0.1 -p {port} "$@"\n')
    os.chmod(path, 0o755)
    return folder


@pytest.fixture(scope="module")
def spamd(tmp_path_factory):
    """A running spamd; the folder of the `spamc` that reaches it."""
    spamd = shutil.which("spamd", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if spamd is None or not os.access(SPAMC, os.X_OK):
        pytest.fail("SpamAssassin is not installed: apt-get install spamd spamassassin spamc "
                    "(make test installs them)")
    folder = tmp_path_factory.mktemp("spamd")
    port = free_port()
    argv = [spamd, "-L", "-x", "-i", "127.0.0.1", "-p", str(port), "-A", "127.0.0.1",
            "--pidfile", str(folder / "spamd.pid"), "-s", "stderr", "-m", "2"]
    if os.geteuid() == 0:
        argv += ["-u", "nobody"]
    log = open(folder / "spamd.log", "wb")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            env=clean_env(HOME=str(folder)))
    try:
        deadline = time.monotonic() + START_SECONDS
        while subprocess.run([SPAMC, "-d", "127.0.0.1", "-p", str(port), "-K"],
                             capture_output=True).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"spamd did not answer spamc -K: {argv}\n"
                            + (folder / "spamd.log").read_text(errors="replace"))
            time.sleep(0.2)             # spamd has no readiness signal but its answer
        yield spamc_for(str(folder / "bin"), port)
    finally:
        proc.terminate()                # spamd stops its children on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        reap(proc)
        log.close()


def with_spamc(masq, folder):
    """The folder's environment with `folder` first in PATH."""
    return masq.env(PATH=f"{folder}:{masq.env()['PATH']}")


def deliver(masq, env, message, sender="alice@test.example"):
    enqueue(masq, message, sender, ["bob@localhost"], env=env).ok()
    masq.run(["masq-send", "--once"], env=env).ok()


def mail(masq, user):
    folder = os.path.join(masq.dir, "mail", user)
    return list(masq.maildir(user)) if os.path.exists(folder) else []


def test_the_first_recipe_holds_gtube(masq, spamd):
    masq.config(held_recipe())
    [command] = tomllib.loads(held_recipe())["queue"]["filters"]
    deliver(masq, with_spamc(masq, spamd), GTUBE)
    assert len(masq.queue_ids("hold")) == 1 and masq.queue_ids("incoming") == []
    assert mail(masq, "bob") == [] and mail(masq, "alice") == []
    log = masq.log()
    assert f"filter {command}: exit 1" in log and "status=hold" in log, log


@pytest.mark.parametrize("which", ["held", "refuse"])
def test_a_clean_message_is_delivered_with_its_x_spam_headers(masq, spamd, tmp_path, which):
    masq.config(held_recipe() if which == "held" else refuse_recipe(str(tmp_path)))
    deliver(masq, with_spamc(masq, spamd), CLEAN)
    [msg] = mail(masq, "bob")
    assert msg["X-Spam-Status"].startswith("No, score="), msg["X-Spam-Status"]
    assert msg["X-Spam-Checker-Version"].startswith("SpamAssassin ")
    assert msg["Subject"] == "lunch on friday"
    assert msg.as_bytes().endswith(b"\n\nShall we meet at noon, at the usual place?\n\nAlice\n")
    assert masq.queue_ids() == []


def test_the_second_recipe_bounces_gtube_from_a_local_sender(masq, spamd, tmp_path):
    masq.config(refuse_recipe(str(tmp_path)))
    deliver(masq, with_spamc(masq, spamd), GTUBE)
    assert mail(masq, "bob") == []
    [report] = mail(masq, "alice")          # the bounce went through spamc too, and passed
    text = report.as_bytes()
    assert b"<bob@localhost>: message refused as spam (5.7.1)" in text, text
    assert b"GTUBE-STANDARD" not in text        # headers only come back
    assert masq.queue_ids() == []
    assert "status=bounced" in masq.log()


def test_the_second_recipe_drops_gtube_from_outside(masq, spamd, tmp_path, daemon_listens):
    """From a stranger: no bounce to alice, whose address the spammer put in MAIL FROM."""
    masq.config(refuse_recipe(str(tmp_path)))
    env = with_spamc(masq, spamd)
    dialogue = (b"EHLO spammer.example\r\nMAIL FROM:<alice@test.example>\r\n"
                b"RCPT TO:<bob@localhost>\r\nDATA\r\n"
                + GTUBE.replace(b"\n", b"\r\n") + b".\r\nQUIT\r\n")
    out = masq.run(["masq-smtpd"], input=dialogue, env=dict(env, TCPREMOTEIP="203.0.113.5"))
    assert b"250 2.0.0" in out.ok().out, out
    masq.run(["masq-send", "--once"], env=env).ok()
    assert mail(masq, "bob") == [] and mail(masq, "alice") == []
    assert masq.queue_ids() == []
    log = masq.log()
    assert "message refused as spam (5.7.1): from outside, not bounced" in log, log
    assert "status=dropped" in log and "bounce=" not in log


@pytest.mark.parametrize("which", ["held", "refuse"])
def test_without_spamd_both_recipes_defer(masq, tmp_path, which):
    masq.config(held_recipe() if which == "held" else refuse_recipe(str(tmp_path)))
    env = with_spamc(masq, spamc_for(str(tmp_path / "bin"), free_port()))   # nobody there
    deliver(masq, env, GTUBE)
    assert len(masq.queue_ids("incoming")) == 1 and mail(masq, "bob") == []
    assert "status=deferred" in masq.log()
