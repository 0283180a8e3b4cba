"""The pipe transport: a route whose mail goes to a command (masqmail's route `pipe`).

The command on the other end is a gateway-like script that writes each
message it gets into a UUCP-style spool folder (a D. data file and an X.
execute file holding its argv and environment, each fsynced and renamed into
place), or the `rmail` of a second masq folder.  Everything runs through the
folder's own bin/ (sendmail, runq, mailq) as a user would.
"""
import io
import json
import os
import sys
import time

import pytest
from conftest import BIN, Masq, clean_env, enqueue, run

from masq import pipe

MESSAGE = (b"From: Alice <alice@laptop.example>\nTo: bob@uucp.example\nSubject: via uucp\n"
           b"Message-ID: <1@laptop.example>\nDate: Mon, 07 Dec 2026 05:00:00 +0000\n\n"
           b"From here on a line that an mbox would quote.\n.a line with a dot\n"
           b"\xc3\xa9t\xc3\xa9 8-bit\n")

GATEWAY = """#!{python}
import json, os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
spool = os.path.join(here, "uucp")
try:
    with open(os.path.join(here, "mode")) as f:
        mode = f.read().split()
except FileNotFoundError:
    mode = []
data = sys.stdin.buffer.read()
if mode[:1] == ["hang"]:
    with open(os.path.join(here, "hung"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)
if mode[:1] == ["exit"]:
    sys.stdout.write("gateway: some chatter on stdout\\n")
    sys.stderr.write("gateway: " + " ".join(mode[2:]) + "\\n")
    sys.exit(int(mode[1]))
os.makedirs(spool, exist_ok=True)
name = "%d.%d" % (time.time_ns(), os.getpid())

def put(prefix, blob):
    tmp = os.path.join(spool, "tmp." + prefix + name)
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(spool, prefix + name))

put("D.", data)
put("X.", json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ)}}).encode())
fd = os.open(spool, os.O_RDONLY)
os.fsync(fd)
os.close(fd)
"""


class Gateway:
    """The script's folder: its spool of D./X. files and its mode file."""

    def __init__(self, folder):
        self.dir = folder
        self.path = os.path.join(folder, "gateway")
        os.makedirs(folder)
        with open(self.path, "w") as f:
            f.write(GATEWAY.format(python=sys.executable))
        os.chmod(self.path, 0o755)

    def mode(self, *words):
        path = os.path.join(self.dir, "mode")
        if words:
            with open(path, "w") as f:
                f.write(" ".join(words))
        elif os.path.exists(path):
            os.unlink(path)

    def jobs(self):
        """[(data bytes, {"argv", "env"})] for each message the gateway took, in order."""
        spool = os.path.join(self.dir, "uucp")
        if not os.path.isdir(spool):
            return []
        names = sorted(n[2:] for n in os.listdir(spool) if n.startswith("X."))
        out = []
        for name in names:
            with open(os.path.join(spool, "D." + name), "rb") as f:
                data = f.read()
            with open(os.path.join(spool, "X." + name)) as f:
                out.append((data, json.load(f)))
        return out


@pytest.fixture
def laptop(tmp_path):
    folder = str(tmp_path / "laptop")
    run(["masq-setup", "local-only", folder, "--hostname", "laptop.example"]).ok()
    return Masq(folder), Gateway(str(tmp_path / "gw"))


def pipe_route(masq, command, **keys):
    """[route.uucp] with this pipe (a TOML literal string) and keys (TOML text)."""
    masq.config("[route.uucp]\n" + f"pipe = '{command}'\n"
                + "".join(f"{k} = {v}\n" for k, v in keys.items()))


def cmd(masq, name, *args, input=b""):
    """A program of the folder's bin/: no MASQ_CONF, it finds its masq.toml itself."""
    return run([masq.bin(name), *args], input=input, env=clean_env())


def send(masq, *rcpts, message=MESSAGE):
    cmd(masq, "sendmail", "-odq", "-f", "alice@laptop.example", *rcpts, input=message).ok()


def stored(masq):
    """The one queued message's bytes as the spool holds them."""
    from masq import spool
    [qid] = masq.queue_ids()
    msg = spool.Message(spool.Spool(masq.spool), "active" if os.path.exists(
        os.path.join(masq.spool, "active", qid)) else "incoming", qid)
    with msg.open_data() as f:
        return qid, f.read()


def test_the_gateway_gets_the_message_once_byte_for_byte_with_masqmails_environment(laptop):
    masq, gw = laptop
    pipe_route(masq, f"{gw.path} {{sender}} {{rcpt}}")
    send(masq, "bob@uucp.example")
    qid, data = stored(masq)
    cmd(masq, "runq").ok()
    [(got, job)] = gw.jobs()
    assert got == data and MESSAGE.split(b"\n\n", 1)[1] in got
    assert job["argv"] == ["alice@laptop.example", "bob@uucp.example"]
    env = job["env"]
    assert {k: env.get(k) for k in ("SENDER", "RETURN_PATH", "SENDER_LOCAL", "SENDER_DOMAIN",
                                    "RECIPIENT", "LOCAL_PART", "DOMAIN", "USER", "LOGNAME",
                                    "MESSAGE_ID", "QUALIFY_DOMAIN")} == {
        "SENDER": "alice@laptop.example", "RETURN_PATH": "alice@laptop.example",
        "SENDER_LOCAL": "alice", "SENDER_DOMAIN": "laptop.example",
        "RECIPIENT": "bob@uucp.example", "LOCAL_PART": "bob", "DOMAIN": "uucp.example",
        "USER": "bob", "LOGNAME": "bob", "MESSAGE_ID": qid, "QUALIFY_DOMAIN": "laptop.example"}
    assert "MASQ_CONF" not in env and "HOME" not in env     # wiped, as masqmail does
    assert masq.queue_ids() == []
    assert "relay=uucp" in masq.log() and "status=sent (piped to gateway)" in masq.log()
    cmd(masq, "runq").ok()
    assert len(gw.jobs()) == 1                               # once
    assert f"route uucp, piped to {gw.path}".encode() in cmd(
        masq, "sendmail", "-bv", "bob@uucp.example").ok().out   # not "the MX"


@pytest.mark.parametrize("per_recipient", [True, False])
def test_once_per_recipient_or_once_with_all(laptop, per_recipient):
    masq, gw = laptop
    pipe_route(masq, f"{gw.path} -f {{sender}} -- {{rcpt}}",
               pipe_per_recipient=str(per_recipient).lower())
    rcpts = ["bob@uucp.example", "carol@uucp.example", "dave@gw.example"]
    send(masq, *rcpts)
    cmd(masq, "runq").ok()
    jobs = gw.jobs()
    if per_recipient:
        assert sorted(job["argv"][3] for _, job in jobs) == sorted(rcpts)
        assert all(len(job["argv"]) == 4 and job["env"]["RECIPIENT"] == job["argv"][3]
                   for _, job in jobs)
    else:
        [(_, job)] = jobs
        assert job["argv"] == ["-f", "alice@laptop.example", "--", *rcpts]
        assert "RECIPIENT" not in job["env"]     # one command, several recipients
    assert masq.queue_ids() == []


def test_exit_75_defers_mailq_shows_it_and_a_later_runq_delivers(laptop):
    masq, gw = laptop
    pipe_route(masq, f"{gw.path} {{rcpt}}")
    gw.mode("exit", "75", "spool", "busy")
    send(masq, "bob@uucp.example")
    cmd(masq, "runq").ok()
    assert gw.jobs() == [] and len(masq.queue_ids()) == 1
    listing = cmd(masq, "mailq").ok().out
    assert b"gateway: spool busy" in listing, listing
    assert "status=deferred" in masq.log()
    gw.mode()
    cmd(masq, "runq").ok()
    assert len(gw.jobs()) == 1 and masq.queue_ids() == []


def test_exit_111_defers_too(laptop):
    masq, gw = laptop
    pipe_route(masq, f"{gw.path} {{rcpt}}")
    gw.mode("exit", "111", "try", "later")
    send(masq, "bob@uucp.example")
    cmd(masq, "runq").ok()
    assert len(masq.queue_ids()) == 1 and b"gateway: try later" in cmd(masq, "mailq").out


