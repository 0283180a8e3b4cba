"""The aliases file (/etc/aliases format): read it, check it, expand names.

Format (masq-local(8)): one entry per line, `name: target, target, ...`;
a line starting with a space or tab continues the entry above; lines
starting with `#` and blank lines are skipped.  Names are case-insensitive.
A target is

    name            a local name, expanded again if it is an alias
    \\name           a local mailbox, never expanded again
    user@domain     an address; a local domain's address counts as its name
    |command        a command run with /bin/sh -c, the message on stdin
    /path/file      an mbox file to append to (/path/folder/ is a maildir)
    :include:FILE   targets read from FILE (one or more a line; # comments)
    "..."           any of these quoted, so it may hold commas; \\" is a quote

The API, for masq-local and for tools that show where mail goes:

    load(path, local_domains=())  -> Aliases (empty when the file is absent)
    Aliases.expand(local_part)    -> the final targets, each a string above
                                     minus quotes, backslash and includes;
                                     a name with no alias gives [name]
    Aliases.expand(local_part, origins=True)
                                  -> (target, origin) pairs: origin is None
                                     for a target of the aliases file, else
                                     the uid owning the :include: file it
                                     came from (system mode runs its |command
                                     and /file targets as that user)
    name in aliases               -> True when the name is an alias
    kind(target)                  -> "local" | "remote" | "pipe" | "file"
                                     | "include"
    check(path)                   -> [(line_number, message), ...] for
                                     every bad line (what newaliases prints)

Loops end, they never hang: a name met again on its own expansion path is
delivered to the mailbox of that name (`root: \\root, bob` and `a: b` +
`b: a` both end in a mailbox), nesting is limited to MAX_DEPTH and the whole
walk to MAX_STEPS.  AliasError says why an expansion failed; its
`temporary` is True when a file could not be read (retrying can help).

An Aliases loaded with strict=True (system mode: the targets of an include
file run as its owner) refuses an include file that is not a regular file,
is a symbolic link, is writable by group or others, or sits in a folder
writable by group or others (sticky or not) or owned by someone other than
root or the file's owner: whoever could change it could choose what runs.
The refusal is temporary: the administrator can fix the modes.
"""
import errno
import os
import stat

from masq import Error, address

MAX_DEPTH = 20              # alias-in-alias or include-in-include nesting
MAX_STEPS = 100000          # targets visited in one expansion (diamond graphs)
MAX_FILE_BYTES = 16 * 1024 * 1024
INCLUDE = ":include:"


class AliasError(Error):
    """An expansion that cannot finish; temporary when a file is unreadable."""

    code = 100
    temporary = False


def kind(target):
    """What a target (a string from the file or from expand) names."""
    if target.startswith("|"):
        return "pipe"
    if target.startswith("/"):
        return "file"
    if target[:len(INCLUDE)].lower() == INCLUDE:
        return "include"
    if target.startswith("\\"):
        return "local"
    return "remote" if "@" in target and not target.endswith('"') else "local"


