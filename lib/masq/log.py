"""Warnings to stderr, and one event line per happening, keyed by queue id.

Event lines go where `log` in masq.toml says: a file (appended with one
write(2) per line, so lines of concurrent programs never mix), "syslog" or
"stderr".  A line looks like Postfix's:

  2026-11-25T19:40:03Z masq-send[812]: 19abc-1f2: to=<bob@localhost> relay=local
      delay=0.21 status=sent (maildir)    (on one line)
"""
import posix
import sys
import time

from masq import program

_target = None      # (kind, value): ("file", fd) | ("syslog", None) | ("stderr", None)


def warn(text):
    """`prog: warning: text` on stderr."""
    program._say(f"{program.name()}: warning: {text}")


def ready():
    """True once setup() has chosen where event lines go."""
    return _target is not None


def setup(conf):
    """Send event lines where the configuration says."""
    global _target
    where = conf.get("log") or "stderr"
    if where in ("stderr", "syslog"):
        _target = (where, None)
        if where == "syslog":
            import syslog   # only where log = "syslog"
            syslog.openlog(program.name(), syslog.LOG_PID, syslog.LOG_MAIL)
        return
    try:
        fd = posix.open(conf.path(where, is_value=True),
                        posix.O_WRONLY | posix.O_APPEND | posix.O_CREAT | posix.O_CLOEXEC, 0o640)
        _target = ("file", fd)
    except OSError as e:
        warn(f"unable to open log {where}: {e.strerror}; logging to stderr")
        _target = ("stderr", None)


def event(qid, text, **fields):
    """Log one event about queue id `qid`: `key=value ... (text)`."""
    parts = [f"{k}={clean(str(v))}" for k, v in fields.items() if v is not None]
    if text:
        parts.append(f"({clean(text)})")
    line(f"{qid}: " + " ".join(parts))


def conf_line(conf, text):
    """Log one line as it is, the log opened where `conf` says at the first."""
    if _target is None:
        setup(conf)
    line(text)


def line(text):
    """Log one line as it is."""
    kind, fd = _target or ("stderr", None)
    if kind == "syslog":
        import syslog   # only where log = "syslog"
        syslog.syslog(syslog.LOG_INFO, text)
        return
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    data = f"{stamp} {program.name()}[{posix.getpid()}]: {text}\n"
    try:
        if kind == "file":
            posix.write(fd, data.encode("utf-8", "replace"))
        else:
            sys.stderr.write(data)
            sys.stderr.flush()
    except (OSError, ValueError):
        pass


def clean(text, max_chars=None, escape=False):
    """One line, printable: a log line (or a terminal) is never split or steered by
    what it quotes.  A character that is not printable (a control, C1, a line or
    paragraph separator) becomes "?", or with `escape` \\xNN or \\uNNNN; at most
    max_chars characters."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else "?" if not escape
                       else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
                       for c in text)
    return text if max_chars is None else text[:max_chars]
