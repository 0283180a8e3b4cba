"""masq-lspawn: start masq-local as the recipient's user, one request at a time.

Usage:
  masq-lspawn [-C FILE]
  masq-lspawn -h | --help

Options:
  -C FILE    Read this configuration instead of $MASQ_CONF.
  -h --help  Show this.

System mode only, and the only masq code that stays root (qmail-lspawn's
shape): masq-send starts it as root with a Unix stream socket on fd 0, then
becomes the masq user.  A request is one netstring of at most
MAX_REQUEST_BYTES, NUL-separated fields USER, QID, SENDER, then TARGET and
RECIPIENT pairs, sent with exactly one descriptor (SCM_RIGHTS): the message,
read-only.  It runs `masq-local --targets --id QID -- SENDER TARGET
RECIPIENT...` as USER and answers one netstring: masq-local's exit status
in decimal (-N: killed by signal N), a NUL, masq-local's stdout; or `!` and
the reason when it ran nothing.  EOF on fd 0 (masq-send gone) ends it;
so does SIGTERM, after the delivery under way.  Details: masq-lspawn(8).
"""
import grp
import os
import pwd
import select
import signal
import socket
import sys
import time

from masq import Error, config, program
from masq.program import Exit

MAX_REQUEST_BYTES = 65536       # a user, a queue id, a sender and a few targets
MAX_OUTPUT_BYTES = 1 << 20      # masq-local's answers: one short line per target
MARGIN_SECONDS = 30             # masq-local's own work beside its programs (an mbox
                                # lock may take mailbox.LOCK_WAIT_SECONDS, 20)
PATH = "/usr/local/bin:/usr/bin:/bin"


class ProtocolError(Error):
    """A request that breaks the framing: answered, then masq-lspawn exits."""

    code = Exit.TEMPORARY


def main(argv=None):
    args = program.parse(__doc__, argv, usage_code=Exit.TEMPORARY)
    if os.geteuid() != 0:
        raise Error("must run as root: masq-send starts it in system mode", code=Exit.TEMPORARY)
    conf = config.load(args["-C"])
    program.title("masq-lspawn")
    server = Server(conf, socket.socket(fileno=0))
    signal.signal(signal.SIGTERM, server.stop)
    return server.run()


