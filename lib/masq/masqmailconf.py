"""masqmail's configuration: its file format read, and turned into a masq.toml.

    result = masqmailconf.convert("/etc/masqmail")     # or the masqmail.conf path
    result.toml        # the text of an equivalent masq.toml
    result.secrets     # {file name: bytes}: passwords, to write with mode 0600
    result.notes       # ["file:line: key: why it was not carried over", ...]
    result.private     # [why masq.toml must not be readable by others], or []

The format (masqmail.conf(5), masqmail.route(5), masqmail.get(5); read as
masqmail 0.2 and 0.3 read it, src/conf.c): statements `key = value`; a
value is "quoted" (backslash escapes the next character) or runs over
letters, digits and `_ - . / @ ; :`; the rest of its line is ignored; `#`
starts a comment.  Lists are separated by ";", and an item that begins
with "/" names a file whose lines are items (not in the lists of route
files).  Booleans are yes/on/true and no/off/false.

A path masqmail's files name under /etc/masqmail/ is read from the folder
given (a copy of /etc/masqmail need not live there), else as written.

Every value written into masq.toml, in a string, a key or a comment, and
every note goes through masq.tomlwrite.escape(): a control character (CR, LF, NUL...)
never ends a line there, so no value becomes a [table] of its own.  A
masqmail value holding one (masqmail reads a newline inside quotes) is not
carried over, with a note; a password may hold any byte but CR, LF and
NUL, and is kept as its bytes.  A value that is not UTF-8 cannot be
written into TOML: its key is left out, with a note.

How each key maps onto masq's: masq-setup(8), IMPORTING FROM MASQMAIL.
"""
import os

from masq import Error
from masq.tomlwrite import CONTROLS, NotUTF8, escape, toml_key, toml_value

DEFAULT_DIR = "/etc/masqmail/"
SAFE_VALUE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                       "_-./@;:")
KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
TRUE_WORDS, FALSE_WORDS = ("yes", "on", "true"), ("no", "off", "false")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
ROUTE_FILE_LISTS = ("permanent_routes", "local_net_route")
CONNECTION_PREFIXES = ("query_routes.", "online_routes.", "connect_route.")
# masqmail's ${variables} in mda and pipe commands, and masq's words for them
MDA_VARIABLES = {"rcpt_local": "{user}", "rcpt_domain": "{domain}", "rcpt": "{recipient}",
                 "return_path": "{sender}"}
PIPE_VARIABLES = {"rcpt_local": "{local}", "rcpt_domain": "{domain}", "rcpt": "{rcpt}",
                  "return_path": "{sender}", "uid": "{id}"}

# keys carried over by no masq key, and why (one sentence each)
DROPPED = {
    "listen_addresses": "masq-smtpd listens where tcpserver, inetd or systemd start it "
                        "(masq-setup system; masq-smtpd(8))",
    "do_relay": "masq-smtpd relays for [smtpd] relay_nets and AUTH users only",
    "defer_all": "a debugging switch masq does not have",
    "do_save_envelope_to": "masq adds no Envelope-to: header to rename",
    "do_queue": "masq delivers at once; queue only with sendmail -odq",
    "spool_dir": "masq keeps its own spool (DIR/spool) in its own format: flush masqmail's "
                 "queue (masqmail -q) before switching",
    "lock_dir": "masq locks its spool files themselves",
    "log_dir": "masq logs to the file named by log (DIR/masq.log) or to syslog",
    "debug_level": "masq has no debug levels",
    "run_as_user": "masq runs as the folder's owner (or the masq user in system mode)",
    "pid_dir": "masq writes no pid file",
    "errmsg_file": "masq's bounces are RFC 3464 reports of its own text",
    "warnmsg_file": "masq's delay warnings are RFC 3464 reports of its own text",
    "local_addresses": "masq decides local by the domain only (local_domains)",
    "not_local_addresses": "masq decides local by the domain only (local_domains)",
    "globalias_file": "masq's aliases have no glob patterns",
    "caseless_matching": "masq has no such switch",
    "alias_local_caseless": "masq has no such switch",
    "mbox_users": "masq delivers every user the same way: give a user an alias "
                  '"|procmail -d user" or similar instead',
    "mda_users": "masq delivers every user the same way: give a user an alias "
                 '"|procmail -d user" or similar instead',
    "maildir_users": "masq delivers every user the same way ([local] mailbox)",
    "mda_fromline": "masq gives the MDA the message without a From_ line",
    "mda_fromhack": "masq gives the MDA the message as it is",
    "pipe_fromline": "masq gives an alias's |command the message without a From_ line "
                     "(route pipes: pipe_fromline)",
    "pipe_fromhack": "masq gives an alias's |command the message as it is "
                     "(route pipes: pipe_fromhack)",
    "ident_trusted_nets": "masq does not use RFC 1413 ident",
    "mserver_iface": "masq has no masqdialer client: online.command runs mservdetect",
    # route files
    "do_correct_helo": "masq greets with helo (default: hostname)",
    "instant_helo": "masq waits for the greeting; a STARTTLS wrapper is replaced by "
                    "masq's own STARTTLS where it could be read",
    "resolve_list": "masq finds hosts by DNS (MX, then A and AAAA) and the system's "
                    "resolver for a smarthost",
    "do_pipelining": "masq pipelines whenever the server offers PIPELINING",
    "map_h_mail_followup_to_addresses": "masq rewrites From:, Sender: and Reply-To: only",
    "expand_h_sender_domain": "masq rewrites Sender: by rewrite_sender",
    "expand_h_sender_address": "masq rewrites Sender: by rewrite_sender",
    "map_h_sender_addresses": "masqmail 1.0; masq rewrites Sender: by rewrite_sender",
    "map_outgoing_addresses": "masqmail 1.0; write rewrite_sender by hand",
    # get files
    "return_path": "masq keeps the fetched message's own sender",
    "do_uidl_dele": "masq deletes a message only once it is queued, and remembers UIDs",
    "max_size_delete": "masq leaves larger messages on the server",
}
IGNORED = ("do_ssl",)           # masqmail ignores it too (written by sqilconf)
SECRET_KEYS = ("auth_secret", "pass")
SECRET_CONTROLS = frozenset("\r\n\0")   # what would end a password file's line


