"""Every key of masq.toml: its kind, default, allowed words and meaning.

KEYS maps a dotted name to a Key: "hostname", "local.mailbox", and for the
route tables, which people name, "route.*.host".  TABLES are the tables a
file may have; [route] holds only tables, one per route.  DEFAULTS is what
a missing key means (None: worked out by the reader, as masq.toml(5) says).
check(data) lists every unknown table or key and every value of the wrong
kind in a parsed file; masq.config runs it before it caches the file.

A kind is the word masq.toml(5) writes in parentheses after the key:
string, path, command, address, word (one of `choices`), "path or word":
a string; integer: a whole number >= 0; seconds: a number >= 0; boolean;
list: a list of strings; table: a table, of `members` or, when `members`
is a kind, of any names to values of that kind; tables: an array of
tables ([[route.NAME.fetch]]), each of `members`, each checked and
located on its own.  tests/test_config.py
checks that the page documents every key here with its kind and default,
and no other.
"""

STRING_KINDS = ("string", "path", "command", "address", "word", "path or word")


class Key:
    """One key: kind, default, allowed words (kind "word"), a line of meaning."""

    __slots__ = ("kind", "default", "doc", "choices", "members")

    def __init__(self, kind, default, doc, choices=(), members=None):
        self.kind, self.default, self.doc = kind, default, doc
        self.choices, self.members = choices, members


TABLES = ("local", "queue", "online", "smtpd", "route")

