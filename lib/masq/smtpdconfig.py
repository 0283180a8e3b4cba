"""masq-smtpd's configuration: the [smtpd] settings, its TLS context, and the listener's preload.

read_settings() gives every [smtpd] key of masq.schema (masq.toml(5)), its
default when absent; config.load has refused values of the wrong kind, and
a relay_nets entry that is no network, or a dnsbl or dnswl entry that is
no zone name, is a ConfigError, never a guess.
conf_file() reads -C from masq-smtpd's or masq-qmtpd's arguments.
tls_context() builds the server's SSLContext once per process and again
only when the certificate or key file changed.  A listener that forks a
session per connection (masq-tcpserver) calls preload() once; load() in
the child then reuses that configuration and its settings while its file
is unchanged (same inode, size and times) and reads it again otherwise.
aliases() gives the aliases table for RCPT, read again only when the file
changed (see there).  The caches are this module's state, kept for the
life of the process on purpose.
"""
import os
import time

from masq import Error, config, net

TLS_MIN_VERSION = "TLSv1_2"
# a file changed this recently may change again within its timestamp's
# granularity without a new stamp: such a read is not kept (git's "racy" files)
RECENT_CHANGE_NS = 2 * 10**9

_preloaded = None                   # (config, file key, settings or None) read by the listener
_aliases = None                     # ((path, local domains), file stamp, Aliases) last read
_tls_contexts = {}                  # (cert, key, client CA) -> (file keys, SSLContext)


def conf_file(argv, doc=None):
    """The -C FILE of a session program's arguments, or None.

    `-C FILE` alone, what a listener passes on every connection, is read
    without docopt; other arguments are parsed by the usage `doc`
    (program.parse: bad usage exits), or without `doc` (a listener's
    preload) name no file.
    """
    if len(argv) == 2 and argv[0] == "-C":
        return argv[1]
    if not argv or doc is None:
        return None
    from masq import program
    return program.parse(doc, argv)["-C"]


def load(conf_file):
    """(configuration, settings): the listener's if still current, else read now."""
    preloaded = _preloaded_config(conf_file)
    if preloaded is not None:
        conf, settings = preloaded
        return conf, settings or read_settings(conf)
    conf = config.load(conf_file)
    return conf, read_settings(conf)


def read_settings(conf):
    """The [smtpd] table with defaults (config.load checked the kinds); a relay_nets
    entry that is no address or network is a ConfigError."""
    # the keys and defaults are masq.schema's, which the configuration carries
    # (from its cache): a session does not import the schema
    settings = {key[6:]: conf.get(key) for key in conf.defaults if key.startswith("smtpd.")}
    for network in settings["relay_nets"]:
        base, _, length = str(network).partition("/")
        address = net.parse_ip(base)
        if (address is None or (length and not (length.isdigit() and length.isascii()))
                or int(length or 0) > (32 if address[0] == 4 else 128)):
            raise config.ConfigError(f"{conf.file}: smtpd.relay_nets: {network!r} is not an "
                                     "address or address/length")
    for key in ("dnsbl", "dnswl"):
        for zone in settings[key]:
            if not zone.strip(".") or net.host_name(zone) != zone:
                raise config.ConfigError(f"{conf.file}: smtpd.{key}: {zone!r} is not a DNS "
                                         "zone name")
    return settings


def tls_files(conf, settings):
    """(certificate, key or None, client CA or None) as absolute paths, or None without
    STARTTLS."""
    if not settings["tls_cert"]:
        return None
    key, ca = settings["tls_key"], settings["tls_client_ca"]
    return (conf.path(settings["tls_cert"], is_value=True),
            conf.path(key, is_value=True) if key else None,
            conf.path(ca, is_value=True) if ca else None)


def tls_context(cert, key, client_ca=None):
    """The server's SSLContext, built once per process while the files are unchanged.

    With `client_ca` it asks the client for a certificate (CERT_OPTIONAL):
    none is fine, one that verifies against that CA makes the peer
    certificate available, and one that does not fails the handshake
    (Python's ssl has no verify callback to let it pass unverified).
    """
    try:
        stamp = tuple(_file_key(f) if f else None for f in (cert, key, client_ca))
    except OSError as e:
        raise Error(f"unable to read {e.filename}: {e.strerror}") from None
    cached = _tls_contexts.get((cert, key, client_ca))
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
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as e:
            raise Error(f"unable to load the client CA {client_ca}: {e}") from None
        context.verify_mode = ssl.CERT_OPTIONAL
    _tls_contexts[(cert, key, client_ca)] = (stamp, context)
    return context


def preload(conf_file):
    """Read the configuration and build the TLS context once, for a forking listener."""
    global _preloaded
    try:
        conf = config.load(conf_file)
        _preloaded = (conf, _file_key(conf.file), None)
    except (Error, OSError):
        _preloaded = None           # each session will say what is wrong
        return
    try:
        settings = read_settings(conf)
        _preloaded = (conf, _preloaded[1], settings)
        files = tls_files(conf, settings)
        if files:
            tls_context(*files)     # once here, not in each forked child
    except Error:
        return                      # each session will say what is wrong
    try:
        aliases(conf)
    except Error:
        pass                        # each session will say what is wrong
    # what greylisting and the DNS lists load at their first use (dnspython:
    # tens of ms), once here; a configuration without them loads none of it
    if settings["greylist"]:
        from masq import greylist   # noqa: F401
        import sqlite3              # noqa: F401
    if settings["dnsbl"] or settings["dnswl"]:
        from masq import dnsbl, mx  # noqa: F401
        import dns.exception        # noqa: F401
        import dns.nameserver       # noqa: F401
        import dns.resolver         # noqa: F401


def aliases(conf):
    """The aliases table (masq.localpart.load_aliases), read again when the file changed.

    A session reads the file as before: its _file_key() (inode, size, times)
    is checked at each call, and a table read from a file changed
    within RECENT_CHANGE_NS of the read is not kept, so a change that
    leaves the stamp alone cannot go unseen.  AliasError when unreadable.
    """
    global _aliases
    from masq import localpart
    path = conf.path("aliases") or os.devnull
    which = (path, tuple(conf.local_domains))
    try:
        stamp = _file_key(path)
    except OSError:
        stamp = None                # absent or unreadable: load() says which
    if stamp is not None and _aliases is not None and _aliases[:2] == (which, stamp):
        return _aliases[2]
    table = localpart.load_aliases(conf)
    if stamp is not None and time.time_ns() - stamp[-1] > RECENT_CHANGE_NS:   # its ctime
        _aliases = (which, stamp, table)
    return table


def _preloaded_config(conf_file):
    """(configuration, settings or None) of the listener, if it is the file we
    would read and unchanged."""
    if _preloaded is None:
        return None
    conf, key, settings = _preloaded
    path = config.find(conf_file)
    try:
        if path != conf.file or _file_key(path) != key:
            return None
    except OSError:
        return None
    os.environ["MASQ_CONF"] = path
    return conf, settings


def _file_key(path):
    """(inode, device, size, mtime, ctime): a file written or replaced gets a new key."""
    st = os.stat(path)
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns
