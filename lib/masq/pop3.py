"""The POP3 client (RFC 1939; CAPA and response codes RFC 2449; STLS RFC 2595)
and the fetch accounts of [[route.NAME.fetch]] (masq.toml(5), masq-fetch(8)).

    session = pop3.Session(account)         # connected, TLS as the account says
    session.login()                         # APOP or USER/PASS; LoginError if refused
    sizes, uids = session.list(), session.uidl()
    stream = session.retr(n)                # the message: read(n), dots unstuffed
    session.dele(n); session.quit()         # deletions happen at QUIT only

Every failure raises POP3Error: LoginError (the server refused the login:
a sysexits 77, or 75 when the server says it is temporary), ConnectionLost
(temporary).  ssl is imported only for an account that uses TLS; socket
only when a connection is made.

A hostile server is bounded: a reply line at MAX_REPLY_BYTES, a LIST or UIDL
listing at MAX_LISTING_LINES and MAX_LISTING_BYTES, a message at the size
limit given to retr() (checked as the data arrives), each read at the
command timeout and the whole session at SESSION_SECONDS.  Past any of them
the session ends without QUIT (TooMuch, a ConnectionLost): nothing marked
for deletion is deleted.  Unique ids outside RFC 1939's 0x21-0x7E, or given
to two messages, count as none.
"""
import os
import stat
import time

from masq import Error, files, net, outcome

DEFAULT_PORTS = {"pop3s": 995, "stls": 110, "none": 110}
CONNECT_TIMEOUT_SECONDS = 30
COMMAND_TIMEOUT_SECONDS = 120       # each read of a reply or of message data
MAX_REPLY_BYTES = 4096              # RFC 1939 section 3 allows 512; be lenient
RECV_BYTES = 65536
SESSION_SECONDS = 3600              # a whole session, login to QUIT
MAX_LISTING_LINES = 100_000         # LIST and UIDL, whatever max_count says
MAX_LISTING_BYTES = 16 << 20
# RFC 2449 section 8: the server says why a login failed; these are worth a retry
TEMPORARY_CODES = ("[IN-USE]", "[LOGIN-DELAY]", "[SYS/TEMP]")


class POP3Error(Error):
    """The session failed; retrying later can help (sysexits 75)."""

    code = 75
    temporary = True


class LoginError(POP3Error):
    """The server refused the user name or password (sysexits 77), unless its
    response code says the refusal is temporary."""

    def __init__(self, text):
        temporary = any(code in text for code in TEMPORARY_CODES)
        super().__init__(text, code=75 if temporary else 77, temporary=temporary)


class ConnectionLost(POP3Error):
    """No connection, or it ended or timed out under us."""


class TooMuch(ConnectionLost):
    """The server sent more than we take, or took too long: the session ends
    without QUIT."""


class Account:
    """One [[route.NAME.fetch]] entry, checked: host, port, tls, user, the rest."""

    def __init__(self, conf, route, index, table):
        self.route, self.index = route, index
        where = f"{conf.file}: [[route.{route}.fetch]] number {index + 1}"
        for need in ("server", "user", "password_file"):
            if not table.get(need):
                raise Error(f"{where} needs {need}", code=78, temporary=True)
        self.tls = table.get("tls", "pop3s")
        if self.tls not in DEFAULT_PORTS:
            raise Error(f'{where}: tls must be "pop3s", "stls" or "none"', code=78)
        try:
            self.host, port = net.host_port(table["server"])
        except ValueError:
            raise Error(f"{where}: server {table['server']} has a bad port", code=78) from None
        self.port = port or DEFAULT_PORTS[self.tls]
        self.ca_file = conf.path(table["tls_ca_file"], is_value=True) \
            if table.get("tls_ca_file") else None
        self.user = str(table["user"])
        self.password_file = conf.path(table["password_file"], is_value=True)
        self.apop = bool(table.get("apop", False))
        self.keep = bool(table.get("keep", False))
        self.max_size = table.get("max_size")
        self.deliver_to = table.get("deliver_to") or None
        self.max_count = table.get("max_count")

    @property
    def label(self):
        return f"{self.user}@{self.host}:{self.port}"

    def password(self):
        """The first line of password_file, which only its owner may read (as for
        a route's auth: masq.clientroute)."""
        from masq import clientroute
        try:
            return clientroute.read_secret(self.password_file)
        except Error as e:
            raise Error(str(e), code=78, temporary=True) from None