class Aliases:
    """A parsed aliases file: name -> list of targets."""

    def __init__(self, table=None, folder="/", local_domains=(), strict=False):
        self.table = table or {}
        self.folder = folder
        self.local_domains = {d.lower() for d in local_domains}
        self.strict = strict

    def __contains__(self, name):
        return name.lower() in self.table

    def __len__(self):
        return len(self.table)

    def expand(self, local_part, origins=False):
        """The final targets of a local part, in file order, without repeats.

        With origins=True, (target, origin) pairs (see the module docstring);
        the same target from two owners is kept twice: it runs as each.
        """
        name = local_part.lower()
        if name not in self.table:
            return [(name, None)] if origins else [name]
        out, steps = [], [0]
        self._walk(self.table[name], [name], out, steps, 0, None)
        unique, seen = [], set()
        for target, origin in out:
            key = target.lower() if kind(target) in ("local", "remote") else target
            if (key, origin) not in seen:
                seen.add((key, origin))
                unique.append((target, origin))
        if origins:
            return unique
        return list(dict.fromkeys(target for target, _ in unique))

    def _walk(self, targets, chain, out, steps, depth, origin):
        """Expand into out as (target, origin); an include's owner passes down to
        everything reached through it, nested aliases included (Postfix does the same)."""
        if depth > MAX_DEPTH:
            raise AliasError(f"aliases nested deeper than {MAX_DEPTH} "
                             f"({' -> '.join(chain[:3])} ...)")
        for target in targets:
            steps[0] += 1
            if steps[0] > MAX_STEPS:
                raise AliasError(f"alias {chain[0]} expands to more than "
                                 f"{MAX_STEPS} targets")
            what = kind(target)
            if what == "include":
                inner, owner = self._include(target)
                self._walk(inner, chain, out, steps, depth + 1, owner)
                continue
            if what == "remote":
                local, _, domain = target.rpartition("@")
                if domain.lower() not in self.local_domains:
                    out.append((f"{local}@{domain.lower()}", origin))
                    continue
                target = local
            if what in ("pipe", "file"):
                out.append((target, origin))
                continue
            if target.startswith("\\"):
                out.append((_local_name(target[1:]), origin))
                continue
            name = _local_name(target)
            if name in chain or name not in self.table:
                out.append((name, origin))
            else:
                self._walk(self.table[name], chain + [name], out, steps, depth + 1, origin)

    def include(self, target):
        """The targets listed in an :include: file; AliasError if unreadable."""
        return self._include(target)[0]

    def _include(self, target):
        """(targets, owner uid) of an :include: file; strict: refuse an unsafe one."""
        path = self.include_path(target)
        try:
            if self.strict:
                data, owner = _read_owned(path)
            else:
                with open(path, "rb") as f:
                    data, owner = f.read(MAX_FILE_BYTES + 1), os.fstat(f.fileno()).st_uid
        except OSError as e:
            raise AliasError(f"unable to read include file {path}: {e.strerror}",
                             temporary=True) from None
        if len(data) > MAX_FILE_BYTES:
            raise AliasError(f"include file {path} is larger than {MAX_FILE_BYTES} bytes")
        targets = []
        for _, line, problem in _include_lines(data):
            if not problem:
                targets += line
        return targets, owner

    def include_path(self, target):
        """The file an :include: target names, relative to the aliases file."""
        return os.path.join(self.folder, target[len(INCLUDE):].strip())


def _read_owned(path):
    """(bytes, owner uid) of an include file that only its owner (or root) can change.

    The folder is opened and checked first, and the file opened from that
    descriptor without following a symbolic link, so the checks and the read
    are about the same file.  AliasError says why a file is refused.
    """
    folder, name = os.path.split(path)
    dfd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC, dir_fd=dfd)
        try:
            st, dst = os.fstat(fd), os.fstat(dfd)
            problem = ("is not a regular file" if not stat.S_ISREG(st.st_mode)
                       else "is writable by group or others" if st.st_mode & 0o022
                       else f"is in {folder or '.'}, writable by group or others"
                       if dst.st_mode & 0o022
                       else f"is in {folder or '.'}, owned by someone else (uid {dst.st_uid})"
                       if dst.st_uid not in (0, st.st_uid) else "")
            if problem:
                raise AliasError(f"include file {path} {problem}: refused, as whoever "
                                 "can change it could choose what runs", temporary=True)
            with open(fd, "rb", closefd=False) as f:
                return f.read(MAX_FILE_BYTES + 1), st.st_uid
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise AliasError(f"include file {path} is a symbolic link: refused",
                             temporary=True) from None
        raise
    finally:
        os.close(dfd)


def load(path, local_domains=(), strict=False):
    """Read an aliases file; an absent file gives no aliases.  strict: see above."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return Aliases({}, folder, local_domains, strict)
    except OSError as e:
        raise AliasError(f"unable to read {path}: {e.strerror}", temporary=True) from None
    if len(data) > MAX_FILE_BYTES:
        raise AliasError(f"{path} is larger than {MAX_FILE_BYTES} bytes", temporary=True)
    table = {}
    for _, name, targets, problem in _entries(data):
        if name is not None and name not in table and (targets or not problem):
            table[name] = targets
    return Aliases(table, folder, local_domains, strict)


def check(path):
    """Every problem in an aliases file, as (line number, message), in order."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as e:
        return [(0, f"unable to read {path}: {e.strerror}")]
    if len(data) > MAX_FILE_BYTES:
        return [(0, f"larger than {MAX_FILE_BYTES} bytes")]
    aliases = Aliases({}, os.path.dirname(os.path.abspath(path)))
    problems, first = [], {}
    for number, name, targets, problem in _entries(data):
        if problem:
            problems.append((number, problem))
        if name is None:
            continue
        if name in first:
            problems.append((number, f"duplicate alias {name} (first on line "
                                     f"{first[name]}; that one is used)"))
            continue
        first[name] = number
        for target in targets:
            for message in _check_target(aliases, target, 0):
                problems.append((number, message))
    return problems


