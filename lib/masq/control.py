"""The control socket: mailq and runq for users who cannot read the spool (system mode).

The masq-send daemon listens on spool/control (AF_UNIX, SOCK_STREAM, mode
0666) in the select loop that waits on the trigger FIFO.  One request per
connection: the client sends one line and reads the answer to EOF.

    list            ok, then the mailq text (describe(): envelopes and
                    state, never message contents); "denied" for a user
                    other than root and masq when [queue] show_queue = "admin"
    flush           ok; then the daemon runs the queue (runq)
    flush ROUTE     ok for root and masq, as if ROUTE were online (runq -qo ROUTE);
                    "denied" for anyone else
    anything else   error

The first line of an answer is `ok`, `denied TEXT` or `error TEXT`.  The
caller's uid comes from SO_PEERCRED (the kernel's word, not the client's)
and is logged.  A client has REQUEST_SECONDS in all to send its line and
take its answer, so a slow one cannot stall the daemon for longer.
"""
import os
import pwd
import socket
import stat
import struct
import time

from masq import Error, log, spool
from masq.program import Exit

NAME = "control"
MAX_REQUEST_BYTES = 512
REQUEST_SECONDS = 2.0           # a client's whole turn: the daemon waits on no one longer
CLIENT_SECONDS = 60.0           # a listing of a long queue takes a while to build


class NotRunningError(Error):
    """No masq-send daemon answers on the control socket."""

    code = Exit.UNAVAILABLE


def describe(queue, conf=None):
    """What mailq prints: one block per message, each recipient with why it waits; no contents."""
    lines, count, now = [], 0, time.time()
    for stage in spool.STAGES:
        for qid in queue.ids(stage):
            try:
                msg = spool.Message(queue, stage, qid)
            except FileNotFoundError:
                continue
            except spool.FormatError as e:
                lines.append(f"{qid:<24}  unreadable: {e}\n")
                continue
            count += 1
            mark = {"incoming": " ", "active": "*", "hold": "!"}[stage]
            when = time.strftime("%a %b %d %H:%M:%S", time.localtime(msg.arrived))
            sender = msg.sender or "<>"
            lines.append(f"{qid + mark:<24} {msg.size:>9} {when}  {sender}\n")
            for i, rcpt in enumerate(msg.recipients):
                why = waiting(msg, i, conf, now)
                if why is not None:
                    lines.append(f"{'':<55}{rcpt} ({why})\n")
    if not count and not lines:
        return ["Mail queue is empty\n"]
    header = "-Queue ID-              --Size-- ----Arrival Time----  -Sender/Recipient-------\n"
    footer = f"-- {count} message{'s' if count != 1 else ''}; * active, ! on hold\n"
    return [header, *lines, footer]


def waiting(msg, i, conf=None, now=None):
    """Why recipient i of msg waits, in a few words; None when it is done with.

    From the spool's records (masq-spool(5)): the hold reason, the route it
    waits for, or the next retry (attempt.backoff, as masq-send reckons it:
    the most failed attempts of the message's deferred recipients) with the
    last reply.  Without conf the retry time is left out.
    """
    word, when, text = msg.state.get(i, ("", 0.0, ""))
    if word == "done":
        return None
    if msg.stage == "hold":
        return msg.held[1] if msg.held else "on hold"
    if word == "failed":
        return f"failed: {text}"        # bounced; the file goes at the end of the attempt
    if word == "waiting":
        return text
    if word == "deferred":
        if conf is None:
            return f"deferred: {text}"
        from masq import attempt    # only here: mailq of a queue without deferrals skips it
        tries = max(n for j, n in msg.attempts.items() if msg.state[j][0] == "deferred")
        due = when + attempt.backoff(conf, tries)
        if due <= (now or time.time()):
            return f"deferred: retry due now: {text}"
        return f"deferred: until {time.strftime('%a %b %d %H:%M:%S', time.localtime(due))}: {text}"
    if msg.stage == "incoming":
        return "not picked up by masq-send yet"
    return "not tried yet"


