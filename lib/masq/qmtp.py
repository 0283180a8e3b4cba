"""QMTP (cr.yp.to/proto/qmtp.txt): netstrings, and both sides' pieces of the protocol.

A client sends packages, each three netstrings: the encoded message, the
envelope sender, and a netstring of recipient netstrings; for each package
the server answers one netstring per recipient, in order, starting with
"K" (accepted), "Z" (temporary failure) or "D" (permanent failure), the
rest a text.  A netstring is `len ":" bytes ","`; len is decimal with no
leading zero (section 6).  The message's first byte says its line ends:
<0a> then LF lines (encoding #2, what masq sends), <0d> then CRLF lines
(encoding #1, still taken: section 4 says a server must take both).

The server's side (masq-qmtpd) reads from a masq.smtp.Reader:
read_length(), read_comma(), read_string(), and MessageStream, the message
as LF lines for the spool.  A bare CR (or, in encoding #1, a bare LF) is
refused as masq-smtpd refuses it (masq.smtp.BareLineEndError): the spool
keeps LF lines and the message goes on over SMTP.  A netstring that is not one
(a non-digit, a leading zero, no ":" or ",", a length over its cap) is a
NetstringError: the stream cannot be followed after it.

The client's side is ClientSession, made by masq.nexthop.connect() for a
route with protocol = "qmtp": send(sender, recipients, message) returns
(letter, text) per recipient as masq.smtpclient's does, the message (a
masq.wiremessage.WireMessage) streamed from the spool file with LF line
ends (its lines(): a CRLF or a bare CR in it made one LF), never held in
memory, its length counted when the WireMessage first read it.
"""
import select
import time

from masq import Error
from masq.outcome import DeliveryError, one_line
from masq.smtp import BareLineEndError

PORT = 209                          # section 7
LENGTH_MAX_DIGITS = 20              # a netstring length longer than this is no length
ADDRESS_MAX_BYTES = 1000            # as envelope.MAX_ADDRESS_BYTES and qmail-qmtpd
RECIPIENTS_MAX_BYTES = 1 << 20      # the netstring of recipients, read whole
RESPONSE_MAX_BYTES = 4096           # a server's response, at the client
READ_BYTES = 65536
LF, CR = b"\n", b"\r"

# the server's responses (section 5); "#" only in HCMSSC codes
ACCEPTED = "Kok, queued as {} (#2.0.0)"
ACCEPTED_NO_ID = "Kok, queued (#2.0.0)"
RELAY_DENIED = "Dsorry, relaying denied from your location (#5.7.1)"
UNKNOWN_USER = "Dsorry, no mailbox here by that name (#5.1.1)"
BAD_RECIPIENT = "Dbad recipient address syntax (#5.1.3)"
BAD_SENDER = "Dbad sender address syntax (#5.1.7)"
TOO_MANY_RCPTS = "Ztoo many recipients, send the rest later (#4.5.3)"
ALIASES_UNAVAILABLE = "Zalias table unavailable, try again later (#4.3.0)"
TOO_BIG = "Dsorry, that message size exceeds my max_size limit (#5.3.4)"
BARE_LINE_END = "Dbare CR or LF in the message: QMTP lines end in LF (#5.6.0)"
NUL_IN_MESSAGE = "DNUL byte in the message (#5.6.0)"
QUEUE_FAILED = "Zqueue file write error, try again later (#4.3.0)"
REJECTED = "Dmessage rejected by the queue (#5.6.0)"
CONFIG_ERROR = "Zserver configuration error (#4.3.5)"
PROTOCOL_ERROR = "Dprotocol error: {} (#5.5.2)"
GREYLISTED = "Zgreylisted, try again in {} seconds (#4.7.1)"
LISTED = "Dservice unavailable; client [{}] blocked using {}; {} (#5.7.1)"
TOO_MANY_REFUSED = "Ztoo many refused recipients (#4.7.0)"


class NetstringError(Error):
    """Bytes that are not the netstring the protocol needs here; `what` says how."""

    code = 100
    temporary = False

    def __init__(self, what):
        super().__init__(f"QMTP protocol error: {what}")
        self.what = what


def netstring(data):
    """`data` (bytes) as a netstring."""
    return b"%d:%s," % (len(data), data)


def parse_netstrings(data):
    """The list of strings in a concatenation of netstrings (the recipients)."""
    items, i = [], 0
    while i < len(data):
        colon = data.find(b":", i, i + LENGTH_MAX_DIGITS + 1)
        if colon < 0:
            raise NetstringError("a recipient is not a netstring")
        n = _length(data[i:colon])
        end = colon + 1 + n
        if end >= len(data) or data[end:end + 1] != b",":
            raise NetstringError("a recipient netstring does not end in a comma")
        items.append(data[colon + 1:end])
        i = end + 1
    return items


