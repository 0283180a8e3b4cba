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
         fcntl.lockf, both within LOCK_WAIT_SECONDS, sleeping between
         tries; then a temporary failure: the queue retries later.  On
         any failure the file is cut back to its old length.
         The lock path is hostile (root may deliver into a folder users
         write): a FILE.lock that is not a regular file (a symbolic link,
         a FIFO, a folder, a device) is a temporary failure naming it; it
         is never followed, opened blocking, or removed.
         A lock held by a live process: like Postfix local(8)
         (deliver_lock_attempts 20 x deliver_lock_delay 1s), wait up to 20 s,
         then defer.  Once a wait timed out on an mbox, this process (a
         whole queue run of masq-send) tries that mbox only once for the
         next BUSY_SECONDS, so a run with many messages for a locked mbox
         is not stalled 20 s per message.
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
LOCK_WAIT_SECONDS = 20          # then give up and let the queue retry (Postfix: 20 x 1 s)
LOCK_PAUSE_SECONDS = 1.0        # the longest sleep between two tries (deliver_lock_delay)
BUSY_SECONDS = 120              # after a timed-out wait, the same mbox is tried once only
STALE_LOCK_SECONDS = 600        # a dot-lock this old is a crashed writer's
MAX_LOCK_BYTES = 32             # a dot-lock holds a PID line; anything bigger is no lock
EMPTY_LOCK_SECONDS = 5          # a dot-lock still without a PID this long: its writer died
_counter = 0                    # deliveries by this process (maildir Q field)
_busy = {}                      # mbox path -> when a lock wait on it last timed out
_KINDS = {stat.S_IFLNK: "a symbolic link", stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a folder",
          stat.S_IFCHR: "a device", stat.S_IFBLK: "a device", stat.S_IFSOCK: "a socket"}


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
    lock = None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DeliveryError(f"{path} is not a regular file", temporary=False)
        lock = _lock(fd, path)
        if isinstance(stream, io.RawIOBase):
            stream = io.BufferedReader(stream, COPY_BYTES)   # readline, not read(1)s
        _append(fd, path, head, stream, sender)
    finally:
        if lock:
            _unlock(*lock)
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
    """The lstat of a stale dot-lock (its PID is dead, or it is old), else None.

    A file larger than a PID line is not a lock at all: never removed.  One
    that is not a regular file raises DeliveryError.
    """
    st = os.lstat(dotlock)          # FileNotFoundError: released meanwhile
    _refuse_odd(dotlock, st.st_mode)
    if st.st_size > MAX_LOCK_BYTES:
        return None
    if time.time() - st.st_mtime > STALE_LOCK_SECONDS:
        return st
    # swapped since the lstat?  O_NOFOLLOW fails on a link, O_NONBLOCK does not
    # wait for a FIFO's writer, and the fstat refuses whatever was opened
    fd = os.open(dotlock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                 | os.O_CLOEXEC)
    try:
        _refuse_odd(dotlock, os.fstat(fd).st_mode)
        text = os.read(fd, MAX_LOCK_BYTES).strip()
    finally:
        os.close(fd)
    if not text.isdigit():          # being written now, or its writer died first
        return st if time.time() - st.st_mtime > EMPTY_LOCK_SECONDS else None
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return st                   # killed with its lock held (kill -9, a crash)
    except OSError:
        pass
    return None


def _refuse_odd(dotlock, mode):
    """A lock file must be a regular file: anything else is an error, not a wait."""
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise DeliveryError(f"{dotlock} is {kind}, not a lock: remove it to let mail in")


def _lock(fd, path):
    """Take the dot-lock and the fcntl lock; return (dot-lock path, its identity) or None."""
    wait, dotlock = _Wait(path), path + ".lock"
    while True:
        try:
            # O_EXCL never follows a symbolic link: a link named so is EEXIST
            lfd = os.open(dotlock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                st = os.fstat(lfd)
                os.write(lfd, b"%d\n" % os.getpid())
            finally:
                os.close(lfd)
            lock = (dotlock, (st.st_dev, st.st_ino))
            break
        except FileExistsError:
            try:
                st = _stale(dotlock)
                if st is not None:
                    _unlock(dotlock, (st.st_dev, st.st_ino))
            except OSError:
                pass                # released meanwhile, or unreadable: try again later
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EROFS):
                lock = None         # a folder we may not write: fcntl alone
                break
            raise DeliveryError(f"unable to create {dotlock}: {e.strerror}") from None
        wait.again(f"{path} is locked by another program ({dotlock})")
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _busy.pop(path, None)
            return lock
        except OSError as e:
            try:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise DeliveryError(f"unable to lock {path}: {e.strerror}") from None
                wait.again(f"unable to lock {path}: {e.strerror}")
            except DeliveryError:
                if lock:
                    _unlock(*lock)
                raise


class _Wait:
    """Lock tries within one deadline, sleeping between them.

    A timed-out mbox is remembered for BUSY_SECONDS: meanwhile this process
    tries it once, so a queue run is not stalled a full wait per message.
    Only a full wait's timeout is remembered, so one is waited again later.
    """

    def __init__(self, path):
        now, since = time.monotonic(), _busy.get(path)
        self.path, self.pause = path, 0.05
        self.quick = since is not None and now - since < BUSY_SECONDS
        self.deadline = now + (0 if self.quick else LOCK_WAIT_SECONDS)

    def again(self, reason):
        """Sleep before the next try, or raise DeliveryError(reason) past the deadline."""
        if time.monotonic() + self.pause > self.deadline:
            if not self.quick:
                _busy[self.path] = time.monotonic()
            raise DeliveryError(reason)
        time.sleep(self.pause)
        self.pause = min(self.pause * 2, LOCK_PAUSE_SECONDS)


def _unlock(dotlock, identity):
    """Remove the dot-lock if it is still that regular file (never someone else's)."""
    try:
        st = os.lstat(dotlock)
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == identity:
            os.unlink(dotlock)      # unlink never follows: it removes the name
    except OSError:
        pass


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
