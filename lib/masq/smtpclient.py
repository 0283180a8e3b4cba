"""SMTP and LMTP client: one connection, any number of messages.

The program masq-smtp(8) is a thin frame around this module.  masq-send may
use it in-process to send several messages over one connection:

    from masq import smtpclient
    route = smtpclient.Route(conf, "isp")          # None: direct MX delivery
    try:
        session = smtpclient.connect(conf, route, "example.org")
    except smtpclient.DeliveryError as e:
        ...   # e.letter ("Z" or "D") and e.text hold for every recipient
    results = session.send(sender, recipients, stream)   # [(letter, text)]
    ...       # more session.send() while session.usable
    session.close()

`Route(conf, name)` reads [route.NAME] and the password file at once and
raises masq.Error (code 111) when the configuration cannot be used.
`connect` also accepts a route name (or None) instead of a Route.

`send` takes the envelope sender ("" for the null sender), the recipients
and a binary stream holding the message from its current position to its
end, with LF line ends as stored in the spool; it is read twice when it is
seekable (once to find its size, 8-bit bytes and header addresses, once to
send it), else copied to a temporary file first.  On the wire lines end in
CRLF and lines starting with "." are dot-stuffed (RFC 5321 section 4.5.2).
It returns one (letter, text) per recipient, in order: "K" accepted, "Z"
temporary failure, "D" permanent failure; text names the remote host and
holds its reply, on one line.  After a lost connection, a timeout or a 421,
`session.usable` is False and the next message needs a new connection.

Timeouts (seconds, route keys): connect_timeout 30, greeting_timeout 300,
command_timeout 300 (EHLO, STARTTLS, AUTH, MAIL, RCPT, RSET), data_timeout
180 (DATA and each write of the message), data_done_timeout 600 (the reply
after the final dot), quit_timeout 60.

socket, ssl and dnspython are imported only when a connection is made.
"""
import os

from masq import Error, headers
from masq.outcome import DeliveryError, one_line

PROTOCOLS = ("smtp", "lmtp")
TLS_MODES = ("starttls", "tls", "none", "may")
DEFAULT_TIMEOUTS = {"connect_timeout": 30, "greeting_timeout": 300,
                    "command_timeout": 300, "data_timeout": 180,
                    "data_done_timeout": 600, "quit_timeout": 60}
MECHANISMS = ("CRAM-MD5", "PLAIN", "LOGIN")     # our preference, best first
MAX_REPLY_LINE_BYTES = 4096
MAX_REPLY_LINES = 200
WRITE_CHUNK_BYTES = 65536
ADDRESS_HEADERS = ("from", "sender", "reply-to", "to", "cc", "bcc",
                   "resent-from", "resent-sender", "resent-to", "resent-cc",
                   "resent-bcc", "return-path", "disposition-notification-to")
MAX_MEMORY_COPY_BYTES = 1 << 20     # a message from a pipe larger than this goes to disk


class _TLSFailed(DeliveryError):
    """An opportunistic TLS handshake failed: try once more without TLS."""


def _config_error(text):
    return Error(text, code=111, temporary=True)