class MasqmailConfError(Error):
    """A masqmail configuration that cannot be read at all."""

    code = 66
    temporary = False


class Statement:
    """key = value, at line `line` of `file`."""

    __slots__ = ("key", "value", "file", "line")

    def __init__(self, key, value, file, line):
        self.key, self.value, self.file, self.line = key, value, file, line

    @property
    def where(self):
        return f"{self.file}:{self.line}: {self.key}"


def parse(text, file="masqmail.conf"):
    """[Statement] of a masqmail configuration text, as masqmail's read_statement reads it."""
    out, i, n, line = [], 0, len(text), 1
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
        if c.isspace():
            i += 1
            continue
        if c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        start = i
        while i < n and text[i] in KEY_CHARS:
            i += 1
        key, at = text[start:i], line
        if not key:                         # a stray character: skip its line
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == "=":
            i += 1
        while i < n and text[i] in " \t":
            i += 1
        value = []
        if i < n and text[i] == '"':
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                if text[i] == "\n":
                    line += 1
                value.append(text[i])
                i += 1
        else:
            while i < n and text[i] in SAFE_VALUE:
                value.append(text[i])
                i += 1
        end = text.find("\n", i)
        i = n if end < 0 else end           # the rest of the line is ignored
        out.append(Statement(key, "".join(value).strip(), file, at))
    return out


def boolean(value):
    """True, False, or None for a word masqmail does not know."""
    word = value.strip().lower()
    if any(word.startswith(w) for w in TRUE_WORDS):
        return True
    if any(word.startswith(w) for w in FALSE_WORDS):
        return False
    return None


def interval(value):
    """Seconds of "30m", "4d", "1w"; None when masqmail would refuse it."""
    digits = "".join(c for c in value[:15] if c.isdigit())
    rest = value[len(digits):]
    if not digits or not rest or rest[0] not in SECONDS:
        return None
    return int(digits) * SECONDS[rest[0]]


def transform_command(text, variables):
    """A masqmail command with ${name} and $name made masq's {words}; (text, unknown names)."""
    out, unknown, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] == "$":
            out.append("$")                 # masqmail's escape for the shell's $
            i += 2
            continue
        if c == "$":
            braced = text[i + 1:i + 2] == "{"
            j = i + (2 if braced else 1)
            k = j
            while k < len(text) and (text[k].isalnum() or text[k] == "_"):
                k += 1
            name = text[j:k]
            if braced and text[k:k + 1] == "}":
                k += 1
            if name in variables:
                out.append(variables[name])
            elif name:
                unknown.append(name)
                out.append(text[i:k])
            else:
                out.append(c)
            i = max(k, i + 1)
            continue
        out.append(c)
        i += 1
    return "".join(out), unknown


