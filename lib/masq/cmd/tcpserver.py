"""masq-tcpserver: accept TCP connections and run a program for each one.

Usage:
  masq-tcpserver [-c LIMIT] [-C PERCLIENT] [-m MAXUSE] [-u USER] [-g GROUP] [-U] [-1]
                 HOST PORT PROGRAM...
  masq-tcpserver -h | --help

Options:
  -c LIMIT   Run at most LIMIT programs at once [default: 40].
  -C PERCLIENT  Serve at most PERCLIENT connections at once from one
             client address (IPv6: one /64); refuse more with a 421.
  -m MAXUSE  Let a masq-smtpd child serve up to MAXUSE connections, one
             after another, before it exits; 1: a process per
             connection [default: 100].
  -u USER    Once listening, become USER (a name or a number).
  -g GROUP   With -u: become GROUP too (a name or a number; default:
             USER's group in the passwd file).
  -U         Take -u and -g from $UID and $GID.
  -1         Print the local port on stdout once listening.
  -h --help  Show this.

ucspi-tcp compatible: each connection's socket is the program's fd 0 and
fd 1, and PROTO=TCP, TCPLOCALIP, TCPLOCALPORT, TCPREMOTEIP, TCPREMOTEPORT
describe it (tcp-environ(5); no DNS, so TCPREMOTEHOST is unset).  HOST is an
IPv4 or IPv6 address, 0 for every IPv4 address, :: for every address; when
systemd passes a listening socket (a .socket unit with Accept=no,
sd_listen_fds(3)), that socket is served and HOST PORT are not bound.  When
PROGRAM is masq-smtpd, its code runs in a forked child of this process
instead of a fresh Python, and such a child waits (up to IDLE_SECONDS)
for another connection after each session, up to MAXUSE sessions, as
Postfix's max_use lets an smtpd process do, saving the fork and exit per
connection; each session still gets a fresh environment and a fresh
session state.  The children waiting take the connections themselves (the
listener accepts only while none waits), and when the last one waiting
takes one, the listener forks a spare, so that no client waits for a fork.
A connection beyond -C gets
`421 4.7.0` from the listener itself (or from the -m child that took it,
after asking the listener), and is closed.  With -u, started as root, it binds the port,
then drops to USER and GROUP with no supplementary groups, before loading
PROGRAM or accepting.  SIGTERM stops the listener; sessions finish.
Exit codes: masq-tcpserver(8).
"""
import gc
import getopt
import grp
import importlib
import os
import pwd
import select
import signal
import socket
import sys
import time

from masq import Error, net, program
from masq.program import Exit

IN_PROCESS = {"masq-smtpd": "masq.cmd.smtpd", "masq-qmtpd": "masq.cmd.qmtpd"}
BACKLOG = 64
SD_LISTEN_FDS_START = 3         # the first socket systemd passes (sd_listen_fds(3))
ACCEPT_PAUSE_SECONDS = 0.5      # after accept fails (EMFILE...), listen again after this
IDLE_SECONDS = 10               # with -m: a child waits this long for its next connection
MAXUSE = 100                    # -m: sessions per child, as Postfix's max_use
STATUS_BYTES = 11               # a child's word to the listener: b"i" or b"b", then its pid
ASK_SECONDS = 10                # with -m and -C: a child waits this long for the listener
V6_PREFIX_BITS = 64             # one IPv6 client: a /64 is one site's, as Postfix counts
TOO_MANY = b"421 4.7.0 Error: too many connections from your address\r\n"


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    limit = _positive(args["-c"], "connection limit -c")
    maxuse = _positive(args["-m"], "-m")
    per_client = _positive(args["-C"], "-C") if args["-C"] is not None else None
    argv = args["PROGRAM"]
    ids = _ids(args["-u"], args["-g"])
    sock = inherited() or listen(args["HOST"], args["PORT"])
    if ids is not None:
        from masq import privilege
        privilege.become(*ids)
    runner = _in_process(argv)
    if args["-1"]:
        sys.stdout.write(f"{sock.getsockname()[1]}\n")
        sys.stdout.flush()
    serve(sock, argv, limit, runner, maxuse, per_client)
    return Exit.OK