class Route:
    """What a [route.NAME] table says about the way out; defaults for direct MX."""

    def __init__(self, conf, name=None):
        table = {}
        if name is not None:
            table = dict(conf.routes).get(name)
            if table is None:
                raise _config_error(f"no [route.{name}] in {conf.file}: "
                                    f"add it or pass another --route")
        self.name = name
        where = f"[route.{name}]" if name else "direct delivery"
        self.wrapper = table.get("wrapper") or None
        host = table.get("host") or None
        self.tls = table.get("tls") or ("starttls" if host and not self.wrapper else "may")
        if self.tls not in TLS_MODES:
            raise _config_error(f"{conf.file}: {where}: tls must be one of "
                                + ", ".join(f'"{m}"' for m in TLS_MODES))
        self.host, self.port = None, table.get("port")
        if host:
            self.host, port = _split_host(str(host))
            self.port = port or self.port
        if self.port is None:
            self.port = 465 if self.tls == "tls" else 25
        try:
            self.port = int(self.port)
        except (TypeError, ValueError):
            raise _config_error(f"{conf.file}: {where}: port must be a number") from None
        verify = table.get("tls_verify")
        # opportunistic TLS to an MX checks nothing unless asked (Postfix "may")
        self.verify = bool(verify) if verify is not None else self.tls in ("starttls", "tls")
        self.ca_file = conf.path(table["tls_ca_file"], is_value=True) \
            if table.get("tls_ca_file") else None
        self.protocol = (table.get("protocol") or "smtp").lower()
        if self.protocol not in PROTOCOLS:
            raise _config_error(f'{conf.file}: {where}: protocol must be "smtp" or "lmtp"')
        self.helo = table.get("helo") or conf.hostname
        self.allow_auth_without_tls = bool(table.get("allow_auth_without_tls", False))
        self.mechanisms = [m.upper() for m in table.get("auth_mechanisms") or MECHANISMS]
        self.timeouts = {k: float(table.get(k, v)) for k, v in DEFAULT_TIMEOUTS.items()}
        self.user = self.secret = None
        auth = table.get("auth")
        if auth:
            if not isinstance(auth, dict) or not auth.get("user") \
                    or not auth.get("password_file"):
                raise _config_error(f"{conf.file}: {where}: auth needs user and password_file")
            if not self.host and not self.wrapper:
                raise _config_error(f"{conf.file}: {where}: auth needs a host or a wrapper: "
                                    "the password would go to every recipient's MX")
            self.user = str(auth["user"])
            self.secret = _read_secret(conf.path(auth["password_file"], is_value=True))

    @property
    def label(self):
        return f"route {self.name}" if self.name else "direct delivery"


