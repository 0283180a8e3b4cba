"""masq-local: deliver one message to local recipients.

Usage:
  masq-local [-C FILE] [--id QID] [--] SENDER RECIPIENT...
  masq-local [-C FILE] [--id QID] --targets [--] SENDER (TARGET RECIPIENT)...
  masq-local -h | --help

Options:
  -C FILE    Read this configuration instead of $MASQ_CONF.
  --id QID   The queue id of the message (for the delivery programs).
  --targets  System mode, run as the user by masq-lspawn(8): deliver to each
             TARGET (mailbox:USER, |command, /file) for its RECIPIENT, without
             expanding aliases; never as root or as the masq user.
  -h --help  Show this.

The message comes on stdin.  For each RECIPIENT, in order, one line on
stdout: "K text" delivered, "Z text" temporary failure, "D text" permanent
failure; then exit 0.  Exit 111 (temporary) or 100 (permanent) when
masq-local cannot start.  SENDER may be "" (a bounce).  Details: masq-local(8).
"""
import io
import os
import stat
import sys

from masq import Error, child, config, headers, local, outcome, program
from masq.program import Exit


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    conf_file, qid, targeted, sender, recipients = _arguments(argv)
    try:
        conf = config.load(conf_file)
    except Error as e:
        raise Error(str(e), code=Exit.TEMPORARY if e.temporary else Exit.PERMANENT,
                    temporary=e.temporary) from None
    for address in [sender, *recipients]:
        if any(c in address for c in "\r\n\0"):
            raise Error("an address holds CR, LF or NUL: fix the caller",
                        code=Exit.PERMANENT, temporary=False)
    if targeted:
        _check_user(conf)
    source = _Stdin(os.path.join(conf.path("spool") or conf.dir, "tmp"))
    try:
        if targeted:
            pairs = list(zip(recipients[0::2], recipients[1::2], strict=True))
            results = local.deliver_targets(conf, sender, pairs, source, qid)
        else:
            results = local.deliver_from(conf, sender, recipients, source, qid)
    finally:
        source.close()
    out = "".join(f"{letter} {outcome.one_line(text) or 'no details'}\n"
                  for letter, text in results)
    data, fd = out.encode("utf-8", "surrogateescape"), 1
    while data:
        data = data[os.write(fd, data):]
    return Exit.OK


def _check_user(conf):
    """--targets trusts its caller's plan: only as a user, never as root or masq."""
    uid, masq = os.geteuid(), conf.get("user") or ""
    if uid == 0 or os.getuid() == 0:
        raise Error("--targets delivers as the recipient: refusing to run as root",
                    code=Exit.TEMPORARY)
    import pwd      # only the system-mode path
    try:
        if masq and pwd.getpwnam(masq).pw_uid == uid:
            raise Error(f"--targets delivers as the recipient: refusing to run as {masq}",
                        code=Exit.TEMPORARY)
    except KeyError:
        pass


def _arguments(argv):
    """(conf file, qid, targets?, sender, recipients); docopt only for help and errors.

    With --targets, `recipients` holds TARGET RECIPIENT pairs, flat.
    """
    conf_file = qid = None
    targeted = False
    rest = list(argv)
    while rest and rest[0].startswith("-") and rest[0] not in ("-", "--"):
        if rest[0] == "--targets":
            targeted, rest = True, rest[1:]
            continue
        if rest[0] == "-C" and len(rest) > 1:
            conf_file = rest[1]
        elif rest[0] == "--id" and len(rest) > 1:
            qid = rest[1]
        else:
            return _docopt(argv)
        rest = rest[2:]
    if rest and rest[0] == "--":
        rest = rest[1:]
    if len(rest) < 2 or (targeted and len(rest) % 2 == 0):
        return _docopt(argv)
    return conf_file, qid, targeted, rest[0], rest[1:]


def _docopt(argv):
    args = program.parse(__doc__, argv, usage_code=Exit.PERMANENT)
    if args["--targets"]:
        pairs = [x for pair in zip(args["TARGET"], args["RECIPIENT"], strict=True) for x in pair]
        return args["-C"], args["--id"], True, args["SENDER"], pairs
    return args["-C"], args["--id"], False, args["SENDER"], args["RECIPIENT"]


class _Stdin:
    """The message on fd 0: read again by seeking, or spooled once if needed.

    A regular file is read again from its start offset for every copy.  A
    pipe is read once: straight into the only copy when there is one, else
    first into an unnamed temporary file beside the spool.
    """

    def __init__(self, tmpdir):
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
                return headers.scan(stream)
        while len(self.ahead) < headers.MAX_HEADER_BYTES and b"\n\n" not in self.ahead \
                and not self.ahead.startswith(b"\n"):
            chunk = self._read(65536)
            if not chunk:
                break
            self.ahead += chunk
        return headers.scan(io.BytesIO(self.ahead))

    def expect(self, copies):
        if self.start is not None or copies < 2:
            return
        import tempfile     # random, shutil...: only a piped message with 2+ copies needs it
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
        return _Reader(child.Chain(self.ahead, open(0, "rb", closefd=False)))

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
    """A child.Chain that `with` accepts."""

    def __init__(self, chain):
        self.read, self.readline = chain.read, chain.readline

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
