"""masq-local: deliver one message to local recipients.

Usage:
  masq-local [-C FILE] [--id QID] [--] SENDER RECIPIENT...
  masq-local -h | --help

Options:
  -C FILE    Read this configuration instead of $MASQ_CONF.
  --id QID   The queue id of the message (for the delivery programs).
  -h --help  Show this.

The message comes on stdin.  For each RECIPIENT, in order, one line on
stdout: "K text" delivered, "Z text" temporary failure, "D text" permanent
failure; then exit 0.  Exit 111 (temporary) or 100 (permanent) when
masq-local cannot start.  SENDER may be "" (a bounce).  Details: masq-local(8).
"""
import os
import sys

from masq import Error
from masq.program import Exit

MAX_HEAD_BYTES = 1024 * 1024    # the header section read for the loop check
MAX_TEXT_CHARS = 1000           # a result line's text
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    conf_file, qid, sender, recipients = _arguments(argv)
    from masq import config
    try:
        conf = config.load(conf_file)
    except Error as e:
        raise Error(str(e), code=Exit.TEMPORARY if e.temporary else Exit.PERMANENT,
                    temporary=e.temporary) from None
    for address in [sender, *recipients]:
        if any(c in address for c in "\r\n\0"):
            raise Error("an address holds CR, LF or NUL: fix the caller",
                        code=Exit.PERMANENT, temporary=False)
    source = _Stdin(os.path.join(conf.path("spool") or conf.dir, "tmp"))
    try:
        results = _deliver(conf, sender, recipients, source, qid)
    finally:
        source.close()
    out = "".join(f"{letter} {_one_line(text)}\n" for letter, text in results)
    data, fd = out.encode("utf-8", "surrogateescape"), 1
    while data:
        data = data[os.write(fd, data):]
    return Exit.OK


def _arguments(argv):
    """(conf file, qid, sender, recipients); docopt only for help and errors."""
    conf_file = qid = None
    rest = list(argv)
    while rest and rest[0].startswith("-") and rest[0] not in ("-", "--"):
        if rest[0] == "-C" and len(rest) > 1:
            conf_file = rest[1]
        elif rest[0] == "--id" and len(rest) > 1:
            qid = rest[1]
        else:
            return _docopt(argv)
        rest = rest[2:]
    if rest and rest[0] == "--":
        rest = rest[1:]
    if len(rest) < 2:
        return _docopt(argv)
    return conf_file, qid, rest[0], rest[1:]


def _docopt(argv):
    from masq import program
    args = program.parse(__doc__, argv, usage_code=Exit.PERMANENT)
    return args["-C"], args["--id"], args["SENDER"], args["RECIPIENT"]


def deliver(conf, sender, recipients, stream_factory, qid=None):
    """Deliver to each recipient; return [(letter, text)], one per recipient.

    stream_factory() gives a fresh binary stream of the whole message each
    time it is called (once to read the header, once per copy written).
    """
    return _deliver(conf, sender, recipients, _Factory(stream_factory), qid)


def _deliver(conf, sender, recipients, source, qid):
    """Plan every recipient's targets, write each distinct target once, answer."""
    seen = _delivered_to(source.head())
    plan = _Plan(conf, sender, qid)
    answers = []
    for rcpt in recipients:
        delivered = _normal(rcpt)
        if delivered.lower() in seen:
            plan.wants.append([])
            answers.append(("D", f"mail loop: already delivered to {delivered} (5.4.6)"))
        else:
            answers.append(plan.add(rcpt, delivered))
    source.expect(plan.copies())
    plan.run(source)
    return [answer if answer else plan.answer(i) for i, answer in enumerate(answers)]