def _split_host(text):
    """(host, port or None) from "host", "host:port", "[v6]:port"."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, None


def _read_secret(path):
    """The first line of a password file that only its owner can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise _config_error(f"unable to read password file {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o077:
            raise _config_error(f"password file {path} is readable by others "
                                f"(mode {mode:04o}): chmod 600 {path}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            line = f.readline(4096)
    finally:
        os.close(fd)
    return line.rstrip(b"\r\n")


class Reply:
    """An SMTP reply: code (int) and its lines' text (str)."""

    def __init__(self, code, lines):
        self.code, self.lines = code, lines

    @property
    def text(self):
        return one_line(f"{self.code} " + " ".join(self.lines))

    @property
    def letter(self):
        return "K" if 200 <= self.code < 300 else "D" if 500 <= self.code < 600 else "Z"


class Message:
    """A message to send: a seekable file, its wire size and what it needs."""

    def __init__(self, stream):
        try:
            seekable = stream.seekable()
        except (AttributeError, OSError, ValueError):
            seekable = False
        if seekable:
            self.file, self.start = stream, stream.tell()
        else:
            self.file, self.start = _copy(stream), 0
        self.size = 0               # bytes on the wire (CRLF), before dot-stuffing
        self.eightbit = False
        self.utf8_addresses = False     # address headers with non-ASCII
        self._scan()

    def _scan(self):
        """Size and 8-bit bytes in one pass; non-ASCII in address headers."""
        self.file.seek(self.start)
        section = headers.scan(self.file)
        self.utf8_addresses = any(name in ADDRESS_HEADERS and not raw.isascii()
                                  for name, raw in section.fields)
        self.file.seek(self.start)
        while chunk := self.file.read(WRITE_CHUNK_BYTES):
            self.size += len(chunk) + chunk.count(b"\n")
            if not self.eightbit and not chunk.isascii():
                self.eightbit = True

    def chunks(self):
        """The message as CRLF lines, dot-stuffed, ending with CRLF.CRLF."""
        self.file.seek(self.start)
        at_line_start, empty = True, True
        while chunk := self.file.read(WRITE_CHUNK_BYTES):
            empty = False
            if at_line_start and chunk.startswith(b"."):
                chunk = b"." + chunk
            at_line_start = chunk.endswith(b"\n")
            yield chunk.replace(b"\n.", b"\n..").replace(b"\n", b"\r\n")
        yield b".\r\n" if at_line_start or empty else b"\r\n.\r\n"


def _copy(stream):
    """A seekable copy of a pipe: in memory while small, else a temporary file."""
    import io
    copy = io.BytesIO()
    while chunk := stream.read(WRITE_CHUNK_BYTES):
        copy.write(chunk)
        if copy.tell() > MAX_MEMORY_COPY_BYTES:
            import tempfile
            spill = tempfile.TemporaryFile()
            spill.write(copy.getbuffer())
            copy = None
            while chunk := stream.read(WRITE_CHUNK_BYTES):
                spill.write(chunk)
            spill.flush()
            return spill
    return copy


class Connection:
    """A socket (TCP, or one end of a socketpair to a wrapper) with line reads."""

    def __init__(self, sock, peer, proc=None, errfile=None):
        self.sock, self.peer, self.proc, self.errfile = sock, peer, proc, errfile
        self.buf = bytearray()
        self.tls = False

    def write(self, data, timeout):
        import socket
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise DeliveryError(f"{self.peer}: timeout after {timeout:g} s "
                                f"while sending") from None
        except OSError as e:
            raise DeliveryError(f"{self.peer}: lost connection while sending: "
                                f"{self._why(e)}") from None

    def readline(self, timeout, what, deadline=None):
        import socket
        import time
        deadline = deadline or time.monotonic() + timeout
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line
            if len(self.buf) > MAX_REPLY_LINE_BYTES:
                raise DeliveryError(f"{self.peer}: reply line too long {what}")
            try:
                # the whole reply within `timeout`, however slowly it trickles in
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data = self.sock.recv(65536)
            except socket.timeout:
                raise DeliveryError(f"{self.peer}: timeout after {timeout:g} s "
                                    f"waiting for the reply {what}") from None
            except OSError as e:
                raise DeliveryError(f"{self.peer}: lost connection {what}: "
                                    f"{self._why(e)}") from None
            if not data:
                raise DeliveryError(f"{self.peer}: lost connection {what}"
                                    + self._wrapper_said())
            self.buf += data

    def reply(self, timeout, what):
        """Read one whole (maybe multi-line) reply."""
        import time
        lines, code = [], None
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(timeout, what, deadline).rstrip(b"\r\n")
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-") \
                    or (code is not None and int(line[:3]) != code):
                raise DeliveryError(f"{self.peer}: malformed reply {what}: "
                                    f"{one_line(line[:200])}")
            code = int(line[:3])
            lines.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return Reply(code, lines)
            if len(lines) > MAX_REPLY_LINES:
                raise DeliveryError(f"{self.peer}: reply too long {what}")

    def starttls(self, context, server_hostname, timeout):
        """Wrap the socket in TLS (after STARTTLS's 220, or at once for tls)."""
        import ssl
        if self.buf:
            # RFC 3207 section 6: nothing may come before the handshake
            raise DeliveryError(f"{self.peer}: data after the STARTTLS reply "
                                f"(response injection?)")
        self.sock.settimeout(timeout)
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        except ssl.SSLCertVerificationError as e:
            raise _TLSFailed(f"{self.peer}: TLS certificate not trusted: "
                             f"{e.verify_message or e.reason}", temporary=True) from None
        except (ssl.SSLError, OSError) as e:
            raise _TLSFailed(f"{self.peer}: TLS handshake failed: {self._why(e)}") from None
        self.tls = True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
        if self.proc is not None:
            import subprocess
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                import signal
                try:                    # the wrapper leads its own process group
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                self.proc.wait()
            if self.errfile is not None:
                self.errfile.close()

    def _why(self, exc):
        return (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__) \
            + self._wrapper_said()

    def _wrapper_said(self):
        """The last line the wrapper wrote on stderr, if any."""
        if self.errfile is None:
            return ""
        try:
            self.errfile.seek(0)
            lines = [ln for ln in self.errfile.read()[-2000:].splitlines() if ln.strip()]
        except OSError:
            return ""
        return f" (wrapper said: {one_line(lines[-1])})" if lines else ""


def _tcp(address, port, peer, timeout):
    """A TCP connection with TCP_NODELAY: each batch is one write, no Nagle stall."""
    import socket
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((address, port))
    except socket.timeout:
        sock.close()
        raise DeliveryError(f"connect to {peer}:{port}: timeout after {timeout:g} s") from None
    except OSError as e:
        sock.close()
        raise DeliveryError(f"connect to {peer}:{port}: {e.strerror or e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Connection(sock, peer)


def _wrapper(command, peer):
    """Run `command` with /bin/sh -c, its stdin and stdout one end of a socketpair."""
    import socket
    import subprocess
    import tempfile
    ours, theirs = socket.socketpair()
    errfile = tempfile.TemporaryFile(mode="w+", errors="replace")
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=theirs, stdout=theirs,
                                stderr=errfile, close_fds=True, start_new_session=True)
    except OSError as e:
        ours.close()
        errfile.close()
        raise DeliveryError(f"unable to run wrapper: {e.strerror}") from None
    finally:
        theirs.close()
    return Connection(ours, peer, proc, errfile)


def _tls_context(route):
    """An ssl context for this route: verified unless tls_verify is false."""
    import ssl
    if route.verify:
        try:
            return ssl.create_default_context(cafile=route.ca_file)
        except (OSError, ssl.SSLError) as e:
            raise _config_error(f"unable to load tls_ca_file {route.ca_file}: "
                                f"{getattr(e, 'strerror', None) or e}") from None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Session:
    """An open SMTP/LMTP session, greeted and ready for MAIL."""

    def __init__(self, conn, route, server_hostname):
        self.conn, self.route = conn, route
        self.server_hostname = server_hostname
        self.extensions = {}
        self.usable = True
        self.timeouts = route.timeouts
        self.lmtp = route.protocol == "lmtp"

    @property
    def peer(self):
        return self.conn.peer

    # -- opening ---------------------------------------------------------
    def open(self):
        """Greeting, EHLO, TLS and AUTH as the route says; raises DeliveryError."""
        route = self.route
        if route.tls == "tls":
            self.conn.starttls(_tls_context(route), self.server_hostname,
                               self.timeouts["command_timeout"])
        greeting = self.conn.reply(self.timeouts["greeting_timeout"], "to the greeting")
        if greeting.code // 100 != 2:
            raise DeliveryError(f"{self.peer} refused to talk to me: {greeting.text}",
                                temporary=greeting.code // 100 != 5)
        self.hello()
        if route.tls in ("starttls", "may") and not self.conn.tls:
            if "STARTTLS" in self.extensions:
                reply = self.command(b"STARTTLS", "to STARTTLS")
                if reply.code == 220:
                    self.conn.starttls(_tls_context(route), self.server_hostname,
                                       self.timeouts["command_timeout"])
                    self.hello()
                elif route.tls == "starttls":
                    raise DeliveryError(f"{self.peer} refused STARTTLS: {reply.text}",
                                        temporary=True)
            elif route.tls == "starttls":
                raise DeliveryError(f"{self.peer} does not offer STARTTLS, "
                                    f"which {route.label} requires (tls = \"starttls\")")
        if route.user is not None:
            self.authenticate()

    def hello(self):
        """EHLO (LHLO for LMTP), falling back to HELO on a 5xx (RFC 5321 3.2)."""
        verb = b"LHLO " if self.lmtp else b"EHLO "
        helo = self.route.helo
        # the idna codec costs milliseconds to import: only for a name that needs it
        name = helo.encode("ascii") if helo.isascii() else helo.encode("idna")
        reply = self.command(verb + name, "to " + verb.decode().strip())
        if reply.code // 100 == 5 and not self.lmtp:
            reply = self.command(b"HELO " + name, "to HELO")
            self.extensions = {}
        elif reply.code // 100 == 2:
            self.extensions = {}
            for line in reply.lines[1:]:
                word, _, params = line.strip().partition(" ")
                if word.upper().startswith("AUTH="):      # the old form
                    word, params = "AUTH", word[5:] + " " + params
                self.extensions[word.upper()] = params.strip()
        if reply.code // 100 != 2:
            raise DeliveryError(f"{self.peer} refused my greeting: {reply.text}",
                                temporary=reply.code // 100 != 5)

    def authenticate(self):
        """AUTH with the best mechanism both sides know (RFC 4954)."""
        route = self.route
        # the password goes only where we know who reads it: over TLS whose
        # certificate and name we checked, or through the route's own wrapper
        safe = (self.conn.tls and route.verify) or self.conn.proc
        if not safe and not route.allow_auth_without_tls:
            why = "unverified TLS" if self.conn.tls else "TLS"
            raise DeliveryError(f"not sending the password for {route.label} to "
                                f"{self.peer} over {why} (set tls_verify = true, or "
                                f"allow_auth_without_tls = true to allow it)")
        offered = self.extensions.get("AUTH", "").upper().split()
        if "AUTH" not in self.extensions:
            return          # as Postfix: send without AUTH, the server decides
        mechanism = next((m for m in route.mechanisms if m in offered and m in MECHANISMS),
                         None)
        if mechanism is None:
            raise DeliveryError(f"{self.peer} offers AUTH {' '.join(offered)}, none of "
                                f"which I may use ({' '.join(route.mechanisms)})")
        import base64
        user, secret = route.user.encode(), route.secret
        b64 = base64.b64encode
        what = f"to AUTH {mechanism}"
        if mechanism == "PLAIN":
            reply = self.command(b"AUTH PLAIN " + b64(b"\0" + user + b"\0" + secret), what)
        elif mechanism == "LOGIN":
            reply = self.command(b"AUTH LOGIN " + b64(user), what)
            if reply.code == 334:
                reply = self.command(b64(secret), what)
        else:
            import hmac
            reply = self.command(b"AUTH CRAM-MD5", what)
            if reply.code == 334:
                challenge = base64.b64decode(reply.lines[0].strip() or b"", validate=False)
                digest = hmac.new(secret, challenge, "md5").hexdigest().encode()
                reply = self.command(b64(user + b" " + digest), what)
        if reply.code == 334:       # the server wants more than we have: cancel
            reply = self.command(b"*", what)
        if reply.code // 100 != 2:
            # a wrong password is fixed by people, then retried (Postfix soft-bounces)
            raise DeliveryError(f"{self.peer} refused authentication as "
                                f"{route.user}: {reply.text}")

    def command(self, line, what):
        """Send one command line and read its reply."""
        self.conn.write(line + b"\r\n", self.timeouts["command_timeout"])
        return self._reply(self.timeouts["command_timeout"], what)

    def _reply(self, timeout, what):
        """One reply; 421 means the server is closing the connection (RFC 5321 3.8)."""
        reply = self.conn.reply(timeout, what)
        if reply.code == 421:
            raise DeliveryError(f"{self.peer} said: {reply.text}")
        return reply

    # -- one message -----------------------------------------------------
    def send(self, sender, recipients, stream):
        """Send one message; [(letter, text)] in the order of `recipients`."""
        try:
            return self._send(sender, list(recipients), stream)
        except DeliveryError as e:
            self.usable = False
            self.close()
            return [(e.letter, e.text)] * len(recipients)

    def _send(self, sender, recipients, stream):
        if not self.usable:
            raise DeliveryError(f"{self.peer}: the connection is closed")
        message = stream if isinstance(stream, Message) else Message(stream)
        ext = self.extensions
        envelope_utf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
        if (envelope_utf8 or message.utf8_addresses) and "SMTPUTF8" not in ext:
            where = "the envelope" if envelope_utf8 else "the headers"
            return self._all(recipients, "D", f"{self.peer} does not support SMTPUTF8, "
                             f"which this message needs (non-ASCII addresses in {where})")
        limit = ext.get("SIZE", "").strip()
        if limit.isdigit() and 0 < int(limit) < message.size:
            return self._all(recipients, "D", f"message too big for {self.peer}: "
                             f"{message.size} bytes, its limit is {limit} (SIZE)")
        params = b""
        if "SIZE" in ext:
            params += b" SIZE=%d" % message.size
        if message.eightbit and "8BITMIME" in ext:
            params += b" BODY=8BITMIME"
        utf8 = (envelope_utf8 or message.utf8_addresses) and "SMTPUTF8" in ext
        if utf8:
            params += b" SMTPUTF8"
        encoding = "utf-8" if utf8 else "ascii"
        try:
            mail = b"MAIL FROM:<" + _address(sender, encoding) + b">" + params + b"\r\n"
            rcpts = [b"RCPT TO:<" + _address(r, encoding) + b">\r\n" for r in recipients]
        except ValueError as e:
            return self._all(recipients, "D", f"bad address: {e}")
        timeouts = self.timeouts
        if "PIPELINING" in ext:
            # RFC 2920: MAIL, every RCPT and DATA in one write, then the replies
            self.conn.write(mail + b"".join(rcpts) + b"DATA\r\n", timeouts["command_timeout"])
            mail_reply = self._reply(timeouts["command_timeout"], "to MAIL FROM")
            rcpt_replies = [self._reply(timeouts["command_timeout"], "to RCPT TO")
                            for _ in rcpts]
            data_reply = self._reply(timeouts["data_timeout"], "to DATA")
        else:
            mail_reply = self.command(mail[:-2], "to MAIL FROM")
            rcpt_replies, data_reply = [], None
            if mail_reply.code // 100 == 2:
                rcpt_replies = [self.command(r[:-2], "to RCPT TO") for r in rcpts]
                if any(r.code // 100 == 2 for r in rcpt_replies):
                    data_reply = self.command(b"DATA", "to DATA")
        if mail_reply.code // 100 != 2:
            self._reset(data_reply)
            return self._all(recipients, mail_reply.letter,
                             f"{self.peer} said to MAIL FROM: {mail_reply.text}")
        results = [None] * len(recipients)
        accepted = []
        for i, reply in enumerate(rcpt_replies):
            if reply.code // 100 == 2:
                accepted.append(i)
            else:
                results[i] = (reply.letter, f"{self.peer} said: {reply.text}")
        if not accepted or data_reply.code != 354:
            self._reset(data_reply)
            for i in accepted:
                results[i] = ("D" if data_reply.code // 100 == 5 else "Z",
                              f"{self.peer} said to DATA: {data_reply.text}")
            return results
        self._write_message(message)
        final = []
        try:
            for _ in (accepted if self.lmtp else [None]):
                final.append(self._reply(timeouts["data_done_timeout"],
                                         "to the end of the message"))
        except DeliveryError as e:
            if not final:
                raise
            # LMTP, cut off after some replies: those recipients have their answer;
            # only the others are tried again (no duplicate for the delivered ones)
            peer = self.peer
            self.usable = False
            self.close()
            for n, i in enumerate(accepted):
                results[i] = ((final[n].letter, f"{peer} said: {final[n].text}")
                              if n < len(final) else (e.letter, e.text))
            return results
        for n, i in enumerate(accepted):
            reply = final[n] if self.lmtp else final[0]
            results[i] = (reply.letter, f"{self.peer} said: {reply.text}")
        return results

    def _write_message(self, message):
        """The message in writes of about WRITE_CHUNK_BYTES (few syscalls, no stall)."""
        pending, size = [], 0
        for chunk in message.chunks():
            pending.append(chunk)
            size += len(chunk)
            if size >= WRITE_CHUNK_BYTES:
                self.conn.write(b"".join(pending), self.timeouts["data_timeout"])
                pending, size = [], 0
        if pending:
            self.conn.write(b"".join(pending), self.timeouts["data_timeout"])

    def _reset(self, data_reply):
        """End a failed transaction so the session can carry the next one."""
        if data_reply is not None and data_reply.code == 354:
            # the server took DATA although no recipient is left: send nothing
            self.conn.write(b".\r\n", self.timeouts["data_timeout"])
            self.conn.reply(self.timeouts["data_done_timeout"], "to the end of the message")
        reply = self.command(b"RSET", "to RSET")
        if reply.code // 100 != 2:
            self.usable = False

    @staticmethod
    def _all(recipients, letter, text):
        return [(letter, one_line(text))] * len(recipients)

    def close(self):
        """QUIT (if still talking) and close."""
        if self.conn is None:
            return
        if self.usable:
            try:
                self.conn.write(b"QUIT\r\n", self.timeouts["quit_timeout"])
                self.conn.reply(self.timeouts["quit_timeout"], "to QUIT")
            except DeliveryError:
                pass
        self.usable = False
        self.conn.close()
        self.conn = None


def _address(address, encoding):
    """An address as bytes for MAIL or RCPT; CR, LF, NUL and <> are refused."""
    if any(c in address for c in "\r\n\0<>"):
        raise ValueError(f"forbidden character in {address!r}")
    try:
        return address.encode(encoding)
    except UnicodeEncodeError:
        raise ValueError(f"non-ASCII address {address!r} without SMTPUTF8") from None


# -- connecting ---------------------------------------------------------------

def connect(conf, route, domain=None):
    """An open Session for `route` (a Route, a name or None) and `domain`.

    With a smarthost (host) or a wrapper, `domain` is not used.  Without
    either, the MX hosts of `domain` are tried in order until one greets us.
    Raises DeliveryError (letter Z or D) when no host could be used, and
    masq.Error (code 111) for a configuration that cannot work.
    """
    if not isinstance(route, Route):
        route = Route(conf, route)
    if route.wrapper:
        peer = f"{route.host or 'wrapper'}[wrapper]"
        return _open(lambda: _wrapper(route.wrapper, peer), route, route.host)
    if route.host:
        return _open_host(route, route.host, route.port, _resolve_host(conf, route.host))
    return _connect_mx(conf, route, domain)


def _open(make, route, server_hostname):
    """Make a connection and open a session on it; one plaintext retry for "may"."""
    conn = make()
    session = Session(conn, route, server_hostname)
    try:
        session.open()
        return session
    except _TLSFailed as e:
        conn.close()
        if route.tls != "may":
            raise DeliveryError(e.text) from None
    except DeliveryError:
        conn.close()
        raise
    # opportunistic TLS failed: as Postfix, try once more in plaintext
    import copy
    plain = copy.copy(route)
    plain.tls = "none"
    return _open(make, plain, server_hostname)


def _open_host(route, name, port, addresses):
    """Try the addresses of one host in turn."""
    last = DeliveryError(f"host {name} has no address")
    for address in addresses:
        peer = f"{name}[{address}]"
        try:
            return _open(lambda a=address, p=peer: _tcp(a, port, p, route.timeouts[
                "connect_timeout"]), route, name)
        except DeliveryError as e:
            last = e
    raise last


def _resolve_host(conf, host):
    """Addresses of a smarthost: a literal as is, else DNS (dns_servers) or the system."""
    if _is_ip(host):
        return [host]
    servers = conf.get("dns_servers")
    if servers:
        from masq import mx
        try:
            addresses = mx.addresses_of(mx.resolver(servers), host)
        except mx.MXError as e:
            raise DeliveryError(str(e)) from None
        if not addresses:
            raise DeliveryError(f"host {host} has no address")
        return addresses
    import socket
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise DeliveryError(f"unable to find the address of {host}: {e.strerror}") from None
    seen = []
    for info in infos:
        if info[4][0] not in seen:
            seen.append(info[4][0])
    return seen


def _is_ip(text):
    import socket
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return True
        except OSError:
            pass
    return False


def _connect_mx(conf, route, domain):
    """Try the MX hosts of `domain` in order (RFC 5321 section 5.1)."""
    from masq import mx
    if not domain:
        raise DeliveryError("no domain to look up MX for", temporary=False)
    try:
        hosts = mx.lookup(domain, conf.get("dns_servers"))
    except mx.MXError as e:
        raise DeliveryError(str(e), temporary=e.temporary) from None
    mine = my_networks(conf)
    usable = []
    for host in hosts:
        if host.name.lower().rstrip(".") == conf.hostname.lower() \
                or any(_is_mine(a, mine) for a in host.addresses):
            # as Postfix: hosts not better than ourselves are no use
            usable = [h for h in usable if h.preference < host.preference]
            break
        usable.append(host)
    if not usable:
        raise DeliveryError(f"mail for {domain} loops back to myself", temporary=False)
    last = None
    for host in usable:
        if not host.addresses:
            last = last or DeliveryError(f"MX host {host.name} of {domain} has no address")
            continue
        try:
            return _open_host(route, host.name, route.port, host.addresses)
        except DeliveryError as e:
            last = e
    raise DeliveryError(last.text, temporary=last.temporary)


def my_networks(conf):
    """The networks that mean "this host": my_addresses, by default loopback and hostname's."""
    import ipaddress
    configured = conf.get("my_addresses")
    if configured is None:
        configured = ["127.0.0.0/8", "::1", "0.0.0.0", "::"]
        import socket
        try:
            configured += [i[4][0] for i in socket.getaddrinfo(conf.hostname, None)]
        except (OSError, UnicodeError):
            pass
    networks = []
    for text in configured:
        try:
            networks.append(ipaddress.ip_network(str(text).split("%")[0], strict=False))
        except ValueError:
            raise _config_error(f"{conf.file}: my_addresses: not an address "
                                f"or network: {text}") from None
    return networks


def _is_mine(address, networks):
    import ipaddress
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    return any(ip.version == n.version and ip in n for n in networks)
