"""Load masq.toml: one table of defaults, paths relative to the file's folder.

Which file: the -C argument, else $MASQ_CONF, else masq.toml in the folder
above the one the program was called from (so DIR/bin/sendmail finds
DIR/masq.toml by itself), else /etc/masq/masq.toml.  The path found is put
into $MASQ_CONF so that every program the chain runs reads the same file.

A missing key takes its default from DEFAULTS (documented in masq.toml(5));
the [smtpd] and [route.NAME] tables keep theirs beside the one program
that reads them (masq.smtpdconfig.SETTINGS, masq.clientroute.Route).
An unreadable or invalid file is an error, never a guess.

tomllib costs more to import than a whole `sendmail` call may take, so the
parsed file is kept beside it as `.NAME.cache` (marshal, keyed by the file's
size, mtime and inode) and parsed again only when the file changes.
"""
import marshal
import os
import sys

from masq import Error

SYSTEM_FILE = "/etc/masq/masq.toml"

DEFAULTS = {
    "hostname": None,                  # None: the host's name (uname)
    "spool": "spool",
    "local_domains": None,             # None: ["localhost", hostname]
    "relay_domains": [],
    "aliases": "aliases",
    "log": "masq.log",
    "max_size": 52428800,
    "postmaster": "postmaster",
    "user": "",                        # system mode: the user the spool belongs to ("masq")
    "local.mailbox": "maildir",
    "local.path": "mail/{user}/",
    "local.mda": "procmail -d {user}",
    "local.users": "any",
    "local.mda_timeout": 3600,
    "local.recipient_delimiter": "+",
    "local.deliver": "in-process",     # masq-send: local.deliver() in-process, or masq-local
    "local.default_privs": "nobody",   # system mode: aliases' own |command and /file run as
    "local.mail_group": "mail",        # system mode, mbox: the group of the mbox spool
    "queue.filters": [],
    "queue.archive_bcc": "",
    "queue.retry_min": 300,            # seconds before the first retry
    "queue.retry_max": 14400,          # the back-off never waits longer
    "queue.max_age": 432000,           # 5 days on a route that is up
    "queue.max_age_offline": 2592000,  # 30 days waiting for a route
    "queue.warn_after": 14400,         # a delay warning after 4 hours failing; 0: none
    "queue.interval": 600,             # daemon: a full queue run at least this often
    "queue.parallel": 2,
    "queue.hoststat_timeout": 5,       # runq trusts a host's failure this long
    "queue.show_queue": "all",         # mailq for every user, or "admin": root and masq
    "online.detect": "always",
    "online.file": "online",
    "online.command": "",
}


class ConfigError(Error):
    """The configuration cannot be read or makes no sense."""

    code = 78
    temporary = True


def find(explicit=None):
    """The path of the configuration file to read."""
    if explicit:
        return os.path.abspath(explicit)
    env = os.environ.get("MASQ_CONF")
    if env:
        return os.path.abspath(env)
    if sys.argv and sys.argv[0]:
        here = os.path.dirname(os.path.abspath(sys.argv[0]))
        candidate = os.path.join(os.path.dirname(here), "masq.toml")
        if os.path.exists(candidate):
            return candidate
    return SYSTEM_FILE


def load(explicit=None):
    """Find, read and check the configuration; return a Config."""
    path = find(explicit)
    data = _read(path)
    conf = Config(path, data)
    os.environ["MASQ_CONF"] = path
    return conf


def _read(path):
    """The parsed TOML file, from the cache when it is current."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"no configuration file {path}: "
                          f"write one with masq-setup or name one with -C") from None
    except OSError as e:
        raise ConfigError(f"unable to read {path}: {e.strerror}") from None
    key = (st.st_size, st.st_mtime_ns, st.st_ino, 1)
    folder, base = os.path.split(path)
    cache = os.path.join(folder, f".{base}.cache")
    try:
        with open(cache, "rb") as f:
            cached_key, data = marshal.load(f)
        if cached_key == key:
            return data
    except (OSError, EOFError, ValueError, TypeError):
        pass
    import tomllib      # only when the marshal cache is stale: it costs a few ms
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"unable to read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    _write_cache(cache, key, data)
    return data


def _write_cache(cache, key, data):
    """Keep the parsed file for the next program; quietly skip if we cannot."""
    try:
        blob = marshal.dumps((key, data))
    except ValueError:      # a datetime value in the file: marshal can't keep it
        return
    tmp = f"{cache}.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, cache)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


class Config:
    """The configuration: `get("local.mailbox")` with defaults, `path()` for files."""

    def __init__(self, path, data):
        self.file = path
        self.dir = os.path.dirname(path)
        self.data = data
        self._check()

    def get(self, key):
        """The value of a dotted key, or its default."""
        node = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return DEFAULTS.get(key)
            node = node[part]
        return node

    def table(self, name):
        """A whole table, {} when absent."""
        value = self.data.get(name, {})
        return value if isinstance(value, dict) else {}

    def path(self, key_or_value, is_value=False):
        """A path from the file, made absolute against the file's folder."""
        value = key_or_value if is_value else self.get(key_or_value)
        if not value:
            return value
        return os.path.join(self.dir, os.path.expanduser(value))

    @property
    def hostname(self):
        return self.get("hostname") or os.uname().nodename

    @property
    def local_domains(self):
        domains = self.get("local_domains")
        if domains is None:
            domains = ["localhost", self.hostname]
        return [d.lower() for d in domains]

    @property
    def routes(self):
        """The [route.NAME] tables, in the order the file gives them."""
        routes = self.data.get("route", {})
        return [(name, table) for name, table in routes.items() if isinstance(table, dict)]

    def _check(self):
        """Refuse values of the wrong kind now, not in the middle of a delivery."""
        checks = {
            "spool": str, "aliases": str, "log": str, "max_size": int,
            "local.mailbox": str, "local.path": str, "local.mda": str,
            "local.users": str, "local.deliver": str, "local_domains": list, "relay_domains": list,
            "queue.filters": list, "online.detect": str, "user": str,
        }
        for key, kind in checks.items():
            value = self.get(key)
            if value is not None and not isinstance(value, kind):
                raise ConfigError(f"{self.file}: {key} must be a {kind.__name__}")
        choices = {"local.mailbox": ("maildir", "mbox", "mda"),
                   "local.users": ("any", "system"),
                   "local.deliver": ("in-process", "child"),
                   "online.detect": ("always", "file", "command"),
                   "queue.show_queue": ("all", "admin")}
        for key, allowed in choices.items():
            if self.get(key) not in allowed:
                raise ConfigError(f"{self.file}: {key} must be one of "
                                  + ", ".join(f'"{a}"' for a in allowed))
