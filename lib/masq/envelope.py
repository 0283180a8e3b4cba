"""The envelope: sender, recipients, and how it travels between programs.

On a descriptor (masq-queue's fd 1, as qmail-queue(8)):

    F<sender>\\0 T<recipient>\\0 ... \\0

The sender may be empty (a bounce).  End of input before the final NUL means
the writer gave up: nothing is queued.  Every address is at most
MAX_ADDRESS_BYTES and holds no NUL, CR or LF.
"""
import posix

from masq import Error

MAX_ADDRESS_BYTES = 1000
MAX_RECIPIENTS = 100000
READ_BYTES = 65536


class EnvelopeError(Error):
    """The envelope is malformed: the writer's bug, retrying will not help."""

    code = 65
    temporary = False


class Envelope:
    """Sender and recipients, as text (UTF-8 addresses are allowed)."""

    def __init__(self, sender="", recipients=()):
        self.sender = sender
        self.recipients = list(recipients)

    def __repr__(self):
        return f"Envelope({self.sender!r}, {self.recipients!r})"

    def __eq__(self, other):
        return (isinstance(other, Envelope) and self.sender == other.sender
                and self.recipients == other.recipients)

    def encode(self):
        """The envelope in its descriptor form."""
        for address in [self.sender, *self.recipients]:
            check(address)
        parts = [b"F" + self.sender.encode() + b"\0"]
        parts += [b"T" + r.encode() + b"\0" for r in self.recipients]
        return b"".join(parts) + b"\0"


def check(address):
    """Refuse an address that cannot travel in an envelope."""
    raw = address.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_ADDRESS_BYTES:
        raise EnvelopeError(f"address longer than {MAX_ADDRESS_BYTES} bytes")
    if b"\0" in raw or b"\r" in raw or b"\n" in raw:
        raise EnvelopeError("address contains NUL, CR or LF")


def decode(data):
    """Parse the descriptor form; raise EnvelopeError unless it is whole and valid."""
    fields = data.split(b"\0")
    # a well-formed envelope ends "...\0\0": the split gives two empty strings
    if len(fields) < 3 or fields[-1] != b"" or fields[-2] != b"":
        raise EnvelopeError("envelope ends early: nothing queued")
    fields = fields[:-2]
    if not fields[0].startswith(b"F"):
        raise EnvelopeError("envelope does not start with a sender (F)")
    recipients = []
    for field in fields[1:]:
        if not field.startswith(b"T"):
            raise EnvelopeError("envelope field is neither F nor T")
        if field == b"T":
            raise EnvelopeError("envelope has an empty recipient")
        recipients.append(_text(field[1:]))
        if len(recipients) > MAX_RECIPIENTS:
            raise EnvelopeError(f"more than {MAX_RECIPIENTS} recipients")
    if not recipients:
        raise EnvelopeError("envelope has no recipients")
    return Envelope(_text(fields[0][1:]), recipients)


def read(fd):
    """Read a whole envelope from a descriptor."""
    chunks, total, tail = [], 0, b""
    limit = (MAX_RECIPIENTS + 1) * (MAX_ADDRESS_BYTES + 2)
    while True:
        try:
            chunk = posix.read(fd, READ_BYTES)
        except OSError as e:
            raise Error(f"unable to read the envelope: {e.strerror}") from None
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise EnvelopeError("envelope too long")
        tail = (tail + chunk)[-2:]
        if tail == b"\0\0":        # only the end holds two NULs in a row: fields are not empty
            break
    return decode(b"".join(chunks))


def _text(raw):
    if len(raw) > MAX_ADDRESS_BYTES:
        raise EnvelopeError(f"address longer than {MAX_ADDRESS_BYTES} bytes")
    if b"\r" in raw or b"\n" in raw:
        raise EnvelopeError("address contains CR or LF")
    return raw.decode("utf-8", "surrogateescape")
