"""masq-smtpd's configuration: the [smtpd] settings, its TLS context, and the listener's preload.

read_settings() gives every key of SETTINGS (masq.toml(5)), its default
when absent; a value of the wrong kind is a ConfigError, never a guess.
tls_context() builds the server's SSLContext once per process and again
only when the certificate or key file changed.  A listener that forks a
session per connection (masq-tcpserver) calls preload() once; load() in
the child then reuses that configuration while its file is unchanged
(same size, mtime and inode) and reads it again otherwise.  The cache is
this module's state, kept for the life of the process on purpose.
"""
import os

from masq import Error, config, net

# [smtpd] keys and their defaults (masq.toml(5))
SETTINGS = {
    "relay_nets": ["127.0.0.0/8", "::1/128"],
    "max_recipients": 100,
    "max_errors": 10,
    "command_timeout": 300,     # RFC 5321 section 4.5.3.2.7: at least 5 minutes
    "data_timeout": 600,
    "greet_delay": 0,           # seconds to wait for a client that talks first
    "pregreet": "reject",       # "reject" (521 and close) | "ignore"
    "tls_cert": "",             # PEM file; "" offers no STARTTLS
    "tls_key": "",              # PEM file; "": the key is in tls_cert's file
    "passwords": "passwd",      # AUTH users (masq-setup passwd); absent: no AUTH
    "auth_without_tls": False,  # unsafe: passwords in clear text on the network
    "add_missing_headers": "trusted",   # Date:, Message-ID: "trusted" | "all" | "none"
}
TLS_MIN_VERSION = "TLSv1_2"

_preloaded = None                   # (config, file key) read by the listener
_tls_contexts = {}                  # (cert, key) -> (file keys, ssl.SSLContext)


def load(conf_file):
    """(configuration, settings): the listener's if still current, else read now."""
    conf = _preloaded_config(conf_file) or config.load(conf_file)
    return conf, read_settings(conf)


def read_settings(conf):
    """The [smtpd] table with defaults; a value of the wrong kind is a ConfigError."""
    table = conf.table("smtpd")
    settings = {}
    for key, default in SETTINGS.items():
        value = table.get(key, default)
        if isinstance(default, bool):
            kind = bool
        else:
            kind = (int, float) if isinstance(default, int) else type(default)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise config.ConfigError(f"{conf.file}: smtpd.{key} must be a "
                                     f"{type(default).__name__}")
        settings[key] = value
    for network in settings["relay_nets"]:
        base, _, length = str(network).partition("/")
        address = net.parse_ip(base)
        if (address is None or (length and not (length.isdigit() and length.isascii()))
                or int(length or 0) > (32 if address[0] == 4 else 128)):
            raise config.ConfigError(f"{conf.file}: smtpd.relay_nets: {network!r} is not an "
                                     "address or address/length")
    if settings["pregreet"] not in ("reject", "ignore"):
        raise config.ConfigError(f'{conf.file}: smtpd.pregreet must be "reject" or "ignore"')
    if settings["add_missing_headers"] not in ("trusted", "all", "none"):
        raise config.ConfigError(f'{conf.file}: smtpd.add_missing_headers must be "trusted", '
                                 '"all" or "none"')
    return settings


def tls_files(conf, settings):
    """(certificate, key or None) as absolute paths, or None without STARTTLS."""
    if not settings["tls_cert"]:
        return None
    key = settings["tls_key"]
    return conf.path(settings["tls_cert"], is_value=True), \
        (conf.path(key, is_value=True) if key else None)


def tls_context(cert, key):
    """The server's SSLContext, built once per process while the files are unchanged."""
    try:
        stamp = (_file_key(cert), _file_key(key) if key else None)
    except OSError as e:
        raise Error(f"unable to read {e.filename}: {e.strerror}") from None
    cached = _tls_contexts.get((cert, key))
    if cached and cached[0] == stamp:
        return cached[1]
    import ssl                      # 10 ms: only STARTTLS (or the listener's preload) pays
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = getattr(ssl.TLSVersion, TLS_MIN_VERSION)
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise Error(f"unable to load the TLS certificate {cert}"
                    f"{' and key ' + key if key else ''}: {e}") from None
    _tls_contexts[(cert, key)] = (stamp, context)
    return context


def preload(conf_file):
    """Read the configuration and build the TLS context once, for a forking listener."""
    global _preloaded
    try:
        conf = config.load(conf_file)
        _preloaded = (conf, _file_key(conf.file))
    except (Error, OSError):
        _preloaded = None           # each session will say what is wrong
        return
    try:
        files = tls_files(conf, read_settings(conf))
        if files:
            tls_context(*files)     # once here, not in each forked child
    except Error:
        pass                        # each session will say what is wrong


def _preloaded_config(conf_file):
    """The listener's configuration, if it is the file we would read and unchanged."""
    if _preloaded is None:
        return None
    conf, key = _preloaded
    path = config.find(conf_file)
    try:
        if path != conf.file or _file_key(path) != key:
            return None
    except OSError:
        return None
    os.environ["MASQ_CONF"] = path
    return conf


def _file_key(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino
