"""TOML written by masq (masq-setup's profiles, import-masqmail): values that
stay the values they are.

    f"key = {toml_value(value)}"     # a string, boolean, integer, list, inline table
    f"[route.{toml_key(name)}]"      # bare when it may be, else a string
    f"# {escape(text)}"              # a comment, or a line printed

Every value goes through escape(): a control character (CR, LF, NUL...,
DEL, C1) never ends a line, so no value becomes a [table] of its own.
"""

# what no value may hold as it is: the control characters but tab (C0, DEL, C1)
CONTROLS = frozenset([chr(c) for c in range(0x20) if c != 9]
                     + [chr(c) for c in range(0x7f, 0xa0)])
SHORT_ESCAPES = {"\b": "\\b", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


class NotUTF8(ValueError):
    """A value with bytes that were not UTF-8: TOML cannot hold it."""


def escape(text, string=False):
    """`text` as it may be written into masq.toml (string=True: between the quotes
    of a TOML basic string; else in a comment) or printed: the one function every
    value passes on its way out.  A control character (CR, LF, NUL..., DEL, C1)
    becomes an escape (\\n, \\u0000), so a value never ends a line (a comment that
    would become a [table]) nor works a terminal; in a string \\ and " are escaped
    too.  A byte that was not UTF-8 (surrogateescape) is written \\xNN in a comment;
    a string cannot hold it: NotUTF8."""
    out = []
    for c in text:
        if c in CONTROLS:
            out.append(SHORT_ESCAPES.get(c) or f"\\u{ord(c):04x}")
        elif string and c in '"\\':
            out.append("\\" + c)
        elif "\ud800" <= c <= "\udfff":
            if string:
                raise NotUTF8(text)
            byte = ord(c) - 0xdc00
            out.append(f"\\x{byte:02x}" if 0x80 <= byte <= 0xff else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out)


def toml_key(name):
    """A TOML key: bare when it may be, else a string."""
    bare = name and all(c.isalnum() and c.isascii() or c in "_-" for c in name)
    return name if bare else toml_value(name)


def toml_value(value):
    """A value written as TOML: strings, booleans, integers, lists, inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}"
                                for k, v in value.items()) + " }"
    return '"' + escape(str(value), string=True) + '"'
