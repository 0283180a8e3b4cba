"""masq-qmtpd: a QMTP server on stdin and stdout, one process per connection.

Usage:
  masq-qmtpd [-C FILE]
  masq-qmtpd -h | --help

Options:
  -C FILE    Read this configuration instead of $MASQ_CONF.
  -h --help  Show this.

Packages come on fd 0, responses go to fd 1 (a socket from tcpserver,
masq-tcpserver, inetd or systemd; port 209), several packages per
connection (cr.yp.to/proto/qmtp.txt).  The client is described by
TCPREMOTEIP, TCPREMOTEHOST and RELAYCLIENT (tcp-environ(5)); it may relay
as masq-smtpd says (smtpd.relay_nets; there is no AUTH in QMTP).  A
recipient from outside passes the DNS lists and greylisting as at
masq-smtpd's RCPT (masq.policy.Guard), and too many refused recipients
end the session (smtpd.max_refused_recipients).  The
message streams into the queue as it comes, as masq-smtpd's DATA does, and
"K" is said only once it is durable; a message over max_size is refused as
soon as its length is read.  Settings: [smtpd] in masq.toml(5).
Exit codes: masq-qmtpd(8).
"""
import _signal      # the C module: `signal` imports enum
import math
import os
import sys
import time

from masq import Error, address, log, policy, program, qmtp, smtp, smtpdconfig
from masq.program import Exit

LINGER_SECONDS = 2      # after a refusal that ends the session: the client's input dropped

RECIPIENT_RESPONSES = {policy.RELAY_DENIED: qmtp.RELAY_DENIED,
                       policy.BAD_ADDRESS: qmtp.BAD_RECIPIENT,
                       policy.UNKNOWN_USER: qmtp.UNKNOWN_USER}


def main(argv=None):
    conf_file = smtpdconfig.conf_file(sys.argv[1:] if argv is None else argv, __doc__)
    try:
        conf, settings = smtpdconfig.load(conf_file)
    except Error:
        _write(qmtp.netstring(qmtp.CONFIG_ERROR.encode()))
        raise
    session = Session(conf, settings, os.environ)
    try:
        session.run()
        if session.ending:
            session.refuse()
    except qmtp.NetstringError as e:
        session.log_line(f"qmtp: client={session.client.who()} {e}")
        session.refuse(qmtp.PROTOCOL_ERROR.format(e.what))
    except smtp.TimeoutError_ as e:       # QMTP has no way to say it: the session ends
        session.log_line(f"qmtp: client={session.client.who()} too slow: {e}")
    except smtp.ConnectionLost:
        pass
    except BrokenPipeError:
        pass
    finally:
        session.recipients.close()
    return Exit.OK


def preload(argv=()):
    """For masq-tcpserver: load once what each forked session would load itself."""
    from masq import envelope, handoff, localpart, spool  # noqa: F401 -- once, in the listener
    smtpdconfig.preload(smtpdconfig.conf_file(argv))


def _write(data):
    """Bytes straight to fd 1, never failing."""
    try:
        os.write(1, data)
    except OSError:
        pass