class Converter:
    """One import: read masqmail.conf and its files, build masq's tables and notes."""

    def __init__(self, source):
        source = os.path.abspath(source)
        if os.path.isdir(source):
            self.folder, self.conf_file = source, os.path.join(source, "masqmail.conf")
        else:
            self.folder, self.conf_file = os.path.dirname(source), source
        self.notes, self.secrets = [], {}
        self.private = []           # why masq.toml must not be readable by others
        self.refused = set()        # (file, key) of values refused for a control character
        self.text = None
        self.top, self.queue, self.local, self.online = {}, {}, {}, {}
        self.routes = {}            # masq name -> {key: value}, in order
        self.comments = {}          # masq name -> comment line
        self.fetch_only = []        # connections of online_gets without routes
        self.hostname = None
        self.statements = {}        # path -> what read() gave: each file is read once

    # -- reading ------------------------------------------------------------------------
    def read(self, path, what):
        """The statements of a masqmail file; None (and a note) when it cannot be read.
        A file is read once: a route file is also read for its pop3_login, a get file
        also as the pop3_login of a route."""
        if path not in self.statements:
            self.statements[path] = self.read_once(path, what)
        return self.statements[path]

    def read_once(self, path, what):
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                self.check_private(f, path)
                statements = parse(f.read(), path)
        except OSError as e:
            self.note(f"{path}: {what} not read: {e.strerror}")
            return None
        return [st for st in statements if self.acceptable(st)]

    def acceptable(self, st):
        """False, with a note, for a value holding a control character (a password:
        CR, LF or NUL): masq.toml and a password file take none."""
        bad = next((c for c in st.value if c in (SECRET_CONTROLS if st.key in SECRET_KEYS
                                                 else CONTROLS)), None)
        if bad is None:
            return True
        self.refused.add((st.file, st.key))
        self.note(f"{st.where}: not carried over: its value holds the control character "
                  f"{escape(bad)}" + (" (a password file holds one line): write the password "
                                      "file by hand" if st.key in SECRET_KEYS else ""))
        return False

    def check_private(self, f, path):
        """A file others may not read: what is copied from it must stay as private."""
        import stat
        if not os.fstat(f.fileno()).st_mode & stat.S_IROTH:
            self.keep_private(f"{path} (not readable by others)")

    def from_file(self, path, f, what):
        """Values of masq.toml read out of a file a value names (host_name, lists):
        whatever file that is, masq.toml is not for others to read (masq-setup(8))."""
        self.check_private(f, path)
        self.keep_private(f"{path} ({what})")

    def keep_private(self, why):
        if why not in self.private:
            self.private.append(why)

    def locate(self, path):
        """Where a file masqmail names is read from: the folder given for /etc/masqmail/."""
        if not path.startswith("/"):
            return os.path.join(self.folder, path)
        if path.startswith(DEFAULT_DIR):
            here = os.path.join(self.folder, path[len(DEFAULT_DIR):])
            if os.path.exists(here) or not os.path.exists(path):
                return here
        return path

    def items(self, value, include=True):
        """A masqmail list: items split on ";", "/file" items read (one item a line)."""
        out = []
        for item in (part.strip() for part in value.split(";")):
            if not item:
                continue
            if include and item.startswith("/"):
                try:
                    with open(self.locate(item), encoding="utf-8", errors="replace") as f:
                        self.from_file(item, f, "a list file")
                        lines = [ln.strip() for ln in f if ln.strip()
                                 and not ln.strip().startswith("#")]
                    for line in lines:
                        if any(c in CONTROLS for c in line):
                            self.note(f"{item}: {line}: not carried over: a control "
                                      "character")
                        else:
                            out.append(line)
                except OSError as e:
                    self.note(f"{item}: list file not read: {e.strerror}")
                continue
            out.append(item)
        return out

    def note(self, text):
        text = escape(text)
        if text not in self.notes:      # a list file named twice
            self.notes.append(text)

    def drop(self, st, why=None):
        why = why or DROPPED.get(st.key, "masq has no such key")
        self.note(f"{st.where}: not carried over: {why}")

    def flag(self, st):
        value = boolean(st.value)
        if value is None:
            self.note(f"{st.where}: not carried over: {st.value!r} is no boolean")
        return value

    # -- masqmail.conf ------------------------------------------------------------------
    def convert(self):
        statements = self.read(self.conf_file, "masqmail.conf")
        if statements is None:
            raise MasqmailConfError(f"unable to read {self.conf_file}: give the folder of "
                                    "masqmail.conf (/etc/masqmail) or the file itself")
        conf = {}
        connections, gets, online_gets = {}, {}, {}
        for st in statements:
            key = st.key
            if key.startswith(CONNECTION_PREFIXES):
                name = key.split(".", 1)[1]
                connections.setdefault(name, []).extend(self.items(st.value, include=False))
            elif key.startswith("get."):
                gets[key[4:]] = st
            elif key.startswith("online_gets."):
                online_gets[key[12:]] = (st, self.items(st.value, include=False))
            else:
                conf[key] = st
        self.main(conf)
        self.route_files(conf, connections, gets, online_gets)
        self.text = self.render()
        return self

    def main(self, conf):
        """The keys of masqmail.conf that are not about routes."""
        host = conf.get("host_name")
        if host and host.value.startswith("/"):
            try:
                with open(self.locate(host.value), encoding="utf-8",
                          errors="surrogateescape") as f:
                    self.from_file(host.value, f, "host_name")
                    self.hostname = f.readline().strip()
            except OSError as e:
                self.note(f"{host.where}: {host.value} not read ({e.strerror}): "
                          "hostname left to masq's default")
            if self.hostname and any(c in CONTROLS for c in self.hostname):
                self.note(f"{host.where}: {host.value}: not carried over: its first line "
                          "holds a control character: hostname left to masq's default")
                self.hostname = None
        elif host:
            self.hostname = host.value
        else:
            self.note(f"{self.conf_file}: host_name: missing (masqmail needs it): "
                      "hostname left to masq's default")
        if self.hostname:
            self.top["hostname"] = self.hostname
        short = (self.hostname or "").split(".")[0]
        default_hosts = ["localhost"] + [h for h in (short, self.hostname) if h]
        hosts = self.items(conf["local_hosts"].value) if "local_hosts" in conf \
            else default_hosts
        domains = []
        for host in hosts:
            if any(c in host for c in "*?["):
                self.note(f"{conf['local_hosts'].where}: {host} not carried over: "
                          "local_domains are exact domains, no patterns")
            elif host.lower() not in domains:
                domains.append(host.lower())
        self.top["local_domains"] = domains
        alias = conf.get("alias_file")
        self.top["aliases"] = alias.value if alias and alias.value else "aliases"
        syslog = conf.get("use_syslog")
        if syslog and self.flag(syslog):
            self.top["log"] = "syslog"
        size = conf.get("max_msg_size")
        if size:
            if size.value.isdigit() and int(size.value) > 0:
                self.top["max_size"] = int(size.value)
            else:
                self.note(f"{size.where}: not carried over: masq needs a limit "
                          "(max_size, default 50 MiB)")
        self.queue_keys(conf)
        self.local_keys(conf)
        for key, st in conf.items():
            if key in KNOWN_MAIN:
                continue
            if key in OFF_BY_DEFAULT and self.flag(st) is False:
                continue            # says what masq does anyway
            self.drop(st, None if key in DROPPED else "masqmail.conf(5) has no such key")

    def queue_keys(self, conf):
        defer = conf.get("max_defer_time")
        if defer:
            seconds = interval(defer.value)
            if seconds is None:
                self.drop(defer, f"{defer.value!r} is no time (30m, 4h, 5d, 1w)")
            else:
                self.queue["max_age"] = seconds
        warn = conf.get("warn_intervals")
        if warn:
            times = [interval(t) for t in self.items(warn.value)]
            if times and times[0] is not None:
                self.queue["warn_after"] = times[0]
            if len(times) > 1 or None in times:
                self.drop(warn, "masq warns once, after the first interval (warn_after)")
        user = conf.get("log_user")
        if user:
            self.queue["archive_bcc"] = user.value if "@" in user.value \
                else f"{user.value}@{self.hostname or 'localhost'}"

    def local_keys(self, conf):
        kind = (conf["mbox_default"].value if "mbox_default" in conf else "mbox").lower()
        mail_dir = conf["mail_dir"].value if "mail_dir" in conf else "/var/mail"
        if kind == "mda" and "mda" in conf:
            mda, unknown = transform_command(conf["mda"].value, MDA_VARIABLES)
            self.local.update(mailbox="mda", mda=mda)
            if unknown:
                self.note(f"{conf['mda'].where}: ${{{'}, ${'.join(unknown)}}} not carried "
                          "over: masq's MDA words are {user} {home} {sender} {recipient} "
                          "{local} {domain}")
        elif kind == "maildir":
            self.local.update(mailbox="maildir", path="{home}/Maildir/")
        else:
            if kind != "mbox":
                self.note(f"{conf['mbox_default'].where}: {kind!r}: mbox used")
            self.local.update(mailbox="mbox", path=mail_dir.rstrip("/") + "/{user}")
        # masqmail delivers only to users of the passwd file
        self.local["users"] = "system"

    # -- routes -------------------------------------------------------------------------
    def route_files(self, conf, connections, gets, online_gets):
        """[route.NAME] tables from the route files, [online] from the detection."""
        files = {}                  # located path -> {"name", "connections", "always"}
        order = []

        def add(path, connection=None, always=False):
            located = self.locate(path)
            if located not in files:
                files[located] = {"path": path, "connections": [], "always": always}
                order.append(located)
            entry = files[located]
            entry["always"] = entry["always"] or always
            if connection is not None and connection not in entry["connections"]:
                entry["connections"].append(connection)

        local_nets = self.items(conf["local_nets"].value, include=False) \
            if "local_nets" in conf else []
        if "permanent_routes" in conf:
            for path in self.items(conf["permanent_routes"].value, include=False):
                add(path, always=True)
        net_routes = []
        if local_nets:
            if "local_net_route" in conf:
                net_routes = self.items(conf["local_net_route"].value, include=False)
                for path in net_routes:
                    add(path, always=True)
        for connection, paths in connections.items():
            for path in paths:
                add(path, connection)
        # names: a connection of one route file of its own gives its name to the route
        used, names = set(), {}
        for located in order:
            entry = files[located]
            conns = entry["connections"]
            if not entry["always"] and len(conns) == 1 and len(connections[conns[0]]) == 1:
                name = conns[0]
            else:
                base = os.path.basename(entry["path"]).removesuffix(".route")
                name = "".join(c if c.isalnum() or c in "_-" else "-" for c in base) or "route"
            while name in used:
                name += "-2"
            used.add(name)
            names[located] = name
        net_names = [names[self.locate(p)] for p in net_routes]
        if local_nets and not net_routes:
            # masqmail 0.2's default local-net route: straight to each host
            name = "localnet"
            while name in used:
                name += "-2"
            used.add(name)
            self.routes[name] = {"always": True,
                                 "allowed_recipients": [f"*@{n}" for n in local_nets]}
            self.comments[name] = "local_nets of masqmail.conf, sent straight to each host"
            net_names = [name]
            self.note(f"{conf['local_nets'].where}: route {name}: masqmail found these hosts "
                      "by gethostbyname (/etc/hosts); masq looks up their MX and addresses "
                      "in the DNS")
        for located in order:
            entry, name = files[located], names[located]
            statements = self.read(located, "route file")
            table = {}
            if entry["always"]:
                table["always"] = True
            self.routes[name] = table
            what = "permanent_routes" if entry["always"] else "the connection " + \
                ", ".join(entry["connections"])
            self.comments[name] = f"{entry['path']} ({what})"
            if statements is not None:
                self.route(name, table, statements, conf)
            if name in net_names:
                allowed = [f"*@{n}" for n in local_nets]
                if "allowed_recipients" in table:
                    self.note(f"{entry['path']}: allowed_rcpt_domains: not carried over: "
                              "local_net_route takes only local_nets recipients")
                table["allowed_recipients"] = allowed
        if local_nets:      # masqmail sends local_nets recipients by the local-net routes only
            for name, table in self.routes.items():
                if name not in net_names:
                    denied = table.setdefault("denied_recipients", [])
                    denied += [f"*@{n}" for n in local_nets if f"*@{n}" not in denied]
        self.fetches(conf, connections, gets, online_gets, names, files)
        self.detection(conf, connections, names)

    def route(self, name, table, statements, conf):
        """One route file's keys onto [route.NAME]."""
        keys = {}
        for st in statements:
            keys[st.key] = st
        denied_senders = []
        locals_, paths = [], []
        for st in statements:
            key, value = st.key, st.value
            if key in IGNORED:
                continue
            if key == "mail_host":
                host, _, port = value.partition(":")
                if not port and "remote_port" in conf and conf["remote_port"].value != "25":
                    port = conf["remote_port"].value
                table["host"] = f"{host}:{port}" if port else host
            elif key == "smtp_port" and value.isdigit():
                table["port"] = int(value)
            elif key == "helo_name":
                table["helo"] = value
            elif key == "wrapper":
                self.wrapper(name, table, st, keys)
            elif key in ("connect_error_fail", "last_route", "pipe_fromline", "pipe_fromhack"):
                if self.flag(st) is not None:
                    table[key] = self.flag(st)
            elif key == "protocol":
                if value not in ("smtp", "pipe"):
                    self.drop(st, f"{value!r}: masqmail knows smtp and pipe")
            elif key == "pipe":
                pipe, unknown = transform_command(value, PIPE_VARIABLES)
                table["pipe"] = pipe
                if unknown:
                    self.note(f"{st.where}: ${{{'}, ${'.join(unknown)}}} not carried over: "
                              "masq's pipe words are {sender} {rcpt} {local} {domain} {id}")
            elif key in ("allowed_senders", "denied_senders", "allowed_recipients",
                         "denied_recipients", "allowed_from_hdrs", "denied_from_hdrs"):
                masq_key = key.replace("_hdrs", "_headers")
                table[masq_key] = table.get(masq_key, []) + [
                    pattern(p) for p in self.items(value)]
            elif key == "allowed_mail_locals":
                locals_ = self.items(value)
            elif key == "not_allowed_mail_locals":
                denied_senders += [f"{p}@*" for p in self.items(value)]
            elif key == "allowed_return_paths":
                paths = [pattern(p) for p in self.items(value)]
            elif key == "not_allowed_return_paths":
                denied_senders += [pattern(p) for p in self.items(value)]
            elif key in ("allowed_rcpt_domains", "not_allowed_rcpt_domains"):
                masq_key = "denied_recipients" if key.startswith("not_") \
                    else "allowed_recipients"
                table[masq_key] = table.get(masq_key, []) + [
                    f"*@{d}" for d in self.items(value)]
            elif key in ("auth_name", "auth_login", "auth_secret"):
                continue            # below, together
            elif key == "pop3_login":
                continue            # after the fetch accounts are known
            elif key in REWRITE_KEYS:
                continue            # below, together
            elif key == "expand_h_sender_address" and self.flag(st) is not False:
                continue            # masqmail's default: Sender: follows the sender
            elif key in DROPPED:
                self.drop(st)
            else:
                self.drop(st, "masqmail.route(5) has no such key")
        if locals_ and paths:
            senders = [p for p in paths if p.rpartition("@")[0] in locals_]
            self.note(f"{keys['allowed_mail_locals'].where}: with allowed_return_paths: "
                      "masq keeps the return paths whose local part is allowed")
        else:
            senders = [f"{p}@*" for p in locals_] + paths
        if senders:
            table["allowed_senders"] = table.get("allowed_senders", []) + senders
        if denied_senders:
            table["denied_senders"] = table.get("denied_senders", []) + denied_senders
        self.auth(name, table, keys)
        self.rewrite(table, keys)
        if "pipe" not in table and "protocol" in keys and keys["protocol"].value == "pipe":
            self.note(f"{keys['protocol'].where}: pipe without a pipe command")
        if "mail_host" in keys and "wrapper" not in table and "pipe" not in table:
            self.note(f"{keys['mail_host'].where}: masqmail sent without TLS; masq requires "
                      'STARTTLS with a host (tls = "starttls"): write tls = "may" for a '
                      "server without it")

    def wrapper(self, name, table, st, keys):
        """A TLS tunnel masq can do itself becomes host and tls; any other stays a wrapper."""
        target, tls = _tunnel(st.value)
        if target and ":" in target and "mail_host" not in keys:
            table["host"], table["tls"] = target, tls
            self.note(f"{st.where}: replaced by host = {target!r}, tls = {tls!r}: masq does "
                      "TLS itself and checks the certificate")
        else:
            table["wrapper"] = st.value

    def auth(self, name, table, keys):
        parts = [keys.get(k) for k in ("auth_name", "auth_login", "auth_secret")]
        if not any(parts):
            return
        if not all(parts):
            st = next(p for p in parts if p)
            if any((st.file, k) in self.refused for k in ("auth_name", "auth_login",
                                                          "auth_secret")):
                return          # said already
            self.note(f"{st.where}: not carried over: masqmail logs in only with all of "
                      "auth_name, auth_login and auth_secret")
            return
        mechanism = parts[0].value.upper()
        if mechanism not in ("CRAM-MD5", "LOGIN", "PLAIN"):
            self.drop(parts[0], f"{parts[0].value!r}: masqmail knows cram-md5 and login")
            return
        secret = self.secret_name(name)
        self.secrets[secret] = parts[2].value.encode("utf-8", "surrogateescape") + b"\n"
        table["auth"] = {"user": parts[1].value, "password_file": secret}
        table["auth_mechanisms"] = [mechanism]

    def secret_name(self, name):
        secret, n = f"{name}.secret", 2
        while secret in self.secrets:
            secret, n = f"{name}-{n}.secret", n + 1
        return secret

    def rewrite(self, table, keys):
        """masqmail's return path and From: rewriting as rewrite_sender, one table for
        the envelope and the headers; a note wherever that says something else."""
        envelope = self.rules(keys, "map_return_path_addresses", "set_return_path_domain")
        header = self.rules(keys, "map_h_from_addresses", "set_h_from_domain")
        reply = self.rules(keys, "map_h_reply_to_addresses", "set_h_reply_to_domain")

        def first(*names):
            return next(keys[k] for k in names if k in keys)

        def pairs(rules):
            return [(p, a) for p, a, _ in rules]
        rules = envelope or header
        if rules:
            table["rewrite_sender"] = {}
            for p, a, _ in rules:
                table["rewrite_sender"].setdefault(p, a)
        if envelope and not header:
            self.note(f"{first('map_return_path_addresses', 'set_return_path_domain').where}: "
                      "masq rewrites From:, Sender: and Reply-To: by these rules too")
        if header and not envelope:
            self.note(f"{first('map_h_from_addresses', 'set_h_from_domain').where}: masq "
                      "rewrites the envelope sender by these rules too")
        if header and envelope and pairs(header) != pairs(envelope):
            self.note(f"{first('map_h_from_addresses', 'set_h_from_domain').where}: not "
                      "carried over: masq rewrites From: by the rules of the return path")
        if any(name for _, _, name in header):
            self.note(f"{first('map_h_from_addresses').where}: the display names are not "
                      "carried over: masq rewrites the address and keeps the name")
        if reply and pairs(reply) != pairs(rules):
            self.note(f"{first('map_h_reply_to_addresses', 'set_h_reply_to_domain').where}: "
                      "not carried over: masq rewrites Reply-To: by rewrite_sender")

    def rules(self, keys, map_key, domain_key):
        """[(pattern, address, display name)] of a map_* key and its set_*_domain."""
        out = []
        domain = keys[domain_key].value if domain_key in keys else None
        if map_key in keys:
            for item in self.items(keys[map_key].value):
                local, _, target = item.partition(":")
                name, addr = display(target.strip())
                if "@" not in addr:
                    if not domain:
                        self.note(f"{keys[map_key].where}: {item.strip()} not carried over: "
                                  "an address without domain keeps the sender's, which "
                                  "masq cannot say")
                        continue
                    addr = f"{addr}@{domain}"
                out.append((f"{local.strip()}@*", addr, name))
        if domain:
            out.append(("*@*", f"*@{domain}", ""))
        return out

    # -- get files, online detection ----------------------------------------------------
    def fetches(self, conf, connections, gets, online_gets, names, files):
        """get files onto [[route.NAME.fetch]]: those of a connection on its first route."""
        by_path = {}
        for conn, (st, items) in online_gets.items():
            paths = [i if i.startswith("/") else (gets[i].value if i in gets else None)
                     for i in items]
            for item, path in zip(items, paths, strict=True):
                if path is None:
                    self.note(f"{st.where}: {item}: no get.{item} in masqmail.conf")
                    continue
                route = next((names[self.locate(p)] for p in connections.get(conn, [])), None)
                if route is None:       # fetching only: a route that carries no mail
                    route = conn
                    connections.setdefault(conn, [])
                    self.fetch_only.append(conn)
                    if route not in self.routes:
                        self.routes[route] = {"allowed_recipients": []}
                        self.comments[route] = f"online_gets.{conn}: fetching only"
                by_path.setdefault(self.locate(path), (path, route))
        for name, st in gets.items():
            if self.locate(st.value) not in by_path:
                route = name if name not in self.routes else f"get-{name}"
                self.routes[route] = {"always": True, "allowed_recipients": []}
                self.comments[route] = f"get.{name}: masq-fetch --route {route} as masqmail -g {name}"  # noqa: E501
                by_path[self.locate(st.value)] = (st.value, route)
        for located, (_, route) in by_path.items():
            statements = self.read(located, "get file")
            if statements is None:
                continue
            account = self.fetch(route, statements)
            if account:
                table = self.routes[route]
                table.setdefault("fetch", []).append(account)
                if table.get("always") is not True:
                    table["fetch_on_up"] = True
        for located in files:       # pop3_login, now that the accounts are known
            for st in self.read(located, "route file") or []:
                if st.key == "pop3_login":
                    self.pop_before_smtp(names[located], st)

    def fetch(self, route, statements):
        """One get file as a fetch account (a dict), or None."""
        keys = {st.key: st for st in statements}
        account = {}
        server = keys.get("server")
        if not server:
            self.note(f"{statements[0].file if statements else '?'}: no server: skipped")
            return None
        port = keys["port"].value if "port" in keys else "110"
        tls = "pop3s" if port == "995" else "stls"
        wrapper = keys.get("wrapper")
        if wrapper:
            target, tunnel = _tunnel(wrapper.value)
            if target and tunnel == "tls":
                account["server"], tls = target, "pop3s"
            else:
                self.drop(wrapper, "masq-fetch does POP3S and STLS itself, without a wrapper")
        account.setdefault("server", f"{server.value}:{port}")
        account["tls"] = tls
        if tls == "stls" and not wrapper:
            self.note(f"{server.where}: masqmail fetched without TLS; masq asks for STLS "
                      '(write tls = "none" for a server without it)')
        if "user" in keys:
            account["user"] = keys["user"].value
        if "pass" in keys:
            secret = self.secret_name(f"{route}-pop")
            self.secrets[secret] = keys["pass"].value.encode("utf-8", "surrogateescape") + b"\n"
            account["password_file"] = secret
        if "protocol" in keys and keys["protocol"].value.lower() == "apop":
            account["apop"] = True
        for st in statements:
            if st.key == "do_keep" and self.flag(st):
                account["keep"] = True
                if not (boolean(keys["do_uidl"].value) if "do_uidl" in keys else False):
                    self.note(f"{st.where}: without do_uidl masqmail fetched kept mail "
                              "again each time; masq fetches it once")
            elif st.key in ("max_size", "max_count") and st.value.isdigit() \
                    and int(st.value) > 0:
                account[st.key] = int(st.value)
            elif st.key == "address":
                account["deliver_to"] = st.value if "@" in st.value \
                    else f"{st.value}@{self.hostname or 'localhost'}"
            elif st.key in ("resolve_list", "return_path", "do_uidl_dele", "max_size_delete"):
                self.drop(st)
            elif st.key not in ("server", "port", "wrapper", "user", "pass", "protocol",
                                "do_keep", "do_uidl", "max_size", "max_count") + IGNORED:
                self.drop(st, "masqmail.get(5) has no such key")
        return account

    def pop_before_smtp(self, route, st):
        """pop3_login (a get file) as the user of one of the route's fetch accounts."""
        statements = self.read(self.locate(st.value), "get file") or []
        users = [s.value for s in statements if s.key == "user"]
        accounts = self.routes[route].get("fetch", [])
        if users and any(a.get("user") == users[0] for a in accounts):
            self.routes[route]["pop_before_smtp"] = users[0]
        else:
            self.drop(st, f"{st.value} is no fetch account of this route's connection "
                      "(online_gets): add it as [[route.NAME.fetch]], then pop_before_smtp")

    def detection(self, conf, connections, names):
        """[online]: masqmail's online_query / online_detect, the connection names mapped
        onto the names of their routes when they differ."""
        if not connections:
            self.online["detect"] = "always"        # only permanent routes: always up
            return
        mapping = {conn: [names[self.locate(p)] for p in paths] or [conn]
                   for conn, paths in connections.items()}
        plain = all(routes == [conn] for conn, routes in mapping.items())
        method, what = None, None
        if "online_query" in conf:
            method, what = "command", conf["online_query"].value
        elif "online_detect" in conf:
            st = conf["online_detect"]
            if st.value == "file" and "online_file" in conf:
                method, what = "file", conf["online_file"].value
            elif st.value == "pipe" and "online_pipe" in conf:
                method, what = "command", conf["online_pipe"].value
            elif st.value == "mserver":
                iface = conf["mserver_iface"].value if "mserver_iface" in conf \
                    else "localhost:224"
                host, _, port = iface.partition(":")
                method, what = "command", f"mservdetect {host} {port or 224}"
                self.note(f"{st.where}: mserver: online.command runs masqmail's "
                          "mservdetect helper, as masqmail 0.3 does")
            else:
                self.note(f"{st.where}: {st.value!r} without its online_file or "
                          "online_pipe: no route is up until DIR/online names it")
        if method is None:
            self.online.update(detect="file", file="online")
            if "online_detect" not in conf:
                self.note(f"{self.conf_file}: no online_query or online_detect: masqmail "
                          "never used its connection routes; masq does when DIR/online "
                          "names them")
            return
        if plain:
            self.online["detect"] = method
            self.online[method] = what
            return
        import shlex
        source = f"cat {shlex.quote(what)} 2>/dev/null" if method == "file" else what
        cases = " ".join(f"{conn}) echo {' '.join(routes)};;"
                         for conn, routes in mapping.items())
        self.online["detect"] = "command"
        self.online["command"] = f'c=$({source}) || exit 1; case "$c" in {cases} esac'

    # -- the result ---------------------------------------------------------------------
    @property
    def toml(self):
        """The masq.toml text."""
        if self.text is None:
            self.text = self.render()
        return self.text

    def render(self):
        """The masq.toml text; a key whose value is not UTF-8 is left out, with a note."""
        lines = ["# masq configuration imported from masqmail's "
                 f"{escape(self.conf_file)} by masq-setup import-masqmail",
                 "# (masq.toml(5)); relative paths are relative to this file's folder."]
        lines += self.assignments("", self.top)
        lines += ['spool = "spool"']
        if "log" not in self.top:
            lines.append('log = "masq.log"')
        for title, table in (("queue", self.queue), ("local", self.local),
                             ("online", self.online)):
            if table:
                lines += ["", f"[{title}]"] + self.assignments(title, table)
        for name, table in self.routes.items():
            title = f"route.{toml_key(name)}"
            lines += ["", f"# {escape(self.comments.get(name, name))}", f"[{title}]"]
            fetch = table.get("fetch", [])
            lines += self.assignments(title, {k: v for k, v in table.items() if k != "fetch"})
            for account in fetch:
                lines += [f"[[{title}.fetch]]"] + self.assignments(f"{title}.fetch", account)
        return "\n".join(lines) + "\n"

    def assignments(self, title, table):
        """`key = value` lines of a table (its keys are masq's own)."""
        lines = []
        for key, value in table.items():
            try:
                lines.append(f"{key} = {toml_value(value)}")
            except NotUTF8 as e:
                where = f"{title}.{key}" if title else key
                self.note(f"{where}: not carried over: {escape(str(e))} is not UTF-8, "
                          "which masq.toml must be")
                lines.append(f"# {key}: not carried over: not UTF-8")
        return lines