def _positive(text, what):
    """A positive whole number from the command line, or the usage error."""
    try:
        value = int(text)
        if value >= 1:
            return value
    except ValueError:
        pass
    raise Error(f"bad {what} {text}: give a positive number", code=Exit.USAGE, temporary=False)


def parse(argv):
    """Options as getopt(3) reads them (docopt takes `-1` for a number)."""
    try:
        opts, rest = getopt.getopt(argv, "c:C:m:u:g:U1h", ["help"])
    except getopt.GetoptError as e:
        raise Error(f"{e}: see masq-tcpserver --help", code=Exit.USAGE, temporary=False) from None
    args = {"-c": "40", "-C": None, "-m": str(MAXUSE), "-1": False, "-u": None, "-g": None}
    for name, value in opts:
        if name in ("-h", "--help"):
            program.parse(__doc__, ["--help"])
        if name == "-U":            # ucspi-tcp's -U: the ids envuidgid(8) left
            args["-u"], args["-g"] = os.environ.get("UID"), os.environ.get("GID")
            if not args["-u"] or not args["-g"]:
                raise Error("-U needs $UID and $GID: see masq-tcpserver --help",
                            code=Exit.USAGE, temporary=False)
        else:
            args[name] = value if name in ("-c", "-C", "-m", "-u", "-g") else True
    if args["-g"] is not None and args["-u"] is None:
        raise Error("-g needs -u: see masq-tcpserver --help", code=Exit.USAGE, temporary=False)
    if len(rest) < 3:
        raise Error("need HOST PORT PROGRAM: see masq-tcpserver --help",
                    code=Exit.USAGE, temporary=False)
    args["HOST"], args["PORT"], args["PROGRAM"] = rest[0], rest[1], rest[2:]
    return args


def _ids(user, group):
    """(uid, gid, name) to become from -u and -g, or None; Error 64 for an unknown one."""
    if user is None:
        return None
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        pw = None
        if not user.isdigit():
            raise Error(f"no user {user} (-u): give an existing user or a number",
                        code=Exit.USAGE, temporary=False) from None
    uid = int(user) if user.isdigit() else pw.pw_uid
    if group is None:
        if pw is None:
            raise Error(f"uid {user} has no passwd entry: give its group with -g",
                        code=Exit.USAGE, temporary=False)
        gid = pw.pw_gid
    elif group.isdigit():
        gid = int(group)
    else:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise Error(f"no group {group} (-g): give an existing group or a number",
                        code=Exit.USAGE, temporary=False) from None
    return uid, gid, pw.pw_name if pw else f"uid {uid}"


def _in_process(argv):
    """The main() to call in a forked child for a program we carry, else None."""
    module_name = IN_PROCESS.get(os.path.basename(argv[0]))
    if module_name is None:
        return None
    module = importlib.import_module(module_name)
    module.preload(argv[1:])
    return module.main


