"""masq-smtpd: an ESMTP server on stdin and stdout, one process per connection.

Usage:
  masq-smtpd [-C FILE]
  masq-smtpd -h | --help

Options:
  -C FILE    Read this configuration instead of $MASQ_CONF.
  -h --help  Show this.

SMTP commands come on fd 0, replies go to fd 1 (a socket from tcpserver,
inetd or systemd, or a pair of pipes).  The client is described by
TCPREMOTEIP, TCPREMOTEHOST and RELAYCLIENT (tcp-environ(5)); no DNS lookups.
STARTTLS is offered when a certificate is configured and fds 0 and 1 are
one socket; AUTH PLAIN and LOGIN only after it, against the password file.
Each message goes to masq-queue in-process, or to the program $MASQ_QUEUE
names; 250 is said only once it is durable.  Settings: [smtpd] in
masq.toml(5).  Exit codes: masq-smtpd(8).
"""
import os
import sys

from masq import Error, net, program, smtp
from masq.program import Exit

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
}
AUTH_FAILURE_DELAY_SECONDS = 1  # slows a password guesser down (also counts as an error)
TLS_MIN_VERSION = "TLSv1_2"
ROUTING_CHARACTERS = "%!@"      # sender-specified routing in a local part
HOST_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and not (len(argv) == 2 and argv[0] == "-C"):
        conf_file = program.parse(__doc__, argv)["-C"]
    else:
        conf_file = argv[1] if argv else None
    from masq import config
    try:
        conf = _preloaded_config(conf_file) or config.load(conf_file)
        settings = read_settings(conf)
    except Error:
        _write(smtp.CONFIG_ERROR)
        raise
    session = Session(conf, settings, os.environ)
    try:
        try:
            session.run()
        except smtp.TimeoutError_:
            session.reply(smtp.TIMEOUT.format(session.host))
        except smtp.ConnectionLost:
            return Exit.OK
        except BaseException:
            session.reply(smtp.INTERNAL_ERROR)
            session.flush(quiet=True)
            raise
        session.flush(quiet=True)
    finally:
        session.close()
    return Exit.OK


def preload(argv=()):
    """Import what a session needs, and read the configuration, once.

    For a listener that forks and calls main() per connection: the child
    reuses this configuration while the file is unchanged (same size,
    mtime and inode), and reads it again otherwise.
    """
    import pwd  # noqa: F401
    import select  # noqa: F401

    from masq import address, aliases, config, envelope, local, log, message, spool  # noqa: F401
    from masq import handoff  # noqa: F401
    global _preloaded
    conf_file = argv[1] if len(argv) == 2 and argv[0] == "-C" else None
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


_preloaded = None
_tls_contexts = {}                  # (cert, key) -> (file keys, ssl.SSLContext)


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
    import ssl
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