class Session:
    """One QMTP connection: packages, each answered per recipient."""

    def __init__(self, conf, settings, environ):
        self.conf, self.settings = conf, settings
        self.max_size = conf.get("max_size")
        self.reader = smtp.Reader(0, settings["command_timeout"])
        self.reader.before_wait = self.flush
        if settings["session_deadline"]:
            self.reader.session_deadline = time.monotonic() + settings["session_deadline"]
        self.client = policy.Client(environ, settings["relay_nets"])
        self.recipients = policy.Recipients(conf, settings, self.client, self.log_line)
        self.ending = False         # over max_refused_recipients: no package after this one
        self.out = []

    def log_line(self, text):
        log.conf_line(self.conf, text)

    def flush(self):
        """Send the responses waiting; the spec lets us hold them while input is pending."""
        if not self.out:
            return
        data, self.out = b"".join(self.out), []
        view = memoryview(data)
        # a client that stops reading must not hold us: SIGALRM's default ends us
        _signal.alarm(max(1, int(self.settings["command_timeout"]) + 1))
        try:
            while view:
                view = view[os.write(1, view):]
        except OSError as e:
            raise smtp.ConnectionLost(f"write error: {e.strerror}") from None
        finally:
            _signal.alarm(0)

    def run(self):
        program.title(f"masq-qmtpd {self.client.who()}")
        while not self.ending:
            reader = self.reader
            if not reader.buf:
                try:
                    reader.fill()           # the next package, or the end: command_timeout
                except smtp.ConnectionLost:
                    self.flush()
                    return
            self.package()

    def package(self):
        """Read one package and answer it."""
        reader, settings = self.reader, self.settings
        reader.timeout = settings["data_timeout"]
        if settings["data_deadline"]:
            reader.deadline = time.monotonic() + settings["data_deadline"]
            reader.deadline_name = "data"
        program.title(f"masq-qmtpd {self.client.who()}: package")
        length = qmtp.read_length(reader)
        if length == 0:
            raise qmtp.NetstringError("an empty message has no line-end mark")
        mark = qmtp.read_byte(reader)
        if mark not in (qmtp.LF, qmtp.CR):
            raise qmtp.NetstringError("a message starts with neither LF nor CR")
        crlf = mark == qmtp.CR
        if self.max_size and qmtp.most_decoded_bytes(length - 1, crlf) > self.max_size:
            self.log_line(f"qmtp: client={self.client.who()} refused a message of {length - 1} "
                          f"bytes: max_size is {self.max_size}")
            self.refuse(qmtp.TOO_BIG)       # not reading 200 MiB to say no
            raise smtp.ConnectionLost("refused early")
        stream = qmtp.MessageStream(reader, length - 1, crlf)
        answers = self.deliver(stream)
        reader.timeout, reader.deadline = settings["command_timeout"], None
        self.out += [qmtp.netstring(a.encode("utf-8", "replace")) for a in answers]

    def deliver(self, stream):
        """Queue the message as it streams in; one response per recipient."""
        from masq import handoff, spool    # as masq-smtpd: only a message pays for them
        from masq.envelope import Envelope
        queue = spool.Spool(self.conf.path("spool"))
        trace = {k: v for k, v in (("proto", "qmtp"), ("client", self.client.ip),
                                   ("client_name", self.client.name),
                                   ("user", self.client.user),
                                   ("trusted", self.client.trusted_by())) if v}
        seen = {}

        def envelope():
            """After the message: its comma, the sender and the recipients judged."""
            qmtp.read_comma(self.reader)
            sender, rcpts, responses = self.read_envelope()
            seen["responses"] = responses
            if sender is None or not rcpts:
                raise Refused("no recipient taken")
            return Envelope(sender, rcpts)

        message = None
        try:
            try:
                if os.environ.get("MASQ_QUEUE"):
                    data = _spill(stream)           # the hook reads its envelope first
                    env = envelope()
                    qid = handoff.submit(self.conf, data, env, trace, queue=queue)
                else:
                    qid = handoff.enqueue(self.conf, stream, envelope, trace, queue=queue)
                message = (qmtp.ACCEPTED.format(qid) if qid else qmtp.ACCEPTED_NO_ID)
            except Refused:
                pass
            except smtp.BareLineEndError:
                message = qmtp.BARE_LINE_END
            except spool.NulError:
                message = qmtp.NUL_IN_MESSAGE
            except spool.TooBigError:
                message = qmtp.TOO_BIG
            except (qmtp.NetstringError, smtp.TimeoutError_, smtp.ConnectionLost):
                raise
            except Error as e:
                log.warn(f"unable to queue a message from {self.client.who()}: {e}")
                message = qmtp.QUEUE_FAILED if e.temporary else qmtp.REJECTED
        finally:
            if "responses" not in seen and message is not None:
                stream.drain()
        if "responses" not in seen:
            qmtp.read_comma(self.reader)
            seen["responses"] = self.read_envelope()[2]
        if message and message.startswith("K") and \
                not (queue.woken if qid else queue.trigger()) and \
                handoff.may_run_queue(self.conf):
            handoff.background(["-C", self.conf.file, "--once"] + ([qid] if qid else []))
        return [r or message for r in seen["responses"]]

    def read_envelope(self):
        """(sender or None, accepted recipients, [response or None per recipient]).

        None in the list: the recipient was taken, the message's own
        response is its answer.
        """
        raw_sender = qmtp.read_string(self.reader, qmtp.ADDRESS_MAX_BYTES)
        raw = qmtp.read_string(self.reader, qmtp.RECIPIENTS_MAX_BYTES)
        if raw is None:
            raise qmtp.NetstringError("the recipient list is longer than "
                                      f"{qmtp.RECIPIENTS_MAX_BYTES} bytes")
        items = qmtp.parse_netstrings(raw)
        if not items:
            raise qmtp.NetstringError("a package has no recipient")
        sender = _text(raw_sender)
        if sender is not None:
            try:
                address.check(sender, allow_empty=True)
            except address.AddressError:
                sender = None
        if sender is None:
            return None, [], [qmtp.BAD_SENDER] * len(items)
        accepted, responses = [], []
        for item in items:
            response = self.judge(_text(item), accepted, sender)
            responses.append(response)
        return sender, accepted, responses

    def judge(self, path, accepted, sender):
        """The response for one recipient, or None when it is taken (added to `accepted`)."""
        if self.ending:
            return qmtp.TOO_MANY_REFUSED
        if path is None or len(path) > qmtp.ADDRESS_MAX_BYTES:
            return qmtp.BAD_RECIPIENT
        if len(accepted) >= self.settings["max_recipients"]:
            return qmtp.TOO_MANY_RCPTS
        path, verdict, detail = self.recipients.judge(path, sender, False)
        if verdict == policy.ALIASES_UNAVAILABLE:
            return qmtp.ALIASES_UNAVAILABLE
        if verdict == policy.TOO_MANY_REFUSED:
            self.ending = True
            return qmtp.TOO_MANY_REFUSED
        if verdict == policy.ACCEPT:
            accepted.append(path)
            return None
        if verdict in (policy.GREYLISTED, policy.DEFERRED):
            return qmtp.GREYLISTED.format(math.ceil(detail))
        if verdict == policy.LISTED:
            return qmtp.LISTED.format(self.client.ip, *detail)
        return RECIPIENT_RESPONSES[verdict]

    def refuse(self, response=None):
        """Say one response (or those waiting) and end the session (the package cannot
        be followed)."""
        if response is not None:
            self.out.append(qmtp.netstring(response.encode()))
        try:
            self.flush()
        except smtp.ConnectionLost:
            return
        _linger(self.reader)