def inherited():
    """The listening socket systemd passed (sd_listen_fds(3): fd 3), or None.

    A masq-smtpd.socket unit with Accept=no: the port is systemd's, and
    HOST PORT are not bound.  LISTEN_* are not passed on to the sessions.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or not os.environ.get("LISTEN_FDS"):
        return None
    count = os.environ["LISTEN_FDS"]
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count != "1":
        raise Error(f"systemd passed {count} sockets: give masq-tcpserver one",
                    code=Exit.USAGE, temporary=False)
    try:
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as e:
        raise Error(f"the socket systemd passed is unusable: {e.strerror}",
                    code=Exit.TEMPORARY) from None
    if not listening or sock.type != socket.SOCK_STREAM:
        raise Error("the socket systemd passed is no listening stream socket: "
                    "use ListenStream= and Accept=no", code=Exit.USAGE, temporary=False)
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


def listen(host, port):
    """A listening socket on HOST PORT (numeric host; 0 means every IPv4 address)."""
    if host == "0":
        host = "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError) as e:
        raise Error(f"bad address {host} port {port}: {e}: give numbers",
                    code=Exit.USAGE, temporary=False) from None
    family, kind, proto, _, where = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(where)
        sock.listen(BACKLOG)
    except OSError as e:
        raise Error(f"unable to bind {host} port {port}: {e.strerror}",
                    code=Exit.TEMPORARY) from None
    sock.setblocking(False)
    return sock


class Clients:
    """Connections per client address (-C): who holds how many, by child pid.

    A child serving one connection holds its count until it is reaped.  A
    -m child that accepts its own next connection asks first over its
    channel (a SOCK_SEQPACKET socketpair): "+IP" is answered "y" (counted)
    or "n" (refuse it), and "-" at the end of each session is answered "k"
    once the count is down, before the client sees the connection close.
    """

    def __init__(self, limit):
        self.limit = limit
        self.count = {}         # client key -> connections
        self.held = {}          # pid -> client key
        self.channels = {}      # listener's end of a -m child's channel -> pid

    def admits(self, ip):
        return self.count.get(_client_key(ip), 0) < self.limit

    def take(self, pid, ip):
        self.release(pid)
        key = _client_key(ip)
        self.count[key] = self.count.get(key, 0) + 1
        self.held[pid] = key

    def release(self, pid):
        key = self.held.pop(pid, None)
        if key is not None:
            self.count[key] -= 1
            if not self.count[key]:
                del self.count[key]

    def answer(self, fd):
        """Answer one question from a child's channel; False at its end."""
        try:
            said = os.read(fd, 512)
        except BlockingIOError:
            return True
        except OSError:
            said = b""
        if not said:
            return False
        pid = self.channels[fd]
        if said.startswith(b"+"):
            ip = said[1:].decode("ascii", "replace")
            if self.admits(ip):
                self.take(pid, ip)
                reply = b"y"
            else:
                reply = b"n"
        else:
            self.release(pid)
            reply = b"k"
        try:
            os.write(fd, reply)
        except OSError:
            return False
        return True

    def forget(self, pid):
        """A reaped child's count, and its channel: the fds to close."""
        self.release(pid)
        return [fd for fd, p in self.channels.items() if p == pid]


def _client_key(ip):
    """What -C counts by: the IPv4 address, or the IPv6 /64."""
    return net.prefix(ip, V6_PREFIX_BITS)


def serve(sock, argv, limit, runner, maxuse=1, per_client=None):
    """Accept until SIGTERM, at most `limit` children at once; reap them.

    With children that serve several connections (-m), the listener accepts
    only while no child waits for one: each child says on the status pipe
    when it starts to wait (b"i") and when it has taken a connection (b"b").
    When the last child waiting takes one, a spare is forked to wait in its
    place: a new connection finds a process ready, not a fork to wait for.
    """
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    reuse = maxuse > 1 and runner is not None
    # children that serve several connections watch this pipe: at its EOF
    # (the listener stopped or died) they stop waiting for connections
    alive_r, alive_w = os.pipe2(os.O_CLOEXEC) if reuse else (None, None)
    status_r, status_w = os.pipe2(os.O_CLOEXEC) if reuse else (None, None)
    if status_r is not None:
        os.set_blocking(status_r, False)
    stop = []
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    children = set()
    idle = set()                # children waiting for a connection (status "i")
    clients = Clients(per_client) if per_client else None
    poller = select.poll()
    poller.register(wake_r, select.POLLIN)
    if status_r is not None:
        poller.register(status_r, select.POLLIN)
    listening = False
    gc.collect()
    gc.freeze()         # a child's collections skip the listener's objects: less copy-on-write
    program.title(f"masq-tcpserver {sock.getsockname()[0]} {sock.getsockname()[1]}")
    resume = 0.0            # after EMFILE: do not accept before this (monotonic)
    spare = False           # a child took a connection: is one left waiting?

    def fork(conn, ip):
        """A child for this connection, or a spare (conn None) that waits for one."""
        mine = theirs = None
        if clients and reuse:       # a -m child asks before it serves
            mine, theirs = (s.detach() for s in socket.socketpair(
                socket.AF_UNIX, socket.SOCK_SEQPACKET))
            os.set_blocking(mine, False)
        close = [fd for fd in (wake_r, wake_w, alive_w, status_r, mine) if fd is not None]
        close += list(clients.channels) if clients else []
        pid = _start(conn, sock, argv, runner, close, alive_r, maxuse, theirs, status_w)
        if theirs is not None:
            os.close(theirs)
        if pid > 0:
            children.add(pid)
            if conn is None:
                idle.add(pid)       # it waits from its first instant
            elif clients:
                clients.take(pid, ip)
            if mine is not None:
                clients.channels[mine] = pid
                poller.register(mine, select.POLLIN)
        elif mine is not None:
            os.close(mine)
        return pid

    while not stop:
        for pid in _reap(children):
            idle.discard(pid)
            for fd in clients.forget(pid) if clients else ():
                poller.unregister(fd)
                os.close(fd)
                del clients.channels[fd]
        if spare and not idle and len(children) < limit and not stop:
            fork(None, None)        # every child is busy: one more waits for the next
        spare = False
        want = len(children) < limit and time.monotonic() >= resume and not idle
        if want != listening:
            listening = want
            if listening:
                poller.register(sock, select.POLLIN)
            else:
                poller.unregister(sock)
        timeout = None if listening or not resume else max(0, resume - time.monotonic()) * 1000
        for fd, _ in poller.poll(timeout):
            if fd == wake_r:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            elif fd == status_r:
                spare = _read_status(status_r, children, idle) or spare
            elif clients and fd in clients.channels:
                if not clients.answer(fd):
                    poller.unregister(fd)
                    os.close(fd)
                    clients.release(clients.channels.pop(fd))
            elif fd == sock.fileno() and listening and not stop and len(children) < limit:
                try:
                    conn, _ = sock.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                except OSError as e:        # EMFILE and friends: say so, pause, go on
                    program._say(f"{program.name()}: warning: unable to accept: {e.strerror}")
                    resume = time.monotonic() + ACCEPT_PAUSE_SECONDS   # not a busy loop
                    continue
                ip = _ip(conn.getpeername()[0]) if clients else None
                if clients and not clients.admits(ip):
                    _refuse(conn)
                    conn.close()
                    continue
                spare = fork(conn, ip) > 0 and reuse
                conn.close()
    # shutdown, not only close: a -m child holds a copy of this socket, and the
    # port must stop listening now, not when that child's session ends
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
    for fd in (alive_w, alive_r, status_r, status_w, *(clients.channels if clients else ())):
        if fd is not None:
            os.close(fd)