def test_exit_1_bounces_with_the_stderr_line(laptop):
    masq, gw = laptop
    pipe_route(masq, f"{gw.path} {{rcpt}}")
    gw.mode("exit", "1", "no", "such", "uucp", "host")
    send(masq, "bob@uucp.example")
    cmd(masq, "runq").ok()
    assert "status=bounced" in masq.log() and "gateway: no such uucp host" in masq.log()
    cmd(masq, "runq").ok()              # the bounce, to the local sender
    [report] = list(masq.maildir("alice"))
    assert b"gateway: no such uucp host" in report.as_bytes()
    assert gw.jobs() == [] and masq.queue_ids() == []


def test_a_hanging_command_is_killed_at_pipe_timeout_and_the_message_deferred(laptop):
    masq, gw = laptop
    pipe_route(masq, f"{gw.path} {{rcpt}}", pipe_timeout=2)
    gw.mode("hang")
    send(masq, "bob@uucp.example")
    started = time.monotonic()
    cmd(masq, "runq").ok()
    assert time.monotonic() - started < 60           # 2 s, and a generous margin
    with open(os.path.join(gw.dir, "hung")) as f:
        pid = int(f.read())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)                              # killed, not left behind
    assert len(masq.queue_ids()) == 1
    assert b"timed out after 2.0 seconds" in cmd(masq, "mailq").ok().out


def test_an_address_never_becomes_an_extra_argument_or_an_option(laptop):
    masq, gw = laptop
    pipe_route(masq, f"{gw.path} {{sender}} {{rcpt}}")
    odd = ['"-x"@uucp.example', '"a b -c"@uucp.example', "-y@uucp.example"]
    enqueue(masq, MESSAGE, "alice@laptop.example", odd).ok()
    cmd(masq, "runq").ok()
    argvs = sorted(job["argv"] for _, job in gw.jobs())
    assert argvs == sorted([["alice@laptop.example", odd[0]], ["alice@laptop.example", odd[1]]])
    # -y@... would begin a word with "-" and no "--" before it: refused, said why
    assert "to=<-y@uucp.example>" in masq.log()
    line = next(x for x in masq.log().splitlines() if "to=<-y@uucp.example>" in x)
    assert "status=bounced" in line and "write -- before {rcpt}" in line


def dash_words(gw):
    """The arguments the gateway got that begin with "-"."""
    return [a for _, job in gw.jobs() for a in job["argv"] if a.startswith("-")]


def bounced_line(masq, rcpt):
    return next(x for x in masq.log().splitlines() if f"to=<{rcpt}>" in x)


@pytest.mark.parametrize("word", [
    "{sender}{local}",                  # the null sender's "" before the local part
    "{sender}{rcpt}",                   # x{rcpt} where x is empty
])
def test_an_empty_value_before_a_recipients_never_lets_it_begin_an_option(laptop, word):
    masq, gw = laptop
    pipe_route(masq, f"{gw.path} {word} x{{rcpt}}")
    rcpts = ["-oQ/tmp/x@uucp.example", "bob@uucp.example"]
    enqueue(masq, MESSAGE, "", rcpts).ok()
    cmd(masq, "runq").ok()
    assert dash_words(gw) == [] and len(gw.jobs()) == 1     # bob's only
    line = bounced_line(masq, rcpts[0])
    assert "status=bounced" in line and f"write -- before {word}" in line, line


def test_masq_smtp_without_a_queue_id_checks_the_words_its_empty_id_begins(laptop):
    masq, gw = laptop
    pipe_route(masq, f"{gw.path} {{id}}{{rcpt}}", pipe_per_recipient="false")
    r = run([os.path.join(BIN, "masq-smtp"), "--route", "uucp", "--", "alice@laptop.example",
             "-oQ/tmp/x", "bob@uucp.example"], input=MESSAGE, env=masq.env()).ok()
    first, second = r.out.decode().splitlines()
    assert first.startswith("D the address <-oQ/tmp/x> makes the word {id}{rcpt} begin"), r
    assert second == "K piped to gateway"
    assert [job["argv"] for _, job in gw.jobs()] == [["bob@uucp.example"]]


