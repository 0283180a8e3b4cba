"""AUTH limits: failures per client address shared by all sessions, checks at once, checkpassword.

Sessions run on pipes (AUTH offered there by auth_without_tls), each with
its own TCPREMOTEIP, as tcpserver would set it: 192.0.2.7 is the guesser,
192.0.2.8 another client.  The password file is the real `masq-setup
passwd`'s; the checkpassword programs are small Python scripts that note
each run in a file, so a test can count the checks that ran.
"""
import base64
import os
import subprocess
import sys
import time

import pytest
from smtpd_helpers import reply_lines

PASSWORD = "correct horse 42"
GUESSER, OTHER = "192.0.2.7", "192.0.2.8"
LOCKED = "454 4.7.0 Error: too many failed authentications from your address, try later"
FAILED = "535 5.7.8 Error: authentication credentials invalid"
OK = "235 2.7.0 Authentication successful"

CHECKPASSWORD = """#!{python}
import os, sys, time
data = os.read(3, 4096)
user, password, stamp, rest = data.split(b"\\0")
with open({log!r}, "ab") as f:
    f.write(b"start %f " % time.time() + data.replace(b"\\0", b"|") + b"\\n")
time.sleep({sleep})
with open({log!r}, "ab") as f:
    f.write(b"end %f\\n" % time.time())
if password == b"temporary":
    sys.exit(111)
sys.exit(0 if (user, password) == (b"alice", b"right") else 1)
"""


pytestmark = pytest.mark.usefixtures("daemon_listens")


@pytest.fixture
def auth(masq):
    masq.config("[smtpd]\nauth_without_tls = true\nrelay_nets = []\nmax_errors = 20")
    masq.run(["masq-setup", "passwd", masq.dir, "alice"], input=PASSWORD.encode() + b"\n").ok()
    return masq


def checkpassword(masq, sleep=0):
    """A checkpassword script in the folder; the file where it notes its runs."""
    log = os.path.join(masq.dir, "checks.log")
    path = os.path.join(masq.dir, "checkpw")
    with open(path, "w") as f:
        f.write(CHECKPASSWORD.format(python=sys.executable, log=log, sleep=sleep))
    os.chmod(path, 0o755)
    return log


def plain(user, password):
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def dialogue(*commands):
    return b"EHLO client.example\r\n" + b"".join(c.encode() + b"\r\n" for c in commands) \
        + b"QUIT\r\n"


def start(masq, ip):
    return subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "masq-smtpd")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=masq.env(TCPREMOTEIP=ip))


def session(masq, ip, *commands):
    """Reply lines of one session from `ip` (EHLO, commands, QUIT), and its stderr."""
    r = masq.run(["masq-smtpd"], input=dialogue(*commands), env=masq.env(TCPREMOTEIP=ip))
    assert r.rc == 0, r
    return reply_lines(r.out), r.err.decode()


def parallel(masq, ip, sessions, commands):
    """Run `sessions` sessions from `ip` at once; all their reply lines."""
    procs = [start(masq, ip) for _ in range(sessions)]
    lines = []
    for p in procs:
        out, _ = p.communicate(dialogue(*commands), timeout=120)
        assert p.returncode == 0
        lines += reply_lines(out)
    return lines


def test_50_wrong_passwords_in_10_sessions_get_10_checks_then_454(auth):
    lines = parallel(auth, GUESSER, 10, [plain("alice", f"guess{i}") for i in range(5)])
    assert lines.count(FAILED) == 10                # exactly auth_failures checks ran
    assert lines.count(LOCKED) == 40                # the rest: refused without one
    # the right password from that address is refused too, at once
    start_time = time.monotonic()
    lines, _ = session(auth, GUESSER, plain("alice", PASSWORD))
    assert LOCKED in lines and OK not in lines
    assert time.monotonic() - start_time < 1        # no scrypt, no failure delay
    assert f"auth: client={GUESSER} refused: locked out after 10 failures" in auth.log()
    # another address logs in as usual
    start_time = time.monotonic()
    lines, _ = session(auth, OTHER, plain("alice", PASSWORD))
    assert OK in lines
    assert time.monotonic() - start_time < 1


def test_checkpassword_runs_only_up_to_the_limit(auth):
    log = checkpassword(auth)
    auth.config('checkpassword = "checkpw"\nauth_failures = 5')
    lines = parallel(auth, GUESSER, 4, [plain("alice", "wrong")] * 5)
    assert lines.count(FAILED) == 5 and lines.count(LOCKED) == 15
    with open(log) as f:
        assert len([x for x in f if x.startswith("start ")]) == 5


def test_a_success_forgets_the_failures_of_the_address(auth):
    auth.config("auth_failures = 3")
    for _ in range(2):
        lines, _ = session(auth, GUESSER, plain("alice", "wrong"), plain("alice", "wrong"),
                           plain("alice", PASSWORD))
        assert lines[-3:-1] == [FAILED, OK] and lines.count(FAILED) == 2


def test_the_lockout_ends(auth):
    auth.config("auth_failures = 2\nauth_lockout = 2")
    lines, _ = session(auth, GUESSER, *[plain("alice", "wrong")] * 3)
    assert lines.count(FAILED) == 2 and lines.count(LOCKED) == 1
    time.sleep(1.5)                             # the lockout's length is the behaviour
    lines, _ = session(auth, GUESSER, plain("alice", PASSWORD))
    assert OK in lines


def test_no_limit_with_auth_failures_0(auth):
    auth.config("auth_failures = 0")
    lines = parallel(auth, GUESSER, 3, [plain("alice", "wrong")] * 2)
    assert lines.count(FAILED) == 6
    assert not os.path.exists(os.path.join(auth.spool, "anvil.db"))


def test_checkpassword_gets_user_password_and_timestamp_on_fd_3(auth):
    log = checkpassword(auth)
    auth.config('checkpassword = "checkpw"')
    lines, _ = session(auth, GUESSER, plain("alice", "right"), "MAIL FROM:<a@client.example>",
                       "RCPT TO:<carol@remote.example>")
    assert lines[-4:] == [OK, "250 2.1.0 Ok", "250 2.1.5 Ok", "221 2.0.0 Bye"]
    with open(log) as f:
        first = f.readline().split(" ", 2)[2]
    user, password, stamp, rest = first.rstrip("\n").split("|")
    assert (user, password, rest) == ("alice", "right", "")
    assert stamp.startswith("<") and stamp.endswith("@test.example>")


def test_checkpassword_exit_codes(auth):
    checkpassword(auth)
    auth.config('checkpassword = "checkpw"')
    lines, err = session(auth, GUESSER, plain("alice", "bad"), plain("alice", "temporary"),
                         plain("alice", "right"))
    assert lines[-4:] == [FAILED, "454 4.7.0 Temporary authentication failure", OK,
                          "221 2.0.0 Bye"]
    assert "checkpw exited 111" in err


def test_a_missing_checkpassword_offers_no_auth(auth):
    auth.config('checkpassword = "no-such-program"')
    lines, err = session(auth, GUESSER)
    assert not any("AUTH" in line for line in lines)
    assert "no AUTH: checkpassword" in err and "is not an executable file" in err


def test_one_check_at_a_time_with_auth_max_concurrent_1(auth):
    log = checkpassword(auth, sleep=0.3)
    auth.config('checkpassword = "checkpw"\nauth_max_concurrent = 1')
    procs = [start(auth, f"192.0.2.{10 + i}") for i in range(4)]
    for p in procs:
        p.stdin.write(dialogue(plain("alice", "right")))
        p.stdin.close()
    for p in procs:
        assert OK in reply_lines(p.stdout.read())
        p.wait(timeout=60)
        p.stdout.close()
        p.stderr.close()
    with open(log) as f:
        times = [(w, float(t)) for w, t, *_ in (line.split(" ", 2) for line in f)]
    times.sort(key=lambda x: x[1])
    assert [w for w, _ in times] == ["start", "end"] * 4     # never two at once


def test_an_ipv6_client_counts_by_its_64(auth):
    """From the review: counted per address, a host with a /64 had 2**64 tries."""
    auth.config("auth_failures = 3")
    for n in range(3):          # three addresses of one /64, one wrong password each
        session(auth, f"2001:db8:1:2::{n + 1}", plain("alice", "wrong"))
    lines, _ = session(auth, "2001:db8:1:2::99", plain("alice", PASSWORD))
    assert LOCKED in lines and OK not in lines
    lines, _ = session(auth, "2001:db8:1:3::1", plain("alice", PASSWORD))
    assert OK in lines           # the next /64 is another client