def _read_status(fd, children, idle):
    """What the children said on the status pipe; True when one took a connection."""
    try:
        data = os.read(fd, STATUS_BYTES * 256)
    except BlockingIOError:
        return False
    busy = False
    for at in range(0, len(data) - STATUS_BYTES + 1, STATUS_BYTES):
        word, pid = data[at:at + 1], int(data[at + 1:at + STATUS_BYTES])
        if word == b"i" and pid in children:
            idle.add(pid)
        else:
            idle.discard(pid)
            busy = True
    return busy


def _tell(status, word):
    """Say to the listener that this child waits (b"i") or serves (b"b"); one
    write of less than PIPE_BUF bytes, so the children's words never mix."""
    if status is not None:
        try:
            os.write(status, word + b"%010d" % os.getpid())
        except OSError:
            pass


def _reap(children):
    """The pids of the children that ended, reaped."""
    ended = []
    while children:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            ended += children
            children.clear()
            break
        if pid == 0:
            break
        children.discard(pid)
        ended.append(pid)
    return ended


def _refuse(conn):
    """Say 421 to a client over its limit, without waiting on it (-C)."""
    try:
        conn.setblocking(False)
        conn.send(TOO_MANY)
    except OSError:
        pass


def _start(conn, sock, argv, runner, close, alive=None, maxuse=1, channel=None, status=None):
    """Fork a child with the connection on fds 0 and 1 (None: a spare that
    waits for its first connection); return its pid."""
    try:
        pid = os.fork()
    except OSError as e:
        program._say(f"{program.name()}: warning: unable to fork: {e.strerror}")
        return -1
    if pid:
        return pid
    code = Exit.TEMPORARY
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for fd in close:
            os.close(fd)
        if alive is None:
            sock.close()            # one connection: the listener is not ours to keep
        if runner is None:
            _place(conn)
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            try:
                os.execvp(argv[0], argv)
            except OSError as e:
                program._say(f"{program.name()}: fatal: unable to run {argv[0]}: {e.strerror}")
                code = Exit.TEMPORARY
        else:
            sys.argv = list(argv)
            environ = dict(os.environ)
            maxuse = maxuse if alive is not None else 1
            waiting = _Waiting(sock, alive) if alive is not None else None
            for _ in range(maxuse):
                if conn is None:
                    _tell(status, b"i")
                    conn = _next_connection(waiting, channel)
                    if conn is None:
                        break
                    _tell(status, b"b")
                _place(conn)
                conn = None
                code = program.run(runner, argv[1:])
                if channel is not None:
                    _ask(channel, b"-")     # counted down before the client sees the end
                # the client sees the end now, not after the kernel has torn
                # down this process's copy of the listener's memory; /dev/null
                # keeps fds 0 and 1 taken, so the next accept cannot land there
                _release_connection()
                _cancel_alarm()
                # for the next session, now rather than while a client waits
                _restore_environ(environ)
    except BaseException:  # noqa: BLE001 -- a child must never return into the loop
        pass
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os._exit(code if isinstance(code, int) else Exit.TEMPORARY)


def _restore_environ(environ):
    """os.environ as the listener had it: what a session added goes, what it
    changed comes back (only those: a whole clear and update costs more than
    the session's own work with a few dozen variables)."""
    for name in [n for n in os.environ if n not in environ]:
        del os.environ[name]
    for name, value in environ.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def _place(conn):
    """The connection on fds 0 and 1, described by tcp-environ(5)."""
    _set_environ(conn)
    conn.setblocking(True)
    os.dup2(conn.fileno(), 0)
    os.dup2(conn.fileno(), 1)
    conn.close()


def _release_connection():
    """Put /dev/null on fds 0 and 1: the client's socket is closed, the fds stay taken."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    if null > 1:
        os.close(null)


def _ask(channel, question):
    """The listener's one-byte answer on a -m child's channel; b"" if it is gone."""
    try:
        os.write(channel, question)
        ready, _, _ = select.select([channel], [], [], ASK_SECONDS)
        return os.read(channel, 1) if ready else b""
    except OSError:
        return b""


class _Waiting:
    """What a -m child waits on between sessions: the listening socket, and the
    listener's pipe.  With EPOLLEXCLUSIVE the kernel wakes one waiting child
    per connection, not all of them (the others would find nothing to accept)."""

    def __init__(self, sock, alive):
        self.sock, self.alive = sock, alive
        self.poller = select.epoll()
        self.poller.register(sock, select.EPOLLIN | getattr(select, "EPOLLEXCLUSIVE", 0))
        self.poller.register(alive, select.EPOLLIN)

    def wait(self, seconds):
        """"conn", "gone" (the listener stopped) or "" (nothing within seconds)."""
        events = [fd for fd, _ in self.poller.poll(seconds)]
        if self.alive in events:
            return "gone"
        return "conn" if events else ""


def _next_connection(waiting, channel=None):
    """Wait for the next connection on the listening socket; None to stop.

    With a channel (-C), a connection the listener says is one too many
    from its client gets the 421 and is closed here.
    """
    deadline = time.monotonic() + IDLE_SECONDS
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        what = waiting.wait(left)
        if what == "gone":
            return None             # the listener is gone: stop at once
        if what == "conn":
            try:
                conn, peer = waiting.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue            # another process took it
            except OSError:
                return None
            if channel is not None:
                answer = _ask(channel, b"+" + _ip(peer[0]).encode())
                if answer != b"y":      # too many, or no word from the listener: refused
                    _refuse(conn)
                    conn.close()
                    if answer != b"n":
                        return None     # the listener is gone or stuck: this child stops
                    continue
            return conn


def _cancel_alarm():
    """No session's write deadline may outlive it."""
    signal.alarm(0)


def _set_environ(conn):
    """tcp-environ(5), without DNS: TCPREMOTEHOST and TCPREMOTEINFO are unset."""
    local, remote = conn.getsockname(), conn.getpeername()
    os.environ.update({"PROTO": "TCP", "TCPLOCALIP": _ip(local[0]),
                       "TCPLOCALPORT": str(local[1]), "TCPREMOTEIP": _ip(remote[0]),
                       "TCPREMOTEPORT": str(remote[1])})
    for name in ("TCPREMOTEHOST", "TCPREMOTEINFO", "TCPLOCALHOST"):
        os.environ.pop(name, None)


def _ip(text):
    """An IPv4-mapped IPv6 address as plain IPv4, as tcpserver shows it."""
    return text[7:] if text.startswith("::ffff:") and "." in text else text
