"""masq-inject: sendmail, mailq, runq, newaliases, rmail and mailrm, run for real.

Each test runs the links in a folder made by masq-setup and checks the exit
code and what is (or is not) left in the spool.
"""
import os
import pwd
import resource
import time

import pytest

from conftest import clean_env, listen_trigger, run

MESSAGE = b"Subject: hello\nTo: bob@localhost\n\nbody line\n"


def queued(masq):
    """The one queued message: (envelope and trace lines, data)."""
    ids = masq.queue_ids()
    assert len(ids) == 1, ids
    shown = masq.run(["masq-queue", "show", ids[0]]).ok().out
    meta, _, data = shown.partition(b"\n\n")
    return meta.decode(), data


def field_lines(data):
    """The header section's lines, without the Received line masq-queue adds."""
    head = data.split(b"\n\n", 1)[0].split(b"\n")
    assert head[0].startswith(b"Received: by test.example (masq, from user ")
    return head[1:]


def count(data, name):
    head = data.split(b"\n\n", 1)[0]
    return sum(1 for line in head.split(b"\n") if line.lower().startswith(name.lower() + b":"))


def nothing_queued(masq):
    assert masq.queue_ids() == []
    assert os.listdir(os.path.join(masq.spool, "tmp")) == []
    masq.run(["masq-queue", "check"]).ok()


def sendmail(masq, args, message=MESSAGE, name="sendmail", env=None, **kw):
    return run([masq.bin(name), *args], input=message, env=env or clean_env(), **kw)


def after_added(data):
    """The data after the Received line and the Date, Message-ID, From lines we add."""
    lines = data.split(b"\n")
    i = 1
    while lines[i].split(b":")[0] in (b"Date", b"Message-ID", b"From"):
        i += 1
    return b"\n".join(lines[i:])


# --- help and usage -----------------------------------------------------------

def test_help_exits_0_and_shows_the_usage(masq):
    r = sendmail(masq, ["--help"]).ok()
    assert b"Usage:\n  sendmail [-t] [-i]" in r.out


@pytest.mark.parametrize("args, text", [
    (["-X", "bob"], b"unknown option -X"),
    (["--verbose", "bob"], b"unknown option --verbose"),
    (["-q5m"], b"-q5m is not supported"),
    (["-bd"], b"-bd is not supported"),
    (["-bp", "-q"], b"an operation mode was already given"),
    (["-f"], b"option -f needs a value"),
    (["-bp", "bob"], b"-bp takes no addresses"),
    (["-bv"], b"-bv needs at least one ADDRESS"),
])
def test_bad_command_line_is_64_with_usage_and_queues_nothing(masq, args, text):
    r = sendmail(masq, args)
    assert r.rc == 64, r
    assert text in r.err and b"Usage:" in r.err, r
    nothing_queued(masq)


def test_no_recipients_is_64(masq):
    r = sendmail(masq, [])
    assert r.rc == 64 and b"recipient addresses must be given" in r.err, r
    nothing_queued(masq)


def test_t_finding_no_recipients_is_64(masq):
    r = sendmail(masq, ["-t"], b"Subject: nobody\n\nx\n")
    assert r.rc == 64 and b"no recipient addresses found in the header" in r.err, r
    nothing_queued(masq)


@pytest.mark.parametrize("args, message", [
    (["bob@exa mple..org"], MESSAGE),
    (["a..b@localhost"], MESSAGE),
    (["-t"], b"To: John Smith john@example.org\n\nx\n"),
    (["-f", "a..b@x", "bob"], MESSAGE),
])
def test_bad_address_is_65_naming_it(masq, args, message):
    r = sendmail(masq, args, message)
    assert r.rc == 65, r
    assert b"bad " in r.err and (b"a..b" in r.err or b"John Smith" in r.err
                                 or b"exa" in r.err), r
    nothing_queued(masq)


def test_unknown_o_option_warns_and_is_ignored(masq):
    r = sendmail(masq, ["-oQ/var/spool", "-odq", "bob"]).ok()
    assert b"warning: ignoring unknown option -oQ/var/spool" in r.err
    assert len(masq.queue_ids()) == 1


def test_ignored_flags_are_accepted(masq):
    sendmail(masq, ["-oem", "-oep", "-oee", "-N", "never", "-B", "8BITMIME", "-m",
                    "-odq", "bob"]).ok()
    assert len(masq.queue_ids()) == 1