def _file_key(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def _preloaded_config(conf_file):
    """The listener's configuration, if it is the file we would read and unchanged."""
    if _preloaded is None:
        return None
    from masq import config
    conf, key = _preloaded
    path = config.find(conf_file)
    try:
        if path != conf.file or _file_key(path) != key:
            return None
    except OSError:
        return None
    os.environ["MASQ_CONF"] = path
    return conf


def read_settings(conf):
    """The [smtpd] table with defaults; a value of the wrong kind is a ConfigError."""
    from masq.config import ConfigError
    table = conf.table("smtpd")
    settings = {}
    for key, default in SETTINGS.items():
        value = table.get(key, default)
        if isinstance(default, bool):
            kind = bool
        else:
            kind = (int, float) if isinstance(default, int) else type(default)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ConfigError(f"{conf.file}: smtpd.{key} must be a {type(default).__name__}")
        settings[key] = value
    for network in settings["relay_nets"]:
        base, _, length = str(network).partition("/")
        address = net.parse_ip(base)
        if (address is None or (length and not (length.isdigit() and length.isascii()))
                or int(length or 0) > (32 if address[0] == 4 else 128)):
            raise ConfigError(f"{conf.file}: smtpd.relay_nets: {network!r} is not an address "
                              "or address/length")
    if settings["pregreet"] not in ("reject", "ignore"):
        raise ConfigError(f'{conf.file}: smtpd.pregreet must be "reject" or "ignore"')
    return settings


def _write(text):
    """One reply line straight to fd 1, never failing."""
    try:
        os.write(1, text.encode() + b"\r\n")
    except OSError:
        pass


class Session:
    """One SMTP session: the state of the dialogue and a method per verb."""

    def __init__(self, conf, settings, environ):
        self.conf = conf
        self.settings = settings
        self.host = conf.hostname
        self.max_size = conf.get("max_size")
        self.reader = smtp.Reader(0, settings["command_timeout"])
        self.reader.before_wait = self.flush
        self.out = []
        self.errors = 0
        self.helo = None
        self.esmtp = False
        self.pending_line = None
        self.relayclient = environ.get("RELAYCLIENT")
        self.client_name = host_name(environ.get("TCPREMOTEHOST"))
        self.client_ip, local = client_address(environ.get("TCPREMOTEIP"))
        self.user = local_user() if local else None
        self.trusted = (local or self.relayclient is not None
                        or net.in_nets(self.client_ip, settings["relay_nets"]))
        self.tls = None             # the ssl.SSLSocket after STARTTLS
        self.tls_files = tls_files(conf, settings)
        self.starttls_offered = self.tls_files is not None and stdio_is_one_socket()
        self.auth_user = None
        self.auth_ready = None      # the password file is usable (checked once)
        self.aliases = None         # read at the first RCPT for a local domain
        self.reset()

    def reset(self):
        """Forget the mail transaction (RSET, EHLO, after each message)."""
        self.sender = None
        self.rcpts = []
        self.rcpt_tried = 0
        self.utf8 = False

    # -- replies

    def reply(self, text):
        self.out.append(text)
        if text[0] in "45":
            self.errors += 1
        if len(self.out) > 64:      # a client that pipelines without reading
            self.flush()

    def flush(self, quiet=False):
        """Send the replies waiting; RFC 2920 lets us hold them while input is pending."""
        if not self.out:
            return
        data = ("\r\n".join(self.out) + "\r\n").encode("utf-8")
        self.out = []
        view = memoryview(data)
        # A client that stops reading must not hold us forever: SIGALRM's
        # default action ends the process (nothing half-written is accepted).
        # The C module: `signal` imports enum, a quarter of our start-up.
        import _signal
        _signal.alarm(max(1, math_ceil(self.settings["command_timeout"])))
        try:
            if self.tls is not None:
                self.tls.settimeout(self.settings["command_timeout"])
                self.tls.sendall(view)
            while view and self.tls is None:
                view = view[os.write(1, view):]
        except OSError as e:
            if quiet:
                return
            raise smtp.ConnectionLost(f"write error: {e.strerror}") from None
        finally:
            _signal.alarm(0)

    def close(self):
        """Let go of the TLS socket: a masq-tcpserver -m child serves on."""
        if self.tls is not None:
            try:                    # close_notify, without waiting for the client's
                self.tls.settimeout(0)
                self.tls.unwrap()
            except (OSError, ValueError):
                pass
            self.tls.close()
            self.tls = self.reader.tls = None

    # -- the dialogue

    def run(self):
        program.title(f"masq-smtpd {self.client_ip or 'local'}")
        if self.settings["greet_delay"] > 0 and self.talks_first():
            if self.settings["pregreet"] == "reject":
                self.reply(smtp.PREGREET.format(self.host))
                return
        self.reply(smtp.GREETING.format(self.host))
        while True:
            if self.errors >= self.settings["max_errors"]:
                self.reply(smtp.TOO_MANY_ERRORS.format(self.host))
                return
            try:
                line, self.pending_line = self.pending_line, None
                if line is None:
                    line = self.reader.readline(smtp.PARAM_LINE_MAX_BYTES)
                verb, arg = smtp.command(line)
                if len(line) > smtp.COMMAND_LINE_MAX_BYTES and verb not in ("MAIL", "RCPT",
                                                                             "AUTH"):
                    raise smtp.ProtocolError(smtp.LINE_TOO_LONG)
                handler = getattr(self, "smtp_" + verb, None) if verb.isalpha() else None
                if handler is None:
                    self.reply(smtp.UNRECOGNIZED)
                elif handler(arg) is False:
                    return
            except smtp.ProtocolError as e:
                self.reply(e.reply)
            except smtp.ChunkInterrupted:
                pass                # the command that ended it is pending_line

    def talks_first(self):
        """Postscreen's pregreet test: does the client send before our greeting?"""
        import select
        poller = select.poll()
        poller.register(0, select.POLLIN)
        if not poller.poll(self.settings["greet_delay"] * 1000):
            return False
        self.reader.fill()          # end of input raises ConnectionLost
        return True

    def smtp_HELO(self, arg):
        return self.hello(arg, esmtp=False)

    def smtp_EHLO(self, arg):
        return self.hello(arg, esmtp=True)

    def hello(self, arg, esmtp):
        name = arg.strip(" ")
        verb = "EHLO" if esmtp else "HELO"
        if not name or any(c <= " " or c == "\x7f" for c in name):
            raise smtp.ProtocolError(smtp.SYNTAX.format(f"{verb} hostname"))
        self.helo, self.esmtp = name, esmtp
        self.reset()
        if not esmtp:
            self.reply(smtp.HELO_OK.format(self.host))
            return
        keywords = [k.format(self.max_size) if "{}" in k else k for k in smtp.EHLO_KEYWORDS]
        if self.starttls_offered and self.tls is None:
            keywords.append(smtp.STARTTLS_KEYWORD)
        if self.auth_offered():
            keywords.append(smtp.AUTH_KEYWORD)
        for line in smtp.reply_lines(250, [self.host, *keywords]):
            self.reply(line)

    def smtp_MAIL(self, arg):
        if self.helo is None:
            raise smtp.ProtocolError(smtp.NEED_HELO)
        if self.sender is not None:
            raise smtp.ProtocolError(smtp.NESTED_MAIL)
        path, params = smtp.path_and_params(arg, "FROM")
        utf8 = False
        for name, value in params.items():
            if not self.esmtp:
                raise smtp.ProtocolError(smtp.BAD_PARAM.format(name))
            if name == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    raise smtp.ProtocolError(smtp.SYNTAX.format("SIZE=number"))
                if self.max_size and int(value) > self.max_size:
                    raise smtp.ProtocolError(smtp.TOO_BIG)
            elif name == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise smtp.ProtocolError(smtp.SYNTAX.format("BODY=7BIT|8BITMIME"))
            elif name == "SMTPUTF8":
                if value is not None:
                    raise smtp.ProtocolError(smtp.SYNTAX.format("SMTPUTF8 takes no value"))
                utf8 = True
            elif name == "AUTH" and self.auth_offered():
                if value is None:       # RFC 4954 section 5: AUTH=<> or xtext, only noted
                    raise smtp.ProtocolError(smtp.SYNTAX.format("AUTH=address"))
            else:
                raise smtp.ProtocolError(smtp.BAD_PARAM.format(name[:40]))
        if not utf8 and not path.isascii():
            raise smtp.ProtocolError(smtp.NON_ASCII)
        from masq import address
        try:
            address.check(path, allow_empty=True)
        except address.AddressError:
            raise smtp.ProtocolError(smtp.BAD_SENDER) from None
        self.sender, self.utf8 = path, utf8
        self.reply(smtp.SENDER_OK)

    def smtp_RCPT(self, arg):
        if self.sender is None:
            raise smtp.ProtocolError(smtp.NEED_MAIL)
        self.rcpt_tried += 1
        path, params = smtp.path_and_params(arg, "TO")
        for name in params:
            raise smtp.ProtocolError(smtp.BAD_PARAM.format(name[:40]))
        if len(self.rcpts) >= self.settings["max_recipients"]:
            raise smtp.ProtocolError(smtp.TOO_MANY_RCPTS)
        if not self.utf8 and not path.isascii():
            raise smtp.ProtocolError(smtp.NON_ASCII)
        if path.lower() == "postmaster":        # RFC 5321 section 4.5.1
            path = f"{path}@{self.host}"
        if self.relayclient:                    # qmail-smtpd(8): appended to each recipient
            path += self.relayclient
        self.reply(self.check_recipient(path))

    def check_recipient(self, path):
        """The reply to RCPT for this address; on success it joins the envelope."""
        from masq import address
        try:
            address.check(path)
        except address.AddressError:
            return smtp.BAD_RCPT
        local, domain = address.split(path)
        domain = domain.lower()
        may_relay = self.trusted or self.auth_user is not None
        if domain in self.conf.local_domains or domain in self.relay_domains():
            if not may_relay and any(c in local for c in ROUTING_CHARACTERS):
                return smtp.RELAY_DENIED.format(path)
            if domain in self.conf.local_domains and self.local_problem(local):
                return smtp.UNKNOWN_USER.format(path)
        elif not may_relay:
            return smtp.RELAY_DENIED.format(path)
        self.rcpts.append(path)
        return smtp.RCPT_OK

    def relay_domains(self):
        return [d.lower() for d in self.conf.get("relay_domains") or []]

    def local_problem(self, local_part):
        """Why masq-local would refuse this local part at once (its own rule), or "".

        postmaster is always accepted (RFC 5321 section 4.5.1).  An aliases
        file that cannot be read is a temporary failure (451), never a
        reason to call a user unknown.
        """
        from masq import address, local
        if address.unquote_local(local_part).lower() == "postmaster":
            return ""
        if self.aliases is None:
            try:
                self.aliases = local.load_aliases(self.conf)
            except Error as e:
                from masq import log
                log.warn(f"unable to read the aliases: {e}")
                raise smtp.ProtocolError(smtp.ALIASES_UNAVAILABLE) from None
        return local.recipient_problem(self.conf, self.aliases, local_part)

    def smtp_DATA(self, arg):
        if arg:
            raise smtp.ProtocolError(smtp.SYNTAX.format("DATA"))
        self.check_transaction()
        self.reply(smtp.START_DATA)
        program.title(f"masq-smtpd {self.client_ip or 'local'}: DATA")
        self.reader.timeout = self.settings["data_timeout"]
        stream = smtp.DataStream(self.reader, self.max_size)
        try:
            self.reply(self.deliver(stream))
        finally:
            self.reader.timeout = self.settings["command_timeout"]
            self.reset()

    def check_transaction(self):
        if self.sender is None:
            raise smtp.ProtocolError(smtp.NEED_MAIL)
        if not self.rcpts:
            raise smtp.ProtocolError(smtp.NO_VALID_RCPTS if self.rcpt_tried
                                     else smtp.NEED_RCPT)

    def smtp_BDAT(self, arg):
        size, last = parse_bdat(arg)
        if size is None:
            # the chunk's end is unknown: reading on could take data for commands
            self.reply(smtp.SYNTAX.format("BDAT size [LAST]"))
            return False
        try:
            self.check_transaction()
        except smtp.ProtocolError:
            for _ in self.reader.read_exactly(size):
                pass
            raise
        self.reader.timeout = self.settings["data_timeout"]
        stream = ChunkStream(self, size, last)
        try:
            self.reply(self.deliver(stream))
        finally:
            self.reader.timeout = self.settings["command_timeout"]
            self.reset()

    def deliver(self, stream):
        """Queue the message from `stream`; the reply that says how it went."""
        from masq import spool
        try:
            qid = self.queue(stream)
        except smtp.BareLineEndError:
            stream.drain()
            return smtp.BAD_MESSAGE
        except spool.TooBigError:
            stream.drain()
            return smtp.TOO_BIG
        except (smtp.TimeoutError_, smtp.ConnectionLost, smtp.ChunkInterrupted):
            raise
        except Error as e:
            stream.drain()
            from masq import log
            log.warn(f"unable to queue a message from {self.client_ip or 'local'}: {e}")
            return smtp.QUEUE_FAILED if e.temporary else smtp.REJECTED
        stream.drain()              # a $MASQ_QUEUE that stopped reading and said yes
        return smtp.QUEUED.format(qid) if qid else smtp.QUEUED_NO_ID

    def queue(self, stream):
        """Hand the message to masq-queue (in-process) or to $MASQ_QUEUE."""
        from masq.envelope import Envelope
        env = Envelope(self.sender, self.rcpts)
        from masq.handoff import submit
        return submit(self.conf, stream, env, self.trace())

    def trace(self):
        proto = "utf8smtp" if self.utf8 else "esmtp" if self.esmtp else "smtp"
        # RFC 3848 (and RFC 6531 for UTF8SMTP): S for TLS, A for AUTH
        suffix = ("s" if self.tls else "") + ("a" if self.auth_user else "")
        if suffix:
            proto = ("esmtp" if proto == "smtp" else proto) + suffix
        trace = {"proto": proto, "client": self.client_ip, "client_name": self.client_name,
                 "helo": self.helo, "user": self.user, "auth": self.auth_user}
        if len(self.rcpts) == 1:
            trace["for"] = self.rcpts[0]
        return {k: v for k, v in trace.items() if v}

    def smtp_RSET(self, arg):
        if arg:
            raise smtp.ProtocolError(smtp.SYNTAX.format("RSET"))
        self.reset()
        self.reply(smtp.OK)

    def smtp_NOOP(self, arg):
        self.reply(smtp.OK)

    def smtp_QUIT(self, arg):
        if arg:
            raise smtp.ProtocolError(smtp.SYNTAX.format("QUIT"))
        self.reply(smtp.BYE)
        return False

    def smtp_VRFY(self, arg):
        if not arg.strip():
            raise smtp.ProtocolError(smtp.SYNTAX.format("VRFY address"))
        self.reply(smtp.VRFY)

    def smtp_EXPN(self, arg):
        self.reply(smtp.NOT_IMPLEMENTED)

    def smtp_HELP(self, arg):
        self.reply(smtp.HELP)

    # -- STARTTLS (RFC 3207) and AUTH (RFC 4954)

    def smtp_STARTTLS(self, arg):
        if arg:
            raise smtp.ProtocolError(smtp.SYNTAX.format("STARTTLS"))
        if self.tls is not None:
            raise smtp.ProtocolError(smtp.TLS_ACTIVE)
        if not self.starttls_offered:
            raise smtp.ProtocolError(smtp.NOT_IMPLEMENTED)
        if self.sender is not None:
            raise smtp.ProtocolError(smtp.IN_TRANSACTION)
        if self.reader.buf:
            # Bytes that came with STARTTLS were sent in clear text: read after
            # the handshake they would pass for protected commands (CVE-2011-0411).
            self.reply(smtp.TLS_PIPELINED)
            return False
        from masq import log
        try:
            context = tls_context(*self.tls_files)
        except Error as e:
            log.warn(f"STARTTLS refused: {e}")
            self.starttls_offered = False
            raise smtp.ProtocolError(smtp.TLS_UNAVAILABLE) from None
        self.reply(smtp.READY_TLS)
        self.flush()
        import socket
        sock = socket.socket(fileno=os.dup(0))
        sock.settimeout(self.settings["command_timeout"])
        try:
            tls = context.wrap_socket(sock, server_side=True)
        except (OSError, ValueError) as e:
            sock.close()
            log.warn(f"TLS handshake with {self.client_ip or 'a local client'} failed: "
                     f"{e.__class__.__name__}: {e}")
            return False
        self.tls = self.reader.tls = tls
        # RFC 3207 section 4.2: forget all the client told us before TLS
        self.helo, self.esmtp, self.auth_user = None, False, None
        self.reset()

    def auth_offered(self):
        """AUTH goes only over TLS (unless auth_without_tls) and with a usable password file."""
        if not (self.tls is not None or self.settings["auth_without_tls"]):
            return False
        if self.auth_ready is None:
            from masq import log, passwords
            try:
                why = passwords.status(self.password_file())
            except FileNotFoundError:
                why = False
            except OSError as e:
                why = f"unable to read {e.filename}: {e.strerror}"
            if why:
                log.warn(f"no AUTH: {why}")
            self.auth_ready = not why
        return self.auth_ready

    def password_file(self):
        return self.conf.path(self.settings["passwords"], is_value=True)

    def smtp_AUTH(self, arg):
        if not self.auth_offered():
            raise smtp.ProtocolError(smtp.AUTH_NOT_ENABLED)
        if not self.esmtp:
            raise smtp.ProtocolError(smtp.NEED_HELO)
        if self.auth_user is not None:
            raise smtp.ProtocolError(smtp.ALREADY_AUTHENTICATED)
        if self.sender is not None:
            raise smtp.ProtocolError(smtp.IN_TRANSACTION)
        mechanism, _, initial = arg.strip(" ").partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN":
            credentials = self.plain_credentials(initial)
        elif mechanism == "LOGIN":
            credentials = self.login_credentials(initial)
        else:
            raise smtp.ProtocolError(smtp.AUTH_MECHANISM)
        from masq import log, passwords
        user = password = None
        if credentials is not None:
            user, password = credentials
        try:
            good = user is not None and passwords.verify(self.password_file(), user, password)
        except passwords.PasswordFileError as e:
            log.warn(f"AUTH impossible: {e}")
            raise smtp.ProtocolError(smtp.AUTH_UNAVAILABLE) from None
        who = self.client_ip or "a local client"
        if not good:
            # no user name in the log: a client may have sent its password there
            log.warn(f"AUTH {mechanism} failed for {who}")
            import time
            self.flush()
            time.sleep(AUTH_FAILURE_DELAY_SECONDS)
            raise smtp.ProtocolError(smtp.AUTH_FAILED)
        self.auth_user = user
        if not log.ready():
            log.setup(self.conf)
        log.line(f"auth: client={who} method={mechanism} user={user}")
        self.reply(smtp.AUTH_OK)

    def auth_response(self, initial, challenge):
        """The client's answer (bytes): the initial response, or a line after 334."""
        if initial:
            text = initial
        else:
            self.reply(smtp.AUTH_CHALLENGE.format(challenge))
            line = self.reader.readline(smtp.AUTH_LINE_MAX_BYTES)
            if not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\n" in line[:-1]:
                raise smtp.ProtocolError(smtp.BARE_LINE_END_COMMAND)
            text = line[:-2].decode("ascii", "replace").strip(" ")
        if text == "*":
            raise smtp.ProtocolError(smtp.AUTH_CANCELLED)
        if text == "=" and initial:     # RFC 4954 section 4: an empty initial response
            return b""
        import binascii
        try:
            return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError):
            raise smtp.ProtocolError(smtp.AUTH_BAD_BASE64) from None

    def plain_credentials(self, initial):
        """(user, password bytes) of RFC 4616 `authzid NUL authcid NUL passwd`, or None."""
        parts = self.auth_response(initial, "").split(b"\0")
        if len(parts) != 3:
            return None
        authzid, authcid, password = parts
        user = _user_name(authcid)
        if user is None or (authzid and authzid != authcid):
            return None                 # acting for another user is not offered
        return user, password

    def login_credentials(self, initial):
        """(user, password bytes) of the LOGIN mechanism, or None."""
        name = self.auth_response(initial, "VXNlcm5hbWU6")       # "Username:"
        password = self.auth_response("", "UGFzc3dvcmQ6")        # "Password:"
        user = _user_name(name)
        return None if user is None else (user, password)