class _Plan:
    """The distinct deliveries of one call, and which recipient wants which."""

    def __init__(self, conf, sender, qid):
        self.conf, self.sender, self.qid = conf, sender, qid
        self.jobs = {}          # key -> job dict (kind, args, rcpt, result)
        self.wants = []         # per recipient: [key or (letter, text)]
        self.forward = []       # remote addresses, in order, without repeats
        self.forwarders = []    # the recipients whose aliases forward
        self.forward_result = None
        self._aliases = None

    # -- planning

    def add(self, rcpt, delivered):
        """Plan one recipient; return an answer now only if it fails at once."""
        from masq import address
        from masq.aliases import AliasError
        from masq.mailbox import DeliveryError
        local, domain = address.split(rcpt)
        local = address.unquote_local(local)
        info = {"rcpt": delivered, "local": local, "domain": domain.lower()}
        wants = []
        self.wants.append(wants)
        try:
            targets = self._targets(local.lower())
        except (AliasError, DeliveryError) as e:
            return ("Z" if e.temporary else "D", str(e))
        if not targets:
            return ("D", f"alias {local.lower()} expands to nothing (5.1.1)")
        for target in targets:
            try:
                wants.append(self._job(target, info))
            except DeliveryError as e:
                note = "" if targets == [local.lower()] else f" (alias {local.lower()})"
                wants.append(("Z" if e.temporary else "D", f"{e}{note}"))
        return None

    def _targets(self, name):
        """The final targets of a local part: aliases, then the +detail rule.

        Only the aliases file may name a |command, a /file or an :include:;
        a local part that is no alias names a mailbox and nothing else, so
        `"|cmd"@localhost` from a stranger is a (refused) mailbox name, never
        a command.  Such names come back as Mailbox(name).
        """
        aliases = self.aliases()
        if name in aliases:
            return aliases.expand(name)
        delimiter = self.conf.get("local.recipient_delimiter")
        delimiter = "+" if delimiter is None else delimiter
        if delimiter and delimiter in name[1:]:
            base = name[:name.index(delimiter, 1)]
            if base in aliases:
                return aliases.expand(base)
            if self.conf.get("local.users") != "system" or _passwd(name) is None:
                return [Mailbox(base)]
        return [Mailbox(name)]

    def aliases(self):
        if self._aliases is None:
            from masq import aliases
            self._aliases = aliases.load(self.conf.path("aliases") or os.devnull,
                                         self.conf.local_domains)
        return self._aliases

    def _job(self, target, info):
        """The key of the delivery a target needs, made once per distinct key."""
        from masq import aliases
        from masq.mailbox import DeliveryError
        what = "local" if isinstance(target, Mailbox) else aliases.kind(target)
        target = str(target)
        if what == "remote":
            from masq import address
            try:
                address.check(target)
            except address.AddressError as e:
                raise DeliveryError(f"bad address in the aliases: {e}", temporary=False) from None
            if target.lower() not in (t.lower() for t in self.forward):
                self.forward.append(target)
            if info["rcpt"] not in self.forwarders:
                self.forwarders.append(info["rcpt"])
            return "forward"
        if what == "pipe":
            key = ("pipe", target[1:].strip())
        elif what == "file":
            if target == "/dev/null":
                key = ("null",)
            else:
                key = ("maildir" if target.endswith("/") else "mbox", target)
        else:
            key = self._mailbox(target, info)
        if key not in self.jobs:
            self.jobs[key] = {"info": dict(info, user=target if what == "local" else None),
                              "result": None}
        return key

    def _mailbox(self, user, info):
        """The key of a local user's mailbox, by [local] mailbox."""
        from masq.mailbox import DeliveryError
        problem = _unsafe(user)
        if problem:
            raise DeliveryError(f"unusable mailbox name {user!r}: {problem} (5.1.3)",
                                temporary=False)
        pw = _passwd(user)
        if self.conf.get("local.users") == "system" and pw is None:
            raise DeliveryError(f"no such user: {user} (5.1.1)", temporary=False)
        home = pw.pw_dir if pw else self.conf.dir
        info["home"] = home
        kind = self.conf.get("local.mailbox")
        if kind == "mbox" and user.endswith(".lock"):
            # NAME.lock is the dot-lock of the mbox NAME: never a mailbox of its own
            raise DeliveryError(f"unusable mailbox name {user!r}: ends in .lock (5.1.3)",
                                temporary=False)
        if kind == "mda":
            return ("mda", user)
        template = self.conf.get("local.path") or "mail/{user}/"
        path = self.conf.path(_substitute(template, {"user": user, "home": home}),
                              is_value=True)
        if kind == "mbox":
            return ("mbox", path.rstrip("/") or path)
        return ("maildir", path if path.endswith("/") else path + "/")

    def copies(self):
        return len(self.jobs) + (1 if self.forward else 0)

    # -- delivering

    def run(self, source):
        """Write each distinct delivery once, in order."""
        from masq import program
        from masq.mailbox import DeliveryError
        for key, job in self.jobs.items():
            program.title(f"masq-local: delivering {self.qid or ''} to {key[0]}")
            try:
                with source.open() as stream:
                    job["result"] = ("K", self._write(key, job["info"], stream))
            except DeliveryError as e:
                job["result"] = ("Z" if e.temporary else "D", str(e))
        if self.forward:
            with source.open() as stream:
                self.forward_result = self._forward(stream)

    def _write(self, key, info, stream):
        from masq import mailbox
        head = (f"Return-Path: <{self.sender}>\nDelivered-To: {info['rcpt']}\n"
                ).encode("utf-8", "surrogateescape")
        kind = key[0]
        if kind == "null":
            return "discarded (/dev/null)"
        if kind == "maildir":
            return "delivered to " + mailbox.maildir(key[1], head, stream)
        if kind == "mbox":
            return "delivered to " + mailbox.mbox(key[1], head, stream, self.sender)
        timeout = _timeout(self.conf)
        if kind == "pipe":
            env = self._env(info, _me())
            return "delivered to " + mailbox.program(
                ["/bin/sh", "-c", key[1]], head, stream, env, cwd=_cwd(env, self.conf),
                timeout=timeout, name=key[1].split()[0] if key[1].split() else "sh")
        argv = self._mda_argv(info)
        env = self._env(info, (info["user"], info["home"]))
        return "delivered to " + mailbox.program(argv, head, stream, env,
                                                 cwd=_cwd(env, self.conf), timeout=timeout)

    def _mda_argv(self, info):
        import shlex
        from masq.mailbox import DeliveryError
        template = self.conf.get("local.mda") or "procmail -d {user}"
        try:
            words = shlex.split(template)
        except ValueError as e:
            raise DeliveryError(f"[local] mda does not parse: {e}") from None
        if not words:
            raise DeliveryError("[local] mda is empty")
        values = {"user": info["user"], "home": info["home"], "sender": self.sender,
                  "recipient": info["rcpt"], "local": info["local"],
                  "domain": info["domain"]}
        # each word on its own, after splitting: a value never makes a new argument
        return [_substitute(word, values) for word in words]

    def _env(self, info, user):
        name, home = user
        env = {"PATH": os.environ.get("PATH") or DEFAULT_PATH, "SHELL": "/bin/sh",
               "SENDER": self.sender, "RECIPIENT": info["rcpt"], "USER": name,
               "LOGNAME": name, "HOME": home, "LOCAL": info["local"],
               "DOMAIN": info["domain"]}
        if os.environ.get("MASQ_CONF"):
            env["MASQ_CONF"] = os.environ["MASQ_CONF"]
        if self.qid:
            env["MASQ_ID"] = self.qid
        return env

    def _forward(self, stream):
        """One new message to every remote target; the answer for forwarders."""
        from masq import mailbox
        from masq.envelope import Envelope
        head = "".join(f"Delivered-To: {r}\n" for r in self.forwarders)
        reader = mailbox._Chain(head.encode("utf-8", "surrogateescape"), stream)
        env = Envelope(self.sender, self.forward)
        trace = {"proto": "local", "user": "masq-local"}
        if len(self.forwarders) == 1:
            trace["for"] = self.forwarders[0]
        where = ", ".join(self.forward)
        if len(where) > 300:
            where = f"{where[:300]}... ({len(self.forward)} addresses)"
        try:
            from masq.cmd import queue
            qid = queue.submit(self.conf, reader, env, trace, timeout=_timeout(self.conf))
        except Error as e:
            return ("Z" if e.temporary else "D", f"unable to forward to {where}: {e}")
        return ("K", f"forwarded to {where}" + (f" as {qid}" if qid else ""))

    # -- answering

    def answer(self, index):
        """Recipient `index`'s line: K if every target went, else its failure."""
        done, failed = [], []
        for want in self.wants[index]:
            if want == "forward":
                result = self.forward_result
            elif isinstance(want, tuple) and want[0] in ("K", "Z", "D"):
                result = want
            else:
                result = self.jobs[want]["result"]
            (done if result[0] == "K" else failed).append(result)
        if not failed:
            return ("K", "; ".join(text for _, text in dict.fromkeys(done)))
        letter = "Z" if any(r[0] == "Z" for r in failed) else "D"
        first = next(r for r in failed if r[0] == letter)[1]
        if done:
            first += f" (the other {len(done)} target{'s' if len(done) > 1 else ''} " \
                     "of this address were delivered)"
        return (letter, first)


def _delivered_to(head):
    """The addresses of the Delivered-To fields in a header section, lower-cased."""
    found = set()
    for line in head.split(b"\n"):
        if line[:13].lower() == b"delivered-to:":
            value = line[13:].decode("utf-8", "surrogateescape").strip()
            if value.startswith("<") and value.endswith(">"):
                value = value[1:-1].strip()
            found.add(value.lower())
    return found


def _read_head(stream):
    """The header section (to its blank line) of a stream, at most MAX_HEAD_BYTES."""
    data = b""
    while len(data) < MAX_HEAD_BYTES:
        chunk = stream.read(65536)
        if not chunk:
            break
        data += chunk
        if data.startswith(b"\n"):
            return b""
        end = data.find(b"\n\n")
        if end >= 0:
            return data[:end + 1]
    return data[:MAX_HEAD_BYTES]


def _normal(rcpt):
    """The address as Delivered-To shows it: the domain lower-cased."""
    local, sep, domain = rcpt.rpartition("@")
    if not sep or local.endswith("\\") or rcpt.endswith('"'):
        return rcpt
    return f"{local}@{domain.lower()}"


class Mailbox(str):
    """A local part that names a mailbox: not an alias target, never a command or file."""


def _unsafe(name):
    """Why a name cannot be a path component, or ""."""
    if not name:
        return "empty"
    if "/" in name:
        return "holds a /"
    if name.startswith("."):
        return "starts with a dot"
    if name.startswith("-"):
        return "starts with a dash (it could pass for an option of the MDA)"
    if name.startswith(("|", ":", "\\")):
        return "starts with |, : or a backslash"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "holds a control character"
    return ""