class Server:
    """The request loop; `busy` while a masq-local runs, so SIGTERM waits for it."""

    def __init__(self, conf, sock):
        self.sock, self.busy, self.stopping = sock, False, False
        self.conf_file = conf.file
        # a request's deadline: masq-local runs as the user, who may stop it
        # (kill -STOP) or keep its stdout open: past this its group is killed,
        # stopped or not, so no user holds masq-send longer than one MDA may run
        self.timeout = float(conf.get("local.mda_timeout")) + MARGIN_SECONDS
        # masq-local beside this launcher: one installation, never a $PATH search
        self.local = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), "masq-local")
        self.mail_gid = None    # the mbox spool's group (Debian's /var/mail is root:mail 2775)
        if conf.get("local.mailbox") == "mbox":
            try:
                self.mail_gid = grp.getgrnam(conf.get("local.mail_group") or "mail").gr_gid
            except KeyError:
                pass

    def stop(self, signum, frame):
        if not self.busy:
            raise SystemExit(Exit.OK)
        self.stopping = True

    def run(self):
        while not self.stopping:
            try:
                request = read_request(self.sock)
            except ProtocolError as e:
                self.answer(b"!" + str(e).encode())
                raise
            if request is None:
                return Exit.OK
            fields, fd = request
            self.busy = True
            try:
                self.answer(self.serve(fields, fd))
            finally:
                self.busy = False
                if fd is not None:
                    os.close(fd)
        return Exit.OK

    def answer(self, data):
        """One netstring to masq-send (gone: the next read sees EOF)."""
        try:
            self.sock.sendall(b"%d:%s," % (len(data), data))
        except OSError:
            pass

    def serve(self, fields, fd):
        """One request's answer: run masq-local as the user, or say why not."""
        if fd is None:
            return b"!the request needs exactly one descriptor, the message"
        if len(fields) < 5 or len(fields) % 2 == 0:
            return b"!the request needs USER QID SENDER and TARGET RECIPIENT pairs"
        name = fields[0].decode("utf-8", "surrogateescape")
        try:
            pw = pwd.getpwnam(name)
        except (KeyError, ValueError):
            return f"!no such user: {name}".encode("utf-8", "surrogateescape")
        if pw.pw_uid == 0 or pw.pw_gid == 0 or 0 in os.getgrouplist(name, pw.pw_gid):
            return f"!refusing to deliver as {name}: uid or gid 0".encode()
        argv = [self.local.encode(), b"--targets", b"--id", fields[1], b"--", *fields[2:]]
        status, output = self.spawn(pw, argv, fd)
        return str(status).encode() + b"\0" + output

    def spawn(self, pw, argv, fd):
        """Run argv as pw with fd on stdin; (exit status, stdout up to MAX_OUTPUT_BYTES)."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            _child(pw, argv, fd, w, self.mail_gid, self.conf_file)
        os.close(w)
        output, deadline = b"", time.monotonic() + self.timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([r], [], [], left)[0]:
                    break
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                output += chunk[:MAX_OUTPUT_BYTES - len(output)]
        finally:
            os.close(r)
        while True:         # its stdout closed; it may still be stopped: the same deadline
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() >= deadline:
                os.killpg(pid, signal.SIGKILL)      # SIGKILL ends a stopped process too
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.05)
        return os.waitstatus_to_exitcode(status), output


def _child(pw, argv, fd, w, mail_gid, conf_file):
    """In the forked child: become the user, then exec masq-local; never returns."""
    try:
        os.setsid()         # its own group: a timeout kills whatever it started
        os.dup2(fd, 0)
        os.dup2(w, 1)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.initgroups(pw.pw_name, pw.pw_gid)
        # the real and saved group are the user's: masq-local can drop the
        # effective one (the mail group, for the mbox only) for good
        egid = pw.pw_gid if mail_gid is None else mail_gid
        os.setresgid(pw.pw_gid, egid, pw.pw_gid)
        os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
        if os.getresuid() != (pw.pw_uid,) * 3 or 0 in os.getresgid():
            raise OSError("the user's ids did not stick")
        try:
            os.chdir(pw.pw_dir)
        except OSError:
            os.chdir("/")
        os.umask(0o077)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        env = {"PATH": PATH, "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
               "SHELL": "/bin/sh", "MASQ_CONF": conf_file}
        os.execve(argv[0], argv, env)
    except BaseException as e:      # noqa: BLE001 -- the child must never return into the loop
        try:
            os.write(2, f"masq-lspawn: fatal: unable to run masq-local as {pw.pw_name}: "
                        f"{e}\n".encode())
        finally:
            os._exit(Exit.TEMPORARY)


def read_request(sock):
    """(fields, fd or None) of the next request; None at EOF before one begins.

    A request and its descriptor come in one sendmsg; more than one
    descriptor, bytes after the netstring or a length over the cap are
    ProtocolErrors (every descriptor received is closed).
    """
    data, fds = b"", []
    try:
        while True:
            chunk, new, _, _ = socket.recv_fds(sock, MAX_REQUEST_BYTES + 16 - len(data), 2)
            fds += new
            if not chunk:
                if data or fds:
                    raise ProtocolError("the request was cut short")
                return None
            data += chunk
            length, colon, rest = data.partition(b":")
            if not length.isdigit() or len(length) > 6 or length[:1] == b"0" and length != b"0":
                raise ProtocolError("a request must be a netstring")
            if not colon:
                continue
            if int(length) > MAX_REQUEST_BYTES:
                raise ProtocolError(f"a request is at most {MAX_REQUEST_BYTES} bytes")
            if len(rest) <= int(length):
                continue
            if len(rest) > int(length) + 1 or rest[-1:] != b",":
                raise ProtocolError("a request must be a netstring, alone")
            break
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        fds = [None]
    return rest[:-1].split(b"\0"), fds[0]
