"""Which way each recipient goes: local, a named route, wait, or bounce.

The decision is made at delivery time from the configuration as it is then
(masq-send calls decide() for every attempt); nothing is frozen into the
queue.  For one recipient:

1. a local domain (or no domain at all): "local";
2. else the [route.NAME] tables, in the order of the file, whose patterns
   allow this sender, recipient and From: header and that are up: "route",
   with these routes in order (Decision.routes).  masq-send tries the first;
   a recipient it defers goes on to the next in the same run, as masqmail's
   deliver.c does, except after a route with `last_route = true`: the list
   ends there;
3. some route would allow it but none of those is up: "wait";
4. no route could ever take it: "bounce".

Which routes are up: [online] detect = "always" (all of them), "file" (the
file holds the names of the routes that are up; absent or empty: none),
"command" (its output does), "link" (a route is up while its network link
is: the route's `interface`, else [online] link; "" or absent: any link
that carries a default route; masq.watch asks the kernel).  A route
with `always = true` (a LAN) is up whenever masq runs.  `masq-send --route
NAME` (sendmail -qo NAME) forces NAME up, as masqmail's -qo does.
"""
import os

from masq import Error, address

PATTERN_KEYS = ("allowed_senders", "denied_senders", "allowed_recipients",
                "denied_recipients", "allowed_from_headers", "denied_from_headers")


class RouteError(Error):
    """The [online] or [route.*] configuration cannot be used."""

    code = 78
    temporary = True


class Decision:
    """kind: "local" | "route" | "wait" | "bounce"; route: a route's name; reason: text;
    routes: for "route", the names to try in turn after a temporary failure."""

    def __init__(self, kind, route=None, reason="", routes=()):
        self.kind, self.route, self.reason = kind, route, reason
        self.routes = list(routes) or ([route] if kind == "route" else [])

    def __repr__(self):
        return f"Decision({self.kind!r}, {self.route!r}, {self.reason!r}, {self.routes!r})"


def online(conf, forced=None):
    """The names of the routes that are up now."""
    names = [name for name, _ in conf.routes]
    up = {name for name, table in conf.routes if table.get("always") is True}
    if forced:
        if forced not in names:
            raise RouteError(f"no route named {forced} in {conf.file}", code=64,
                             temporary=False)
        return up | {forced}
    detect = conf.get("online.detect")
    if detect == "always":
        return set(names)
    if detect == "file":
        path = conf.path("online.file")
        try:
            with open(path) as f:
                said = f.read().split()
        except FileNotFoundError:
            said = []
        except OSError as e:
            raise RouteError(f"unable to read {path}: {e.strerror}") from None
    elif detect == "link":
        return up | _linked(conf)
    else:
        said = _command_output(conf.get("online.command"))
    return up | {name for name in said if name in names}


def _linked(conf):
    """detect = "link": the routes whose link is up now."""
    from masq import watch
    default = conf.get("online.link") or ""     # absent from older schemas: any link
    seen, up = {}, set()
    for name, table in conf.routes:
        link = table.get("interface", default)
        if not isinstance(link, str):
            raise RouteError(f"[route.{name}] interface must be a string")
        if link not in seen:
            seen[link] = watch.up(link) if link else watch.default_route()
        if seen[link]:
            up.add(name)
    return up


def _command_output(command):
    import subprocess   # re, enum, locale: only for detect = "command"
    if not command:
        raise RouteError('online.detect = "command" needs online.command')
    try:
        p = subprocess.run(command, shell=True, capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise RouteError(f"online.command did not answer within 30 s: {command}") from None
    return p.stdout.decode("utf-8", "replace").split() if p.returncode == 0 else []


def is_local(conf, recipient):
    """Whether mail to `recipient` is delivered here: no domain, or a local one."""
    return not address.domain_of(recipient) or address.is_local(recipient, conf.local_domains)


def decide(conf, recipient, sender="", up=(), from_header=None, size=None):
    """The Decision for one recipient (of a message of `size` bytes, if known)."""
    if is_local(conf, recipient):
        return Decision("local")
    waiting, too_big, routes = None, None, []
    for name, table in conf.routes:
        if not allows(table, sender, recipient, from_header):
            continue
        limit = table.get("max_size")
        if size is not None and isinstance(limit, int) and size > limit:
            too_big = too_big or (name, limit)
            continue
        if name in up:
            routes.append(name)
            if flag(table, name, "last_route"):
                break
        waiting = waiting or name
    if routes:
        return Decision("route", routes[0], routes=routes)
    if waiting:
        return Decision("wait", waiting, f"waiting for route {waiting} to come online")
    domain = address.domain_of(recipient)
    if too_big:
        return Decision("bounce", reason=f"message of {size} bytes is larger than route "
                        f"{too_big[0]} takes ({too_big[1]} bytes) (5.3.4)")
    if not conf.routes:
        return Decision("bounce", reason=f"no route for mail to {domain}: "
                        "this host delivers locally only (5.4.4)")
    return Decision("bounce", reason=f"no route may carry mail from <{sender}> "
                    f"to <{recipient}> (5.7.1)")


def allows(table, sender, recipient, from_header=None):
    """True when the route's patterns let this mail through."""
    checks = (("senders", sender), ("recipients", recipient), ("from_headers", from_header))
    for what, value in checks:
        allowed = table.get(f"allowed_{what}")
        denied = table.get(f"denied_{what}", [])
        if value is None:           # no From: header known: header patterns do not apply
            continue
        if allowed is not None and not matches(allowed, value):
            return False
        if denied and matches(denied, value):
            return False
    return True


def flag(table, name, key):
    """A boolean key of [route.NAME] (false when absent); anything else is an error."""
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise RouteError(f"[route.{name}] {key} must be true or false")
    return value


def matches(patterns, addr):
    """Shell-style match (* and ?) of an address against patterns.

    Domains compare case-blind; "[" is a plain character, so that address
    literals like *@[192.0.2.1] match themselves rather than a set.
    """
    from fnmatch import fnmatchcase     # it imports re: only routes with patterns pay
    local, domain = address.split(addr)
    subject = f"{local}@{domain.lower()}" if domain else local
    for pattern in patterns:
        plocal, pdomain = address.split(pattern)
        pattern = f"{plocal}@{pdomain.lower()}" if pdomain else plocal
        if fnmatchcase(subject, pattern.replace("[", "[[]")):
            return True
    return False


def rewrite(table, addr):
    """The sender as the route rewrites it ({"*@host": "me@isp"}), or unchanged."""
    for pattern, replacement in (table.get("rewrite_sender") or {}).items():
        if matches([pattern], addr):
            if "*" in replacement:
                replacement = replacement.replace("*", address.split(addr)[0])
            return replacement
    return addr


REWRITTEN_HEADERS = ("from", "sender", "reply-to")


def rewrite_headers(table, section):
    """The fields of a header section (masq.headers.Section) as bytes, with
    rewrite_sender applied to From:, Sender: and Reply-To:; every other byte
    stays as it was."""
    if not table.get("rewrite_sender"):
        return section.raw()
    return b"".join(_rewrite_field(table, raw) if name in REWRITTEN_HEADERS else raw
                    for name, raw in section.fields)


def _rewrite_field(table, raw):
    """One header field with each address in it rewritten (RFC 5322 3.4)."""
    import re           # only routes with rewrite_sender
    name, colon, value = raw.partition(b":")
    text = value.decode("utf-8", "surrogateescape")
    masked = _mask(text)
    spans = [(m.start(1), m.end(1)) for m in re.finditer(r"<([^<>]*)>", masked)]
    bare = masked
    for start, end in spans:
        bare = bare[:start - 1] + " " * (end - start + 2) + bare[end + 1:]
    spans += [m.span() for m in re.finditer(r"[^\s<>,;:\"()\x00]+@[^\s<>,;:\"()\x00]+", bare)]
    for start, end in sorted(spans, reverse=True):
        addr = text[start:end].strip()
        if not addr or "@" not in addr:
            continue
        new = rewrite(table, addr)
        if new != addr:
            text = text[:start] + new + text[end:]
    return name + colon + text.encode("utf-8", "surrogateescape")


def _mask(text):
    """Text with quoted strings and comments blanked out (same length)."""
    out, depth, quoted, escaped = [], 0, False, False
    for c in text:
        hidden = quoted or depth > 0
        if escaped:
            escaped = False
        elif c == "\\" and (quoted or depth):
            escaped = True
        elif quoted:
            quoted = c != '"'
        elif c == '"':
            quoted, hidden = True, True
        elif c == "(":
            depth, hidden = depth + 1, True
        elif c == ")" and depth:
            depth -= 1
        out.append("\x00" if hidden else c)
    return "".join(out)


def route_table(conf, name):
    for route_name, table in conf.routes:
        if route_name == name:
            return table
    raise RouteError(f"no route named {name} in {conf.file}")


def describe_route(table):
    host = table.get("host")
    if table.get("pipe"):
        return f"piped to {table['pipe']}"
    return f"via {host}" if host else "straight to the MX of the recipient's domain"


def mailbox_of(conf, local_part):
    """Where a local user's mail lands, as configured (for people to read)."""
    kind = conf.get("local.mailbox")
    if kind == "mda":
        return f"MDA {conf.get('local.mda').replace('{user}', local_part)}"
    if kind == "lmtp":
        return f"LMTP {conf.get('local.lmtp')} as {local_part}"
    path = conf.get("local.path").replace("{user}", local_part)
    return f"{kind} {os.path.join(conf.dir, path)}"
