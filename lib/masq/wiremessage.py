"""A message as the SMTP client sends it: its wire size, its needs, its bytes.

`WireMessage(stream)` takes a binary stream holding the message from its
current position to its end, with LF line ends as stored in the spool.  A
seekable stream is read twice (once here, once for each send); any other is
copied first, in memory while small, else to a temporary file.  The first
read finds what MAIL FROM declares and needs:

- `size`: bytes on the wire with CRLF line ends, before dot-stuffing (the
  SIZE parameter, RFC 1870); `lf_size`, the same with LF line ends (what
  `lines()` yields: the length QMTP declares);
- `eightbit`: a byte above 127 anywhere (BODY=8BITMIME, RFC 6152);
- `utf8_addresses`: non-ASCII in an address header (SMTPUTF8, RFC 6531),
  found with masq.headers.scan, the one reader of a header section.

`chunks()` yields the message with CRLF line ends and dot-stuffed (RFC 5321
section 4.5.2), ending with the CRLF.CRLF that ends DATA.  A CR not
followed by LF (sendmail passes it into the spool) goes out as CRLF, and a
CRLF as one line end: RFC 5321 section 2.3.8 allows no bare CR, and a
receiver that took `\r.\r` for the end of DATA would split the message.
"""
import io

from masq import headers

WRITE_CHUNK_BYTES = 65536
MAX_MEMORY_COPY_BYTES = 1 << 20     # a message from a pipe larger than this goes to disk
ADDRESS_HEADERS = ("from", "sender", "reply-to", "to", "cc", "bcc",
                   "resent-from", "resent-sender", "resent-to", "resent-cc",
                   "resent-bcc", "return-path", "disposition-notification-to")


class WireMessage:
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
        self.lf_size = 0            # bytes of lines() (LF line ends)
        self.head = b""             # prepend(): a field added in front (DKIM-Signature)
        self.eightbit = False
        self.utf8_addresses = False     # address headers with non-ASCII
        self._scan()

    def _scan(self):
        """Size and 8-bit bytes in one pass; non-ASCII in address headers."""
        self.file.seek(self.start)
        section = headers.scan(self.file)
        self.utf8_addresses = any(name in ADDRESS_HEADERS and not raw.isascii()
                                  for name, raw in section.fields)
        for chunk in self.lines():
            self.lf_size += len(chunk)
            self.size += len(chunk) + chunk.count(b"\n")
            if not self.eightbit and not chunk.isascii():
                self.eightbit = True

    def prepend(self, field):
        """Send these bytes (header fields with LF line ends) before the message."""
        self.head = field + self.head
        self.lf_size += len(field)
        self.size += len(field) + field.count(b"\n")

    def lines(self):
        """The message as it goes on the wire but with LF line ends only, in pieces
        (what masq.dkim signs, what QMTP sends): CRLF and a bare CR become LF."""
        if self.head:
            yield self.head
        self.file.seek(self.start)
        carry = b""
        while chunk := self.file.read(WRITE_CHUNK_BYTES):
            chunk = carry + chunk
            carry = b"\r" if chunk.endswith(b"\r") else b""   # its LF may come next
            chunk = chunk[:len(chunk) - len(carry)]
            yield chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if carry:
            yield b"\n"

    def chunks(self):
        """The message as CRLF lines, dot-stuffed, ending with CRLF.CRLF."""
        at_line_start, empty = True, True
        for chunk in self.lines():
            if not chunk:
                continue
            empty = False
            if at_line_start and chunk.startswith(b"."):
                chunk = b"." + chunk
            at_line_start = chunk.endswith(b"\n")
            yield chunk.replace(b"\n.", b"\n..").replace(b"\n", b"\r\n")
        yield b".\r\n" if at_line_start or empty else b"\r\n.\r\n"


def _copy(stream):
    """A seekable copy of a pipe: in memory while small, else a temporary file."""
    copy = io.BytesIO()
    while chunk := stream.read(WRITE_CHUNK_BYTES):
        copy.write(chunk)
        if copy.tell() > MAX_MEMORY_COPY_BYTES:
            import tempfile     # costly, and only for a large message from a pipe
            spill = tempfile.TemporaryFile()
            spill.write(copy.getbuffer())
            copy = None
            while chunk := stream.read(WRITE_CHUNK_BYTES):
                spill.write(chunk)
            spill.flush()
            return spill
    return copy
