"""Write one message into a maildir, an mbox, or a delivery program.

Each function takes `head` (bytes put before the message: Return-Path and
Delivered-To lines) and `stream` (a binary stream of the message, LF line
ends), and returns a short text saying where the message went.  It raises
DeliveryError, whose `temporary` says whether trying again can help.
Nothing is reported delivered before it is on disk (fsync):

maildir  cr.yp.to/proto/maildir.html: a unique name in tmp/, write, fsync,
         link into new/ (the commit point), fsync new/; tmp/new/cur are made
         when missing; the tmp file is removed on any failure.
mbox     mboxrd: a `From sender date` line, every line matching ^>*From_
         gets one more `>`, a blank line after the message.  Locked with a
         dot-lock (FILE.lock, O_EXCL, holding our PID; removed when its
         PID is dead or it is older than STALE_LOCK_SECONDS) and
         fcntl.lockf, each retried for LOCK_WAIT_SECONDS.  On
         any failure the file is cut back to its old length.
command  argv run without a shell (or ["/bin/sh", "-c", cmd] for a pipe
         alias), message on stdin, stdout and stderr kept for the reason:
         exit 0 delivered; a temporary code of masq.program's table (75,
         111, 70-74, 78), a signal, a failed exec or the timeout temporary;
         any other code permanent.
"""
import errno
import fcntl
import io
import os
import stat
import time

from masq import child, program
from masq.outcome import DeliveryError
from masq.spool import fsync_dir

COPY_BYTES = 65536
LOCK_WAIT_SECONDS = 60          # then give up and let the queue retry
STALE_LOCK_SECONDS = 600        # a dot-lock this old is a crashed writer's
MAX_LOCK_BYTES = 32             # a dot-lock holds a PID line; anything bigger is no lock
EMPTY_LOCK_SECONDS = 5          # a dot-lock still without a PID this long: its writer died
_counter = 0                    # deliveries by this process (maildir Q field)


def maildir(folder, head, stream):
    """Deliver into the maildir `folder`; return 'maildir FOLDER'."""
    folder = folder.rstrip("/") or "/"
    try:
        _make_maildir(folder)
    except OSError as e:
        raise DeliveryError(f"unable to create maildir {folder}: {e.strerror}") from None
    name = _unique_name()
    tmp = os.path.join(folder, "tmp", name)
    new = os.path.join(folder, "new", name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise DeliveryError(f"unable to create {tmp}: {e.strerror}") from None
    try:
        try:
            _write_all(fd, head)
            _copy(stream, lambda chunk: _write_all(fd, chunk))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, new)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            os.rename(tmp, new)     # a file system without hard links
        fsync_dir(os.path.join(folder, "new"))
    except OSError as e:
        _unlink(tmp)
        raise DeliveryError(f"unable to write into maildir {folder}: {e.strerror}") from None
    except BaseException:
        _unlink(tmp)
        raise
    _unlink(tmp)
    return f"maildir {folder}/"


def _make_maildir(folder):
    """Create the folder and its tmp, new and cur when missing."""
    made = False
    for sub in ("", "tmp", "new", "cur"):
        path = os.path.join(folder, sub) if sub else folder
        if not os.path.isdir(path):
            os.makedirs(path, 0o700, exist_ok=True)
            made = True
    if made:
        fsync_dir(folder)
        fsync_dir(os.path.dirname(folder) or ".")


def _unique_name():
    """time.MusecPpidQcounterRrandom.host (maildir spec, "modern" fields)."""
    global _counter
    _counter += 1
    now = time.time()
    host = os.uname().nodename.replace("/", "\\057").replace(":", "\\072")
    return (f"{int(now)}.M{int(now * 1e6) % 1000000}P{os.getpid()}"
            f"Q{_counter}R{os.urandom(8).hex()}.{host}")