def _passwd(name):
    import pwd
    try:
        return pwd.getpwnam(name)
    except (KeyError, ValueError):
        return None


def _me():
    """(user name, home) of this process, for pipe aliases."""
    import pwd
    try:
        pw = pwd.getpwuid(os.getuid())
        return pw.pw_name, pw.pw_dir
    except KeyError:
        return str(os.getuid()), os.environ.get("HOME") or "/"


def _cwd(env, conf):
    return env["HOME"] if os.path.isdir(env["HOME"]) else conf.dir


def _timeout(conf):
    try:
        return float(conf.get("local.mda_timeout") or 3600)
    except (TypeError, ValueError):
        return 3600.0


def _substitute(text, values):
    """Replace {name} for the names in `values`, in one pass (no re-expansion)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "{":
            end = text.find("}", i)
            if end > 0 and text[i + 1:end] in values:
                out.append(values[text[i + 1:end]])
                i = end + 1
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _one_line(text):
    text = "".join(c if c.isprintable() else " " for c in str(text)).strip()
    return text[:MAX_TEXT_CHARS] or "no details"


class _Factory:
    """A message source from deliver()'s stream_factory."""

    def __init__(self, factory):
        self.factory = factory

    def head(self):
        with self.factory() as stream:
            return _read_head(stream)

    def expect(self, copies):
        pass

    def open(self):
        return self.factory()

    def close(self):
        pass


class _Stdin:
    """The message on fd 0: read again by seeking, or spooled once if needed.

    A regular file is read again from its start offset for every copy.  A
    pipe is read once: straight into the only copy when there is one, else
    first into an unnamed temporary file beside the spool.
    """

    def __init__(self, tmpdir):
        import stat
        self.tmpdir = tmpdir
        self.spool = None
        self.ahead = b""        # bytes read from a pipe for the header check
        self.used = False
        try:
            st = os.fstat(0)
            self.start = os.lseek(0, 0, os.SEEK_CUR) if stat.S_ISREG(st.st_mode) else None
        except OSError as e:
            raise Error(f"unable to read the message on stdin: {e.strerror}",
                        code=Exit.TEMPORARY) from None

    def head(self):
        if self.start is not None:
            with self.open() as stream:
                return _read_head(stream)
        while len(self.ahead) < MAX_HEAD_BYTES and b"\n\n" not in self.ahead \
                and not self.ahead.startswith(b"\n"):
            chunk = self._read(65536)
            if not chunk:
                break
            self.ahead += chunk
        import io
        return _read_head(io.BytesIO(self.ahead))

    def expect(self, copies):
        if self.start is not None or copies < 2:
            return
        import tempfile
        try:
            self.spool = tempfile.TemporaryFile(dir=self.tmpdir)
        except OSError:
            self.spool = tempfile.TemporaryFile()
        try:
            self.spool.write(self.ahead)
            while chunk := self._read(65536):
                self.spool.write(chunk)
            self.spool.flush()
        except OSError as e:
            raise Error(f"unable to keep a copy of the message: {e.strerror}",
                        code=Exit.TEMPORARY) from None

    def open(self):
        if self.start is not None:
            os.lseek(0, self.start, os.SEEK_SET)
            return open(0, "rb", closefd=False)
        if self.spool is not None:
            os.lseek(self.spool.fileno(), 0, os.SEEK_SET)
            return open(self.spool.fileno(), "rb", closefd=False)
        if self.used:
            raise Error("internal error: stdin read twice", code=Exit.TEMPORARY)
        self.used = True
        from masq import mailbox
        return _Reader(mailbox._Chain(self.ahead, open(0, "rb", closefd=False)))

    def _read(self, size):
        try:
            return os.read(0, size)
        except OSError as e:
            raise Error(f"unable to read the message on stdin: {e.strerror}",
                        code=Exit.TEMPORARY) from None

    def close(self):
        if self.spool is not None:
            self.spool.close()


class _Reader:
    """A _Chain that `with` accepts."""

    def __init__(self, chain):
        self.read, self.readline = chain.read, chain.readline

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
