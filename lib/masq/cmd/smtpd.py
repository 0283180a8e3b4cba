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
one socket; AUTH PLAIN and LOGIN only after it, against the password file
or a checkpassword program, with failures counted per client address and
checks limited over all sessions (masq.anvil).  Deadlines bound a whole
command line, message and session: a client too slow gets 421.
A recipient from outside may be refused by a DNS block list or greylisted
(masq.policy.Guard); too many refused recipients end the session.
Each message goes to masq-queue in-process, or to the program $MASQ_QUEUE
names; 250 is said only once it is durable.  When no masq-send daemon
listens on the spool's trigger, a detached masq-send --once delivers it.
Settings: [smtpd] in masq.toml(5).  Exit codes: masq-smtpd(8).
"""
# Over 400 lines as one concept, the server's side of the SMTP dialogue: a
# method per verb over one session's state.  What is not the dialogue lives
# by concept: masq.smtp (replies, commands, DATA and BDAT streams),
# masq.policy (relay, recipients), masq.sasl (AUTH), masq.smtpdconfig.
import _signal      # the C module: `signal` imports enum, a quarter of our start-up
import os
import select
import sys
import time

from masq import Error, address, log, net, policy, program, smtp, smtpdconfig
from masq.program import Exit

AUTH_FAILURE_DELAY_SECONDS = 1  # slows a password guesser down (also counts as an error)
AUTH_SLOT_WAIT_SECONDS = 10     # for a free password-check slot (auth_max_concurrent)
RECIPIENT_REPLIES = {policy.ACCEPT: smtp.RCPT_OK, policy.BAD_ADDRESS: smtp.BAD_RCPT,
                     policy.RELAY_DENIED: smtp.RELAY_DENIED, policy.UNKNOWN_USER: smtp.UNKNOWN_USER}
# max_errors counts the client's mistakes; a recipient refused by policy is an
# answer the client asked for (RFC 5321 section 4.5.3.1.10 on 452), not one
POLICY_VERDICTS = (policy.RELAY_DENIED, policy.UNKNOWN_USER)
# the Guard's replies (greylisting, dnsbl) and the cap on refused recipients
GREYLISTED = "451 4.7.1 <{}>: Recipient address rejected: greylisted, try again in {} seconds"
LISTED = "554 5.7.1 Service unavailable; client [{}] blocked using {}; {}"
TOO_MANY_REFUSED = "421 4.7.0 {} Error: too many refused recipients"


def main(argv=None):
    conf_file = smtpdconfig.conf_file(sys.argv[1:] if argv is None else argv, __doc__)
    try:
        conf, settings = smtpdconfig.load(conf_file)
    except Error:
        _write(smtp.CONFIG_ERROR)
        raise
    session = ServerSession(conf, settings, os.environ)
    try:
        try:
            session.run()
        except smtp.DeadlineError as e:
            session.reply(smtp.TOO_SLOW.format(session.host, e.what))
            session.log_line(f"too slow: client={session.client.who()} deadline={e.what}")
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
    """For masq-tcpserver: load once what each forked session would load itself.

    The imports a session makes late (see there why), and the configuration,
    TLS context and aliases (masq.smtpdconfig.preload).
    """
    from masq import (anvil, envelope, handoff, headers, localpart,  # noqa: F401 -- once,
                      message, sasl, spool)                            # in the listener
    smtpdconfig.preload(smtpdconfig.conf_file(argv))


def _write(text):
    """One reply line straight to fd 1, never failing."""
    try:
        os.write(1, text.encode() + b"\r\n")
    except OSError:
        pass


class ServerSession:
    """One SMTP session of the server: the state of the dialogue and a method per verb."""

    def __init__(self, conf, settings, environ):
        self.conf = conf
        self.settings = settings
        self.host = conf.hostname
        self.max_size = conf.get("max_size")
        self.reader = smtp.Reader(0, settings["command_timeout"])
        self.reader.before_wait = self.flush
        if settings["session_deadline"]:
            self.reader.session_deadline = time.monotonic() + settings["session_deadline"]
        self.out = []
        self.errors = 0
        self.helo = None
        self.esmtp = False
        self.pending_line = None
        self.client = policy.Client(environ, settings["relay_nets"])
        self.recipients = policy.Recipients(conf, settings, self.client, self.log_line)
        self.tls = None             # the ssl.SSLSocket after STARTTLS
        self.tls_files = smtpdconfig.tls_files(conf, settings)
        self.starttls_offered = self.tls_files is not None and net.stdio_is_one_socket()
        self.auth_user = None
        self.auth_ready = None      # the password backend is usable (checked once)
        self.anvil = None           # masq.anvil.Anvil, opened at the first AUTH
        self.reset()

    def reset(self):
        """Forget the mail transaction (RSET, EHLO, after each message)."""
        self.sender = None
        self.rcpts = []
        self.rcpt_tried = 0
        self.utf8 = False

    # -- replies

    def reply(self, text, counted=True):
        """Queue a reply; a 4xx or 5xx counts toward max_errors unless not `counted`."""
        self.out.append(text)
        if counted and text[0] in "45":
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
        if self.anvil is not None:
            self.anvil.close()
        self.recipients.close()

    def counted_as(self):
        """The client for the AUTH failure table: an IPv6 client counts by its /64,
        since one host may hold a whole /64 (RFC 4291): 2**64 addresses, as many tries."""
        return net.prefix(self.client.ip, 64) if self.client.ip else "local"

    def log_line(self, text):
        log.conf_line(self.conf, text)

    def command_deadline(self):
        """Seconds a command line may take from its first byte, or None."""
        return self.settings["command_deadline"] or None

    # -- the dialogue

    def run(self):
        program.title(f"masq-smtpd {self.client.ip or 'local'}")
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
                    line = self.reader.readline(smtp.PARAM_LINE_MAX_BYTES,
                                                self.command_deadline())
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
            except smtp.ChunkInterrupted as e:
                self.pending_line = e.line  # the command that ended it comes next

    def talks_first(self):
        """Postscreen's pregreet test: does the client send before our greeting?"""
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
        if self.settings["require_tls"] and self.tls is None and self.client.user is None:
            raise smtp.ProtocolError(smtp.NEED_TLS)     # a local user's pipes need none
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
            # RFC 5321 section 4.5.3.1.10: 452, and the client sends the rest later
            self.reply(smtp.TOO_MANY_RCPTS, counted=False)
            return
        if not self.utf8 and not path.isascii():
            raise smtp.ProtocolError(smtp.NON_ASCII)
        path, verdict, detail = self.recipients.judge(path, self.sender,
                                                      self.auth_user is not None)
        if verdict == policy.ALIASES_UNAVAILABLE:
            self.reply(smtp.ALIASES_UNAVAILABLE, counted=False)     # our fault, not theirs
            return
        if verdict == policy.TOO_MANY_REFUSED:
            self.reply(TOO_MANY_REFUSED.format(self.host))
            return False
        if verdict == policy.ACCEPT:
            self.rcpts.append(path)
        if verdict in (policy.GREYLISTED, policy.DEFERRED):
            reply = GREYLISTED.format(path, math_ceil(detail))
        elif verdict == policy.LISTED:
            reply = LISTED.format(self.client.ip, *detail)
        else:
            reply = RECIPIENT_REPLIES[verdict]
            reply = reply.format(path) if "{}" in reply else reply
        self.reply(reply, counted=verdict not in POLICY_VERDICTS + (
            policy.GREYLISTED, policy.LISTED, policy.DEFERRED))

    def smtp_DATA(self, arg):
        if arg:
            raise smtp.ProtocolError(smtp.SYNTAX.format("DATA"))
        self.check_transaction()
        self.reply(smtp.START_DATA)
        program.title(f"masq-smtpd {self.client.ip or 'local'}: DATA")
        self.start_data()
        stream = smtp.DataStream(self.reader, self.max_size)
        try:
            self.reply(self.deliver(stream))
        finally:
            self.end_data()

    def start_data(self):
        """The message's limits: data_timeout per read, data_deadline for all of it."""
        self.reader.timeout = self.settings["data_timeout"]
        if self.settings["data_deadline"]:
            self.reader.deadline = time.monotonic() + self.settings["data_deadline"]
            self.reader.deadline_name = "data"

    def end_data(self):
        self.reader.timeout = self.settings["command_timeout"]
        self.reader.deadline = None
        self.reset()

    def check_transaction(self):
        if self.sender is None:
            raise smtp.ProtocolError(smtp.NEED_MAIL)
        if not self.rcpts:
            raise smtp.ProtocolError(smtp.NO_VALID_RCPTS if self.rcpt_tried
                                     else smtp.NEED_RCPT)

    def smtp_BDAT(self, arg):
        size, last = smtp.parse_bdat(arg)
        if size is None:
            # the chunk's end is unknown: reading on could take data for commands
            self.reply(smtp.SYNTAX.format("BDAT size [LAST]"))
            return False
        self.start_data()               # one deadline for the whole run of chunks
        try:
            self.check_transaction()
        except smtp.ProtocolError:
            for _ in self.reader.read_exactly(size):
                pass
            self.reader.timeout, self.reader.deadline = self.settings["command_timeout"], None
            raise
        stream = smtp.ChunkStream(self.reader, size, last, self.reply, self.max_size)
        try:
            self.reply(self.deliver(stream))
        finally:
            self.end_data()

    def deliver(self, stream):
        """Queue the message from `stream`; the reply that says how it went."""
        # handoff imports masq.child, signal and enum (5 ms): only a message pays
        from masq import handoff, message, spool
        from masq.envelope import Envelope
        trace = self.trace()
        queue = spool.Spool(self.conf.path("spool"))
        try:
            data = stream
            if self.adds_missing_headers():
                missing, data = message.missing(stream)
                if missing:
                    trace["add"] = " ".join(missing)
            qid = handoff.submit(self.conf, data, Envelope(self.sender, self.rcpts), trace,
                                 queue=queue)
        except smtp.BareLineEndError:
            stream.drain()
            return smtp.BAD_MESSAGE
        except spool.NulError:
            stream.drain()
            return smtp.NUL_IN_MESSAGE
        except spool.TooBigError:
            stream.drain()
            return smtp.TOO_BIG
        except (smtp.TimeoutError_, smtp.ConnectionLost, smtp.ChunkInterrupted):
            raise
        except Error as e:
            stream.drain()
            log.warn(f"unable to queue a message from {self.client.ip or 'local'}: {e}")
            return smtp.QUEUE_FAILED if e.temporary else smtp.REJECTED
        stream.drain()              # a $MASQ_QUEUE that stopped reading and said yes
        # no daemon woke (nor one we could tell of, behind $MASQ_QUEUE): deliver
        # now, as sendmail -odb does, not at the next cron queue run
        if not (queue.woken if qid else queue.trigger()) and handoff.may_run_queue(self.conf):
            handoff.background(["-C", self.conf.file, "--once"] + ([qid] if qid else []))
        return smtp.QUEUED.format(qid) if qid else smtp.QUEUED_NO_ID

    def adds_missing_headers(self):
        """Date: and Message-ID: for a client we serve as its submission server?"""
        which = self.settings["add_missing_headers"]
        return which == "all" or (which == "trusted" and (
            self.client.trusted or self.auth_user is not None
            or self.client.certificate is not None))

    def trace(self):
        proto = "utf8smtp" if self.utf8 else "esmtp" if self.esmtp else "smtp"
        # RFC 3848 (and RFC 6531 for UTF8SMTP): S for TLS, A for AUTH
        suffix = ("s" if self.tls else "") + ("a" if self.auth_user else "")
        if suffix:
            proto = ("esmtp" if proto == "smtp" else proto) + suffix
        trace = {"proto": proto, "client": self.client.ip, "client_name": self.client.name,
                 "helo": self.helo, "user": self.client.user, "auth": self.auth_user,
                 "cert": self.client.certificate, "trusted": self.client.trusted_by()}
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
        try:
            context = smtpdconfig.tls_context(*self.tls_files)
        except Error as e:
            log.warn(f"STARTTLS refused: {e}")
            self.starttls_offered = False
            raise smtp.ProtocolError(smtp.TLS_UNAVAILABLE) from None
        self.reply(smtp.READY_TLS)
        self.flush()
        import socket               # it imports enum: only STARTTLS pays for it
        sock = socket.socket(fileno=os.dup(0))
        # the whole handshake, as a command: a trickled ClientHello is dropped
        sock.settimeout(min(self.reader.wait_seconds(), self.command_deadline() or 1e9))
        try:
            tls = context.wrap_socket(sock, server_side=True)
        except (OSError, ValueError) as e:
            sock.close()
            log.warn(f"TLS handshake with {self.client.ip or 'a local client'} failed: "
                     f"{e.__class__.__name__}: {e}")
            return False
        self.tls = self.reader.tls = tls
        # RFC 3207 section 4.2: forget all the client told us before TLS
        self.helo, self.esmtp, self.auth_user = None, False, None
        self.reset()
        peercert = tls.getpeercert() if self.tls_files[2] else None
        if peercert:                # CERT_OPTIONAL: only a verified one gets here
            self.client.certificate = policy.certificate_subject(peercert)
            self.log_line(f"tls: client={self.client.who()} cert={self.client.certificate}")

    def auth_offered(self):
        """AUTH goes only over TLS (unless auth_without_tls) and with a usable backend."""
        if not (self.tls is not None or self.settings["auth_without_tls"]):
            return False
        if self.auth_ready is None:
            # masq.sasl imports passwords and binascii: a session with no AUTH does not pay
            from masq import sasl
            why = sasl.unusable(self.password_file(), self.checkpassword())
            if why:
                log.warn(f"no AUTH: {why}")
            self.auth_ready = not why
        return self.auth_ready

    def password_file(self):
        return self.conf.path(self.settings["passwords"], is_value=True)

    def checkpassword(self):
        """The checkpassword program, or "" for the password file."""
        path = self.settings["checkpassword"]
        return self.conf.path(path, is_value=True) if path else ""

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
        from masq import anvil, passwords, sasl     # as in auth_offered(), which loaded them
        who = self.client.who()
        try:
            if self.failures() is not None and self.failures().locked(self.counted_as()):
                raise anvil.LockedError(who)    # no 334, no check: refused at once
            user = sasl.authenticate(mechanism, initial, self.sasl_response,
                                     self.check_password)
        except sasl.SaslError as e:
            replies = {sasl.MechanismError: smtp.AUTH_MECHANISM,
                       sasl.CancelledError: smtp.AUTH_CANCELLED,
                       sasl.Base64Error: smtp.AUTH_BAD_BASE64}
            raise smtp.ProtocolError(replies[type(e)]) from None
        except anvil.LockedError:
            self.log_line(f"auth: client={who} refused: locked out after "
                          f"{self.settings['auth_failures']} failures")
            raise smtp.ProtocolError(smtp.AUTH_LOCKED) from None
        except anvil.BusyError as e:
            log.warn(f"AUTH for {who} refused: {e}")
            raise smtp.ProtocolError(smtp.AUTH_BUSY) from None
        except (anvil.AnvilError, passwords.UnavailableError) as e:
            log.warn(f"AUTH impossible: {e}")
            raise smtp.ProtocolError(smtp.AUTH_UNAVAILABLE) from None
        if user is None:
            # no user name in the log: a client may have sent its password there
            log.warn(f"AUTH {mechanism} failed for {self.client.ip or 'a local client'}")
            self.flush()
            time.sleep(AUTH_FAILURE_DELAY_SECONDS)
            raise smtp.ProtocolError(smtp.AUTH_FAILED)
        self.auth_user = user
        self.log_line(f"auth: client={who} method={mechanism} user={user}")
        self.reply(smtp.AUTH_OK)

    def failures(self):
        """The failure table shared by the spool's sessions, or None (auth_failures = 0)."""
        if self.anvil is None and self.settings["auth_failures"]:
            from masq import anvil
            self.anvil = anvil.Anvil(self.conf.path("spool"), self.settings["auth_failures"],
                                     self.settings["auth_failure_window"],
                                     self.settings["auth_lockout"])
        return self.anvil

    def check_password(self, user, password):
        """Is it the user's password?  Counted against the client's address, run in a slot."""
        from masq import anvil, passwords
        who, failures = self.counted_as(), self.failures()
        if failures is not None:
            failures.reserve(who)       # LockedError: no check runs
        try:
            with self.check_slot():
                program.title(f"masq-smtpd {who}: AUTH")
                if self.checkpassword():
                    good = passwords.checkpassword(self.checkpassword(), user, password,
                                                   f"<{os.getpid()}.{int(time.time())}"
                                                   f"@{self.host}>")
                else:
                    good = passwords.verify(self.password_file(), user, password)
        except (anvil.AnvilError, passwords.UnavailableError) as e:
            # no answer is no failure, except from a checkpassword program: a
            # guesser must not get free tries from one that crashes or is slow
            if failures is not None and not isinstance(e, passwords.CheckpasswordError):
                failures.cancel(who)
            raise
        if good and failures is not None:
            failures.passed(who)
        return good

    def check_slot(self):
        """A slot of auth_max_concurrent, or no limit at 0."""
        from masq import anvil
        count = self.settings["auth_max_concurrent"]
        if not count:
            import contextlib
            return contextlib.nullcontext()
        return anvil.Slot(self.conf.path("spool"), count, AUTH_SLOT_WAIT_SECONDS)

    def sasl_response(self, challenge):
        """Send a 334 challenge; the client's answer line as text."""
        self.reply(smtp.AUTH_CHALLENGE.format(challenge))
        line = self.reader.readline(smtp.AUTH_LINE_MAX_BYTES, self.command_deadline())
        if not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\n" in line[:-1]:
            raise smtp.ProtocolError(smtp.BARE_LINE_END_COMMAND)
        return line[:-2].decode("ascii", "replace").strip(" ")


def math_ceil(x):
    """ceil() without importing math."""
    return int(x) + (x > int(x))