def _user_name(data):
    """A user name from AUTH data, or None when it cannot be one."""
    from masq import passwords
    try:
        return passwords.check_user(data.decode("utf-8"))
    except (UnicodeDecodeError, passwords.BadUserError):
        return None


def stdio_is_one_socket():
    """True when fds 0 and 1 are the same socket (tcpserver, inetd, systemd Accept=yes)."""
    import stat
    try:
        st0, st1 = os.fstat(0), os.fstat(1)
    except OSError:
        return False
    return stat.S_ISSOCK(st0.st_mode) and (st0.st_dev, st0.st_ino) == (st1.st_dev, st1.st_ino)


class ChunkStream:
    """The message of a run of BDAT commands, as one stream (RFC 3030).

    Between chunks it answers the chunk and reads the next command itself: a
    BDAT goes on, anything else ends the transaction (ChunkInterrupted) and
    is handed back to the session as its next command.
    """

    def __init__(self, session, size, last):
        self.session = session
        self.reader = session.reader
        self.left, self.last = size, last
        self.chunk_size = size
        self.decoder = smtp.ChunkDecoder()
        self.size = 0

    def read(self, n=65536):
        while True:
            if self.left:
                if not self.reader.buf:
                    self.reader.fill()
                piece = self.reader.buf[:min(self.left, n)]
                self.reader.buf = self.reader.buf[len(piece):]
                self.left -= len(piece)
                data = self.decoder.feed(piece, self.last and not self.left)
                self.size += len(data)
                max_size = self.session.max_size
                if max_size and self.size > max_size:
                    from masq.spool import TooBigError
                    raise TooBigError(f"message larger than the limit of {max_size} bytes")
                if data:
                    return data
                continue
            if self.last:
                return b""
            self.next_chunk()

    def next_chunk(self):
        session = self.session
        session.reply(smtp.CHUNK_OK.format(self.chunk_size))
        line = self.reader.readline(smtp.PARAM_LINE_MAX_BYTES)
        try:
            verb, arg = smtp.command(line)
        except smtp.ProtocolError:
            verb = arg = None
        size, last = parse_bdat(arg) if verb == "BDAT" else (None, False)
        if size is None:
            session.pending_line = line
            raise smtp.ChunkInterrupted("BDAT transaction ended by another command")
        self.left, self.last, self.chunk_size = size, last, size

    def drain(self):
        """Consume the rest of the current chunk."""
        for _ in self.reader.read_exactly(self.left):
            pass
        self.left = 0


