"""What a [route.NAME] table says about the way out, for the SMTP/LMTP client.

`Route(conf, name)` reads the table and its password file at once; `Route(conf)`
(no name) holds the defaults of direct delivery to each domain's MX.  Any
setting that cannot be used raises masq.Error (code 111, temporary): a
configuration is fixed by people, then retried.  Keys, defaults and meaning:
masq.toml(5), masq-smtp(8).

`tls_context(route)` makes the ssl context the route's settings ask for; ssl
is imported only then.
"""
import os

from masq import Error, net, passwords, schema

# the [route.NAME] keys: masq.schema; config.load has checked their kinds and words
KEYS = schema.table_keys("route.*.")
PROTOCOLS = KEYS["protocol"].choices
TLS_MODES = KEYS["tls"].choices
DEFAULT_TIMEOUTS = {name: key.default for name, key in KEYS.items()
                    if name.endswith("_timeout")}
MECHANISMS = tuple(KEYS["auth_mechanisms"].default)     # our preference, best first
TOKEN_MECHANISMS = tuple(m.upper() for m in KEYS["auth"].members["mechanism"].choices)
MAX_SECRET_BYTES = 4096


class Route:
    """A route's client settings; defaults for direct MX without a name."""

    def __init__(self, conf, name=None):
        table = {}
        if name is not None:
            table = dict(conf.routes).get(name)
            if table is None:
                raise config_error(f"no [route.{name}] in {conf.file}: "
                                   f"add it or pass another --route")
        self.name = name
        where = f"[route.{name}]" if name else "direct delivery"
        self.wrapper = table.get("wrapper") or None
        host = table.get("host") or None
        self.tls = table.get("tls") or ("starttls" if host and not self.wrapper else "may")
        if self.tls not in TLS_MODES:
            raise config_error(f"{conf.file}: {where}: tls must be one of "
                               + ", ".join(f'"{m}"' for m in TLS_MODES))
        self.host, self.port = None, table.get("port")
        if host:
            self.host, port = net.host_port(host)
            self.port = port or self.port
        if self.port is None:
            self.port = 465 if self.tls == "tls" else 25
        try:
            self.port = int(self.port)
        except (TypeError, ValueError):
            raise config_error(f"{conf.file}: {where}: port must be a number") from None
        verify = table.get("tls_verify")
        # opportunistic TLS to an MX checks nothing unless asked (Postfix "may")
        self.verify = bool(verify) if verify is not None else self.tls in ("starttls", "tls")
        self.ca_file = conf.path(table["tls_ca_file"], is_value=True) \
            if table.get("tls_ca_file") else None
        self.protocol = (table.get("protocol") or KEYS["protocol"].default).lower()
        if self.protocol not in PROTOCOLS:
            raise config_error(f"{conf.file}: {where}: protocol must be one of "
                               + ", ".join(f'"{p}"' for p in PROTOCOLS))
        if self.protocol == "qmtp":         # QMTP has no TLS and no AUTH; port 209
            if table.get("tls") not in (None, "none") or table.get("auth"):
                raise config_error(f'{conf.file}: {where}: protocol = "qmtp" takes no tls '
                                   'and no auth (QMTP has neither): use a wrapper for TLS')
            self.tls, self.verify = "none", False
            if not table.get("port") and not (host and net.host_port(host)[1]):
                self.port = 209
        self.helo = table.get("helo") or conf.hostname
        self.allow_auth_without_tls = bool(table.get("allow_auth_without_tls",
                                                     KEYS["allow_auth_without_tls"].default))
        self.mechanisms = [m.upper() for m in table.get("auth_mechanisms") or MECHANISMS]
        self.timeouts = {k: float(table.get(k, v)) for k, v in DEFAULT_TIMEOUTS.items()}
        # masqmail.route(5): no connection at all bounces instead of deferring
        self.connect_error_fail = table.get("connect_error_fail",
                                            KEYS["connect_error_fail"].default)
        if not isinstance(self.connect_error_fail, bool):
            raise config_error(f"{conf.file}: {where}: connect_error_fail must be true or false")
        self.user = self.secret = None
        # OAuth 2.0 (masq.oauth): the token a command prints, cached in the spool
        self.mechanism = self.token_command = self.token_cache = self.token_cwd = None
        auth = table.get("auth")
        if auth:
            mechanism = auth.get("mechanism") if isinstance(auth, dict) else None
            if not isinstance(auth, dict) or not auth.get("user") or not (
                    auth.get("token_command") if mechanism else auth.get("password_file")):
                raise config_error(f"{conf.file}: {where}: auth needs user and "
                                   + ("token_command" if mechanism else "password_file"))
            if not self.host and not self.wrapper:
                raise config_error(f"{conf.file}: {where}: auth needs a host or a wrapper: "
                                   "the password would go to every recipient's MX")
            self.user = str(auth["user"])
            if mechanism:
                if str(mechanism).upper() not in TOKEN_MECHANISMS or auth.get("password_file"):
                    raise config_error(f"{conf.file}: {where}: auth mechanism must be "
                                       '"xoauth2" or "oauthbearer", with token_command '
                                       "and without password_file")
                from masq import oauth
                self.mechanism = str(mechanism).upper()
                self.token_command = str(auth["token_command"])
                self.token_cache = oauth.cache_path(conf.path("spool"), name)
                self.token_cwd = conf.dir
            else:
                self.secret = read_secret(conf.path(auth["password_file"], is_value=True))
        self.dkim = None            # a masq.dkim.Signer when the route signs
        if table.get("dkim_key"):
            from masq import dkim   # only for a route that signs
            self.dkim = dkim.Signer(conf, table, where)

    @property
    def label(self):
        return f"route {self.name}" if self.name else "direct delivery"


def read_secret(path, what="password file", max_bytes=None, absent_ok=False):
    """The first line of a password file that only its owner can read (see
    passwords.secret_problem); max_bytes: the whole file, at most that many
    bytes, without white space at its ends (a DKIM key); absent_ok: None when
    there is no such file.  config_error when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        if absent_ok:
            return None
        raise config_error(f"unable to read {what} {path}: {e.strerror}") from None
    except OSError as e:
        raise config_error(f"unable to read {what} {path}: {e.strerror}") from None
    try:
        problem = passwords.secret_problem(f"{what} {path}", os.fstat(fd))
        if problem:
            raise config_error(problem)
        if max_bytes is not None:
            return os.read(fd, max_bytes).strip()
        with os.fdopen(fd, "rb", closefd=False) as f:
            line = f.readline(MAX_SECRET_BYTES)
    except OSError as e:
        raise config_error(f"unable to read {what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    return line.rstrip(b"\r\n")


def tls_context(route):
    """An ssl context for this route: verified unless tls_verify is false."""
    import ssl      # costly, and only needed once a connection is made
    if route.verify:
        try:
            return ssl.create_default_context(cafile=route.ca_file)
        except (OSError, ssl.SSLError) as e:
            raise config_error(f"unable to load tls_ca_file {route.ca_file}: "
                               f"{getattr(e, 'strerror', None) or e}") from None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def config_error(text):
    """The error for a route setting that cannot be used: retry once it is fixed."""
    return Error(text, code=111, temporary=True)