def accounts(conf, route):
    """The Accounts of [route.ROUTE], in the file's order."""
    tables = dict(conf.routes).get(route, {}).get("fetch") or []
    return [Account(conf, route, i, table) for i, table in enumerate(tables)]


def login_before_smtp(conf, route):
    """POP-before-SMTP: log in to the route's fetch account whose user is the route's
    `pop_before_smtp`, and log out, touching no message.  Nothing to do without it."""
    table = dict(conf.routes).get(route) or {}
    user = table.get("pop_before_smtp")
    if not user:
        return
    found = [a for a in accounts(conf, route) if a.user == user]
    if not found:
        raise Error(f"{conf.file}: [route.{route}] pop_before_smtp = \"{user}\" names no "
                    f"[[route.{route}.fetch]] with that user", code=78)
    session = Session(found[0])
    try:
        session.login()
        session.quit()
    finally:
        session.close()


class Session:
    """One connection to a POP3 server, from the greeting to QUIT."""

    def __init__(self, account, timeout=COMMAND_TIMEOUT_SECONDS, seconds=SESSION_SECONDS):
        import socket   # only when mail is fetched
        self.account, self.timeout = account, timeout
        self.seconds, self.deadline = seconds, time.monotonic() + seconds
        self.peer = account.label
        self.buf, self.pos = bytearray(), 0     # what is read, and where the next line starts
        self.sock = None
        try:
            self.sock = socket.create_connection((account.host, account.port),
                                                 timeout=CONNECT_TIMEOUT_SECONDS)
        except OSError as e:
            raise ConnectionLost(f"{account.host}:{account.port}: unable to connect: "
                                 f"{e.strerror or e}") from None
        try:
            self.address = self.sock.getpeername()[0]
            self.sock.settimeout(timeout)
            if account.tls == "pop3s":
                self._start_tls()
            self.greeting = self._reply("the greeting")
            if account.tls == "stls":
                self.command(b"STLS", "STLS")
                self._start_tls()
        except BaseException:
            self.close()
            raise

    def _start_tls(self):
        import ssl      # only for an account with TLS
        acct = self.account
        try:
            context = ssl.create_default_context(cafile=acct.ca_file)
        except (OSError, ssl.SSLError) as e:
            raise Error(f"unable to load tls_ca_file {acct.ca_file}: "
                        f"{getattr(e, 'strerror', None) or e}", code=78) from None
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname=acct.host)
        except (OSError, ssl.SSLError) as e:
            raise ConnectionLost(f"{self.peer}: TLS failed: {e}") from None
        # RFC 2595 section 4: nothing read before STLS counts after it
        self.buf, self.pos = bytearray(), 0

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def _recv(self, what):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TooMuch(f"{self.peer}: the session took more than {self.seconds:g} s "
                          f"(at {what}): ended without QUIT")
        try:
            self.sock.settimeout(min(self.timeout, left))
            data = self.sock.recv(RECV_BYTES)
        except TimeoutError:
            if left < self.timeout:
                raise TooMuch(f"{self.peer}: the session took more than {self.seconds:g} s "
                              f"(at {what}): ended without QUIT") from None
            raise ConnectionLost(f"{self.peer}: timeout after {self.timeout:g} s "
                                 f"waiting for {what}") from None
        except OSError as e:
            raise ConnectionLost(f"{self.peer}: connection lost waiting for {what}: "
                                 f"{e.strerror or e}") from None
        if not data:
            raise ConnectionLost(f"{self.peer}: connection closed waiting for {what}")
        return data

    def readline(self, limit, what, many=False):
        """One line with its CRLF (or the first `limit` bytes of a longer one);
        with `many`, all the whole lines the buffer has, up to `limit` bytes,
        reading only when it has none (a line longer than `limit` comes in pieces)."""
        buf, pos = self.buf, self.pos
        while True:
            end = (buf.rfind if many else buf.find)(b"\n", pos, pos + limit)
            if end >= 0 or len(buf) - pos >= limit:
                end = end + 1 if end >= 0 else pos + limit
                self.pos = end
                return bytes(buf[pos:end])
            del buf[:pos]       # only when more must be read: each byte moves once
            pos = self.pos = 0
            buf += self._recv(what)

    def _reply(self, what):
        """The text after +OK; POP3Error (LoginError for a login) after -ERR."""
        line = self.readline(MAX_REPLY_BYTES, f"the reply to {what}")
        text = outcome.one_line(line.rstrip(b"\r\n").decode("utf-8", "replace"))
        if text.startswith("+OK"):
            return text[3:].strip()
        raise POP3Error(f"{self.peer}: {what} failed: {text[:200]}")

    def command(self, line, what=None):
        """Send one command; the text of its +OK reply."""
        if b"\r" in line or b"\n" in line:
            raise POP3Error(f"{self.peer}: a line break in a POP3 command")
        try:
            self.sock.sendall(line + b"\r\n")
        except OSError as e:
            raise ConnectionLost(f"{self.peer}: connection lost sending "
                                 f"{what or line.split()[0].decode()}: {e}") from None
        return self._reply(what or line.split()[0].decode())

    def login(self):
        """APOP (RFC 1939 section 7) or USER and PASS; LoginError when refused."""
        acct = self.account
        secret = acct.password()
        user = acct.user.encode()
        try:
            if acct.apop:
                start, end = self.greeting.find("<"), self.greeting.find(">")
                if start < 0 or end < start:
                    raise LoginError(f"{self.peer}: apop = true, but the server offers no "
                                     "APOP (no timestamp in its greeting)")
                import hashlib  # only for APOP
                digest = hashlib.md5(self.greeting[start:end + 1].encode() + secret).hexdigest()
                self.command(b"APOP " + user + b" " + digest.encode(), "APOP")
            else:
                self.command(b"USER " + user, "USER")
                self.command(b"PASS " + secret, "PASS")
        except (LoginError, ConnectionLost):
            raise
        except POP3Error as e:
            raise LoginError(f"login refused for {acct.user}: {e}") from None

    def _multiline(self, what):
        """The lines of a multi-line reply, without the final dot; TooMuch past
        MAX_LISTING_LINES or MAX_LISTING_BYTES."""
        lines, size = [], 0
        while True:
            line = self.readline(MAX_REPLY_BYTES, what)
            size += len(line)
            line = line.rstrip(b"\r\n")
            if line == b".":
                return lines
            if len(lines) >= MAX_LISTING_LINES or size > MAX_LISTING_BYTES:
                raise TooMuch(f"{self.peer}: the {what} listing is longer than "
                              f"{MAX_LISTING_LINES} lines or {MAX_LISTING_BYTES} bytes: "
                              "ended without QUIT")
            lines.append(line[1:] if line.startswith(b".") else line)

    def list(self):
        """{message number: size in octets}."""
        self.command(b"LIST")
        sizes = {}
        for line in self._multiline("LIST"):
            try:
                number, size = line.split()[:2]
                sizes[int(number)] = int(size)
            except ValueError:
                raise POP3Error(f"{self.peer}: a LIST line that makes no sense: "
                                f"{line[:80]!r}") from None
        return sizes

    def uidl(self):
        """{message number: unique id}, or None when the server has no UIDL.

        An id that is no 1 to 70 characters 0x21-0x7E (RFC 1939 section 7), or
        that two messages share, is left out: those messages have none."""
        try:
            self.command(b"UIDL")
        except ConnectionLost:
            raise
        except POP3Error:
            return None
        uids, shared = {}, set()
        for line in self._multiline("UIDL"):
            try:
                number, uid = line.split()[:2]
                number = int(number)
            except ValueError:
                raise POP3Error(f"{self.peer}: a UIDL line that makes no sense: "
                                f"{line[:80]!r}") from None
            if len(uid) <= 70 and all(0x21 <= c <= 0x7E for c in uid):
                uids[number] = uid.decode("ascii")
        seen = set()
        for uid in uids.values():
            (shared if uid in seen else seen).add(uid)
        return {n: uid for n, uid in uids.items() if uid not in shared}

    def retr(self, number, limit=None):
        """The message: a Retrieval stream (read(n)), after RETR's +OK; TooMuch
        from read() once more than `limit` bytes came."""
        self.command(b"RETR %d" % number)
        return Retrieval(self, f"message {number}", limit)

    def dele(self, number):
        self.command(b"DELE %d" % number)

    def quit(self):
        """QUIT: the server deletes what was marked (RFC 1939 section 6)."""
        self.command(b"QUIT")


class Retrieval:
    """A multi-line message reply as a stream: dots unstuffed, ending before the
    final dot.  Line ends stay as sent (the spool turns CRLF into LF)."""

    def __init__(self, session, what, limit=None):
        self.session, self.what, self.limit = session, what, limit
        self.at_start = True        # at the start of a line
        self.done = False
        self.size = 0               # bytes read, as sent

    def read(self, n=-1):
        """At least one line (or RECV_BYTES of a longer one), whole lines up to
        about n bytes; b"" at the end."""
        out = []
        want = RECV_BYTES if n is None or n < 0 else n
        got = 0
        while not self.done and got < want:
            chunk = self.session.readline(RECV_BYTES, self.what, many=True)
            self.size += len(chunk)
            if self.limit is not None and self.size > self.limit + 3:     # + ".\r\n"
                raise TooMuch(f"{self.session.peer}: {self.what} is more than the limit "
                              f"of {self.limit} bytes (whatever LIST said): ended "
                              "without QUIT")
            if b"\n." in chunk or (self.at_start and chunk.startswith(b".")):
                chunk = self._unstuff(chunk)
            else:               # no line starts with a dot: as it came
                self.at_start = chunk.endswith(b"\n")
            out.append(chunk)
            got += len(chunk)
        return b"".join(out)

    def _unstuff(self, chunk):
        """The chunk's lines, dots unstuffed, up to the final dot (what follows
        it is given back to the session)."""
        out, i = [], 0
        while i < len(chunk):
            j = chunk.find(b"\n", i)
            j = len(chunk) if j < 0 else j + 1
            line, start = chunk[i:j], self.at_start
            self.at_start = line.endswith(b"\n")
            if start and line.startswith(b"."):
                if line in (b".\r\n", b".\n"):
                    self.done = True
                    self.session.pos -= len(chunk) - j
                    self.size -= len(chunk) - j
                    break
                line = line[1:]
            out.append(line)
            i = j
        return b"".join(out)

    def drain(self):
        """Read the rest of the reply, so that the session can go on (within the
        limit and the session's time)."""
        while not self.done:
            self.read(RECV_BYTES)