KEYS = {
    "hostname": Key("string", None, "the host's mail name; absent: uname -n"),
    "spool": Key("path", "spool", "the spool folder"),
    "local_domains": Key("list", None, 'domains delivered locally; absent: "localhost", hostname'),
    "relay_domains": Key("list", [], "domains masq-smtpd accepts from anyone and routes on"),
    "aliases": Key("path", "aliases", "the aliases file"),
    "log": Key("path or word", "masq.log", 'where event lines go: a file, "syslog", "stderr"'),
    "max_size": Key("integer", 52428800, "the largest message accepted, in bytes"),
    "postmaster": Key("string", "postmaster", "not read yet"),
    "user": Key("string", "", "system mode: the user the spool belongs to"),
    "dns_servers": Key("list", None, "DNS servers for masq-smtp and dnsbl; absent: the "
                       "system's"),
    "my_addresses": Key("list", None, "addresses and networks that mean this host"),

    "local.mailbox": Key("word", "maildir", "the kind of mailbox",
                         choices=("maildir", "mbox", "mda", "lmtp")),
    "local.lmtp": Key("string", "/run/dovecot/lmtp", "mailbox = lmtp: the LMTP server, a "
                      "Unix socket path or host:port"),
    "local.path": Key("path", "mail/{user}/", "the maildir folder or mbox file"),
    "local.mda": Key("command", "procmail -d {user}", "the delivery agent for mailbox = mda"),
    "local.users": Key("word", "any", "which local parts are mailboxes",
                       choices=("any", "system")),
    "local.mda_timeout": Key("seconds", 3600, "an MDA or alias command running longer stops"),
    "local.recipient_delimiter": Key("string", "+", "bob+list goes to bob"),
    "local.deliver": Key("word", "in-process", "how masq-send hands local mail over",
                         choices=("in-process", "child")),
    "local.default_privs": Key("string", "nobody", "system mode: the user aliases' "
                               "|command and /file run as"),
    "local.mail_group": Key("string", "mail", "system mode, mbox: the mbox spool's group"),

    "queue.retry_min": Key("seconds", 300, "the wait after the first failed attempt"),
    "queue.retry_max": Key("seconds", 14400, "the longest wait between attempts"),
    "queue.max_age": Key("seconds", 432000, "temporary failures this long bounce"),
    "queue.max_age_offline": Key("seconds", 2592000, "mail waiting for a route this long "
                                 "bounces"),
    "queue.warn_after": Key("seconds", 14400, "a delay warning after failing this long; 0: none"),
    "queue.interval": Key("seconds", 600, "the daemon looks at waiting mail this often"),
    "queue.filters": Key("list", [], "commands run on each message before delivery"),
    "queue.outside_failures": Key("word", "drop", "a loop or policy failure of mail from "
                                  "outside: not bounced", choices=("drop", "hold", "bounce")),
    "queue.archive_bcc": Key("address", "", "an address that gets a copy of every message"),
    "queue.parallel": Key("integer", 2, "destinations a queue run talks to at once"),
    "queue.hoststat_timeout": Key("seconds", 5, "runq trusts a host's failure this long"),
    "queue.show_queue": Key("word", "all", "who may list the queue in system mode",
                            choices=("all", "admin")),

    "online.detect": Key("word", "always", "how masq knows which routes are up",
                         choices=("always", "file", "link", "command")),
    "online.file": Key("path", "online", "holds the names of the routes that are up"),
    "online.link": Key("string", "", 'detect = "link": the interface whose being up brings '
                       'routes up; "": any with a default route'),
    "online.command": Key("command", "", "prints the names of the routes that are up"),

    "smtpd.relay_nets": Key("list", ["127.0.0.0/8", "::1/128"],
                            "clients in these networks may relay"),
    "smtpd.max_recipients": Key("integer", 100, "recipients in one transaction"),
    "smtpd.max_errors": Key("integer", 10, "the session ends after this many client errors"),
    # RFC 5321 section 4.5.3.2.7: at least 5 minutes
    "smtpd.command_timeout": Key("seconds", 300, "the wait for a command"),
    "smtpd.data_timeout": Key("seconds", 600, "the wait for each piece of the message"),
    "smtpd.greet_delay": Key("seconds", 0, "the wait before the greeting"),
    "smtpd.pregreet": Key("word", "reject", "what to do with a client that talks first",
                          choices=("reject", "ignore")),
    "smtpd.tls_cert": Key("path", "", "the certificate chain for STARTTLS; none: no STARTTLS"),
    "smtpd.tls_key": Key("path", "", "its key; none: in the tls_cert file"),
    "smtpd.passwords": Key("path", "passwd", "the AUTH users"),
    "smtpd.auth_without_tls": Key("boolean", False, "offer AUTH without TLS (unsafe)"),
    "smtpd.add_missing_headers": Key("word", "trusted", "who gets Date: and Message-ID: added",
                                     choices=("trusted", "all", "none")),
    "smtpd.command_deadline": Key("seconds", 60, "a whole command line, from its first byte; "
                                  "0: none"),
    "smtpd.data_deadline": Key("seconds", 1200, "a whole DATA or BDAT message; 0: none"),
    "smtpd.session_deadline": Key("seconds", 3600, "a whole session; 0: none"),
    "smtpd.require_tls": Key("boolean", False, "MAIL only after STARTTLS (a submission port)"),
    "smtpd.tls_client_ca": Key("path", "", "clients with a certificate from this CA may relay"),
    "smtpd.checkpassword": Key("path", "", "a checkpassword program for AUTH instead of "
                               "passwords"),
    "smtpd.auth_failures": Key("integer", 10, "failed AUTH per client address before a "
                               "lockout; 0: no limit"),
    "smtpd.auth_failure_window": Key("seconds", 3600, "the failures counted are this recent"),
    "smtpd.auth_lockout": Key("seconds", 3600, "how long AUTH is refused after that"),
    "smtpd.auth_max_concurrent": Key("integer", 2, "password checks at once, all sessions; "
                                     "0: no limit"),
    "smtpd.greylist": Key("boolean", False, "defer a new client network, sender, recipient"),
    "smtpd.greylist_delay": Key("seconds", 300, "a retry this much later passes"),
    "smtpd.greylist_window": Key("seconds", 86400, "a retry must come within this"),
    "smtpd.greylist_expire": Key("seconds", 3024000, "a passed triplet is remembered this long"),
    "smtpd.greylist_whitelist": Key("path", "", "addresses, domains, networks not greylisted"),
    "smtpd.dnsbl": Key("list", [], "DNS block list zones: a listed client is refused"),
    "smtpd.dnswl": Key("list", [], "DNS allow list zones: a listed client skips dnsbl and "
                       "greylist"),
    "smtpd.max_refused_recipients": Key("integer", 20, "refused RCPTs before 421; 0: no "
                                        "limit"),

    "route.*.interface": Key("string", None, 'detect = "link": the route is up while this '
                             "interface is"),
    "route.*.host": Key("string", None, "the smarthost; absent: each domain's MX"),
    "route.*.port": Key("integer", None, "absent: 465 with tls = tls, else 25"),
    "route.*.tls": Key("word", None, 'absent: "starttls" with a host and no wrapper, '
                       'else "may"', choices=("starttls", "tls", "may", "none")),
    "route.*.tls_verify": Key("boolean", None, "check the server's certificate and name"),
    "route.*.tls_ca_file": Key("path", None, "the certificates to check against"),
    "route.*.auth": Key("table", None, "log in with SMTP AUTH", members={
        "user": Key("string", None, "the name to log in as"),
        "password_file": Key("path", None, "the password is its first line"),
        "mechanism": Key("word", None, "OAuth 2.0 with the token of token_command",
                         choices=("xoauth2", "oauthbearer")),
        "token_command": Key("command", None, "prints an OAuth access token")}),
    "route.*.auth_mechanisms": Key("list", ["CRAM-MD5", "PLAIN", "LOGIN"], "best first"),
    "route.*.allow_auth_without_tls": Key("boolean", False, "send the password unprotected"),
    "route.*.helo": Key("string", None, "the name in EHLO or LHLO; absent: hostname"),
    "route.*.wrapper": Key("command", None, "a command that is the connection"),
    "route.*.pipe": Key("command", None, "a command the route's mail is piped to, "
                        "instead of SMTP"),
    "route.*.pipe_per_recipient": Key("boolean", True, "the pipe runs once per recipient; "
                                      "false: once with all"),
    "route.*.pipe_fromline": Key("boolean", False, 'a "From sender date" line before the '
                                 "message"),
    "route.*.pipe_fromhack": Key("boolean", False, 'lines beginning "From " get a ">"'),
    "route.*.pipe_timeout": Key("seconds", 300, "a pipe command running longer is killed "
                                "(deferred)"),
    "route.*.protocol": Key("word", "smtp", "the protocol spoken",
                             choices=("smtp", "lmtp", "qmtp")),
    "route.*.connect_timeout": Key("seconds", 30, "the wait for a connection"),
    "route.*.greeting_timeout": Key("seconds", 300, "the wait for the greeting"),
    "route.*.command_timeout": Key("seconds", 300, "the wait for a command's reply"),
    "route.*.data_timeout": Key("seconds", 180, "the wait for DATA and each write"),
    "route.*.data_done_timeout": Key("seconds", 600, "the wait for the reply to the final dot"),
    "route.*.quit_timeout": Key("seconds", 60, "the wait for the reply to QUIT"),
    "route.*.always": Key("boolean", False, "the route is always up"),
    "route.*.allowed_senders": Key("list", None, "envelope senders the route takes"),
    "route.*.denied_senders": Key("list", None, "envelope senders the route refuses"),
    "route.*.allowed_recipients": Key("list", None, "recipients the route takes"),
    "route.*.denied_recipients": Key("list", None, "recipients the route refuses"),
    "route.*.allowed_from_headers": Key("list", None, "From: addresses the route takes"),
    "route.*.denied_from_headers": Key("list", None, "From: addresses the route refuses"),
    "route.*.rewrite_sender": Key("table", None, "pattern = address: the sender sent with",
                                  members="string"),
    "route.*.max_size": Key("integer", None, "larger messages take another route"),
    "route.*.reuse_connection": Key("boolean", True, "one connection per destination and run"),
    "route.*.last_route": Key("boolean", False, "deferred mail tries no later route"),
    "route.*.connect_error_fail": Key("boolean", False, "no connection bounces at once"),
    "route.*.dkim_key": Key("path", None, "sign with this DKIM private key; absent: unsigned"),
    "route.*.dkim_selector": Key("string", None, "the DKIM selector (s=)"),
    "route.*.dkim_domain": Key("string", None, "the signing domain (d=); absent: From:'s"),
    "route.*.dkim_algorithm": Key("word", None, "absent: the key's kind",
                                  choices=("rsa-sha256", "ed25519-sha256")),
    "route.*.fetch": Key("tables", None, "POP3 accounts masq-fetch reads", members={
        "server": Key("string", None, "host or host:port"),
        "tls": Key("word", "pop3s", "how the connection is protected",
                   choices=("pop3s", "stls", "none")),
        "tls_ca_file": Key("path", None, "the certificates to check against"),
        "user": Key("string", None, "the name to log in as"),
        "password_file": Key("path", None, "the password is its first line"),
        "apop": Key("boolean", False, "log in with APOP"),
        "keep": Key("boolean", False, "leave fetched mail on the server"),
        "max_size": Key("integer", None, "larger messages stay on the server"),
        "deliver_to": Key("address", None, "where fetched mail goes"),
        "max_count": Key("integer", None, "messages fetched per run")}),
    "route.*.fetch_on_up": Key("boolean", False, "masq-send runs masq-fetch when the route "
                               "comes up"),
    "route.*.pop_before_smtp": Key("string", None, "log in to this fetch user before SMTP"),
}