def _check_target(aliases, target, depth):
    """Messages about one target (and, for an include, about its file)."""
    what = kind(target)
    if what == "pipe":
        return [] if target[1:].strip() else ["empty command after |"]
    if what == "file":
        return [] if target.strip("/") else [f"{target}: not a file or folder"]
    if what == "include":
        return _check_include(aliases, target, depth)
    body = target[1:] if target.startswith("\\") else target
    try:
        if what == "remote" or "@" in body:
            address.check(body)
        else:
            address.check_local(body)
    except address.AddressError as e:
        return [f"bad address {target}: {e}"]
    return []


def _check_include(aliases, target, depth):
    path = aliases.include_path(target)
    if not target[len(INCLUDE):].strip():
        return [":include: without a file name"]
    if depth >= MAX_DEPTH:
        return [f"{path}: includes nested deeper than {MAX_DEPTH}"]
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        return [f"include file {path}: {e.strerror}"]
    messages = []
    for number, targets, problem in _include_lines(data):
        if problem:
            messages.append(f"{path} line {number}: {problem}")
        for inner in targets:
            messages += [f"{path} line {number}: {m}"
                         for m in _check_target(aliases, inner, depth + 1)]
    return messages


def _entries(data):
    """(line number, name, targets, problem) for each logical line.

    `name` is None when the line cannot be used at all; `problem` is None
    when the line is good.
    """
    for number, text in _logical_lines(data):
        if text is None:
            yield number, None, [], "continuation line without an entry above it"
            continue
        name, colon, rest = text.partition(":")
        name = name.strip()
        if not colon:
            yield number, None, [], "no colon: expected 'name: target, target, ...'"
            continue
        if not name or any(c.isspace() or ord(c) < 32 or c == '"' for c in name):
            yield number, None, [], f"bad alias name {name!r}"
            continue
        try:
            targets = split_targets(rest)
        except ValueError as e:
            yield number, None, [], f"{name}: {e}"
            continue
        if not targets:
            yield number, name.lower(), [], f"{name}: no targets"
            continue
        yield number, name.lower(), targets, None


def _logical_lines(data):
    """(first line number, text) per entry, continuation lines joined.

    Text is None for a continuation line that has no entry to continue.
    """
    start, parts = 0, []
    for number, raw in enumerate(data.split(b"\n"), 1):
        line = raw.decode("utf-8", "surrogateescape").rstrip("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if parts:
                parts.append(stripped)
            else:
                yield number, None
            continue
        if parts:
            yield start, " ".join(parts)
        start, parts = number, [stripped]
    if parts:
        yield start, " ".join(parts)


def _include_lines(data):
    """(line number, targets, problem) for each line of an :include: file."""
    for number, raw in enumerate(data.split(b"\n"), 1):
        line = raw.decode("utf-8", "surrogateescape").strip()
        if not line or line.startswith("#"):
            continue
        try:
            yield number, split_targets(line), None
        except ValueError as e:
            yield number, [], str(e)


def split_targets(text):
    """Targets from `a, "|cmd x, y", \\b`; ValueError on an unterminated quote."""
    targets, item, quoted, escaped = [], [], False, False
    for c in text:
        if escaped:
            item.append(c)
            escaped = False
        elif quoted and c == "\\":
            item.append(c)
            escaped = True
        elif c == '"':
            quoted = not quoted
            item.append(c)
        elif c == "," and not quoted:
            targets.append("".join(item))
            item = []
        else:
            item.append(c)
    if quoted:
        raise ValueError("unterminated quote")
    targets.append("".join(item))
    return [_unquote(t.strip()) for t in targets if t.strip()]


def _unquote(item):
    """`"|a, b"` -> `|a, b`; `"john doe"@x` (a quoted local part) stays."""
    if len(item) < 2 or not (item.startswith('"') and item.endswith('"')):
        return item
    inner, out, escaped = item[1:-1], [], False
    for c in inner:
        if escaped:
            out.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            return item         # more than one quoted string: an address
        else:
            out.append(c)
    text = "".join(out).strip()
    if text.startswith(("|", "/", "\\")) or text[:len(INCLUDE)].lower() == INCLUDE:
        return text
    return item if "@" in text or " " in text else text


def _local_name(name):
    """A local name as mailboxes use it: unquoted and lower-cased."""
    return address.unquote_local(name.strip()).lower()
