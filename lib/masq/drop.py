"""Drop files: how a user who cannot write the spool submits mail (system mode).

spool/drop is masq:masq mode 3733: anyone may create a file in it, nobody
but masq may list it (so no one learns another's file name), the setgid bit
gives every file the group masq, the sticky bit keeps a user from removing or
renaming another's file.  The file's owner (st_uid) is the submitter: the
kernel sets it, no user can forge it.

A drop file, written by masq-inject as the submitting user (write()):

    drop/NAME        NAME: 32 lower-case hex digits from os.urandom(16)
    masq-drop 1\\n
    F<sender>\\0T<rcpt>\\0...\\0\\0       the envelope, masq.envelope's framing
    <the message>                    as cleaned by masq-inject

States, and what a crash in each leaves:

    D1  created 0200, being written       not accepted: masq cannot read it;
                                           pick_up removes it after a day
    D2  fsynced, fchmod 0640, fsynced,     ACCEPTED: masq-inject exits 0 only now
        the file system synced (syncfs)
    D3  queued by masq-send (enqueue)      in incoming/, then unlinked here; a crash
                                           before the unlink queues it twice at most

masq-send (as masq) reads drop files as untrusted input (pick_up()): only a
regular file with one link, no larger than max_size plus the envelope's cap,
with the first line, a whole envelope and a header section; anything else
is moved to corrupt/drop-NAME with a log line.  The Received line and the
log name the owner (trace user = pw_name of st_uid, or "uid N").
"""
import errno
import os
import pwd
import stat
import time

from masq import Error, envelope, handoff, headers, log, spool
from masq.program import Exit

MAGIC = b"masq-drop 1\n"
NAME_HEX_DIGITS = 32
COMMITTED_MODE = 0o640          # group masq may read: the writer's commit mark
STALE_SECONDS = 86400           # a file never committed is removed after a day
ENVELOPE_MAX_BYTES = (envelope.MAX_RECIPIENTS + 1) * (envelope.MAX_ADDRESS_BYTES + 2)
COPY_BYTES = 65536


class DropError(Error):
    """The drop file could not be written: nothing was submitted."""

    code = Exit.TEMPFAIL
    temporary = True


class BadDropError(Error):
    """A drop file that is not what masq-inject writes: it goes to corrupt/."""

    code = Exit.DATAERR
    temporary = False


def folder(conf):
    return os.path.join(conf.path("spool"), "drop")


def write(conf, stream, env):
    """Write one drop file from `stream` (the cleaned message) and `env`; return its name.

    Returns only once the file is durable; on any failure the file is removed
    and DropError (or TooBigError, 65) raised.  Then the daemon is woken.
    """
    name = os.urandom(NAME_HEX_DIGITS // 2).hex()
    path = os.path.join(folder(conf), name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o200)
    except OSError as e:
        raise DropError(f"unable to create a file in {folder(conf)}: {e.strerror}; "
                        "is masq set up (masq-setup system)?", code=Exit.CANTCREAT) from None
    try:
        if os.fstat(fd).st_gid != os.stat(folder(conf)).st_gid:
            # without the setgid bit masq could never read the file: refuse now, not lose it
            raise DropError(f"{folder(conf)} does not give its group to new files "
                            "(mode 3733 expected): run masq-setup system", code=Exit.CANTCREAT)
        _write_all(fd, MAGIC + env.encode())
        max_size, size = conf.get("max_size"), 0
        while chunk := stream.read(COPY_BYTES):
            size += len(chunk)
            if max_size and size > max_size:
                raise spool.TooBigError(f"message larger than the limit of {max_size} bytes")
            if b"\0" in chunk:     # masq-queue's rule, told the user now, not after exit 0
                raise spool.NulError("NUL byte in the message (RFC 5322 section 2.3)")
            _write_all(fd, chunk)
        os.fsync(fd)
        os.fchmod(fd, COMMITTED_MODE)       # only now may masq-send take it
        os.fsync(fd)
        _syncfs(fd)     # the user cannot open drop/ to fsync the new name in it
    except BaseException as e:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)
        if isinstance(e, OSError):
            raise DropError(f"unable to write {path}: {e.strerror}") from None
        raise
    os.close(fd)
    spool.Spool(conf.path("spool")).trigger()
    return name


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _syncfs(fd):
    """syncfs(2) on fd's file system (libc through ctypes); os.sync() without it."""
    import ctypes       # only drop writers pay for it
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) == 0:
            return
    except (OSError, AttributeError):
        pass
    os.sync()


def names(conf):
    """The drop file names waiting, oldest name order; [] without a drop folder."""
    try:
        found = os.listdir(folder(conf))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise spool.SpoolError(f"unable to list {folder(conf)}: {e.strerror}") from None
    return sorted(n for n in found if len(n) == NAME_HEX_DIGITS
                  and all(c in "0123456789abcdef" for c in n))


def pick_up(conf, queue):
    """Queue every committed drop file (as masq-send, the masq user); return the queue ids.

    A file still being written is left alone; a malformed one goes to
    corrupt/; a temporary failure (disk full) leaves it for the next run.
    """
    ids = []
    for name in names(conf):
        try:
            qid = take(conf, queue, name)
        except Error as e:
            if e.temporary:     # a full disk: the next run tries again
                log.warn(f"drop/{name}: {e}; left for the next queue run")
            else:               # malformed, too big, a NUL byte: never queueable
                set_aside(conf, queue, name, str(e))
        except OSError as e:
            log.warn(f"drop/{name}: {e.strerror}; left for the next queue run")
        else:
            if qid:
                ids.append(qid)
    return ids


def take(conf, queue, name):
    """Check one drop file, enqueue it as its owner, unlink it; the queue id or None (skipped)."""
    path = os.path.join(folder(conf), name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):    # never open a FIFO, device or symlink
        raise BadDropError("a symbolic link" if stat.S_ISLNK(st.st_mode)
                           else "not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except PermissionError:
        if stat.S_IMODE(st.st_mode) & 0o040:    # committed, but not for us
            if st.st_gid != os.stat(folder(conf)).st_gid:
                # its owner gave it another group after the commit: set aside
                raise BadDropError("committed, then given a group masq is not in") from None
            raise spool.SpoolError("committed but not readable by masq-send: "
                                   "is drop/ mode 3733, group masq?") from None
        return _unfinished(path, st)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BadDropError("a symbolic link") from None
        raise spool.SpoolError(f"unable to open {path}: {e.strerror}") from None
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadDropError("not a regular file")
        if st.st_nlink != 1:    # a link to another's file would carry its owner
            raise BadDropError(f"{st.st_nlink} links")
        if stat.S_IMODE(st.st_mode) & 0o040 == 0:   # root reads a 0200 file too
            return _unfinished(path, st)
        max_size = conf.get("max_size")
        if max_size and st.st_size > max_size + ENVELOPE_MAX_BYTES + len(MAGIC):
            raise BadDropError(f"larger than max_size ({st.st_size} bytes)")
        if f.read(len(MAGIC)) != MAGIC:
            raise BadDropError("no masq-drop 1 line")
        env, rest = _envelope(f)
        message = _Checked(rest, f)
        trace = {"proto": "local", "user": _owner(st.st_uid)}
        qid = handoff.enqueue(conf, message, env, trace, queue=queue)
    try:
        os.unlink(path)
    except OSError as e:        # the next run queues it again: say so loudly
        log.warn(f"drop/{name}: queued as {qid} but not removed: {e.strerror}")
    log.event(qid, f"picked up drop/{name}")
    return qid


def _unfinished(path, st):
    """A file its writer has not committed: skip it, or remove it after a day."""
    if time.time() - st.st_mtime > STALE_SECONDS:
        try:
            os.unlink(path)
        except OSError:
            pass
        log.line(f"drop/{os.path.basename(path)}: never finished by uid {st.st_uid}: removed")
    return None


def _envelope(f):
    """Read the envelope up to its final NUL, within its cap; (Envelope, bytes read past it)."""
    data = b""
    while True:
        end = data.find(b"\0\0")
        if end >= 0:
            break
        if len(data) > ENVELOPE_MAX_BYTES:
            raise BadDropError("envelope too long")
        chunk = f.read(COPY_BYTES)
        if not chunk:
            raise BadDropError("the envelope ends early")
        data += chunk
    try:
        env = envelope.decode(data[:end + 2])
    except envelope.EnvelopeError as e:
        raise BadDropError(str(e)) from None
    return env, data[end + 2:]


class _Checked:
    """The message after the envelope; its header section must parse before anything is read."""

    def __init__(self, first, f):
        self.lines = _Lines(first, f)
        try:
            section = headers.read(self.lines.readline)
        except headers.HeaderError as e:
            raise BadDropError(str(e)) from None
        self.head = section.encode()
        self.first = True

    def read(self, size=COPY_BYTES):
        if self.first:
            self.first = False
            if self.head:
                return self.head
        return self.lines.read(size)


class _Lines:
    """readline(n) and read(n) over bytes already read, then the file."""

    def __init__(self, first, f):
        self.buf, self.f = first, f

    def readline(self, limit):
        while b"\n" not in self.buf[:limit] and len(self.buf) < limit:
            more = self.f.read(COPY_BYTES)
            if not more:
                break
            self.buf += more
        cut = self.buf.find(b"\n", 0, limit)
        cut = min(limit, len(self.buf)) if cut < 0 else cut + 1
        line, self.buf = self.buf[:cut], self.buf[cut:]
        return line

    def read(self, size):
        if self.buf:
            data, self.buf = self.buf[:size], self.buf[size:]
            return data
        return self.f.read(size)


def _owner(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


_unmovable = set()      # names warned of already (a folder a user made there, say)


def set_aside(conf, queue, name, why):
    """Move a bad drop file to corrupt/drop-NAME (the rename never follows a link)."""
    target = os.path.join(queue.folder("corrupt"), f"drop-{name}")
    try:
        os.rename(os.path.join(folder(conf), name), target)
    except FileNotFoundError:
        return
    except OSError as e:
        if name not in _unmovable:      # once per process: anyone may wake a rescan
            _unmovable.add(name)
            log.warn(f"drop/{name}: {why}; unable to move it to corrupt/: {e.strerror}")
        return
    log.line(f"drop/{name}: {why}: moved to corrupt/drop-{name}")
