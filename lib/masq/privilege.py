"""System mode in masq-send: start masq-lspawn as root, become masq, ask it for deliveries.

as_spool_owner(path): root (sendmail -g, masq-queue greylist) becomes the
spool's owner before it writes there.

start(conf) is the first thing masq-send does.  In system mode (masq.toml
`user`) and started as root, it starts masq-lspawn(8) with one end of a
socketpair on its fd 0, then drops to the masq user for good (no
supplementary groups, then the group, then the user; checked with
getresuid/getresgid) before any message is read.  The spawner is kept
for the process (like the log target): spawner() gives it to the
deliverer, or None when masq-send did not start as root.

Spawner.ask(fields, fd) sends one request (masq-lspawn(8): a netstring of
NUL-separated fields and the message as a descriptor) and reads its
answer; SpawnError says the spawner refused or is gone (temporary).
"""
import os
import pwd
import socket
import sys
import time

from masq import Error

MAX_ANSWER_BYTES = (1 << 20) + 32   # masq-lspawn's cap on masq-local's output, framed

_spawner = None                     # one per process: the helper started before the drop


class SpawnError(Error):
    """masq-lspawn refused a request or is not there: the deliveries wait."""

    code = 111
    temporary = True


def spawner():
    """The Spawner masq-send started, or None."""
    return _spawner


def start(conf):
    """In system mode as root: start masq-lspawn, then become the masq user."""
    global _spawner
    name = conf.get("user")
    if not name or os.geteuid() != 0:
        return
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise Error(f"no user {name} (masq.toml `user`): make it with masq-setup system",
                    code=78) from None
    if pw.pw_uid == 0:
        raise Error(f"masq.toml `user` = {name} is root: system mode runs as a user of its own",
                    code=78)
    import subprocess   # only system mode starts a helper
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    program = os.path.join(os.path.dirname(sys.executable), "masq-lspawn")
    if not os.access(program, os.X_OK):
        import shutil
        program = shutil.which("masq-lspawn") or program
    try:
        child = subprocess.Popen([program, "-C", conf.file], stdin=theirs,
                                 stdout=subprocess.DEVNULL, close_fds=True)
    except OSError as e:
        raise Error(f"unable to start {program}: {e.strerror}", code=111) from None
    finally:
        theirs.close()
    drop(pw)
    _spawner = Spawner(ours, child)


def drop(pw):
    """Become pw for good: groups, gid, uid, in that order (after setuid, no way back)."""
    become(pw.pw_uid, pw.pw_gid, pw.pw_name)
    os.environ.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)


def become(uid, gid, name):
    """setgroups([]), setgid, setuid, then check all three stuck; Error 111 otherwise."""
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as e:
        raise Error(f"unable to become {name}: {e.strerror}", code=111) from None
    if os.getresuid() != (uid,) * 3 or os.getresgid() != (gid,) * 3 \
            or os.getgroups() not in ([], [gid]):
        raise Error(f"unable to become {name}: the ids did not stick", code=111)


def as_spool_owner(path):
    """As root (system mode: sendmail -g, masq-queue greylist run by root), become
    the owner of the spool at path, so that what is written there is the masq
    user's and no link the masq user plants is followed with root's rights.
    Nothing to do for another user, or for a spool root owns."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(path)
    except OSError as e:
        raise Error(f"unable to read the spool {path}: {e.strerror}", code=75) from None
    if st.st_uid != 0:
        try:
            entry = pwd.getpwuid(st.st_uid)     # the owner's own group, not the folder's
            name, gid = entry.pw_name, entry.pw_gid
        except KeyError:
            name, gid = f"uid {st.st_uid}", st.st_gid
        become(st.st_uid, gid, name)


class Spawner:
    """The client end of masq-lspawn's socket: one request, one answer."""

    def __init__(self, sock, child):
        self.sock, self.child = sock, child
        self.gone = None            # why it cannot be asked any more
        self.slow = {}              # user -> when a delivery as them was killed late

    def ask(self, fields, fd, timeout):
        """Send fields (bytes) and fd; return (masq-local's exit status, its stdout)."""
        if self.gone:
            raise SpawnError(self.gone)
        data = b"\0".join(fields)
        frame = b"%d:%s," % (len(data), data)
        try:
            self.sock.settimeout(timeout)
            sent = socket.send_fds(self.sock, [frame], [fd])
            self.sock.sendall(frame[sent:])
            answer = self._read(time.monotonic() + timeout)
        except (OSError, ValueError) as e:
            self.gone = f"masq-lspawn is gone ({e}): restart masq-send"
            self.child.poll()
            raise SpawnError(self.gone) from None
        if answer.startswith(b"!"):
            raise SpawnError("masq-lspawn: " + answer[1:].decode("utf-8", "replace"))
        status, _, output = answer.partition(b"\0")
        return int(status), output

    def _read(self, deadline):
        """One netstring answer; ValueError when it is not one, OSError when cut."""
        data = b""
        while True:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ValueError("it closed the socket")
            data += chunk
            length, colon, rest = data.partition(b":")
            if not length.isdigit() or int(length) > MAX_ANSWER_BYTES:
                raise ValueError("it answered badly")
            if colon and len(rest) > int(length):
                if rest[int(length):] != b",":
                    raise ValueError("it answered badly")
                return rest[:int(length)]