def mbox(path, head, stream, sender):
    """Append to the mbox `path` (created if missing); return 'mbox PATH'."""
    try:
        os.makedirs(os.path.dirname(path) or ".", 0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DeliveryError(f"{path} is a symbolic link: refusing to write "
                                "through it") from None
        raise DeliveryError(f"unable to open mbox {path}: {e.strerror}") from None
    dotlock = None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DeliveryError(f"{path} is not a regular file", temporary=False)
        dotlock = _lock(fd, path)
        if isinstance(stream, io.RawIOBase):
            stream = io.BufferedReader(stream, COPY_BYTES)   # readline, not read(1)s
        _append(fd, path, head, stream, sender)
    finally:
        if dotlock:
            _unlink(dotlock)
        os.close(fd)        # drops the lockf lock too
    return f"mbox {path}"


def _append(fd, path, head, stream, sender):
    """Write one mboxrd message at the end; on any failure cut the file back."""
    old = os.fstat(fd).st_size
    try:
        pad = b""
        if old:
            tail = os.pread(fd, 2, max(old - 2, 0))
            pad = b"" if tail.endswith(b"\n\n") or tail == b"\n" else (
                b"\n" if tail.endswith(b"\n") else b"\n\n")
        from_line = f"From {sender or 'MAILER-DAEMON'} {time.asctime()}\n"
        out = _Writer(fd)
        out.write(pad + from_line.encode("utf-8", "surrogateescape"))
        _quote_into(child.Chain(head, stream), out)
        out.write(b"\n" if out.last == b"\n" else b"\n\n")
        out.flush()
        os.fsync(fd)
    except BaseException as e:
        try:
            os.ftruncate(fd, old)
            os.fsync(fd)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise DeliveryError(f"unable to write to mbox {path}: {e.strerror}; "
                                "mbox left as it was") from None
        raise


def _quote_into(reader, out):
    """Copy lines, giving each line matching ^>*From_ one more '>' (mboxrd)."""
    at_start, pending = True, b""
    while True:
        piece = reader.readline(COPY_BYTES)
        if not piece:
            if pending:
                out.write(pending)
            return
        if pending:
            piece, pending = pending + piece, b""
        if at_start:
            rest = piece.lstrip(b">")
            if len(rest) < 5 and not piece.endswith(b"\n") and len(piece) < 1 << 20:
                pending = piece         # too short to tell yet: read more of the line
                continue
            if rest.startswith(b"From "):
                out.write(b">")
        out.write(piece)
        at_start = piece.endswith(b"\n")


def _stale(dotlock):
    """A dot-lock is stale when its writer (the PID inside) is dead, or it is old.

    A file larger than a PID line is not a lock at all: never removed.
    """
    st = os.stat(dotlock)
    if st.st_size > MAX_LOCK_BYTES:
        return False
    if time.time() - st.st_mtime > STALE_LOCK_SECONDS:
        return True
    with open(dotlock, "rb") as f:
        text = f.read(32).strip()
    if not text.isdigit():          # being written now, or its writer died first
        return time.time() - os.stat(dotlock).st_mtime > EMPTY_LOCK_SECONDS
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return True                 # killed with its lock held (kill -9, a crash)
    except OSError:
        pass
    return False


def _lock(fd, path):
    """Take the dot-lock and the fcntl lock; return the dot-lock's path or None."""
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    dotlock, pause = path + ".lock", 0.05
    while True:
        try:
            lfd = os.open(dotlock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(lfd, b"%d\n" % os.getpid())
            finally:
                os.close(lfd)
            break
        except FileExistsError:
            try:
                if _stale(dotlock):
                    os.unlink(dotlock)
                    continue
            except FileNotFoundError:
                continue            # released meanwhile: try again at once
            except OSError:
                pass
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EROFS):
                dotlock = None      # a folder we may not write: fcntl alone
                break
            raise DeliveryError(f"unable to create {dotlock}: {e.strerror}") from None
        if time.monotonic() > deadline:
            raise DeliveryError(f"{path} is locked by another program ({dotlock})")
        time.sleep(pause)
        pause = min(pause * 2, 1.0)
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return dotlock
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                if dotlock:
                    _unlink(dotlock)
                raise DeliveryError(f"unable to lock {path}: {e.strerror}") from None
        time.sleep(pause)
        pause = min(pause * 2, 1.0)


def command(argv, head, stream, env, cwd=None, timeout=3600, name=None):
    """Run a delivery program with the message on stdin; return 'program NAME'."""
    import subprocess   # with tempfile: several ms that a maildir or mbox delivery
    import tempfile     # does not pay (masq.child)
    name = name or os.path.basename(argv[0])
    with tempfile.TemporaryFile() as output:
        try:
            status = child.run(argv, child.Chain(head, stream), time.monotonic() + timeout,
                               stdout=output, stderr=output, env=env, cwd=cwd)
        except OSError as e:
            raise DeliveryError(f"unable to run {argv[0]}: {e.strerror}") from None
        except subprocess.TimeoutExpired:
            raise DeliveryError(f"{name} timed out after {timeout} seconds") from None
        if status == 0:
            return f"program {name}"
        temporary, what = program.classify(status, unknown_temporary=False)
        reason = child.last_line(output) or f"{name} exited with status {status}"
        if status < 0:
            reason = f"{name} {what}: {reason}"
        raise DeliveryError(reason, temporary=temporary)


class _Writer:
    """Buffered writes to a descriptor, remembering the last byte written."""

    def __init__(self, fd):
        self.fd, self.parts, self.size, self.last = fd, [], 0, b""

    def write(self, data):
        if data:
            self.parts.append(data)
            self.size += len(data)
            self.last = data[-1:]
            if self.size >= COPY_BYTES:
                self.flush()

    def flush(self):
        _write_all(self.fd, b"".join(self.parts))
        self.parts, self.size = [], 0


def _copy(stream, write):
    while chunk := stream.read(COPY_BYTES):
        write(chunk)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass
