"""SMTP as data: server replies, command lines, and the DATA and BDAT byte streams.

Shared by the server (masq-smtpd) and anything else that speaks SMTP; the
client lives in masq.smtpclient.  Every reply is written here once, with its
enhanced status code (RFC 3463); a reply that takes values has `{}` fields.

Lines end in CRLF only (RFC 5321 section 2.3.8).  In DATA a bare LF or a bare
CR is an error, never repaired, so `\\n.\\n` or `\\r.\\r` can never end a
message early (SMTP smuggling); only CRLF "." CRLF ends it.
"""
import os
import select
import time

from masq import Error

# limits (RFC 5321 section 4.5.3.1)
COMMAND_LINE_MAX_BYTES = 512         # section 4.5.3.1.4, CRLF included
PARAM_LINE_MAX_BYTES = 1024          # MAIL and RCPT: extensions raise the limit (RFC 1869 4.1.2)
READ_BYTES = 65536
PARTIAL_LINE_BYTES = 65536           # a longer text line is passed on in pieces

# replies; {host} is our hostname
GREETING = "220 {} ESMTP masq"
PREGREET = "521 5.5.1 {} Error: protocol error, talked before the greeting"
EHLO_KEYWORDS = ("PIPELINING", "SIZE {}", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8",
                 "CHUNKING")
STARTTLS_KEYWORD = "STARTTLS"           # RFC 3207
AUTH_KEYWORD = "AUTH PLAIN LOGIN"       # RFC 4954, RFC 4616
AUTH_LINE_MAX_BYTES = 1024              # an AUTH command or response line, CRLF included
HELO_OK = "250 {}"
OK = "250 2.0.0 Ok"
SENDER_OK = "250 2.1.0 Ok"
RCPT_OK = "250 2.1.5 Ok"
QUEUED = "250 2.0.0 Ok: queued as {}"
QUEUED_NO_ID = "250 2.0.0 Ok: queued"
CHUNK_OK = "250 2.0.0 Ok: {} octets"
BYE = "221 2.0.0 Bye"
HELP = "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP"
READY_TLS = "220 2.0.0 Ready to start TLS"
AUTH_CHALLENGE = "334 {}"
AUTH_OK = "235 2.7.0 Authentication successful"
VRFY = "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"
START_DATA = "354 End data with <CR><LF>.<CR><LF>"
TIMEOUT = "421 4.4.2 {} Error: timeout exceeded"
TOO_SLOW = "421 4.4.2 {} Error: too slow, {} deadline exceeded"
CONFIG_ERROR = "421 4.3.5 Error: server configuration error"
INTERNAL_ERROR = "421 4.3.0 Error: internal error"
ALIASES_UNAVAILABLE = "451 4.3.0 Error: alias table unavailable, try again later"
TOO_MANY_ERRORS = "421 4.7.0 {} Error: too many errors"
TLS_UNAVAILABLE = "454 4.7.0 TLS not available due to local problem"
AUTH_UNAVAILABLE = "454 4.7.0 Temporary authentication failure"
AUTH_LOCKED = "454 4.7.0 Error: too many failed authentications from your address, try later"
AUTH_BUSY = "454 4.7.0 Error: too many authentications in progress, try again"
QUEUE_FAILED = "451 4.3.0 Error: queue file write error"
TOO_MANY_RCPTS = "452 4.5.3 Error: too many recipients"
UNRECOGNIZED = "502 5.5.2 Error: command not recognized"
NOT_IMPLEMENTED = "502 5.5.1 Error: command not implemented"
LINE_TOO_LONG = "500 5.5.2 Error: line too long"
BARE_LINE_END_COMMAND = "500 5.5.2 Error: command line not ended by CRLF"
BAD_UTF8 = "500 5.5.2 Error: command is not valid UTF-8"
SYNTAX = "501 5.5.4 Syntax: {}"
TLS_PIPELINED = "501 5.5.4 Error: nothing may follow STARTTLS before the TLS handshake"
AUTH_CANCELLED = "501 5.0.0 Error: authentication cancelled"
AUTH_BAD_BASE64 = "501 5.5.2 Error: cannot decode the response (base64)"
BAD_SENDER = "501 5.1.7 Bad sender address syntax"
BAD_RCPT = "501 5.1.3 Bad recipient address syntax"
NEED_HELO = "503 5.5.1 Error: send HELO/EHLO first"
NEED_TLS = "530 5.7.0 Must issue a STARTTLS command first"
NESTED_MAIL = "503 5.5.1 Error: nested MAIL command"
NEED_MAIL = "503 5.5.1 Error: need MAIL command"
NEED_RCPT = "503 5.5.1 Error: need RCPT command"
IN_TRANSACTION = "503 5.5.1 Error: MAIL transaction in progress"
TLS_ACTIVE = "503 5.5.1 Error: TLS already active"
AUTH_NOT_ENABLED = "503 5.5.1 Error: authentication not enabled"
ALREADY_AUTHENTICATED = "503 5.5.1 Error: already authenticated"
AUTH_MECHANISM = "504 5.5.4 Error: unsupported authentication mechanism"
AUTH_FAILED = "535 5.7.8 Error: authentication credentials invalid"
NO_VALID_RCPTS = "554 5.5.1 Error: no valid recipients"
UNKNOWN_USER = "550 5.1.1 <{}>: Recipient address rejected: user unknown"
BAD_MESSAGE = "550 5.6.0 Error: bare CR or LF in the message (RFC 5321 section 2.3.8)"
NUL_IN_MESSAGE = "550 5.6.0 Error: NUL byte in the message (RFC 5322 section 2.3)"
TOO_BIG = "552 5.3.4 Error: message too big for system"
NON_ASCII = "553 5.6.7 Error: non-ASCII address needs SMTPUTF8 (RFC 6531)"
RELAY_DENIED = "554 5.7.1 <{}>: Relay access denied"
REJECTED = "554 5.6.0 Error: message rejected by the queue"
BAD_PARAM = "555 5.5.4 Error: unsupported parameter {}"


class ProtocolError(Error):
    """The client broke the protocol in a way we answer with `reply`."""

    code = 65
    temporary = False

    def __init__(self, reply):
        super().__init__(reply)
        self.reply = reply


class TimeoutError_(Error):
    """The client said nothing for longer than the timeout."""


class DeadlineError(TimeoutError_):
    """The client was too slow: a deadline over a whole line, message or session passed.

    `what` names it: "command", "data" or "session".
    """

    def __init__(self, what):
        super().__init__(f"{what} deadline exceeded")
        self.what = what


class ConnectionLost(Error):
    """The client went away (end of input or a broken connection)."""


class ChunkInterrupted(Error):
    """A command other than BDAT came between chunks: the transaction is over.

    `line` is that command, for the session to take as its next one.
    """

    def __init__(self, message, line=None):
        super().__init__(message)
        self.line = line


class BareLineEndError(Error):
    """A bare CR or LF in message data: the message is refused, not repaired."""

    code = 65
    temporary = False


def reply_lines(code, lines):
    """A multiline reply: `250-a`, `250-b`, `250 c`."""
    return [f"{code}-{line}" for line in lines[:-1]] + [f"{code} {lines[-1]}"]


class Reader:
    """Buffered reads from a descriptor, each wait bounded by `timeout` seconds.

    A timeout per read alone lets a client that sends a byte a second hold
    the connection for ever; deadlines bound the whole of a slow thing.
    `deadline` (a time.monotonic() value, or None) ends the command line
    or message being read, `session_deadline` the whole session; past one
    of them fill() raises DeadlineError, named by `deadline_name` ("data")
    or "session".  readline() can start a deadline of its own at the first
    byte of a line, so that a client idle between commands is held to
    `timeout` only (RFC 5321 section 4.5.3.2.7), and one trickling a line
    to `line_seconds`.

    Once `tls` is set (an ssl.SSLSocket on the same connection, after
    STARTTLS) every read goes through it, with the same limits.
    """

    def __init__(self, fd, timeout=300.0):
        self.fd = fd
        self.timeout = timeout
        self.buf = b""
        self.eof = False
        self.before_wait = None      # called before blocking (flush replies)
        self.tls = None
        self.deadline = None
        self.deadline_name = "data"
        self.session_deadline = None

    def pending(self):
        """True when input is already buffered (a pipelining client)."""
        return bool(self.buf)

    def wait_seconds(self):
        """How long the next wait may be: the timeout, or less before a deadline."""
        wait, now = self.timeout, time.monotonic()
        for what, deadline in ((self.deadline_name, self.deadline),
                               ("session", self.session_deadline)):
            if deadline is not None:
                if now >= deadline:
                    raise DeadlineError(what)
                wait = min(wait, deadline - now)
        return wait

    def _timed_out(self):
        """The error for a wait that ended with nothing read."""
        self.wait_seconds()         # raises DeadlineError when that is why
        return TimeoutError_("timeout")

    def fill(self):
        """Read more into the buffer; raise ConnectionLost at end of input."""
        if self.eof:
            raise ConnectionLost("connection closed by the client")
        if self.tls is not None:
            return self._fill_tls()
        if self.before_wait:
            self.before_wait()
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        if not poller.poll(math_ceil(self.wait_seconds() * 1000)):
            raise self._timed_out()
        try:
            data = os.read(self.fd, READ_BYTES)
        except OSError as e:
            self.eof = True
            raise ConnectionLost(f"read error: {e.strerror}") from None
        if not data:
            self.eof = True
            raise ConnectionLost("connection closed by the client")
        self.buf += data

    def _fill_tls(self):
        if self.before_wait and not self.tls.pending():
            self.before_wait()
        self.tls.settimeout(self.wait_seconds())
        try:
            data = self.tls.recv(READ_BYTES)
        except TimeoutError:
            raise self._timed_out() from None
        except (OSError, ValueError) as e:     # ssl.SSLError is an OSError
            self.eof = True
            raise ConnectionLost(f"TLS read error: {e}") from None
        if not data:
            self.eof = True
            raise ConnectionLost("connection closed by the client")
        self.buf += data

    def readline(self, limit, line_seconds=None):
        """One line ending in LF, at most `limit` bytes; a longer line -> ProtocolError.

        With `line_seconds` (and no deadline already running), the line must
        be complete that long after its first byte came (DeadlineError
        "command").  The rest of a long line is read and thrown away
        (bounded memory).
        """
        own = line_seconds is not None and self.deadline is None
        try:
            while True:
                if own and self.buf and self.deadline is None:
                    self.deadline, self.deadline_name = time.monotonic() + line_seconds, \
                        "command"
                i = self.buf.find(b"\n", 0, limit)
                if i >= 0:
                    line, self.buf = self.buf[:i + 1], self.buf[i + 1:]
                    return line
                if len(self.buf) >= limit:
                    self._skip_line()
                    raise ProtocolError(LINE_TOO_LONG)
                self.fill()
        finally:
            if own:
                self.deadline, self.deadline_name = None, "data"

    def _skip_line(self):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                self.buf = self.buf[i + 1:]
                return
            self.buf = b""
            self.fill()

    def read_exactly(self, n):
        """Yield the next n bytes in pieces (BDAT)."""
        while n > 0:
            if not self.buf:
                self.fill()
            piece, self.buf = self.buf[:n], self.buf[n:]
            n -= len(piece)
            yield piece


def command(line):
    """(VERB, argument text) of a command line; ProtocolError for a bad line."""
    if not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\n" in line[:-1]:
        raise ProtocolError(BARE_LINE_END_COMMAND)
    try:
        text = line[:-2].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(BAD_UTF8) from None
    verb, _, arg = text.partition(" ")
    return verb.upper(), arg


def path_and_params(arg, keyword):
    """Split `FROM:<path> PARAM=VALUE...` into (path, {PARAM: value or None}).

    A space after the colon is tolerated (many clients send it); the path
    must be in angle brackets.  A source route (`@a,@b:user@c`) is dropped,
    as RFC 5321 section 4.1.1.3 says a server should.
    """
    head = arg[:len(keyword) + 1].upper()
    if head != keyword + ":":
        raise ProtocolError(SYNTAX.format(f"{'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}"
                                          ":<address>"))
    rest = arg[len(keyword) + 1:].lstrip(" ")
    if not rest.startswith("<"):
        raise ProtocolError(BAD_SENDER if keyword == "FROM" else BAD_RCPT)
    end = _closing_bracket(rest)
    if end < 0:
        raise ProtocolError(BAD_SENDER if keyword == "FROM" else BAD_RCPT)
    path, tail = rest[1:end], rest[end + 1:]
    if tail and not tail.startswith(" "):
        raise ProtocolError(BAD_SENDER if keyword == "FROM" else BAD_RCPT)
    if path.startswith("@"):
        route, colon, path = path.partition(":")
        if not colon:
            raise ProtocolError(BAD_SENDER if keyword == "FROM" else BAD_RCPT)
    params = {}
    for word in tail.split(" "):
        if not word:
            continue
        name, eq, value = word.partition("=")
        name = name.upper()
        if not name or (eq and not value) or name in params:
            raise ProtocolError(SYNTAX.format(f"bad or repeated parameter {word[:40]}"))
        params[name] = value if eq else None
    return path, params


def _closing_bracket(text):
    """The index of the `>` closing the path, skipping quoted strings; -1 if none."""
    quoted = escaped = False
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
    return -1


class DataStream:
    """The message of one DATA command, read as it arrives: LF line ends, dots undone.

    read() returns b"" after CRLF "." CRLF and never a byte past it; a bare CR
    or LF raises BareLineEndError, more than `max_size` bytes TooBigError.
    After an error, drain() reads on to the end of the data.
    """

    def __init__(self, reader, max_size=None):
        self.reader = reader
        self.max_size = max_size
        self.size = 0
        self.bol = True             # at the beginning of a line (after CRLF)
        self.done = False

    def read(self, n=-1):
        while not self.done:
            data = self._next()
            if data:
                return data
        return b""

    def drain(self):
        """Consume the rest of the data, ignoring what is wrong with it."""
        while not self.done:
            self._next(check=False)

    def _next(self, check=True):
        """Decode some complete lines of the buffer (or a piece of a long line)."""
        r = self.reader
        if not r.buf:
            r.fill()
        buf = r.buf
        if self.bol and buf[:3] == b".\r\n":
            r.buf = buf[3:]
            self.done = True
            return b""
        if self.bol and len(buf) < 3 and b".\r\n".startswith(buf):
            r.fill()                 # may be the end: wait for the rest of it
            return b""
        last = buf.rfind(b"\n")
        end = buf.find(b"\r\n.\r\n", 0, last + 1) if last >= 0 else -1
        if end >= 0:
            segment, r.buf = buf[:end + 2], buf[end + 5:]
            self.done = True
        elif last >= 0:
            segment, r.buf = buf[:last + 1], buf[last + 1:]
        elif len(buf) >= PARTIAL_LINE_BYTES:
            keep = 1 if buf.endswith(b"\r") else 0      # never split a CRLF
            segment, r.buf = buf[:len(buf) - keep], buf[len(buf) - keep:]
        else:
            r.fill()
            return b""
        bol, self.bol = self.bol, segment.endswith(b"\r\n")
        if check:
            crlf = segment.count(b"\r\n")
            if segment.count(b"\n") != crlf or segment.count(b"\r") != crlf:
                raise BareLineEndError("bare CR or LF in message data")
        if bol and segment[:1] == b".":
            segment = segment[1:]
        data = segment.replace(b"\r\n.", b"\r\n").replace(b"\r\n", b"\n")
        self.size += len(data)
        if check and self.max_size is not None and self.size > self.max_size:
            _too_big(self.max_size)
        return data


class ChunkDecoder:
    """BDAT data (RFC 3030) to LF line ends; a bare CR or LF raises BareLineEndError.

    A CR at the end of one chunk waits for the LF that may start the next.
    """

    def __init__(self):
        self.carry = b""

    def feed(self, data, last=False):
        data = self.carry + data
        self.carry = b""
        if data.endswith(b"\r") and not last:
            data, self.carry = data[:-1], b"\r"
        crlf = data.count(b"\r\n")
        if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
            raise BareLineEndError("bare CR or LF in message data")
        return data.replace(b"\r\n", b"\n")


class ChunkStream:
    """The message of a run of BDAT commands, as one stream (RFC 3030).

    Between chunks it answers the chunk through `reply` and reads the next
    command itself: a BDAT goes on, anything else ends the transaction
    (ChunkInterrupted, carrying that command line for the session).  More
    than `max_size` bytes raise TooBigError; drain() reads the rest of the
    current chunk.
    """

    def __init__(self, reader, size, last, reply, max_size=None):
        self.reader = reader
        self.reply = reply
        self.max_size = max_size
        self.left, self.last = size, last
        self.chunk_size = size
        self.decoder = ChunkDecoder()
        self.size = 0

    def read(self, n=65536):
        while True:
            if self.left:
                if not self.reader.buf:
                    self.reader.fill()
                piece = self.reader.buf[:min(self.left, n)]
                self.reader.buf = self.reader.buf[len(piece):]
                self.left -= len(piece)
                data = self.decoder.feed(piece, self.last and not self.left)
                self.size += len(data)
                if self.max_size and self.size > self.max_size:
                    _too_big(self.max_size)
                if data:
                    return data
                continue
            if self.last:
                return b""
            self.next_chunk()

    def next_chunk(self):
        self.reply(CHUNK_OK.format(self.chunk_size))
        line = self.reader.readline(PARAM_LINE_MAX_BYTES)
        try:
            verb, arg = command(line)
        except ProtocolError:
            verb = arg = None
        size, last = parse_bdat(arg) if verb == "BDAT" else (None, False)
        if size is None:
            raise ChunkInterrupted("BDAT transaction ended by another command", line)
        self.left, self.last, self.chunk_size = size, last, size

    def drain(self):
        """Consume the rest of the current chunk."""
        for _ in self.reader.read_exactly(self.left):
            pass
        self.left = 0


def parse_bdat(arg):
    """(size, last) of `BDAT size [LAST]`; size None when it does not parse."""
    words = arg.split(" ")
    if not words[0].isdigit() or not words[0].isascii() or len(words[0]) > 20:
        return None, False
    if len(words) == 1:
        return int(words[0]), False
    if len(words) == 2 and words[1].upper() == "LAST":
        return int(words[0]), True
    return None, False


def math_ceil(x):
    """ceil() without importing math."""
    return int(x) + (x > int(x))


def _too_big(max_size):
    """Raise the queue's TooBigError: the caller handles it as the queue's own."""
    # masq.spool imports fcntl: only a message over the limit pays for it here
    from masq.spool import TooBigError
    raise TooBigError(f"message larger than the limit of {max_size} bytes")
