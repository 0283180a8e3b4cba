"""Write one message into a maildir, an mbox, an LMTP server or a delivery program.

Each function takes `head` (bytes put before the message: Return-Path and
Delivered-To lines) and `stream` (a binary stream of the message, LF line
ends), and returns a short text saying where the message went.  It raises
DeliveryError, whose `temporary` says whether trying again can help.
Nothing is reported delivered before it is on disk (fsync):

maildir  cr.yp.to/proto/maildir.html: a unique name in tmp/, write, fsync,
         link into new/ (the commit point), fsync new/; tmp/new/cur are made
         when missing; the tmp file is removed on any failure.  While
         `deferred` is a FolderSync (masq-send's group commit, masq.attempt),
         the fsync of new/ is owed to it instead: the caller reports nothing
         delivered before its sync().
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
Paths a user controls are hostile to a process running as root (single-user
mode run as root; system mode never delivers as root): the maildir's tmp,
new and cur and the mbox are opened from a descriptor of their folder,
never through a symbolic link (O_NOFOLLOW; as root the maildir folder
itself too), and every later step (create, link, lock) is relative to that
descriptor, so a folder swapped for a link halfway changes nothing.

A group borrowed for the mbox spool (system mode: masq-lspawn(8) gives
masq-local the effective group `mail` so it can create /var/mail/USER and
its dot-lock) is dropped by drop_group() before anything else: command()
always drops it, and masq-local drops it before every target that is not
the user's own mailbox.

lmtp     the message as it is, in one LMTP transaction for all the users of
         one message ([local] lmtp: Dovecot's socket or host:port); RCPT
         TO is the user name; each user's reply is that user's answer (a
         452 defers that one only).  The server writes its own Return-Path
         and trace; masq adds nothing.  Returns (letter, text) per user.
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
deferred = None                 # a FolderSync: maildir() leaves new/'s fsync to it
_KINDS = {stat.S_IFLNK: "a symbolic link", stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a folder",
          stat.S_IFCHR: "a device", stat.S_IFBLK: "a device", stat.S_IFSOCK: "a socket"}


def maildir(folder, head, stream):
    """Deliver into the maildir `folder`; return 'maildir FOLDER'."""
    folder = folder.rstrip("/") or "/"
    try:
        fds = _open_maildir(folder)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DeliveryError(f"maildir {folder} or its tmp, new or cur is a symbolic "
                                "link: refusing to write through it") from None
        raise DeliveryError(f"unable to create maildir {folder}: {e.strerror}") from None
    try:
        return _maildir_write(folder, fds, head, stream)
    finally:
        for fd in fds.values():
            os.close(fd)


def _maildir_write(folder, fds, head, stream):
    name = _unique_name()
    tmp, new = os.path.join(folder, "tmp", name), os.path.join(folder, "new", name)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                     dir_fd=fds["tmp"])
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
            os.link(name, name, src_dir_fd=fds["tmp"], dst_dir_fd=fds["new"])
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            # a file system without hard links
            os.rename(name, name, src_dir_fd=fds["tmp"], dst_dir_fd=fds["new"])
        if deferred is None:
            os.fsync(fds["new"])
        else:
            deferred.owe(fds.pop("new"), folder)
    except OSError as e:
        _unlink(name, fds["tmp"])
        raise DeliveryError(f"unable to write into maildir {folder}: {e.strerror} "
                            f"({new})") from None
    except BaseException:
        _unlink(name, fds["tmp"])
        raise
    _unlink(name, fds["tmp"])
    return f"maildir {folder}/"


class FolderSync:
    """The new/ folders whose fsync is owed: one fsync per folder for many deliveries.

    owe() takes a descriptor of a new/ folder that a message was just linked
    into, under the current `label` (masq-send: the queue id); sync() fsyncs
    each folder once (by inode: a folder renamed or swapped meanwhile is
    still the one linked into) and returns {label: reason} for the labels
    whose folder's fsync failed: those deliveries are not durable.
    """

    MAX_OWED = 64                   # folders held open at most: then fsynced at once

    def __init__(self):
        self.label = None
        self.owed = {}              # (st_dev, st_ino) -> [fd, folder, {label}]
        self.failed = {}            # label -> reason, from an early fsync (MAX_OWED)

    def owe(self, fd, folder):
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        entry = self.owed.get((st.st_dev, st.st_ino))
        if entry is None:
            self.owed[(st.st_dev, st.st_ino)] = [fd, folder, {self.label}]
            if len(self.owed) >= self.MAX_OWED:     # a message for many mailboxes: do
                self.failed.update(self._fsync())   # not run out of descriptors
        else:
            os.close(fd)
            entry[2].add(self.label)

    def pending(self):
        """Is a fsync owed, or a failed early one not yet reported?"""
        return bool(self.owed or self.failed)

    def sync(self):
        failed, self.failed = self.failed, {}
        failed.update(self._fsync())
        return failed

    def _fsync(self):
        failed = {}
        owed, self.owed = self.owed, {}
        for fd, folder, labels in owed.values():
            try:
                os.fsync(fd)
            except OSError as e:
                failed.update(dict.fromkeys(labels, f"unable to fsync {folder}/new: "
                                                    f"{e.strerror}"))
            finally:
                os.close(fd)
        return failed

    def close(self):
        """Forget what is owed (its deliveries were not reported): close the folders."""
        for fd, _, _ in self.owed.values():
            os.close(fd)
        self.owed, self.failed = {}, {}


def _open_maildir(folder):
    """{"": folder fd, "tmp", "new", "cur"}: made when missing, never through a link."""
    made = False
    if not os.path.isdir(folder):
        os.makedirs(folder, 0o700, exist_ok=True)
        made = True
    # the folder the configuration names may be a link a user made for
    # themselves; not when root delivers: then the user could point it anywhere
    nofollow = os.O_NOFOLLOW if os.geteuid() == 0 else 0
    if nofollow:
        parent = os.open(os.path.dirname(folder) or ".", os.O_RDONLY | os.O_DIRECTORY
                         | os.O_CLOEXEC)
        try:
            fds = {"": _open_folder(os.path.basename(folder), parent)}
        finally:
            os.close(parent)
    else:
        fds = {"": os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)}
    try:
        for sub in ("tmp", "new", "cur"):
            try:
                os.mkdir(sub, 0o700, dir_fd=fds[""])
                made = True
            except FileExistsError:
                pass
            fds[sub] = _open_folder(sub, fds[""])
        if made:
            os.fsync(fds[""])
            fsync_dir(os.path.dirname(folder) or ".")
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def _unique_name():
    """time.MusecPpidQcounterRrandom.host (maildir spec, "modern" fields)."""
    global _counter
    _counter += 1
    now = time.time()
    host = os.uname().nodename.replace("/", "\\057").replace(":", "\\072")
    return (f"{int(now)}.M{int(now * 1e6) % 1000000}P{os.getpid()}"
            f"Q{_counter}R{os.urandom(8).hex()}.{host}")


def mbox(path, head, stream, sender, mode=0o600):
    """Append to the mbox `path` (created with `mode` if missing); return 'mbox PATH'."""
    folder, name = os.path.split(path)
    try:
        os.makedirs(folder or ".", 0o700, exist_ok=True)
        dfd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise DeliveryError(f"unable to open the folder of mbox {path}: {e.strerror}") from None
    try:
        fd = _open_mbox(name, dfd, mode)
    except OSError as e:
        os.close(dfd)
        if e.errno == errno.ELOOP:
            raise DeliveryError(f"{path} is a symbolic link: refusing to write "
                                "through it") from None
        raise DeliveryError(f"unable to open mbox {path}: {e.strerror}") from None
    lock = None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DeliveryError(f"{path} is not a regular file", temporary=False)
        # a hard link or another's file planted under the name would take the
        # mail elsewhere (Postfix local(8) and procmail refuse it too)
        if st.st_nlink != 1 or (os.geteuid() != 0 and st.st_uid != os.geteuid()):
            raise DeliveryError(f"{path} has {st.st_nlink} links or is not the owner's "
                                f"(uid {st.st_uid}): refusing to write into it")
        lock = _lock(fd, path, dfd)
        if isinstance(stream, io.RawIOBase):
            stream = io.BufferedReader(stream, COPY_BYTES)   # readline, not read(1)s
        _append(fd, path, head, stream, sender)
    finally:
        if lock:
            _unlock(*lock)
        os.close(fd)        # drops the lockf lock too
        os.close(dfd)
    return f"mbox {path}"


def _open_mbox(name, dfd, mode):
    """The mbox in the folder dfd, opened for appending, made with exactly `mode`."""
    flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        # O_EXCL never follows a link: a new file is ours, and its mode is set
        # past the umask (a delivery as the user runs under umask 077)
        fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, mode, dir_fd=dfd)
        os.fchmod(fd, mode)
    except FileExistsError:
        fd = os.open(name, flags, dir_fd=dfd)
    os.set_blocking(fd, True)
    return fd


def _open_folder(name, dfd):
    """A folder in dfd, never through a link (O_DIRECTORY makes a link ENOTDIR: say ELOOP)."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=dfd)
    except NotADirectoryError:
        if stat.S_ISLNK(os.lstat(name, dir_fd=dfd).st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name) from None
        raise


