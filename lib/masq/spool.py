"""The spool: the only code that writes the queue, and the code that reads it.

Layout (masq-spool(5)), all in one file system:

    VERSION          "masq-spool 1"
    tmp/ID           a message being written by masq-queue (flock held)
    incoming/ID      accepted, not yet filtered
    active/ID        filtered, ready to route and deliver
    hold/ID          kept back by a person: goes nowhere until released
    corrupt/ID       files `masq-queue check --repair` found unreadable
    trigger          FIFO: one byte written wakes the masq-send daemon

A message is one file.  Its first line is fixed-width, the data follows,
and after the data come records, one per line, "word value":

    masq-spool 1 0000000000004182      (HEADER_BYTES long; the data's size)
    <the message, exactly that many bytes, LF line ends>
    sender alice@example.org           envelope and trace, written before commit
    rcpt bob@localhost
    arrived 1764100000.123
    proto local
    done 0 1764100002.5 maildir        state, appended after each attempt
    failed 1 ... / deferred 1 ... / warned ...
    waiting 1 ... for route isp         no route up: written when the reason changes
    held 1764100009.1 by the admin      why the message went to hold/

States of a message, and what a crash in each leaves (cf. qmail INTERNALS):

    S1  tmp/ID being written, flock held     crash: orphan, not accepted;
                                             `check` removes it once no lock is held
    S2  tmp/ID complete and fsynced          same as S1: not yet accepted
    S3  incoming/ID renamed, folder fsynced  ACCEPTED: masq-queue exits 0 only now
    S4  active/ID (rename, folder fsynced)   filters have run
    S5  state records appended and fsynced   a recipient's outcome is durable
        before the next attempt is decided   before the next attempt
    S6  file unlinked                        all recipients done; a crash that
                                             loses the unlink redelivers once

A state record torn by a crash is an incomplete last line: readers ignore
it (its delivery may repeat once), and the next append starts a new line.

One module of about 600 lines on purpose: the on-disk format, its writer
and its readers, its locks and its check are one contract (masq-spool(5)),
and keeping them together is what lets the crash states above be read in
one place.
"""
import errno
import fcntl
import io
import posix
import time

from masq import Error, pathenv
from masq.files import fsync_dir

VERSION = 1
MAGIC = b"masq-spool %d " % VERSION
SIZE_DIGITS = 16
HEADER_BYTES = len(MAGIC) + SIZE_DIGITS + 1
STAGES = ("incoming", "active", "hold")
FOLDERS = ("tmp", *STAGES, "corrupt")
KNOWN_FILES = ("trigger", "VERSION",
               "drop", "control",     # system mode: masq.drop, masq.control
               "fetch",               # masq-fetch's unique ids (masq.pop3)
               "oauth",               # masq-smtp's access tokens (masq.oauth)
               "auth-slots")          # masq-smtpd's password checks (masq.anvil)
# sqlite3 stores: masq.hoststat, masq.anvil, masq.greylist, with their side files
KNOWN_DATABASES = ("hoststat.db", "anvil.db", "greylist.db")
SQLITE_SUFFIXES = ("", "-journal", "-wal", "-shm")
COPY_BYTES = 65536
TMP_GRACE_SECONDS = 60         # check leaves younger tmp/ files alone (created, not yet locked)
TRACE_WORDS = ("arrived", "proto", "client", "client_name", "helo", "auth", "user", "for",
               "trusted")
STATE_WORDS = ("done", "failed", "deferred", "waiting")


class SpoolError(Error):
    """The spool cannot be written or read now (disk full, permissions...)."""

    code = 75
    temporary = True


class TooBigError(SpoolError):
    """The message is larger than max_size."""

    code = 65
    temporary = False


class NulError(SpoolError):
    """A NUL byte in the message: RFC 5322 section 2.3 allows none, and a
    delivery program reading C strings would cut the message there."""

    code = 65
    temporary = False


class FormatError(SpoolError):
    """A spool file is not in the format this version writes."""


class Spool:
    """A spool folder; `woken` says whether the last trigger() found a daemon."""

    woken = False

    def __init__(self, path):
        self.path = path

    def folder(self, name):
        return pathenv.join(self.path, name)

    def create(self, mode=0o700):
        """Make the folders, the trigger FIFO and VERSION (idempotent)."""
        import os       # makedirs: only masq-setup and check create a spool
        os.makedirs(self.path, mode=mode, exist_ok=True)
        for name in FOLDERS:
            os.makedirs(self.folder(name), mode=mode, exist_ok=True)
        fifo = self.folder("trigger")
        if not pathenv.lexists(fifo):
            posix.mkfifo(fifo, 0o622)
        version = self.folder("VERSION")
        if not pathenv.lexists(version):
            # O_NOFOLLOW: root runs this (masq-setup system) in a folder masq owns
            fd = posix.open(version, posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL
                            | posix.O_NOFOLLOW | posix.O_CLOEXEC, 0o644)
            try:
                posix.write(fd, f"masq-spool {VERSION}\n".encode())
            finally:
                posix.close(fd)

    def new_message(self, max_size=None):
        """A NewMessage in tmp/: write to it, then commit() it."""
        return NewMessage(self, max_size)

    def ids(self, stage):
        """The ids in a stage folder, oldest first."""
        try:
            names = posix.listdir(self.folder(stage))
        except FileNotFoundError:
            raise SpoolError(f"no spool at {self.path}: make one with masq-setup") from None
        except OSError as e:        # system mode: a user who is not masq
            raise SpoolError(f"unable to list {self.folder(stage)}: {e.strerror}") from None
        return sorted(n for n in names if not n.startswith("."))

    def find(self, qid):
        """The Message with this id, in whichever stage it is."""
        if "/" in qid or qid.startswith("."):
            raise SpoolError(f"{qid}: not a queue id", code=65, temporary=False)
        for stage in STAGES:
            path = pathenv.join(self.folder(stage), qid)
            if pathenv.exists(path):
                return Message(self, stage, qid)
        raise SpoolError(f"{qid}: no such message in the queue", code=67, temporary=False)

    def messages(self, stages=STAGES):
        """Every readable message in the stages, oldest first; skip vanished ones."""
        for stage in stages:
            for qid in self.ids(stage):
                try:
                    yield Message(self, stage, qid)
                except FileNotFoundError:
                    continue

    def trigger(self):
        """Wake the masq-send daemon; False when none is listening."""
        try:
            fd = posix.open(self.folder("trigger"), posix.O_WRONLY | posix.O_NONBLOCK)
        except OSError:
            self.woken = False
            return False
        try:
            posix.write(fd, b"\0")
        except OSError:     # the FIFO is full: the daemon has been woken already
            pass
        finally:
            posix.close(fd)
        self.woken = True
        return True

    def sync(self, stage):
        """fsync a stage folder, making the renames into it durable."""
        fsync_dir(self.folder(stage))

    def sync_shared(self, stage):
        """fsync a stage folder after a rename, sharing the fsync with other writers.

        Group commit: one fsync of a folder makes every rename done into it
        before the fsync started durable.  Writers that renamed while another
        one's fsync ran queue on a flock; the first of them fsyncs once for
        all, and the others find that a sync which started after their own
        rename has completed.  `.sync-STAGE` holds two counters: syncs
        started, and the start number of the last one completed.
        """
        path = self.folder(f".sync-{stage}")
        pid, fd = _sync_fds.get(path, (None, None))
        if pid != posix.getpid():
            # kept open for the process's life, one per spool folder; a forked
            # child opens its own: the parent's may be closed, or its number reused
            fd = posix.open(path, posix.O_RDWR | posix.O_CREAT | posix.O_CLOEXEC, 0o600)
            _sync_fds[path] = (posix.getpid(), fd)
        before = _counters(fd)[0]           # syncs started before our rename was done
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            started, completed = _counters(fd)
            if completed > before:
                return                      # a sync that began after our rename has ended
            started += 1
            posix.pwrite(fd, b"%020d" % started, 0)
            fsync_dir(self.folder(stage))
            posix.pwrite(fd, b"%020d" % started, 20)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


class NewMessage:
    """A message being written to tmp/: write(), then commit(envelope, trace)."""

    _serial = 0

    def __init__(self, spool, max_size=None):
        self.spool = spool
        self.max_size = max_size
        self.size = 0
        self.uncounted = 0          # bytes we add ourselves (Received:), not held to max_size
        self._carry = b""           # a CR at the end of the last write
        self._committed = False
        now = int(time.time() * 1e6)
        while True:
            NewMessage._serial += 1
            self.id = f"{now:x}-{posix.getpid():x}"
            if NewMessage._serial > 1:
                self.id += f"-{NewMessage._serial:x}"
            self.tmp = pathenv.join(spool.folder("tmp"), self.id)
            try:
                self.fd = posix.open(self.tmp, posix.O_RDWR | posix.O_CREAT | posix.O_EXCL
                                     | posix.O_CLOEXEC, 0o600)
                break
            except FileExistsError:
                continue
            except FileNotFoundError:
                raise SpoolError(f"no spool at {spool.path}: make one with masq-setup") from None
            except OSError as e:
                raise SpoolError(f"unable to create {self.tmp}: {e.strerror}") from None
        # __exit__ (and so abort) runs only once __init__ has returned: a
        # failure here (a full disk at the first write) must remove the file itself
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            self._write_raw(MAGIC + b"0" * SIZE_DIGITS + b"\n")
        except BaseException:
            self.abort()
            raise

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if not self._committed:
            self.abort()

    def write(self, data):
        """Append message bytes; CRLF becomes LF, other bytes stay as they are."""
        if self._carry:
            data = self._carry + data
            self._carry = b""
        if data.endswith(b"\r"):
            data, self._carry = data[:-1], b"\r"
        data = data.replace(b"\r\n", b"\n")
        if b"\0" in data:      # every way in writes here: refused once for all
            raise NulError("NUL byte in the message (RFC 5322 section 2.3)")
        self.size += len(data)
        if self.max_size is not None and self.size - self.uncounted > self.max_size:
            raise TooBigError(f"message larger than the limit of {self.max_size} bytes")
        self._write_raw(data)

    def copy_from(self, stream):
        """Write everything a binary file object gives until EOF."""
        while True:
            chunk = stream.read(COPY_BYTES)
            if not chunk:
                return
            self.write(chunk)

    def commit(self, envelope, trace=None):
        """Make the message durable and visible in incoming/: it is accepted.

        Order: flush, size into the header, envelope records, fsync the file,
        rename into incoming/, fsync incoming/.  Returns the queue id.
        """
        records = [("sender", envelope.sender)]
        records += [("rcpt", r) for r in envelope.recipients]
        records.append(("arrived", f"{time.time():.3f}"))
        for word, value in (trace or {}).items():
            if value:
                records.append((word, value))
        self._finish(_records(records), pathenv.join(self.spool.folder("incoming"), self.id))
        try:
            self.spool.sync_shared("incoming")
        except OSError as e:
            raise SpoolError(f"unable to commit {self.tmp}: {e.strerror}") from None
        posix.close(self.fd)
        return self.id

    def _finish(self, records, target):
        """Records after the data, the size into the header, fsync, rename to target."""
        if self._carry:
            self.size += 1
            self._write_raw(self._carry)
            self._carry = b""
        self._write_raw(records)
        try:
            posix.pwrite(self.fd, b"%0*d" % (SIZE_DIGITS, self.size), len(MAGIC))
            posix.fsync(self.fd)
            posix.rename(self.tmp, target)
        except OSError as e:
            raise SpoolError(f"unable to commit {self.tmp}: {e.strerror}") from None
        self._committed = True

    def abort(self):
        """Remove the unfinished message."""
        if self.fd is not None:
            try:
                posix.unlink(self.tmp)
            except OSError:
                pass
            posix.close(self.fd)
            self.fd = None

    def _write_raw(self, data):
        view = memoryview(data)
        while view:
            try:
                n = posix.write(self.fd, view)
            except OSError as e:
                raise SpoolError(f"unable to write {self.tmp}: {e.strerror}") from None
            view = view[n:]


class Message:
    """A committed message: envelope, trace, per-recipient state, and its data."""

    def __init__(self, spool, stage, qid):
        self.spool = spool
        self.stage = stage
        self.id = qid
        self.path = pathenv.join(spool.folder(stage), qid)
        self._fd = None
        self._read()

    def reload(self):
        """Read the file again (after taking the lock, the state may be newer)."""
        self._read()

    def _read(self):
        try:
            f = open(self.path, "rb", opener=_no_link)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise FormatError(f"{self.path} is a symbolic link, not a message") from None
        with f:
            head = f.read(HEADER_BYTES)
            if len(head) != HEADER_BYTES or not head.startswith(MAGIC) or head[-1:] != b"\n":
                raise FormatError(f"{self.path}: not a masq-spool {VERSION} file")
            try:
                self.size = int(head[len(MAGIC):-1])
            except ValueError:
                raise FormatError(f"{self.path}: bad size in the first line") from None
            f.seek(HEADER_BYTES + self.size)
            tail = f.read()             # every record: a cut-off one would be forgotten
        self.file_size = HEADER_BYTES + self.size + len(tail)
        lines = tail.split(b"\n")
        self.torn_tail = lines[-1] != b""     # an append cut short by a crash
        self.sender = None
        self.recipients = []
        self.trace = {}
        self.state = {}             # index -> (word, time, text) of the last outcome
        self.attempts = {}          # index -> number of failed attempts
        self.last_attempt = 0.0
        self.first_deferred = None  # when a temporary failure was first recorded
        self.warned = 0.0
        self.held = None            # (time, why) of the last move to hold/
        for raw in lines[:-1]:
            word, _, value = raw.decode("utf-8", "surrogateescape").partition(" ")
            if word == "sender":
                self.sender = value
            elif word == "rcpt":
                self.recipients.append(value)
            elif word in STATE_WORDS:
                fields = value.split(" ", 2)
                try:
                    index, when = int(fields[0]), float(fields[1])
                except (ValueError, IndexError):
                    continue
                text = fields[2] if len(fields) > 2 else ""
                self.state[index] = (word, when, text)
                if word == "waiting":       # no attempt was made
                    continue
                self.last_attempt = max(self.last_attempt, when)
                if word == "deferred":
                    self.attempts[index] = self.attempts.get(index, 0) + 1
                    if self.first_deferred is None or when < self.first_deferred:
                        self.first_deferred = when
            elif word == "warned":
                try:
                    self.warned = float(value)
                except ValueError:
                    pass
            elif word == "held":
                when, _, why = value.partition(" ")
                try:
                    self.held = (float(when), why)
                except ValueError:
                    pass
            elif word in TRACE_WORDS:
                self.trace[word] = value
        if self.sender is None or not self.recipients:
            raise FormatError(f"{self.path}: no envelope after the data")
        try:
            self.arrived = float(self.trace.get("arrived", "0"))
        except ValueError:
            self.arrived = 0.0

    def pending(self):
        """Indices of recipients with no final outcome yet."""
        return [i for i in range(len(self.recipients))
                if self.state.get(i, ("",))[0] not in ("done", "failed")]

    def open_data(self):
        """A binary file object that reads exactly the message's bytes."""
        f = open(self.path, "rb", opener=_no_link)
        f.seek(HEADER_BYTES)
        return _Limited(f, self.size)

    def lock(self, wait=False):
        """Take the delivery lock; False if another process holds it or it is gone.

        The file is looked at again under the lock: another process may have
        moved or removed it between our listing and our lock.
        """
        if self._fd is None:
            try:
                self._fd = _no_link(self.path, posix.O_RDWR | posix.O_CLOEXEC)
            except FileNotFoundError:
                return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        try:
            same = posix.stat(self.path).st_ino == posix.fstat(self._fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            self.unlock()
        return same

    def unlock(self):
        if self._fd is not None:
            posix.close(self._fd)
            self._fd = None

    def record(self, outcomes, sync=True):
        """Append state records durably: outcomes = [(word, index, text)]."""
        now = f"{time.time():.3f}"
        records = []
        for word, index, text in outcomes:
            records.append((word, f"{index} {now} {text}"))
        self._append(_records(records), sync)

    def replace_data(self, stream):
        """New message bytes in place of the old, every record kept (a filter's work).

        The new file is written and locked in tmp/, then renamed over this one:
        a crash leaves either the old message or the new, whole.  This object
        then holds the lock on the new file.
        """
        with open(self.path, "rb", opener=_no_link) as f:
            f.seek(HEADER_BYTES + self.size)
            records = f.read()
        with NewMessage(self.spool) as new:
            new.copy_from(stream)
            new._finish(records, self.path)
        try:
            fsync_dir(pathenv.dirname(self.path))
        except OSError as e:
            raise SpoolError(f"unable to sync {self.path}: {e.strerror}") from None
        self.unlock()
        self._fd = new.fd               # still locked: nobody filters it twice
        self.reload()

    def note_warned(self):
        self._append(_records([("warned", f"{time.time():.3f}")]), True)

    def note_held(self, why):
        """Say why the message goes to hold/ (before the move: mailq shows it there)."""
        self._append(_records([("held", f"{time.time():.3f} {why}")]), True)

    def _append(self, data, sync):
        try:
            fd = _no_link(self.path, posix.O_RDWR | posix.O_APPEND | posix.O_CLOEXEC)
            try:
                end = posix.lseek(fd, 0, io.SEEK_END)
                if posix.pread(fd, 1, end - 1) != b"\n":
                    data = b"\n" + data      # close a line torn by a crash
                posix.write(fd, data)
                if sync:
                    posix.fsync(fd)
            finally:
                posix.close(fd)
        except OSError as e:
            raise SpoolError(f"unable to record state in {self.path}: {e.strerror}") from None

    def move(self, stage, sync=True):
        """Rename the message into another stage folder."""
        target = pathenv.join(self.spool.folder(stage), self.id)
        try:
            posix.rename(self.path, target)
            if sync:
                fsync_dir(self.spool.folder(stage))
        except OSError as e:
            raise SpoolError(f"unable to move {self.path} to {stage}: {e.strerror}") from None
        self.stage, self.path = stage, target

    def remove(self):
        """Delete the message: every recipient is done."""
        try:
            posix.unlink(self.path)
        except FileNotFoundError:
            pass
        self.unlock()


class _Limited:
    """Read at most `left` bytes from a file, then EOF."""

    def __init__(self, f, left):
        self.f, self.left = f, left

    def read(self, n=-1):
        if n < 0 or n > self.left:
            n = self.left
        data = self.f.read(n)
        self.left -= len(data)
        return data

    def readline(self, n=-1):
        if n < 0 or n > self.left:
            n = self.left
        data = self.f.readline(n)
        self.left -= len(data)
        return data

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _records(pairs):
    """Encode records; a value never holds a newline."""
    out = []
    for word, value in pairs:
        value = str(value).replace("\n", " ").replace("\r", " ")
        out.append(f"{word} {value}\n")
    return "".join(out).encode("utf-8", "surrogateescape")


_sync_fds = {}         # .sync-STAGE path -> (the pid that opened it, its descriptor)


def _counters(fd):
    """(syncs started, start number of the last sync completed) from a .sync file."""
    data = posix.pread(fd, 40, 0)
    started = int(data[:20] or b"0")
    completed = int(data[20:40] or b"0")
    return started, completed


def _no_link(path, flags):
    """open(2) for a queue file, never through a symbolic link: root's mailq and
    masq-queue read a spool that masq owns (masq-system(7))."""
    return posix.open(path, flags | posix.O_NOFOLLOW)


def is_locked(path):
    """True if a live process holds the flock on this file."""
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        posix.close(fd)


def _is_database(name):
    """One of the sqlite3 stores masq keeps in the spool, or a side file of one."""
    return any(name == db + suffix for db in KNOWN_DATABASES for suffix in SQLITE_SUFFIXES)


def check(spool, repair=False):
    """Find torn, orphaned and unreadable files; yield one line per problem.

    With repair: orphans in tmp/ (no live writer) are removed, unreadable
    messages are moved to corrupt/, a torn state line is closed.
    """
    for name in spool.ids("tmp"):
        path = pathenv.join(spool.folder("tmp"), name)
        try:
            young = time.time() - posix.stat(path).st_mtime < TMP_GRACE_SECONDS
        except FileNotFoundError:
            continue
        if young or is_locked(path):    # young: its writer may not have its lock yet
            continue
        yield f"tmp/{name}: orphan of an interrupted enqueue (never accepted)" + (
            ": removed" if repair else "")
        if repair:
            try:
                posix.unlink(path)
            except FileNotFoundError:
                pass
    seen = {}
    for stage in STAGES:
        for qid in spool.ids(stage):
            if qid in seen:
                yield f"{stage}/{qid}: also in {seen[qid]}"
            seen[qid] = stage
            try:
                msg = Message(spool, stage, qid)
            except FileNotFoundError:
                continue
            except FormatError as e:
                yield f"{stage}/{qid}: unreadable: {e}" + (": moved to corrupt/" if repair else "")
                if repair:
                    posix.rename(pathenv.join(spool.folder(stage), qid),
                                 pathenv.join(spool.folder("corrupt"), qid))
                continue
            except OSError as e:
                yield f"{stage}/{qid}: unreadable: {e.strerror}"
                continue
            if msg.torn_tail:
                yield f"{stage}/{qid}: last state record torn by a crash" + (
                    ": closed" if repair else "")
                if repair:
                    msg._append(b"", True)
    for name in posix.listdir(spool.path):
        if (name not in FOLDERS and name not in KNOWN_FILES and not name.startswith(".")
                and not _is_database(name)):
            yield f"{name}: not part of a masq spool"
    if not pathenv.exists(spool.folder("VERSION")):
        yield "VERSION: missing" + (": written" if repair else "")
        if repair:
            spool.create()
    else:
        with open(spool.folder("VERSION")) as f:
            if f.read().strip() != f"masq-spool {VERSION}":
                yield f"VERSION: not masq-spool {VERSION}"