def test_a_bounce_to_a_sender_beginning_with_a_dash_never_gives_it_as_an_option(laptop):
    masq, gw = laptop
    pipe_route(masq, f"{gw.path} {{sender}}{{local}}")
    enqueue(masq, MESSAGE, "-oQ/tmp/x@uucp.example", ["bob@uucp.example"]).ok()
    cmd(masq, "runq").ok()          # refused for its sender: a bounce to it, from <>
    line = bounced_line(masq, "bob@uucp.example")
    assert "status=bounced (the sender <-oQ/tmp/x@uucp.example> " in line, line
    cmd(masq, "runq").ok()          # the bounce, by the same route
    assert dash_words(gw) == [] and gw.jobs() == []
    assert "makes the word {sender}{local} begin with '-'" in line, line
    line = bounced_line(masq, "-oQ/tmp/x@uucp.example")
    assert "the address <-oQ/tmp/x@uucp.example> makes the word {sender}{local}" in line, line


def test_a_word_beginning_with_a_dash_or_after_a_double_dash_may_take_one(laptop):
    masq, gw = laptop
    pipe_route(masq, f"{gw.path} -f{{sender}} -- {{sender}}{{local}}")
    enqueue(masq, MESSAGE, "-s@laptop.example", ["-y@uucp.example"]).ok()
    cmd(masq, "runq").ok()
    assert [job["argv"] for _, job in gw.jobs()] == [
        ["-f-s@laptop.example", "--", "-s@laptop.example-y"]]


def test_after_a_double_dash_an_address_with_a_dash_is_delivered(laptop):
    masq, gw = laptop
    pipe_route(masq, f"{gw.path} -f {{sender}} -- {{rcpt}}", pipe_per_recipient="false")
    rcpts = ["-y@uucp.example", '"a b"@uucp.example']
    enqueue(masq, MESSAGE, "alice@laptop.example", rcpts).ok()
    cmd(masq, "runq").ok()
    [(_, job)] = gw.jobs()
    assert job["argv"] == ["-f", "alice@laptop.example", "--", *rcpts]


def test_fromline_and_fromhack(laptop):
    masq, gw = laptop
    pipe_route(masq, f"{gw.path} {{rcpt}}", pipe_fromline="true", pipe_fromhack="true")
    send(masq, "bob@uucp.example")
    _, data = stored(masq)
    cmd(masq, "runq").ok()
    [(got, _)] = gw.jobs()
    first, rest = got.split(b"\n", 1)
    assert first.startswith(b"From alice@laptop.example ") and first.endswith(
        time.strftime("%Y").encode())
    assert rest == data.replace(b"\nFrom here", b"\n>From here")


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_fromhack_quotes_every_from_line_whatever_the_reads(size):
    data = b"From a\nFrom b\n>From c\nFro\nFrom\nx From d\nFrom "
    hack = pipe.FromHack(io.BufferedReader(io.BytesIO(data), 1))
    out = b""
    while chunk := hack.read(size):
        out += chunk
    assert out == b">From a\n>From b\n>From c\nFro\nFrom\nx From d\n>From "


def test_rmail_of_a_second_masq_on_the_other_end_gets_it_once_byte_for_byte(laptop, tmp_path):
    masq, _ = laptop
    folder = str(tmp_path / "uucphost")
    run(["masq-setup", "local-only", folder, "--hostname", "uucp.example"]).ok()
    other = Masq(folder)
    # rmail takes the sender from the From line, as UUCP's rmail does
    pipe_route(masq, f"{other.bin('rmail')} -odq -- {{rcpt}}", pipe_fromline="true",
               pipe_per_recipient="false")
    send(masq, "bob@uucp.example", "carol@uucp.example")
    _, data = stored(masq)
    cmd(masq, "runq").ok()
    assert masq.queue_ids() == [] and "status=sent (piped to rmail)" in masq.log()
    cmd(other, "runq").ok()
    for user in ("bob", "carol"):
        [got] = list(other.maildir(user))
        assert got["Return-Path"] == "<alice@laptop.example>"
        assert got["Message-ID"] == "<1@laptop.example>"
    with open(os.path.join(other.dir, "mail", "bob", "new",
                           os.listdir(os.path.join(other.dir, "mail", "bob", "new"))[0]),
              "rb") as f:
        raw = f.read()
    assert raw.endswith(b"\n\n" + data.split(b"\n\n", 1)[1])     # the body, byte for byte
    assert raw.count(b"Subject: via uucp") == 1
    cmd(masq, "runq").ok()
    cmd(other, "runq").ok()
    assert len(list(other.maildir("bob"))) == 1                  # once


