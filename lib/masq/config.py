"""Load masq.toml: keys checked against one schema, paths relative to the file's folder.

Which file: the -C argument, else $MASQ_CONF, else masq.toml in the folder
above the one the program was called from (so DIR/bin/sendmail finds
DIR/masq.toml by itself), else /etc/masq/masq.toml.  The path found is put
into $MASQ_CONF so that every program the chain runs reads the same file.

Every key, its kind and default are in masq.schema (documented in
masq.toml(5)); a missing key takes its default.  An unreadable or invalid
file, an unknown table or key, or a value of the wrong kind is a
ConfigError naming the file and line of each problem, never a guess.

tomllib costs more to import than a whole `sendmail` call may take, so the
parsed and checked file is kept beside it as `.NAME.cache` (marshal, keyed
by the file's size, mtime and inode) and parsed again only when the file
changes.  Whoever can write the cache decides what every program does, root
included: it is read only when masq.toml's owner owns it and no one else
may write it, and written with masq.toml's mode, never writable by others.
"""
import marshal
import posix
import sys

from masq import Error, pathenv

SYSTEM_FILE = "/etc/masq/masq.toml"
CACHE_VERSION = 2       # 2: the cached data has been checked against the schema
S_IFMT, S_IFREG = 0o170000, 0o100000    # stat's: sendmail's path does without the module


def _unreadable(path, error):
    """The ConfigError for a configuration file that cannot be read."""
    if isinstance(error, FileNotFoundError):
        return ConfigError(f"no configuration file {path}: "
                           "write one with masq-setup or name one with -C")
    return ConfigError(f"unable to read {path}: {error.strerror}")


class ConfigError(Error):
    """The configuration cannot be read or makes no sense.

    `problems` holds one line per problem, "FILE:LINE: what"; the message is
    the first, and says how many more `masq-setup check` would list.
    """

    code = 78
    temporary = True

    def __init__(self, message, problems=None, file=None, **kw):
        self.problems = problems or [message]
        if len(self.problems) > 1:
            message += (f" (and {len(self.problems) - 1} more: masq-setup check "
                        f"{file or ''} lists them all)").replace(" )", ")")
        super().__init__(message, **kw)


def find(explicit=None):
    """The path of the configuration file to read."""
    if explicit:
        return pathenv.abspath(explicit)
    env = pathenv.getenv("MASQ_CONF")
    if env:
        return pathenv.abspath(env)
    if sys.argv and sys.argv[0]:
        here = pathenv.dirname(pathenv.abspath(sys.argv[0]))
        candidate = pathenv.join(pathenv.dirname(here), "masq.toml")
        if pathenv.exists(candidate):
            return candidate
    return SYSTEM_FILE


def load(explicit=None):
    """Find, read and check the configuration; return a Config."""
    path = find(explicit)
    conf = Config(path, *_read(path))
    pathenv.putenv("MASQ_CONF", path)
    return conf


def reload(previous):
    """The configuration as previous.file now says, for a running daemon.

    When the file cannot be used, the error goes to the log (or stderr
    before log.setup) as a warning and `previous` is returned: a daemon
    keeps the last good configuration and goes on.
    """
    try:
        return Config(previous.file, *_read(previous.file))
    except ConfigError as e:
        from masq import log
        text = f"{e}; keeping the configuration read before"
        if log.ready():
            log.line(f"warning: {text}")
        else:
            log.warn(text)
        return previous


def check(path):
    """Every problem of the file at `path`, one line each ([] when it is good);
    the cache is neither read nor written."""
    try:
        parse(path)
    except ConfigError as e:
        return e.problems
    return []


def parse(path):
    """The file parsed and checked, without the cache; a ConfigError lists every problem."""
    import tomllib      # only when the marshal cache is stale: it costs a few ms
    from masq import schema
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
        data = tomllib.loads(text)
    except OSError as e:
        raise _unreadable(path, e) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: not UTF-8 at byte {e.start}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    problems = schema.check(data)
    if problems:
        lines = _key_lines(text)
        located = [f"{path}:{_line_of(lines, where)}: {message}" for where, message in problems]
        raise ConfigError(located[0], located, path)
    return data


def _key_lines(text):
    """{names: line number} of each table header and key of a TOML text.

    tomllib gives no positions, so this scans the lines: a header `[a.b]`
    is the table that follows (the Nth `[[a.b]]`: the table a.b.N-1, as
    masq.schema names an entry), and `key =` or `a."b".c =` adds its names
    to the table's; the first line of each path counts.  It
    does not follow multi-line strings and arrays: a line inside one that
    looks like `name =` could be taken for a key.
    """
    import re           # only when the file has a problem
    name = r'(?:[A-Za-z0-9_-]+|"[^"]*"|\'[^\']*\')'
    key = re.compile(rf"\s*({name}(?:\s*\.\s*{name})*)\s*=")
    header = re.compile(rf"\s*(\[\[?)\s*({name}(?:\s*\.\s*{name})*)\s*\]")
    lines, table, counts = {}, (), {}
    for number, line in enumerate(text.splitlines(), 1):
        m = header.match(line)
        if m:
            table = _names(m.group(2))
            lines.setdefault(table, number)
            if m.group(1) == "[[":      # an array of tables: its entries are 0, 1, ...
                counts[table] = counts.get(table, -1) + 1
                table += (counts[table],)
                lines.setdefault(table, number)
            continue
        m = key.match(line)
        if m:
            lines.setdefault(table + _names(m.group(1)), number)
    return lines


