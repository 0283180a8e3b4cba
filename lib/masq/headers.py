"""Read a message's header section, clean it, and find the addresses in it.

The header section (RFC 5322 section 2.2) is read as bytes, line by line,
from a `readline(limit)` function, up to the first empty line, and kept
byte-exact: fields are never rewrapped or re-encoded.  A field is
`Name: value` (name: 1 to MAX_NAME_BYTES printable US-ASCII bytes other than
the colon) with its continuation lines (starting with SP or HT).

What the first line decides (Postfix's cleanup does the same):
  - a field: the message has a header section;
  - SP or HT first (a continuation with nothing to continue): malformed;
  - anything else ("hello world", "From alice Mon ..."): no header section,
    the whole input is body.
A later line that is neither a field nor a continuation (no colon, or a
space in the name) ends the header section early: an empty line is put
before it so the message stays well formed.  NUL bytes, or bytes other than
printable US-ASCII in a field name, make the section malformed (HeaderError,
65, with the line number).

No `re` and no `email` package: both cost more to import than a whole
sendmail call may take.
"""
from masq import Error

MAX_HEADER_BYTES = 1024 * 1024
MAX_NAME_BYTES = 997
MAX_LINE_BYTES = 65536          # a longer header line is read in pieces
_NAME_BYTES = bytes(c for c in range(33, 127) if c != ord(":"))


class HeaderError(Error):
    """The header section is not one; retrying will not help."""

    code = 65
    temporary = False


class Section:
    """A header section: `fields` [(lower-case name, raw bytes)] and `tail`.

    `tail` is what follows the fields in the message up to the rest of the
    input: the empty line as it came (LF or CRLF), an added empty line plus
    the first body line, or nothing (the input ended inside the header).
    `size` is the number of input bytes the fields took (the body, or the
    empty line before it, starts there); `complete` is False when a lenient
    read (scan) stopped at a malformed first line or the size limit.  A
    lenient read keeps a later line that is no field as a field named None.
    """

    def __init__(self, fields, tail, size=None, complete=True):
        self.fields = fields
        self.tail = tail
        self.size = sum(len(raw) for _, raw in fields) if size is None else size
        self.complete = complete

    def has(self, name):
        """True when a field of this (lower-case) name is present."""
        return any(n == name for n, _ in self.fields)

    def values(self, name):
        """The unfolded values of every field of this name, as text."""
        out = []
        for n, raw in self.fields:
            if n == name:
                value = raw.split(b":", 1)[1]
                value = value.replace(b"\r\n", b"").replace(b"\n", b"")
                out.append(value.decode("utf-8", "surrogateescape").strip())
        return out

    def address(self, name):
        """The first address in the first field of this name, or "" (From:, Sender:).

        Only the first field counts: a second From: that parses must not
        choose a route the first one would not get.
        """
        for value in self.values(name)[:1]:
            try:
                found = addresses(value)
            except HeaderError:
                return ""
            return found[0] if found else ""
        return ""

    def raw(self):
        """The fields as they came, without the empty line after them."""
        return b"".join(raw for _, raw in self.fields)

    def encode(self, drop=()):
        """The section's bytes without the fields named in `drop`."""
        return b"".join(raw for n, raw in self.fields if n not in drop) + self.tail


def read(readline, limit=MAX_HEADER_BYTES, strict=True):
    """Read a header section with `readline(n)`; return a Section.

    `readline` returns one line (or the first n bytes of it), b"" at the end.
    Raise HeaderError when the section is malformed or longer than `limit`;
    with strict=False the section ends there instead (Section.complete is
    False), for the readers of a message that was accepted already.
    """
    fields, total, number = [], 0, 0

    def failed(text):
        if strict:
            raise HeaderError(text)
        return Section(fields, b"", complete=False)

    while True:
        line = readline(MAX_LINE_BYTES)
        number += 1
        if total + len(line) > limit:
            return failed(f"the header section is larger than {limit} bytes")
        total += len(line)
        if not line:
            return Section(fields, b"", total)
        if line == b"\n" or line == b"\r\n":
            return Section(fields, line, total - len(line))
        name, problem = None, ""
        if b"\0" in line:
            problem = f"the header section is malformed at line {number}: NUL byte"
        elif line[0] in b" \t":
            if fields:
                fields[-1][1] += line
                continue
            problem = (f"the header section is malformed at line {number}: "
                       "a continuation line with no field before it")
        else:
            try:
                name = field_name(line, number)
            except HeaderError as e:
                problem = str(e)
        if problem and (strict or not fields):
            return failed(problem)
        if name is None and not problem and (strict or not fields):
            return Section(fields, b"\n" + line, total - len(line))
        # lenient, after a field: a line that is none stays as it is (name None),
        # so that what follows it up to the empty line is still seen
        fields.append([name, line])
        if not line.endswith(b"\n"):
            # a line longer than MAX_LINE_BYTES: the rest belongs to this field
            while not fields[-1][1].endswith(b"\n"):
                more = readline(MAX_LINE_BYTES)
                if total + len(more) > limit:
                    return failed(f"the header section is larger than {limit} bytes")
                total += len(more)
                if not more:
                    break
                fields[-1][1] += more


def scan(stream, limit=MAX_HEADER_BYTES):
    """The header section at the start of a queued message, as far as it parses.

    The one reader for every program that looks at a message accepted
    already (routes' From: conditions, the Delivered-To loop check,
    bounces, sender rewriting, the SMTP client's SMTPUTF8 check): it never
    raises on the message's bytes.  `stream` needs readline(n) or read(n).
    """
    readline = getattr(stream, "readline", None)
    if readline is None:
        readline = _Lines(stream).readline
    return read(readline, limit, strict=False)