def parse_bdat(arg):
    """(size, last) of `BDAT size [LAST]`; size None when it does not parse."""
    words = arg.split(" ")
    if not words[0].isdigit() or not words[0].isascii() or len(words[0]) > 20:
        return None, False
    if len(words) == 1:
        return int(words[0]), False
    if len(words) == 2 and words[1].upper() == "LAST":
        return int(words[0]), True
    return None, False


def host_name(name):
    """TCPREMOTEHOST if it looks like a host name (it comes from the DNS), else unknown."""
    if not name or len(name) > 255 or not all(c in HOST_CHARACTERS for c in name):
        return "unknown"
    return name


def math_ceil(x):
    """ceil() without importing math."""
    return int(x) + (x > int(x))


def client_address(ip):
    """(client IP, is a local user): TCPREMOTEIP, else the peer of a socket on fd 0."""
    if ip is not None:
        return ip, False
    import stat
    if not stat.S_ISSOCK(os.fstat(0).st_mode):
        return "", True             # pipes or a terminal: a local user (sendmail -bs)
    import socket
    try:
        with socket.socket(fileno=os.dup(0)) as s:
            peer = s.getpeername()
    except OSError:
        return "", False
    if isinstance(peer, tuple):
        return peer[0], False
    return "", True                 # a Unix socket: someone on this host


def local_user():
    import pwd
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())