def borrowed_group():
    """True while this process has an effective group that is not its real one."""
    return os.getegid() != os.getgid()


def drop_group():
    """Give up a borrowed group for good: real, effective and saved become the real one."""
    rgid, egid, sgid = os.getresgid()
    if egid != rgid or sgid != rgid:
        os.setresgid(rgid, rgid, rgid)


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


def _stale(dotlock, dfd):
    """The lstat of a stale dot-lock (its PID is dead, or it is old), else None.

    A file larger than a PID line is not a lock at all: never removed.  One
    that is not a regular file raises DeliveryError.  dfd: the folder.
    """
    name = os.path.basename(dotlock)
    st = os.lstat(name, dir_fd=dfd)     # FileNotFoundError: released meanwhile
    _refuse_odd(dotlock, st.st_mode)
    if st.st_size > MAX_LOCK_BYTES:
        return None
    if time.time() - st.st_mtime > STALE_LOCK_SECONDS:
        return st
    # swapped since the lstat?  O_NOFOLLOW fails on a link, O_NONBLOCK does not
    # wait for a FIFO's writer, and the fstat refuses whatever was opened
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                 | os.O_CLOEXEC, dir_fd=dfd)
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


def _lock(fd, path, dfd):
    """Take the dot-lock and the fcntl lock; return (dot-lock path, identity, dfd) or None."""
    wait, dotlock = _Wait(path), path + ".lock"
    name = os.path.basename(dotlock)
    cleared = False             # a stale lock was removed: the next try is at once, once
    while True:
        try:
            # O_EXCL never follows a symbolic link: a link named so is EEXIST
            lfd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                          dir_fd=dfd)
            try:
                st = os.fstat(lfd)
                os.write(lfd, b"%d\n" % os.getpid())
            finally:
                os.close(lfd)
            lock = (dotlock, (st.st_dev, st.st_ino), dfd)
            break
        except FileExistsError:
            try:
                st = _stale(dotlock, dfd)
                if st is not None:
                    _unlock(dotlock, (st.st_dev, st.st_ino), dfd)
                    if not cleared:
                        cleared = True
                        continue
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


def _unlock(dotlock, identity, dfd):
    """Remove the dot-lock if it is still that regular file (never someone else's)."""
    name = os.path.basename(dotlock)
    try:
        st = os.lstat(name, dir_fd=dfd)
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == identity:
            os.unlink(name, dir_fd=dfd)     # unlink never follows: it removes the name
    except OSError:
        pass


def command(argv, head, stream, env, cwd=None, timeout=3600, name=None, stderr_first=False):
    """Run a delivery program with the message on stdin; return 'program NAME'.

    The reason of a failure is the last line it wrote; with stderr_first
    (the pipe transport), the last line on stderr, else on stdout.
    """
    import subprocess   # with tempfile: several ms that a maildir or mbox delivery
    import tempfile     # does not pay (masq.child)
    drop_group()        # a program never runs with the mail spool's group
    name = name or os.path.basename(argv[0])
    with tempfile.TemporaryFile() as output, tempfile.TemporaryFile() as errors:
        try:
            status = child.run(argv, child.Chain(head, stream), time.monotonic() + timeout,
                               stdout=output, stderr=errors if stderr_first else output,
                               env=env, cwd=cwd)
        except OSError as e:
            raise DeliveryError(f"unable to run {argv[0]}: {e.strerror}") from None
        except subprocess.TimeoutExpired:
            raise DeliveryError(f"{name} timed out after {timeout} seconds") from None
        if status == 0:
            return f"program {name}"
        temporary, what = program.classify(status, unknown_temporary=False)
        reason = (stderr_first and child.last_line(errors)) or child.last_line(output) \
            or f"{name} exited with status {status}"
        if status < 0:
            reason = f"{name} {what}: {reason}"
        raise DeliveryError(reason, temporary=temporary)


def lmtp(conf, sender, users, stream):
    """Hand one message to [local] lmtp for these users, in one transaction;
    (letter, text) per user, as the server answered each (RFC 2033 section 4.2)."""
    from masq import nexthop    # socket and the SMTP client: only for mailbox = lmtp
    from masq import Error
    try:
        session = nexthop.local_lmtp(conf)
    except DeliveryError as e:
        return [e.answer()] * len(users)
    except Error as e:          # a configuration that cannot work: fixed, then retried
        return [("Z", str(e))] * len(users)
    try:
        return session.send(sender, users, stream)
    finally:
        session.close()


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


def _unlink(path, dir_fd=None):
    try:
        os.unlink(path, dir_fd=dir_fd)
    except OSError:
        pass