def test_masq_smtp_with_a_pipe_route_runs_the_command(laptop):
    masq, gw = laptop
    pipe_route(masq, f"{gw.path} {{sender}} {{rcpt}}", pipe_per_recipient="false")
    r = run([os.path.join(BIN, "masq-smtp"), "--route", "uucp", "--", "alice@laptop.example",
             "bob@uucp.example", "carol@uucp.example"], input=MESSAGE, env=masq.env()).ok()
    assert r.out == b"K piped to gateway\nK piped to gateway\n"
    [(got, job)] = gw.jobs()
    assert got == MESSAGE
    assert job["argv"] == ["alice@laptop.example", "bob@uucp.example", "carol@uucp.example"]


def test_a_sender_without_a_domain_has_an_empty_sender_domain(laptop):
    """SENDER_DOMAIN is the sender's domain (masq.address.split), never the whole sender."""
    masq, gw = laptop
    pipe_route(masq, f"{gw.path} {{rcpt}}")
    for sender in ("alice", "alice@laptop.example"):
        run([os.path.join(BIN, "masq-smtp"), "--route", "uucp", "--", sender,
             "bob@uucp.example"], input=MESSAGE, env=masq.env()).ok()
    [(_, bare), (_, full)] = gw.jobs()
    assert [(job["env"]["SENDER_LOCAL"], job["env"]["SENDER_DOMAIN"]) for job in (bare, full)] \
        == [("alice", ""), ("alice", "laptop.example")]


def test_a_command_that_does_not_parse_defers_every_message_of_the_run(laptop):
    masq, gw = laptop
    pipe_route(masq, f'{gw.path} "{{rcpt}}')     # a quote never closed
    send(masq, "bob@uucp.example")
    send(masq, "carol@uucp.example")
    cmd(masq, "runq").ok()
    assert len(masq.queue_ids()) == 2 and gw.jobs() == []
    assert cmd(masq, "mailq").ok().out.count(b"[route.uucp] pipe does not parse") == 2


def test_a_missing_command_defers_or_bounces_with_connect_error_fail(laptop, tmp_path):
    masq, _ = laptop
    pipe_route(masq, str(tmp_path / "nowhere") + " {rcpt}")
    send(masq, "bob@uucp.example")
    cmd(masq, "runq").ok()
    assert b"unable to run" in cmd(masq, "mailq").ok().out
    masq.set_config(open(masq.conf).read() + "connect_error_fail = true\n")
    cmd(masq, "runq").ok()
    assert "status=bounced" in masq.log() and "(connect_error_fail)" in masq.log()


@pytest.mark.parametrize("other", ["host = \"smtp.isp.example\"", "wrapper = \"socat - TCP:x:25\""])
def test_pipe_with_host_or_wrapper_is_a_config_error_with_its_line(laptop, other):
    masq, gw = laptop
    pipe_route(masq, f"{gw.path} {{rcpt}}")
    masq.config(other)
    lines = open(masq.conf).read().splitlines()
    number = next(i for i, line in enumerate(lines, 1) if line.startswith("pipe = "))
    r = cmd(masq, "sendmail", "-bv", "bob@uucp.example")
    assert r.rc == 78, r
    assert f"{masq.conf}:{number}: route.uucp has both pipe and {other.split()[0]}".encode() \
        in r.err, r
