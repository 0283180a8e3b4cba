"""Helpers for the masq-smtpd tests: transcripts, spool reading, listeners."""
import codecs
import os
import subprocess
import sys

from conftest import BIN

HOST = "test.example"


def parse_transcript(path):
    """(directives, client bytes, expected reply lines) of a transcript file.

    `C: text` is a client line (CRLF added), `R: text` raw client bytes (no
    CRLF); both take Python escapes (\\n, \\r, \\x00).  `S: text` is one
    expected reply line; a trailing `*` matches any rest.  `% word args` are
    directives: env, top (a top-level TOML line), config (a line appended to
    the file), queued N [content].
    """
    directives, client, expected = [], [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("C: ") or line == "C:":
                client.append(_unescape(line[3:]) + b"\r\n")
            elif line.startswith("R: "):
                client.append(_unescape(line[3:]))
            elif line.startswith("S: "):
                expected.append(line[3:])
            elif line.startswith("% "):
                word, _, rest = line[2:].partition(" ")
                directives.append((word, rest))
    return directives, b"".join(client), expected


def _unescape(text):
    return codecs.escape_decode(text.encode("utf-8"))[0]


def replies_match(got, expected):
    """True when every reply line matches its expected line."""
    if len(got) != len(expected):
        return False
    for g, e in zip(got, expected, strict=True):
        if e.endswith("*") and g.startswith(e[:-1]):
            continue
        if g != e:
            return False
    return True


def reply_lines(out):
    """Server output as lines; every line must end in CRLF."""
    assert out == b"" or out.endswith(b"\r\n"), out[-80:]
    return out.decode("utf-8").split("\r\n")[:-1]


def prepend_config(masq, text):
    """Put a top-level TOML key at the start of masq.toml, replacing its old value."""
    key = text.split("=")[0].strip()
    with open(masq.conf) as f:
        old = [line for line in f if line.split("=")[0].strip() != key]
    masq.set_config(text + "\n" + "".join(old))


def spool_messages(masq, stage="incoming"):
    """{qid: (data bytes, records text)} of the messages in a stage."""
    folder = os.path.join(masq.spool, stage)
    found = {}
    for qid in sorted(os.listdir(folder)):
        with open(os.path.join(folder, qid), "rb") as f:
            raw = f.read()
        head = raw.index(b"\n") + 1
        size = int(raw[:head].split()[2])
        found[qid] = (raw[head:head + size], raw[head + size:].decode("utf-8", "replace"))
    return found


def body(data):
    """A spooled message without the Received line masq-queue put on top."""
    lines = data.split(b"\n")
    assert lines[0].startswith(b"Received: from "), data[:200]
    i = 1
    while lines[i].startswith(b"\t"):
        i += 1
    return b"\n".join(lines[i:])


def tmp_files(masq):
    return os.listdir(os.path.join(masq.spool, "tmp"))


class Listener:
    """A listener (masq-tcpserver or ucspi-tcp's tcpserver) on 127.0.0.1, port 0.

    It prints its port (-1); we wait for that line, never sleep.
    """

    def __init__(self, masq, kind="masq", env=None, host="127.0.0.1", limit=None):
        smtpd = os.path.join(BIN, "masq-smtpd")
        limit_args = ["-c", str(limit)] if limit else []
        if kind == "masq":
            argv = [os.path.join(BIN, "masq-tcpserver"), *limit_args, "-1", host, "0", smtpd]
        else:
            argv = ["tcpserver", *limit_args, "-1", "-H", "-R", "-l", "localhost",
                    host, "0", smtpd]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env or masq.env())
        line = self.proc.stdout.readline()
        assert line.strip().isdigit(), (line, self.proc.stderr.read1(4096))
        self.host = host
        self.port = int(line)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def python():
    return sys.executable
