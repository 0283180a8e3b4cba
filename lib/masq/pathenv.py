"""Paths and the environment for the modules on sendmail's path, without os.

Importing os costs about 1 ms (its environ mapping pulls in the collections
ABCs): a tenth of a whole `sendmail` call, and more than all its own work.
So the modules a submission loads (cmd/inject, program, config, cleanup,
message, headers, address, envelope, log, files, spool, handoff) take their
system calls from posix, which os re-exports as they are, and these few
path and environment helpers from here.  tests/test_imports.py checks that
a sendmail call does not import os.

The environment: a process that has imported os may have changed
os.environ since it started (masq-tcpserver sets each session's variables),
so getenv() and putenv() go through os.environ when os is loaded, and
through posix.environ (bytes, as the process began) when it is not; os,
imported later, starts from posix.environ, so a putenv() before it is seen.
"""
import posix
import sys


def join(path, *parts):
    """os.path.join: an absolute part starts the path anew."""
    for part in parts:
        if part.startswith("/") or not path:
            path = part
        elif path.endswith("/"):
            path += part
        else:
            path += "/" + part
    return path


def dirname(path):
    """os.path.dirname: everything before the last slash, trailing slashes off."""
    head = path[:path.rfind("/") + 1]
    return head.rstrip("/") or head


def basename(path):
    """os.path.basename: everything after the last slash."""
    return path[path.rfind("/") + 1:]


def abspath(path):
    """os.path.abspath: absolute against the working folder, "." and ".." resolved
    by name (links are not followed), as os.path.normpath does."""
    if not path.startswith("/"):
        path = posix.getcwd() + "/" + path
    parts = []
    for part in path.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part and part != ".":
            parts.append(part)
    return "/" + "/".join(parts)


def expanduser(path):
    """os.path.expanduser: "~" and "~/x" from $HOME (else the password file), "~name/x"."""
    if not path.startswith("~"):
        return path
    end = path.find("/", 1)
    if end < 0:
        end = len(path)
    import pwd
    try:
        if end == 1:
            home = getenv("HOME") or pwd.getpwuid(posix.getuid()).pw_dir
        else:
            home = pwd.getpwnam(path[1:end]).pw_dir
    except KeyError:
        return path
    return (home.rstrip("/") or "/") + path[end:] if home else path


def exists(path):
    """os.path.exists: the path leads somewhere (links followed)."""
    try:
        posix.stat(path)
    except (OSError, ValueError):
        return False
    return True


def lexists(path):
    """os.path.lexists: something is there, a dangling link too."""
    try:
        posix.lstat(path)
    except (OSError, ValueError):
        return False
    return True


def getenv(name, default=None):
    """os.environ.get(name, default)."""
    os = sys.modules.get("os")
    if os is not None:
        return os.environ.get(name, default)
    value = posix.environ.get(name.encode())
    return default if value is None else value.decode("utf-8", "surrogateescape")


def putenv(name, value):
    """os.environ[name] = value: for this process and the programs it starts."""
    os = sys.modules.get("os")
    if os is not None:
        os.environ[name] = value
        return
    raw = value.encode("utf-8", "surrogateescape")
    posix.putenv(name.encode(), raw)
    posix.environ[name.encode()] = raw