# --- what is queued -------------------------------------------------------------

@pytest.mark.parametrize("body", [
    b"8-bit: \xe9t\xe9 \xff\xfe\n",
    b"x" * 5000 + b"\n" + b"y" * 5000 + b"\n",
    b"From me at the top of a line\nFrom again\n>From quoted\n",
    b"..two dots\n. dot space\n.x\n",
    b"no newline at the end",
], ids=["8bit", "long-lines", "From-lines", "dot-lines", "no-final-newline"])
def test_message_is_queued_byte_exact_after_added_headers(masq, body):
    message = b"Subject: exact\nTo: bob@localhost\n\n" + body
    sendmail(masq, ["-odq", "bob@localhost"], message).ok()
    meta, data = queued(masq)
    assert after_added(data) == message
    assert "rcpt bob@localhost" in meta and "user " in meta and "proto local" in meta


def test_crlf_input_is_queued_with_lf(masq):
    message = b"Subject: crlf\r\nTo: bob@localhost\r\n\r\nline 1\r\nline 2\r\n"
    sendmail(masq, ["-odq", "bob@localhost"], message).ok()
    _, data = queued(masq)
    assert after_added(data) == message.replace(b"\r\n", b"\n")


@pytest.mark.parametrize("end", [b".\n", b".\r\n", b"."])
def test_lone_dot_ends_input(masq, end):
    message = b"Subject: dot\n\nbefore\n" + end + (b"after\n" if end != b"." else b"")
    sendmail(masq, ["-odq", "bob"], message).ok()
    _, data = queued(masq)
    assert after_added(data) == b"Subject: dot\n\nbefore\n"


@pytest.mark.parametrize("flag", ["-i", "-oi"])
def test_i_keeps_lone_dot_lines(masq, flag):
    message = b"Subject: dot\n\nbefore\n.\nafter\n.\r\n"
    sendmail(masq, [flag, "-odq", "bob"], message).ok()
    _, data = queued(masq)
    assert after_added(data) == message.replace(b"\r\n", b"\n")


def test_lone_dot_in_header_section_ends_input(masq):
    sendmail(masq, ["-odq", "bob"], b"Subject: x\n.\nmore\n").ok()
    _, data = queued(masq)
    assert after_added(data) == b"Subject: x\n"


def test_missing_headers_are_added_once(masq):
    sendmail(masq, ["-odq", "-F", "Bob Example", "bob"], b"Subject: s\n\nbody\n").ok()
    _, data = queued(masq)
    for name in (b"Date", b"Message-ID", b"From", b"Received"):
        assert count(data, name) == 1, (name, data)
    lines = field_lines(data)
    assert lines[0].startswith(b"Date: ")
    assert lines[1].startswith(b"Message-ID: <") and lines[1].endswith(b"@test.example>")
    assert lines[2].startswith(b"From: Bob Example <") and lines[2].endswith(b"@test.example>")


def test_existing_headers_are_kept_and_return_path_dropped(masq):
    message = (b"Return-Path: <forged@example.org>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
               b"Message-ID: <mine@example.org>\nFrom: Me <me@example.org>\n"
               b"Subject: kept\n\nbody\n")
    sendmail(masq, ["-odq", "bob"], message).ok()
    _, data = queued(masq)
    assert count(data, b"Return-Path") == 0
    assert field_lines(data)[0] == b"Date: Mon, 1 Jan 2024 00:00:00 +0000"
    assert data.split(b"\n", 1)[1] == message.split(b"\n", 1)[1]


def test_sender_f_sets_envelope_and_from(masq):
    sendmail(masq, ["-odq", "-f", "alice@example.org", "-F", "Alice, A.", "bob"],
             b"Subject: s\n\nx\n").ok()
    meta, data = queued(masq)
    assert "sender alice@example.org" in meta
    assert b'From: "Alice, A." <alice@example.org>\n' in data


@pytest.mark.parametrize("args", [["-r", "<>"], ["-f<>"], ["-f", ""]])
def test_null_sender(masq, args):
    sendmail(masq, ["-odq", *args, "bob"]).ok()
    meta, _ = queued(masq)
    assert "sender \n" in meta + "\n" or "\nsender\n" in "\n" + meta + "\n"