KNOWN_MAIN = ("host_name", "local_hosts", "alias_file", "use_syslog", "max_msg_size",
              "max_defer_time", "warn_intervals", "log_user", "mbox_default", "mail_dir",
              "mda", "online_query", "online_detect", "online_file", "online_pipe",
              "permanent_routes", "local_nets", "local_net_route", "remote_port")
# boolean keys whose "false" is what masq does: no note for them
OFF_BY_DEFAULT = ("pipe_fromline", "pipe_fromhack", "mda_fromline", "mda_fromhack",
                  "do_queue", "defer_all", "do_save_envelope_to", "run_as_user",
                  "caseless_matching", "alias_local_caseless")
REWRITE_KEYS = ("map_return_path_addresses", "set_return_path_domain", "map_h_from_addresses",
                "set_h_from_domain", "map_h_reply_to_addresses", "set_h_reply_to_domain")


def _tunnel(wrapper):
    """(host:port, "tls" or "starttls") of a wrapper that is only a TLS tunnel
    (openssl s_client -connect, gnutls-cli -p); (None, None) for any other, one
    that does not parse (an open quote) included."""
    import shlex
    try:
        words = shlex.split(wrapper.replace("2>/dev/null", ""))
    except ValueError:
        return None, None
    target, tls = None, None
    if len(words) > 1 and os.path.basename(words[0]) == "openssl" and words[1] == "s_client":
        for i, word in enumerate(words):
            if word == "-connect" and i + 1 < len(words):
                target = words[i + 1]
        tls = "starttls" if "-starttls" in words else "tls"
    elif words and os.path.basename(words[0]) == "gnutls-cli":
        hosts = [w for w in words[1:] if not w.startswith("-")]
        port = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "-p"), "")
        if hosts and port.isdigit():
            target = f"{hosts[0]}:{port}"
        tls = "starttls" if any(w.startswith("--starttls") for w in words) else "tls"
    return target, tls


def pattern(text):
    """A masqmail address pattern as masq's: <> is the null sender, no @ any domain."""
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if not text:
        return ""
    return text if "@" in text else f"{text}@*"


def display(text):
    """("Full Name", "addr") of "Full Name <addr>" or ("", "addr")."""
    if text.endswith(">") and "<" in text:
        name, _, addr = text[:-1].rpartition("<")
        return name.strip().strip('"'), addr.strip()
    return "", text


def convert(source):
    """Read masqmail's configuration (a folder or its masqmail.conf): a Converter with
    .toml, .secrets, .notes and .hostname."""
    return Converter(source).convert()