def _names(dotted):
    """The names of a dotted key: `a."b.c" . d` -> ("a", "b.c", "d")."""
    names, word, quote = [], "", None
    for c in dotted:
        if quote:
            if c == quote:
                quote = None
            else:
                word += c
        elif c in "\"'":
            quote = c
        elif c == ".":
            names.append(word.strip())
            word = ""
        else:
            word += c
    names.append(word.strip())
    return tuple(names)


def _line_of(lines, where):
    """The line of a key, else of the nearest table or key around it found (an
    inline table's member: its table's key), else 1."""
    for end in range(len(where), 0, -1):
        if where[:end] in lines:
            return lines[where[:end]]
    return 1


def _read(path):
    """(data, defaults): the parsed, checked file and the schema's defaults, from
    the cache when it is current and trusted (then masq.schema is not even
    imported: start-up is what the cache is for)."""
    try:
        st = posix.stat(path)
    except OSError as e:
        raise _unreadable(path, e) from None
    key = (st.st_size, st.st_mtime_ns, st.st_ino, CACHE_VERSION, _schema_stamp())
    folder, base = pathenv.dirname(path), pathenv.basename(path)
    cache = pathenv.join(folder, f".{base}.cache")
    cached = _read_cache(cache, key, st)
    if cached:
        return cached
    from masq import schema
    data = parse(path)          # checked before it is cached
    _write_cache(cache, key, data, schema.DEFAULTS, st)
    return data, schema.DEFAULTS


def _schema_stamp():
    """The modification time of schema.py: a new masq's keys and defaults make
    every cache stale."""
    try:
        return posix.stat(pathenv.join(pathenv.dirname(__file__), "schema.py")).st_mtime_ns
    except OSError:
        return 0


def _read_cache(cache, key, st):
    """(data, defaults) from the cache if current, owned by the file's owner and
    writable by no one else; else None."""
    try:
        fd = posix.open(cache, posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_CLOEXEC)
    except OSError:
        return None
    try:
        with open(fd, "rb") as f:
            own = posix.fstat(fd)
            if own.st_uid != st.st_uid or own.st_mode & 0o022 or own.st_mode & S_IFMT != S_IFREG:
                return None
            # read whole, then loads: marshal.load(f) reads in small pieces (0.15 ms)
            cached_key, data, defaults = marshal.loads(f.read())
    except (OSError, EOFError, ValueError, TypeError):
        return None
    return (data, defaults) if cached_key == key and isinstance(data, dict) else None


def _write_cache(cache, key, data, defaults, st):
    """Keep the parsed file for the next program, with the file's owner, group and
    mode (never writable by others); quietly skip if we cannot."""
    if posix.geteuid() not in (0, st.st_uid):
        return          # a cache we would own could never be read
    try:
        blob = marshal.dumps((key, data, defaults))
    except ValueError:      # a value marshal can't keep
        return
    mode = st.st_mode & 0o755
    tmp = f"{cache}.{posix.getpid()}"
    try:
        flags = posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_NOFOLLOW | posix.O_CLOEXEC
        fd = posix.open(tmp, flags, 0o600)
    except OSError:
        return
    try:
        try:
            posix.fchown(fd, st.st_uid if posix.geteuid() == 0 else -1, st.st_gid)
        except OSError:
            mode &= 0o705   # another group: its bits would give the wrong group access
        posix.fchmod(fd, mode)
        with open(fd, "wb", closefd=False) as f:
            f.write(blob)
        posix.replace(tmp, cache)
    except OSError:
        try:
            posix.unlink(tmp)
        except OSError:
            pass
    finally:
        posix.close(fd)


class Config:
    """The configuration: `get("local.mailbox")` with defaults, `path()` for files."""

    def __init__(self, path, data, defaults=None):
        if defaults is None:
            from masq import schema
            defaults = schema.DEFAULTS
        self.file = path
        self.dir = pathenv.dirname(path)
        self.data = data
        self.defaults = defaults

    def get(self, key):
        """The value of a dotted key, or its default."""
        node = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return self.defaults.get(key)
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
        return pathenv.join(self.dir, pathenv.expanduser(value))

    @property
    def hostname(self):
        return self.get("hostname") or posix.uname().nodename

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
