"""Parse, check and qualify mail addresses (RFC 5321 section 4.1.2, RFC 6531).

Addresses are text; UTF-8 in local parts and domains is allowed (SMTPUTF8).
No regular expressions: `re` costs more to import than a sendmail call may.
"""
from masq import Error

ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                  "!#$%&'*+-/=?^_`{|}~")
LABEL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
MAX_LOCAL_BYTES = 64
MAX_DOMAIN_BYTES = 255
MAX_ADDRESS_BYTES = 256 + 64


class AddressError(Error):
    """An address that does not parse; not worth retrying."""

    code = 65
    temporary = False


def split(address):
    """(local part, domain) of an address; domain is "" when there is none."""
    if address.endswith('"') or "@" not in address:
        return address, ""
    local, _, domain = address.rpartition("@")
    return local, domain


def check(address, allow_empty=False, need_domain=True):
    """Return the address if it is a valid mailbox, else raise AddressError."""
    if address == "":
        if allow_empty:
            return address
        raise AddressError("empty address")
    if len(address.encode("utf-8", "surrogateescape")) > MAX_ADDRESS_BYTES:
        raise AddressError(f"address too long: {address[:40]}...")
    local, domain = split(address)
    if not domain and address.endswith("@"):
        raise AddressError(f"{address}: nothing after the @")
    check_local(local, address)
    if domain:
        check_domain(domain, address)
    elif need_domain:
        raise AddressError(f"{address}: no domain")
    return address


def refused(error):
    """The one sentence every program gives for an address that does not parse."""
    return f"bad address, does not parse: {error}"


def check_local(local, address=None):
    """Refuse a local part that is neither a dot-atom nor a quoted string."""
    address = address or local
    if not local:
        raise AddressError(f"{address}: empty local part")
    if len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL_BYTES:
        raise AddressError(f"{address}: local part longer than {MAX_LOCAL_BYTES} bytes")
    if local.startswith('"'):
        if len(local) < 2 or not local.endswith('"'):
            raise AddressError(f"{address}: unterminated quoted local part")
        escaped = False
        for c in local[1:-1]:
            if escaped:         # quoted-pairSMTP: %d92 %d32-126, nothing else
                if not " " <= c <= "~":
                    raise AddressError(f"{address}: bad character in quoted local part")
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"' or _control(c):
                raise AddressError(f"{address}: bad character in quoted local part")
        if escaped:
            raise AddressError(f"{address}: quoted local part ends in a backslash")
        return
    for atom in local.split("."):
        if not atom:
            raise AddressError(f"{address}: empty atom in local part (two dots, "
                               "or a dot at an end)")
        for c in atom:
            if (c not in ATEXT and ord(c) < 128) or _control(c):
                raise AddressError(f"{address}: character {c!r} not allowed in a local part")


def check_domain(domain, address=None):
    """Refuse a domain that is neither a host name nor an address literal."""
    address = address or domain
    if domain.startswith("["):
        if not domain.endswith("]") or not _is_literal(domain[1:-1]):
            raise AddressError(f"{address}: bad address literal")
        return
    if len(domain.encode("utf-8", "surrogateescape")) > MAX_DOMAIN_BYTES:
        raise AddressError(f"{address}: domain too long")
    for label in domain.split("."):
        if not label or len(label) > 63:
            raise AddressError(f"{address}: bad domain (empty or overlong label)")
        if label.startswith("-") or label.endswith("-"):
            raise AddressError(f"{address}: domain label starts or ends with '-'")
        for c in label:
            if (c not in LABEL and ord(c) < 128) or _control(c):
                raise AddressError(f"{address}: character {c!r} not allowed in a domain")


def _control(c):
    """A C0 or C1 control, DEL, or a Unicode line or paragraph separator (RFC 6531's
    UTF8-non-ascii is text, these are not: str.splitlines() breaks lines at them)."""
    return ord(c) < 32 or 127 <= ord(c) < 160 or c in "\u2028\u2029"


def _is_literal(text):
    if text.lower().startswith("ipv6:"):
        import ipaddress    # rare (IPv6 literals); it costs a quarter of a start
        try:
            ipaddress.IPv6Address(text[5:])
            return True
        except ValueError:
            return False
    parts = text.split(".")
    return len(parts) == 4 and all(p.isdigit() and int(p) < 256 and len(p) <= 3 for p in parts)


def qualify(address, domain):
    """Add @domain to an address that has none."""
    local, dom = split(address)
    return address if dom else f"{address}@{domain}"


def domain_of(address):
    """The domain, lower-cased, or ""."""
    return split(address)[1].lower()


def is_local(address, local_domains):
    """True when the address's domain is one of ours."""
    return domain_of(address) in local_domains


def strip_brackets(text):
    """`<a@b>` -> `a@b`, whitespace around it removed."""
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        return text[1:-1].strip()
    return text


def unquote_local(local):
    """The local part with quoting undone: '"a b"' -> 'a b'."""
    if not local.startswith('"'):
        return local
    out, escaped = [], False
    for c in local[1:-1]:
        if escaped or c != "\\":
            out.append(c)
            escaped = False
        else:
            escaped = True
    return "".join(out)