class _Lines:
    """readline(n) over a stream that only has read(n)."""

    def __init__(self, stream):
        self.stream, self.buffer = stream, b""

    def readline(self, limit):
        while b"\n" not in self.buffer[:limit] and len(self.buffer) < limit:
            chunk = self.stream.read(65536)
            if not chunk:
                break
            self.buffer += chunk
        end = self.buffer.find(b"\n", 0, limit)
        end = min(limit, len(self.buffer)) if end < 0 else end + 1
        line, self.buffer = self.buffer[:end], self.buffer[end:]
        return line


def field_name(line, number=0):
    """The lower-case name of a field line, or None if it is not one."""
    colon = line.find(b":")
    if colon <= 0:
        return None
    name = line[:colon].rstrip(b" \t")     # RFC 5322 section 4.5.3: obs WSP before ":"
    if not name or b" " in name or b"\t" in name:
        return None
    if len(name) > MAX_NAME_BYTES or name.translate(None, _NAME_BYTES):
        raise HeaderError(f"the header section is malformed at line {number}: "
                          "bad byte in a field name")
    return name.decode("ascii").lower()


def addresses(text):
    """The addr-specs in an address list (To, Cc, Bcc, an argument), in order.

    Handles display names, quoted strings, comments, angle addresses with
    source routes and groups (`list: a@b, c@d;`).  Raise HeaderError naming
    the part that does not parse.  Encoded words need no decoding: they only
    occur in display names and comments, which are skipped.
    """
    out = []
    for item in _split_list(_tokens(text), text):
        addr = _mailbox(item, text)
        if addr is not None:
            out.append(addr)
    return out


_SPECIALS = '()<>,;:@[]"\\'


def _tokens(text):
    """(kind, value) tokens: 'w' word, 'q' quoted string, 'd' domain literal,
    ' ' white space (comments count as white space), or a special character."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            out.append((" ", " "))
            i += 1
        elif c == "(":
            depth, i = 1, i + 1
            while i < n and depth:
                if text[i] == "\\":
                    i += 1
                elif text[i] == "(":
                    depth += 1
                elif text[i] == ")":
                    depth -= 1
                i += 1
            if depth:
                raise HeaderError(f"unterminated comment in {text.strip()!r}")
            out.append((" ", " "))
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                raise HeaderError(f"unterminated quoted string in {text.strip()!r}")
            out.append(("q", text[i:j + 1]))
            i = j + 1
        elif c == "[":
            j = text.find("]", i)
            if j < 0:
                raise HeaderError(f"unterminated domain literal in {text.strip()!r}")
            out.append(("d", text[i:j + 1]))
            i = j + 1
        elif c in _SPECIALS:
            out.append((c, c))
            i += 1
        else:
            j = i
            while j < n and text[j] not in _SPECIALS and text[j] not in " \t\r\n":
                j += 1
            out.append(("w", text[i:j]))
            i = j
    return out


def _split_list(tokens, text):
    """Split at top-level commas; a group's name and its `;` are dropped."""
    items, item, depth, in_group = [], [], 0, False
    for tok in tokens:
        kind = tok[0]
        if kind == "<":
            depth += 1
        elif kind == ">":
            depth -= 1
            if depth < 0:
                raise HeaderError(f"unbalanced '>' in {text.strip()!r}")
        if depth == 0 and kind == ":" and not any(t[0] == "<" for t in item):
            if in_group:
                raise HeaderError(f"nested group in {text.strip()!r}")
            in_group, item = True, []          # the group's display name goes
            continue
        if depth == 0 and (kind == "," or (kind == ";" and in_group)):
            items.append(item)
            item = []
            if kind == ";":
                in_group = False
            continue
        item.append(tok)
    if depth:
        raise HeaderError(f"unbalanced '<' in {text.strip()!r}")
    if in_group:
        raise HeaderError(f"group without its closing ';' in {text.strip()!r}")
    items.append(item)
    return items


def _mailbox(item, text):
    """The addr-spec of one list item, None for an empty item."""
    if all(kind == " " for kind, _ in item):
        return None
    if any(kind == "<" for kind, _ in item):
        start = next(i for i, (kind, _) in enumerate(item) if kind == "<")
        end = next(i for i, (kind, _) in enumerate(item) if kind == ">")
        inner = item[start + 1:end]
        if any(kind not in (" ",) for kind, _ in item[end + 1:]):
            raise HeaderError(f"text after '>' in {text.strip()!r}")
        if any(kind in "<>" for kind, _ in inner):
            raise HeaderError(f"'<' inside an angle address in {text.strip()!r}")
        colon = [i for i, (kind, _) in enumerate(inner) if kind == ":"]
        if colon:                               # <@relay,@relay:user@host>: drop the route
            inner = inner[colon[-1] + 1:]
        return _addr_spec(inner, text)
    return _addr_spec(item, text)


def _addr_spec(tokens, text):
    """Join local-part "@" domain; words must be joined by "." or "@"."""
    parts, previous = [], None
    for kind, value in tokens:
        if kind == " ":
            continue
        if kind not in "wqd.@" or (kind in "wqd" and previous in ("w", "q", "d")):
            what = "".join(v for _, v in tokens).strip() or text.strip()
            raise HeaderError(f"{what!r} is not an address")
        parts.append(value)
        previous = kind
    return "".join(parts) or None