def _length(digits):
    """The value of a netstring's length digits; NetstringError if they are no length."""
    if not digits or not digits.isdigit() or not digits.isascii():
        raise NetstringError("a netstring length is not a number")
    if len(digits) > 1 and digits.startswith(b"0"):
        raise NetstringError("a netstring length has a leading zero")
    return int(digits)


# -- the server's side, on a masq.smtp.Reader ------------------------------

def read_length(reader):
    """The length before a netstring's ":" (the colon is consumed)."""
    while True:
        buf = reader.buf
        colon = buf.find(b":", 0, LENGTH_MAX_DIGITS + 1)
        if colon >= 0:
            reader.buf = buf[colon + 1:]
            return _length(buf[:colon])
        head = buf[:LENGTH_MAX_DIGITS]
        if head and not (head.isdigit() and head.isascii()):
            raise NetstringError("a netstring length is not a number")
        if len(buf) > LENGTH_MAX_DIGITS:
            raise NetstringError("a netstring length is too long")
        reader.fill()


def read_comma(reader):
    """The "," that ends a netstring."""
    if not reader.buf:
        reader.fill()
    if reader.buf[:1] != b",":
        raise NetstringError("a netstring does not end in a comma")
    reader.buf = reader.buf[1:]


def read_string(reader, limit):
    """A whole netstring of at most `limit` bytes; None (read and dropped) if longer."""
    n = read_length(reader)
    keep = n <= limit
    pieces = []
    for piece in reader.read_exactly(n):
        if keep:
            pieces.append(piece)
    read_comma(reader)
    return b"".join(pieces) if keep else None


def read_byte(reader):
    """One byte (the encoding mark at the start of a message)."""
    if not reader.buf:
        reader.fill()
    byte, reader.buf = reader.buf[:1], reader.buf[1:]
    return byte


class MessageStream:
    """The `size` bytes of an encoded message after its mark, as LF lines: read() for
    the spool.  `crlf`: encoding #1.  drain() reads the rest, unchecked."""

    def __init__(self, reader, size, crlf):
        self.reader, self.left, self.crlf = reader, size, crlf
        self.carry = b""            # encoding #1: a CR whose LF may come next

    def read(self, n=READ_BYTES):
        while self.left:
            if not self.reader.buf:
                self.reader.fill()
            piece = self.reader.buf[:min(self.left, n)]
            self.reader.buf = self.reader.buf[len(piece):]
            self.left -= len(piece)
            data = self._decode(piece)
            if data:
                return data
        if self.carry:
            raise BareLineEndError("bare CR at the end of the message")
        return b""

    def _decode(self, data):
        if not self.crlf:
            if CR in data:
                raise BareLineEndError("CR in a message with LF line ends")
            return data
        data = self.carry + data
        self.carry = b""
        if data.endswith(CR):
            data, self.carry = data[:-1], CR
        crlf = data.count(b"\r\n")
        if data.count(LF) != crlf or data.count(CR) != crlf:
            raise BareLineEndError("bare CR or LF in a message with CRLF line ends")
        return data.replace(b"\r\n", LF)

    def drain(self):
        for _ in self.reader.read_exactly(self.left):
            pass
        self.left, self.carry = 0, b""


def most_decoded_bytes(size, crlf):
    """The fewest bytes the `size` encoded bytes can become in the spool (the size check
    before reading them): all of them with LF ends, half with CRLF ends."""
    return (size + 1) // 2 if crlf else size


# -- the client's side ------------------------------------------------------

class ClientSession:
    """An open QMTP connection: send() one package at a time, as smtpclient's session."""

    def __init__(self, conn, route, server_hostname):
        self.conn, self.route = conn, route
        self.peer = conn.peer
        self.server_hostname = server_hostname
        self.usable = True
        self.timeouts = route.timeouts

    def open(self):
        """QMTP has no greeting, no TLS and no AUTH: the connection is ready."""

    def send(self, sender, recipients, message):
        """Send one package (a masq.wiremessage.WireMessage); [(letter, text)]
        in the order of `recipients`.

        One response per recipient (section 2); one that comes before the
        whole package was sent (masq-qmtpd's early "too big") is taken for
        all of them, and the connection is closed.
        """
        recipients = list(recipients)
        if not self.usable:
            return _all(recipients, "Z", f"{self.peer}: the connection is closed")
        try:
            rcpts = b"".join(netstring(_address(r)) for r in recipients)
            head = netstring(_address(sender))
        except ValueError as e:
            return _all(recipients, "D", f"bad address: {e}")
        body = Body(message)
        try:
            early = self._write_package(body, head + netstring(rcpts))
            if early is not None:
                self.usable = False
                self.close()
                return _all(recipients, early[0], f"{self.peer} said: {early[1]}")
        except DeliveryError as e:
            early = self._early_response()
            self.usable = False
            self.close()
            if early is not None:
                return _all(recipients, early[0], f"{self.peer} said: {early[1]}")
            return _all(recipients, e.letter, e.text)
        results = []
        deadline = time.monotonic() + self.timeouts["data_done_timeout"]
        try:
            for _ in recipients:
                letter, text = read_response(self.conn, deadline, "to the package")
                results.append((letter, f"{self.peer} said: {text}"))
        except DeliveryError as e:
            # responses read are answers; any not received is a temporary failure
            self.usable = False
            self.close()
            results += [(e.letter, e.text)] * (len(recipients) - len(results))
        return results

    def _write_package(self, body, tail):
        """Write the package; a response the server sent before its end, or None."""
        timeout = self.timeouts["data_timeout"]
        self.conn.write(b"%d:\n" % (body.length + 1), timeout)
        pending, size = [], 0
        for chunk in body.chunks():
            pending.append(chunk)
            size += len(chunk)
            if size >= READ_BYTES:
                self.conn.write(b"".join(pending), timeout)
                pending, size = [], 0
                early = self._early_response()
                if early is not None:
                    return early
        self.conn.write(b"".join(pending) + b"," + tail, timeout)
        return None

    def _early_response(self):
        """A response already waiting (the server gave up on the package), or None."""
        if not self.conn.buf:
            try:
                ready = select.select([self.conn.sock], [], [], 0)[0]
            except (OSError, ValueError):
                return None
            if not ready:
                return None
        try:
            return read_response(self.conn, time.monotonic() + 2, "before the end of "
                                 "the package")
        except DeliveryError:
            return None

    def close(self):
        if self.conn is None:
            return
        self.usable = False
        self.conn.close()
        self.conn = None


def read_response(conn, deadline, what):
    """(letter, text) of one response netstring from a masq.connection.Connection."""
    def fill():
        try:
            conn.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            data = conn.sock.recv(READ_BYTES)
        except TimeoutError:
            raise DeliveryError(f"{conn.peer}: timeout waiting for the response {what}") \
                from None
        except OSError as e:
            raise DeliveryError(f"{conn.peer}: lost connection {what}: "
                                f"{e.strerror or e}") from None
        if not data:
            raise DeliveryError(f"{conn.peer}: lost connection {what}")
        conn.buf += data

    while True:
        colon = conn.buf.find(b":", 0, LENGTH_MAX_DIGITS + 1)
        if colon >= 0 or len(conn.buf) > LENGTH_MAX_DIGITS:
            break
        fill()
    try:
        n = _length(bytes(conn.buf[:colon])) if colon > 0 else _length(b"")
    except NetstringError:
        raise DeliveryError(f"{conn.peer}: malformed response {what}: "
                            f"{one_line(bytes(conn.buf[:40]))}") from None
    if n > RESPONSE_MAX_BYTES or n == 0:
        raise DeliveryError(f"{conn.peer}: response of {n} bytes {what}")
    while len(conn.buf) < colon + n + 2:
        fill()
    response = bytes(conn.buf[colon + 1:colon + 1 + n])
    comma = conn.buf[colon + 1 + n:colon + 2 + n]
    del conn.buf[:colon + 2 + n]
    letter = response[:1].decode("latin-1")
    if comma != b"," or letter not in ("K", "Z", "D"):
        raise DeliveryError(f"{conn.peer}: malformed response {what}: "
                            f"{one_line(response[:200])}")
    return letter, one_line(response[1:]) or "no text"


class Body:
    """A masq.wiremessage.WireMessage as QMTP sends it: LF lines, its length first
    (counted when the WireMessage read it; what it sends in front, a
    DKIM-Signature, included)."""

    def __init__(self, message):
        self.chunks = message.lines
        self.length = message.lf_size


def _address(address):
    """An address as QMTP sends it (8-bit: UTF-8); NUL, CR and LF are refused."""
    if any(c in address for c in "\r\n\0"):
        raise ValueError(f"forbidden character in {address!r}")
    return address.encode("utf-8")


def _all(recipients, letter, text):
    return [(letter, one_line(text))] * len(recipients)
