"""masq-smtpd under arbitrary bytes: no traceback, well-formed replies, no partial message."""
import os
import subprocess

import pytest
from conftest import BIN, clean_env, listen_trigger, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PIECES = [b"EHLO c\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<bob@test.example>\r\nDATA\r\n",
          b"EHLO c\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<bob@test.example>\r\nBDAT 7\r\n",
          b"EHLO c\r\n", b"HELO c\r\n", b"MAIL FROM:<a@c.example>\r\n",
          b"MAIL FROM:<a@c.example> SIZE=10 BODY=8BITMIME SMTPUTF8\r\n",
          b"RCPT TO:<bob@test.example>\r\n", b"RCPT TO:<x@elsewhere.example>\r\n",
          b"DATA\r\n", b"BDAT 5\r\n", b"BDAT 3 LAST\r\n", b"BDAT x\r\n", b".\r\n", b"\r\n.\r\n",
          b"\n.\n", b"\r.\r", b"..\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"\r", b"\n",
          b"\x00", b"\xff\xfe", b"x" * 600, "é".encode()]

stream = st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=40)), max_size=30)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fuzz") / "masq")
    run(["masq-setup", "local-only", path, "--hostname", "test.example"]).ok()
    with open(os.path.join(path, "masq.toml"), "a") as f:
        f.write("\n[smtpd]\ncommand_timeout = 5\ndata_timeout = 5\nmax_errors = 1000\n")
    # a reader on the trigger, as a daemon: messages stay queued (no queue runs)
    fd = listen_trigger(os.path.join(path, "spool"))
    yield path
    os.close(fd)


def queued(folder):
    spool = os.path.join(folder, "spool")
    return {n for s in ("incoming", "tmp") for n in os.listdir(os.path.join(spool, s))}


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=stream)
def test_any_bytes_give_well_formed_replies_and_no_partial_message(folder, pieces):
    data = b"".join(pieces)
    before = queued(folder)
    p = subprocess.run([os.path.join(BIN, "masq-smtpd")], input=data, capture_output=True,
                       timeout=30, env=clean_env(MASQ_CONF=os.path.join(folder, "masq.toml"),
                                                 TCPREMOTEIP="192.0.2.1"))
    assert p.returncode == 0, p
    assert b"Traceback" not in p.stderr and b"internal error" not in p.stderr, p.stderr
    assert p.stdout.endswith(b"\r\n"), p.stdout
    lines = p.stdout.split(b"\r\n")[:-1]
    for line in lines:
        assert len(line) >= 3 and line[:3].isdigit() and line[3:4] in (b" ", b"-"), lines
        assert line[:1] in b"2345", lines
    assert lines[0] == b"220 test.example ESMTP masq"
    new = queued(folder) - before
    accepted = sum(line.startswith(b"250 2.0.0 Ok: queued as ") for line in lines)
    assert len(new) == accepted, (lines, new)
    spool = os.path.join(folder, "spool")
    for qid in new:         # every new file is a whole message in incoming/
        assert os.path.exists(os.path.join(spool, "incoming", qid))
        assert run(["masq-queue", "show", qid],
                   env=clean_env(MASQ_CONF=os.path.join(folder, "masq.toml"))).rc == 0