def test_attached_values_and_grouped_flags(masq):
    message = b"To: carol@localhost\n\nx\n.\ny\n"
    sendmail(masq, ["-oi", "-odq", "-ti", "-falice@example.org", "-FAlice", "bob"],
             message).ok()
    meta, data = queued(masq)
    assert "sender alice@example.org" in meta
    assert "rcpt bob@test.example" in meta and "rcpt carol@localhost" in meta
    assert data.endswith(b"x\n.\ny\n")


def test_unqualified_recipients_get_the_hostname(masq):
    sendmail(masq, ["-odq", "bob", "Carol <carol>, dave@localhost"]).ok()
    meta, _ = queued(masq)
    assert meta.count("rcpt ") == 3
    for rcpt in ("bob@test.example", "carol@test.example", "dave@localhost"):
        assert f"rcpt {rcpt}" in meta


def test_t_takes_to_cc_bcc_adds_arguments_and_removes_bcc(masq):
    message = (b'To: Name <a@localhost>, "Last, First" <b@localhost>\n'
               b"Cc: c@localhost (comment), list: d@localhost, e@localhost;\n"
               b"Bcc: secret@localhost,\n hidden@localhost\nSubject: t\n\nbody\n")
    sendmail(masq, ["-odq", "-t", "arg@localhost", "a@localhost"], message).ok()
    meta, data = queued(masq)
    rcpts = [line[5:] for line in meta.split("\n") if line.startswith("rcpt ")]
    assert [r.split()[0] for r in rcpts] == [
        "arg@localhost", "a@localhost", "b@localhost", "c@localhost", "d@localhost",
        "e@localhost", "secret@localhost", "hidden@localhost"]
    assert b"Bcc" not in data and b"secret" not in data and b"hidden" not in data
    assert after_added(data) == message.replace(
        b"Bcc: secret@localhost,\n hidden@localhost\n", b"")


def test_t_uses_resent_headers_when_present(masq):
    message = (b"To: old@localhost\nResent-To: new@localhost\nResent-Bcc: b@localhost\n"
               b"\nbody\n")
    sendmail(masq, ["-odq", "-t"], message).ok()
    meta, data = queued(masq)
    assert "rcpt new@localhost" in meta and "rcpt b@localhost" in meta
    assert "old@localhost" not in meta and b"Resent-Bcc" not in data


def test_bcc_is_removed_without_t_too(masq):
    sendmail(masq, ["-odq", "bob"], b"Bcc: secret@localhost\nSubject: s\n\nx\n").ok()
    _, data = queued(masq)
    assert b"secret" not in data


@pytest.mark.parametrize("first", [b"hello world\n", b"From alice Mon Jan  1 10:00:00 2024\n",
                                   b"no colon at all\n"])
def test_input_without_header_section_is_all_body(masq, first):
    message = first + b"Subject: not a header now\n\nrest\n"
    sendmail(masq, ["-odq", "bob"], message).ok()
    _, data = queued(masq)
    lines = field_lines(data)
    assert [line.split(b":")[0] for line in lines[:3]] == [b"Date", b"Message-ID", b"From"]
    assert data.split(b"\n\n", 1)[1] == message


def test_header_section_cut_by_a_non_header_line_gets_an_empty_line(masq):
    sendmail(masq, ["-odq", "bob"], b"Subject: s\nthis is body\nmore\n").ok()
    _, data = queued(masq)
    assert after_added(data) == b"Subject: s\n\nthis is body\nmore\n"


@pytest.mark.parametrize("message, line", [
    (b" continued\nSubject: x\n\nbody\n", 1),
    (b"Subject: x\nX-Nul: a\0b\n\nbody\n", 2),
    (b"Subject: x\nS\xfcbject: y\n\nbody\n", 2),
    (b"S\xfcbject: y\n\nbody\n", 1),
])
def test_malformed_header_section_is_65(masq, message, line):
    r = sendmail(masq, ["-odq", "bob"], message)
    assert r.rc == 65, r
    assert f"the header section is malformed at line {line}".encode() in r.err, r
    nothing_queued(masq)