def is_admin(conf, uid):
    """Root, the masq user, and the user the daemon runs as may do everything."""
    if uid in (0, os.geteuid()):
        return True
    try:
        return uid == pwd.getpwnam(conf.get("user")).pw_uid
    except KeyError:
        return False


class Server:
    """The daemon's listening socket; fileno() for select, then serve(act)."""

    def __init__(self, conf, queue):
        self.conf, self.queue = conf, queue
        self.path = queue.folder(NAME)
        try:
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode):       # left by a daemon that died
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise Error(f"unable to remove the old {self.path}: {e.strerror}") from None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.bind(self.path)
            os.chmod(self.path, 0o666)      # every user may ask; SO_PEERCRED says who
            self.sock.listen(16)
        except OSError as e:
            self.sock.close()
            raise Error(f"unable to listen on {self.path}: {e.strerror or e}") from None
        self.sock.setblocking(False)

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def serve(self):
        """Answer one waiting client; return ("flush", ROUTE or None) when a run is asked for."""
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        deadline = time.monotonic() + REQUEST_SECONDS
        with conn:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            try:
                request = _read_line(conn, deadline)
            except (OSError, ValueError) as e:
                log.warn(f"control: uid {uid}: {e}")
                return None
            try:
                answer, action = self.answer(uid, request)
            except Error as e:          # no spool now: the daemon goes on, the client is told
                answer, action = f"error {e}\n", None
            log.line(f"control: uid {uid}: {request!r}: {answer.splitlines()[0]}")
            try:
                _send(conn, answer.encode("utf-8", "replace"), deadline)
            except OSError as e:
                log.warn(f"control: uid {uid}: {e}; answer not sent")
        return action

    def answer(self, uid, request):
        """(answer text, action for the daemon) for one request line."""
        words = request.split()
        if words == ["list"]:
            if self.conf.get("queue.show_queue") == "admin" and not is_admin(self.conf, uid):
                return "denied the mail queue is shown only to root and masq\n", None
            return "ok\n" + "".join(describe(self.queue, self.conf)), None
        if words[:1] == ["flush"] and len(words) <= 2:
            route = words[1] if len(words) == 2 else None
            if route and not is_admin(self.conf, uid):
                return "denied only root and masq may run the queue for a route\n", None
            if route and route not in dict(self.conf.routes):
                return f"error no route named {route}\n", None
            return "ok\n", ("flush", route)
        return "error unknown request: list, flush or flush ROUTE\n", None


def _read_line(conn, deadline):
    """One request line, within the deadline and MAX_REQUEST_BYTES."""
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ValueError("no request in time")
        conn.settimeout(left)
        chunk = conn.recv(MAX_REQUEST_BYTES)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            raise ValueError("request too long")
    return data.split(b"\n", 1)[0].decode("ascii", "replace").strip()


def _send(conn, data, deadline):
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client did not read its answer in time")
        conn.settimeout(left)
        view = view[conn.send(view):]


def ask(queue, request, timeout=CLIENT_SECONDS):
    """Send one request to the daemon; (status word, rest of the first line, the text after).

    Raises NotRunningError when no daemon listens.
    """
    path = queue.folder(NAME)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunningError("masq-send is not running") from None
        except OSError as e:
            raise Error(f"unable to reach masq-send at {path}: {e.strerror or e}",
                        code=Exit.UNAVAILABLE) from None
        try:
            sock.sendall(request.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError as e:
            raise Error(f"masq-send did not answer: {e.strerror or e}",
                        code=Exit.TEMPFAIL) from None
    status, _, text = b"".join(chunks).decode("utf-8", "replace").partition("\n")
    word, _, why = status.partition(" ")
    if word not in ("ok", "denied", "error"):
        raise Error("masq-send gave no answer", code=Exit.TEMPFAIL)
    return word, why, text