class Refused(Error):
    """No recipient (or no sender) of the package was taken: nothing is queued."""


def _text(raw):
    """An address as text (UTF-8), or None: absent (over its cap) or not UTF-8.

    Its length and its characters (controls too) are the caller's to check:
    address.check, for the sender and in each recipient's verdict.
    """
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _spill(stream):
    """The message in a temporary file, for a $MASQ_QUEUE hook (bounded memory)."""
    import tempfile
    spill = tempfile.TemporaryFile()
    while data := stream.read():
        spill.write(data)
    spill.seek(0)
    return spill


def _linger(reader):
    """Tell the client we are done writing, and drop what it still sends for a little
    while: closing with unread input would reset the connection and could throw
    away the response before the client reads it (RFC 1122 section 4.2.2.13)."""
    try:
        import socket
        sock = socket.socket(fileno=os.dup(1))
        try:
            sock.shutdown(socket.SHUT_WR)
        finally:
            sock.close()
    except OSError:
        pass                            # fd 1 is a pipe: nothing to say
    reader.buf = b""
    reader.timeout = LINGER_SECONDS
    reader.deadline, reader.deadline_name = time.monotonic() + LINGER_SECONDS, "linger"
    try:
        while True:
            reader.fill()
            reader.buf = b""
    except (smtp.TimeoutError_, smtp.ConnectionLost):
        pass