def test_message_over_max_size_is_65(masq):
    masq.set_config(open(masq.conf).read().replace("max_size = 52428800", "max_size = 2000"))
    r = sendmail(masq, ["-odq", "bob"], b"Subject: big\n\n" + b"x" * 5000 + b"\n")
    assert r.rc == 65 and b"larger than the limit of 2000 bytes" in r.err, r
    nothing_queued(masq)
    r = sendmail(masq, ["-odq", "bob"], b"Subject: " + b"h" * 3000 + b"\n\nx\n")
    assert r.rc == 65 and b"header section is larger than 2000 bytes" in r.err, r
    nothing_queued(masq)
    sendmail(masq, ["-odq", "bob"], b"Subject: small\n\nx\n").ok()


def test_full_disk_is_75_and_leaves_nothing(masq):
    masq.run(["masq-queue", "list"]).ok()       # the config cache exists before the limit

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    r = sendmail(masq, ["-odq", "bob"], b"Subject: big\n\n" + b"x" * 100000 + b"\n",
                 preexec_fn=small_files)
    assert r.rc == 75, r
    assert b"sendmail: fatal: unable to write" in r.err and b"File too large" in r.err, r
    nothing_queued(masq)


# --- modes and names ---------------------------------------------------------------

def test_links_find_their_configuration_without_environment(masq):
    env = clean_env()
    assert "MASQ_CONF" not in env
    sendmail(masq, ["-odq", "bob"], env=env).ok()
    assert len(masq.queue_ids()) == 1


@pytest.mark.parametrize("name, args", [("mailq", []), ("sendmail", ["-bp"])])
def test_bp_and_mailq_list_the_queue(masq, name, args):
    assert sendmail(masq, args, name=name).ok().out == b"Mail queue is empty\n"
    sendmail(masq, ["-odq", "-f", "alice@example.org", "bob@localhost"]).ok()
    out = sendmail(masq, args, name=name).ok().out.decode()
    assert masq.queue_ids()[0] in out and "alice@example.org" in out
    assert "bob@localhost" in out


@pytest.mark.parametrize("name, args", [("runq", []), ("sendmail", ["-q"]),
                                        ("sendmail", ["-qo", "isp"]),
                                        ("sendmail", ["-qoisp"])])
def test_q_and_runq_deliver_the_queue(masq, name, args):
    masq.config('[route.isp]\nhost = "127.0.0.1:1"')
    sendmail(masq, ["-odq", "bob@localhost"]).ok()
    assert len(masq.queue_ids()) == 1
    sendmail(masq, args, name=name).ok()
    assert masq.queue_ids() == []
    (msg,) = list(masq.maildir("bob"))
    assert msg["Subject"] == "hello"


@pytest.mark.parametrize("name, args", [("newaliases", []), ("sendmail", ["-bi"])])
def test_bi_and_newaliases_check_the_aliases_file(masq, name, args):
    r = sendmail(masq, args, name=name).ok()
    assert r.out == b"" and r.err == b""
    with open(os.path.join(masq.dir, "aliases"), "a") as f:
        f.write("this line has no colon\n")
    r = sendmail(masq, args, name=name)
    assert r.rc == 65, r
    path = os.path.join(masq.dir, "aliases")
    assert r.err.startswith(f"{name}: {path}:".encode()), r


def test_bv_says_where_mail_would_go_and_sends_nothing(masq):
    r = sendmail(masq, ["-bv", "bob", "carol@localhost"]).ok()
    assert b"bob@test.example" in r.out and b"carol@localhost" in r.out
    assert masq.queue_ids() == [] and not os.path.exists(os.path.join(masq.dir, "mail", "bob"))
    r = sendmail(masq, ["-bv", "a..b@localhost"])
    assert r.rc == 65 and b"a..b" in r.err, r


def test_odi_delivers_before_returning(masq):
    sendmail(masq, ["-odi", "bob@localhost"]).ok()
    assert masq.queue_ids() == []
    assert len(list(masq.maildir("bob"))) == 1


def test_odb_without_daemon_delivers_in_the_background(masq):
    r = sendmail(masq, ["-v", "bob@localhost"]).ok()
    assert b"no masq-send daemon listening: delivering in the background" in r.err, r
    folder = os.path.join(masq.dir, "mail", "bob", "new")
    deadline = time.monotonic() + 20
    while not (os.path.isdir(folder) and os.listdir(folder)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(os.listdir(folder)) == 1


def test_odb_with_a_daemon_only_wakes_it(masq):
    fifo = listen_trigger(masq.spool)
    try:
        r = sendmail(masq, ["-v", "-odb", "bob@localhost"]).ok()
        assert b"the masq-send daemon was woken" in r.err, r
        assert os.read(fifo, 64)
    finally:
        os.close(fifo)
    assert len(masq.queue_ids()) == 1


def test_v_names_the_queue_id(masq):
    r = sendmail(masq, ["-v", "-odq", "-f", "a@example.org", "bob"]).ok()
    qid = masq.queue_ids()[0]
    assert f"sendmail: {qid}: queued, from <a@example.org> to <bob@test.example>".encode() in r.err
    assert b"left in the queue" in r.err


def test_bs_speaks_smtp_on_stdin(masq):
    have_smtpd = os.path.exists(os.path.join(os.path.dirname(__file__), os.pardir, "lib",
                                             "masq", "cmd", "smtpd.py"))
    r = sendmail(masq, ["-bs"], b"QUIT\r\n")
    if not have_smtpd:
        assert r.rc == 69 and b"masq-smtpd is not available yet" in r.err, r
    else:
        assert r.rc == 0 and r.out.startswith(b"220 "), r


def test_rmail_drops_the_uucp_from_line_and_keeps_dots(masq):
    message = b"From alice Mon Jan  1 10:00:00 2024 remote from uuhost\nSubject: u\n\n.\nx\n"
    sendmail(masq, ["-odq", "bob@localhost"], message, name="rmail").ok()
    meta, data = queued(masq)
    assert "sender alice@uuhost" in meta
    assert after_added(data) == b"Subject: u\n\n.\nx\n"
    assert b"From alice" not in data


def test_rmail_without_a_from_line_or_f_sends_as_the_caller(masq):
    sendmail(masq, ["-odq", "bob@localhost"], b"Subject: u\n\nx\n", name="rmail").ok()
    meta, _ = queued(masq)
    assert f"sender {pwd.getpwuid(os.getuid()).pw_name}@" in meta, meta


def test_mailrm_removes_messages(masq):
    sendmail(masq, ["-odq", "bob"]).ok()
    (qid,) = masq.queue_ids()
    sendmail(masq, [qid], name="mailrm").ok()
    assert masq.queue_ids() == []
    r = sendmail(masq, [qid], name="mailrm")
    assert r.rc == 67, r
    assert sendmail(masq, [], name="mailrm").rc == 64


def test_masq_queue_hook_gets_message_envelope_and_trace(masq, tmp_path):
    hook = tmp_path / "hook"
    out = tmp_path / "out"
    hook.write_text(f"#!/bin/sh\ncat > {out}.msg\ncat <&1 > {out}.env\n"
                    f'echo "$MASQ_PROTO $MASQ_USER" > {out}.trace\nexit 0\n')
    hook.chmod(0o755)
    r = sendmail(masq, ["-f", "a@example.org", "bob"], env=clean_env(MASQ_QUEUE=hook))
    assert r.rc == 0, r
    assert out.with_suffix(".msg").read_bytes().endswith(MESSAGE)
    assert out.with_suffix(".env").read_bytes() == b"Fa@example.org\0Tbob@test.example\0\0"
    assert out.with_suffix(".trace").read_text().startswith("local ")
    assert masq.queue_ids() == []


@pytest.mark.parametrize("code, expected", [(100, 65), (111, 75), (73, 73)])
def test_masq_queue_hook_failure_codes(masq, tmp_path, code, expected):
    hook = tmp_path / "hook"
    hook.write_text(f"#!/bin/sh\ncat >/dev/null\nexit {code}\n")
    hook.chmod(0o755)
    r = sendmail(masq, ["bob"], env=clean_env(MASQ_QUEUE=hook))
    assert r.rc == expected, r
    assert b"refused the message" in r.err


def test_sendmail_then_runq_delivers_byte_exact_into_maildir(masq):
    body = b"8-bit \xe9\n" + b"z" * 5000 + b"\nFrom here\n.\n..dots\n"
    message = b"Subject: end to end\r\nTo: bob@localhost\r\n\r\n" + body.replace(b"\n", b"\r\n")
    sendmail(masq, ["-odq", "-i", "-t"], message).ok()
    sendmail(masq, [], name="runq").ok()
    (msg,) = list(masq.maildir("bob"))
    raw = msg.as_bytes()
    assert raw.endswith(b"\n\n" + body)
    assert msg["Subject"] == "end to end" and msg["Message-ID"] and msg["Date"]