class UIDStore:
    """The unique ids of an account's messages that are in our queue already:
    spool/fetch/ROUTE.USER@HOST:PORT, one id a line.  Each id is appended and
    fsynced after its message is queued and before DELE or QUIT; ids the server
    no longer lists are dropped at the next session's start.

    Nothing here follows a symbolic link: the folder must be one, the record
    a regular file (opened O_NOFOLLOW), its replacement made O_EXCL under a
    random name."""

    def __init__(self, spool_path, account):
        folder = os.path.join(spool_path, "fetch")
        name = f"{account.route}.{account.label}".replace("/", "_")
        self.path = os.path.join(folder, name)
        self.fd = None
        try:
            try:
                os.mkdir(folder, 0o700)
            except FileExistsError:
                pass
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                raise Error(f"unable to use {folder}: it is not a folder (a link?): "
                            "move it aside", code=75)
            fd = _open_file(self.path, os.O_RDONLY)
            with os.fdopen(fd, "rb") as f:
                self.ids = set(f.read().decode("ascii", "replace").split())
        except FileNotFoundError:
            self.ids = set()
        except OSError as e:
            raise self._error(e) from None

    def _error(self, e):
        return Error(f"unable to use {self.path}: {e.strerror}", code=75)

    def prune(self, listed):
        """Forget the ids the server no longer has (written atomically, fsynced)."""
        keep = self.ids & set(listed)
        if keep == self.ids:
            return
        try:
            files.write_atomic(self.path, "".join(f"{uid}\n" for uid in sorted(keep)).encode(),
                               0o600)
        except OSError as e:
            raise self._error(e) from None
        self.ids = keep

    def add(self, uid):
        """Remember one id durably (before its message is deleted)."""
        try:
            if self.fd is None:
                self.fd = _open_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                files.fsync_dir(os.path.dirname(self.path))
            os.write(self.fd, f"{uid}\n".encode("ascii"))
            os.fsync(self.fd)
        except OSError as e:
            raise self._error(e) from None
        self.ids.add(uid)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _open_file(path, flags):
    """A descriptor on the regular file at path, never through a link (ELOOP)
    nor blocking on a FIFO; OSError otherwise."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(0, "not a regular file")
    os.set_blocking(fd, True)
    return fd

