"""Cleanup of a message a local user submits, as sendmail and Postfix's cleanup do.

The message comes as sendmail reads it (Input: a lone "." may end it);
its sender and recipients are checked and qualified with the host name;
Date, Message-ID and From are added when missing (From with the user's
full name, as an RFC 2047 phrase if it needs one); Bcc and Return-Path are
dropped by the caller (masq-inject); rmail's UUCP "From " lines give the
sender.  Errors are sysexits: 65 for a bad address.
"""
import posix
import pwd
import time

from masq import Error, address, headers, message
from masq.program import Exit


class Input:
    """stdin as lines, ending at a lone "." line unless -i (dots False)."""

    def __init__(self, raw, dots):
        self.raw = raw
        self.dots = dots
        self.ended = False
        self.bol = True             # at the beginning of a line

    def readline(self, limit):
        if self.ended:
            return b""
        line = self.raw.readline(limit)
        if self.dots and self.bol and line[:1] == b"." and line in (b".\n", b".\r\n", b"."):
            self.ended = True
            return b""
        self.bol = line.endswith(b"\n")
        return line

    def read(self, size):
        """Up to about `size` bytes; whole lines while dots end the input."""
        if self.ended:
            return b""
        if not self.dots:
            return self.raw.read(size)
        lines, total = [], 0
        while total < size:
            line = self.readline(size)
            if not line:
                break
            lines.append(line)
            total += len(line)
        return b"".join(lines)


class Body:
    """The stream enqueue reads: the cleaned header section, then the rest."""

    def __init__(self, head, source):
        self.head = head
        self.source = source

    def read(self, size=65536):
        if self.head:
            head, self.head = self.head, b""
            return head
        return self.source.read(size)


def user():
    """(login name, full name from the passwd GECOS field)."""
    try:
        entry = pwd.getpwuid(posix.getuid())
    except KeyError:
        return str(posix.getuid()), ""
    full = entry.pw_gecos.split(",")[0]
    if "&" in full:                 # BSD: & stands for the capitalised login
        full = full.replace("&", entry.pw_name.capitalize())
    return entry.pw_name, full.strip()


def sender(value, login, hostname):
    """The envelope sender: -f, or the user at this host; "<>" is null."""
    if value is None:
        return f"{login}@{hostname}"
    value = address.strip_brackets(value)
    if value == "":
        return ""
    try:
        address.check(value, need_domain=False)
    except address.AddressError as e:
        raise Error(f"{address.refused(e)} (the sender)", code=Exit.DATAERR,
                    temporary=False) from None
    return address.qualify(value, hostname)


def recipients(text, hostname, what):
    """The addresses in an argument or a header value, qualified.

    An address that does not parse is refused in address.refused()'s words,
    as masq-route and sendmail -bv refuse it; `what` names a header value.
    """
    try:
        found = headers.addresses(text)
    except Error as e:
        raise Error(f"bad {what}: {e}", code=Exit.DATAERR, temporary=False) from None
    for addr in found:
        try:
            address.check(addr, need_domain=False)
        except address.AddressError as e:
            where = f" ({what})" if what.startswith("address in ") else ""
            raise Error(address.refused(e) + where, code=Exit.DATAERR,
                        temporary=False) from None
    return [address.qualify(a, hostname) for a in found]


def added_headers(section, login, fullname, sender, explicit, hostname):
    """Date, Message-ID and From lines for those the message lacks.

    `fullname` is -F's value or the GECOS name; `explicit` is True when -f
    gave the sender, which then goes into From.
    """
    lines = []
    if not section.has("date"):
        lines.append(f"Date: {message.date()}\n")
    if not section.has("message-id"):
        lines.append(f"Message-ID: <{time.time_ns():x}.{posix.getpid():x}@{hostname}>\n")
    if not section.has("from"):
        mailbox = sender if explicit and sender else f"{login}@{hostname}"
        name = " ".join(fullname.split())       # no CR or LF from -F
        lines.append(f"From: {_phrase(name)} <{mailbox}>\n" if name else f"From: {mailbox}\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


_ATOM_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                        "!#$%&'*+-/=?^_`{|}~ ")


def _phrase(name):
    """A display name as atoms, a quoted string, or RFC 2047 encoded words."""
    if not name.isascii():
        import binascii     # only a non-ASCII full name needs it
        raw = name.encode("utf-8", "surrogateescape")
        words, start = [], 0
        while start < len(raw):
            end = min(start + 45, len(raw))
            while end < len(raw) and (raw[end] & 0xC0) == 0x80:
                end -= 1            # never split a UTF-8 sequence
            chunk = binascii.b2a_base64(raw[start:end], newline=False).decode()
            words.append(f"=?utf-8?b?{chunk}?=")
            start = end
        return " ".join(words)
    if all(c in _ATOM_CHARS for c in name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def strip_uucp_from(source, explicit, hostname):
    """rmail: drop leading "From user date remote from host" lines.

    The sender comes from the first of them unless -f gave one.
    """
    found = explicit
    raw = source.raw
    while raw.peek(5)[:5] in (b"From ", b">From"):
        line = raw.readline(65536)
        words = line.decode("utf-8", "surrogateescape").split()
        if found is None and len(words) > 1:
            found = words[1]
            if "@" not in found and len(words) > 4 and words[-3:-1] == ["remote", "from"]:
                found = f"{found}@{words[-1]}"
    if found is None:
        login, _ = user()
        return f"{login}@{hostname}"
    return sender(found, "", hostname)