DEFAULTS = {name: key.default for name, key in KEYS.items()}


def table_keys(prefix):
    """{name: Key} of one table: "" (top level), "local.", "route.*."."""
    return {name[len(prefix):]: key for name, key in KEYS.items()
            if name.startswith(prefix) and "." not in name[len(prefix):]}


def check(data):
    """[(where, message)] for each problem of a parsed file; `where` is the
    key's path as a tuple of names, ("route", "dead", "hots")."""
    problems = []
    _check_table(data, "", (), problems)
    routes = data.get("route")
    for name, table in (routes.items() if isinstance(routes, dict) else ()):
        if isinstance(table, dict) and table.get("pipe"):
            for other in ("host", "wrapper"):
                if table.get(other):    # masqmail: `pipe` replaces the SMTP connection
                    problems.append((("route", name, "pipe"), f"route.{name} has both pipe "
                                     f"and {other}: a route pipes its mail or sends it, "
                                     "not both"))
    return problems


def _check_table(table, prefix, where, problems):
    """Check one table against the keys under `prefix` ("", "local.", "route.*.")."""
    known = table_keys(prefix)
    for name, value in table.items():
        path = where + (name,)
        if not prefix and name in TABLES:
            if not isinstance(value, dict):
                problems.append((path, f"{name} must be a table [{name}], not {_show(value)}"))
            elif name == "route":
                for route, inner in value.items():
                    if isinstance(inner, dict):
                        _check_table(inner, "route.*.", path + (route,), problems)
                    else:
                        problems.append((path + (route,), f"route.{route} must be a table "
                                         f"[route.{route}], not {_show(inner)}"))
            else:
                _check_table(value, f"{name}.", path, problems)
        elif name in known and known[name].kind == "tables" and isinstance(value, list) \
                and all(isinstance(item, dict) for item in value):
            members = known[name].members
            for index, item in enumerate(value):    # each entry and member has its line
                for member, inner in item.items():
                    if member not in members:
                        hint = _suggest(member, members, "{}")
                        problems.append((path + (index, member), f"unknown key {member} "
                                         f"in [[{_label(where, name)}]]{hint}"))
                        continue
                    message = _check_value(members[member], inner)
                    if message:
                        problems.append((path + (index, member),
                                         f"{_label(where, name)}.{member} must be {message}"))
        elif name in known:
            message = _check_value(known[name], value)
            if message:
                problems.append((path, f"{_label(where, name)} must be {message}"))
        elif isinstance(value, dict) and not prefix:
            hint = _suggest(name, TABLES, "[{}]")
            problems.append((path, f"unknown table [{name}]{hint}"))
        else:
            hint = _suggest(name, list(known) + ([] if prefix else list(TABLES)), "{}")
            inside = f" in [{'.'.join(where)}]" if where else ""
            problems.append((path, f"unknown key {name}{inside}{hint}"))


def _check_value(key, value):
    """What the value should be, or "" when it is right."""
    kind = key.kind
    if kind in STRING_KINDS:
        if not isinstance(value, str):
            return f"a string, not {_show(value)}"
        if key.choices and value not in key.choices:
            return ("one of " + ", ".join(f'"{c}"' for c in key.choices)
                    + f", not {_show(value)}" + _suggest(value, key.choices, '"{}"'))
    elif kind in ("integer", "seconds"):
        whole = kind == "integer"
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            what = "a whole number" if whole else "a number of seconds"
            return f"{what}, not {_show(value)}"
        if value < 0:
            return f"0 or more, not {value}"
    elif kind == "boolean":
        if not isinstance(value, bool):
            return f"true or false, not {_show(value)}"
    elif kind == "list":
        if not isinstance(value, list):
            hint = f' (write ["{value}"])' if isinstance(value, str) else ""
            return f"a list of strings, not {_show(value)}{hint}"
        for item in value:
            if not isinstance(item, str):
                return f"a list of strings, not one with {_show(item)}"
    elif kind == "tables":
        return f"an array of tables [[...]], not {_show(value)}"
    elif kind == "table":
        if not isinstance(value, dict):
            return f"a table, not {_show(value)}"
        members = key.members
        for name, item in value.items():
            member = Key(members, None, "") if isinstance(members, str) else members.get(name)
            if member is None:
                hint = _suggest(name, members, "{}")
                return f"a table of {', '.join(members)}; {name} is not one{hint}"
            message = _check_value(member, item)
            if message:
                return f"a table whose {name} is {message}"
    return ""


def _label(where, name):
    """How a key is named in a message: `max_size`, `route.isp.max_size`."""
    return ".".join(where + (name,))


def _show(value):
    """A value as TOML would write it, short."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return f'the string "{text}"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return f"a {type(value).__name__}"


def _suggest(word, candidates, form):
    """ " (did you mean X?)" for the closest candidate, or ""."""
    import difflib      # only for an error: it imports heavy modules
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {form.format(close[0])}?)" if close else ""
