"""SMTP and LMTP client: the session on an open connection, and its wire protocol.

A ClientSession is made by masq.nexthop.connect(), which finds the next hop,
connects and calls open(): the greeting, EHLO (LHLO for LMTP, HELO after a
5xx), STARTTLS and AUTH as the route (masq.clientroute) says (a password,
or an OAuth 2.0 token from masq.oauth: XOAUTH2, OAUTHBEARER); it raises
DeliveryError (masq.outcome) when the session cannot be used.  Then:

    results = session.send(sender, recipients, stream)   # [(letter, text)]
    ...       # more session.send() while session.usable
    session.close()

`send` takes the envelope sender ("" for the null sender), the recipients
and the message: a binary stream from its current position to its end, with
LF line ends as stored in the spool, or a masq.wiremessage.WireMessage made
from one (to send the same message over several sessions).  It returns one
(letter, text) per recipient, in order: "K" accepted, "Z" temporary failure,
"D" permanent failure; text names the remote host and holds its reply, on
one line.  Recipients over the server's limit go in further transactions
on the same connection.  After a lost connection, a timeout or a 421,
`session.usable` is False and the next message needs a new connection; the
answers read before it are kept (a 550 stays a 550).

Timeouts (seconds, route keys): connect_timeout 30, greeting_timeout 300,
command_timeout 300 (EHLO, STARTTLS, AUTH, MAIL, RCPT, RSET), data_timeout
180 (DATA and each write of the message), data_done_timeout 600 (the reply
after the final dot), quit_timeout 60.
"""
import time

from masq import wiremessage
from masq.clientroute import MECHANISMS, tls_context
from masq.outcome import DeliveryError, one_line

MAX_REPLY_LINES = 200


class Reply:
    """An SMTP reply: code (int) and its lines' text (str)."""

    def __init__(self, code, lines):
        self.code, self.lines = code, lines

    @property
    def text(self):
        return one_line(f"{self.code} " + " ".join(self.lines))

    @property
    def letter(self):
        return "K" if 200 <= self.code < 300 else "D" if 500 <= self.code < 600 else "Z"


def read_reply(conn, timeout, what):
    """One whole (maybe multi-line) reply from `conn`, within `timeout` (RFC 5321 4.2)."""
    lines, code = [], None
    deadline = time.monotonic() + timeout
    while True:
        line = conn.readline(timeout, what, deadline).rstrip(b"\r\n")
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-") \
                or (code is not None and int(line[:3]) != code):
            raise DeliveryError(f"{conn.peer}: malformed reply {what}: "
                                f"{one_line(line[:200])}")
        code = int(line[:3])
        lines.append(line[4:].decode("utf-8", "replace"))
        if line[3:4] != b"-":
            return Reply(code, lines)
        if len(lines) > MAX_REPLY_LINES:
            raise DeliveryError(f"{conn.peer}: reply too long {what}")


class ClientSession:
    """An open SMTP/LMTP session, greeted and ready for MAIL."""

    def __init__(self, conn, route, server_hostname):
        self.conn, self.route = conn, route
        self._peer = conn.peer      # still named once the connection is closed
        self.server_hostname = server_hostname
        self.extensions = {}
        self.usable = True
        self.timeouts = route.timeouts
        self.lmtp = route.protocol == "lmtp"

    @property
    def peer(self):
        return self._peer

    # -- opening ---------------------------------------------------------
    def open(self):
        """Greeting, EHLO, TLS and AUTH as the route says; raises DeliveryError."""
        route = self.route
        if route.tls == "tls":
            self.conn.starttls(tls_context(route), self.server_hostname,
                               self.timeouts["command_timeout"])
        greeting = read_reply(self.conn, self.timeouts["greeting_timeout"], "to the greeting")
        if greeting.code // 100 != 2:
            raise DeliveryError(f"{self.peer} refused to talk to me: {greeting.text}",
                                temporary=greeting.code // 100 != 5)
        self.hello()
        if route.tls in ("starttls", "may") and not self.conn.tls:
            if "STARTTLS" in self.extensions:
                reply = self.command(b"STARTTLS", "to STARTTLS")
                if reply.code == 220:
                    self.conn.starttls(tls_context(route), self.server_hostname,
                                       self.timeouts["command_timeout"])
                    self.hello()
                elif route.tls == "starttls":
                    raise DeliveryError(f"{self.peer} refused STARTTLS: {reply.text}",
                                        temporary=True)
            elif route.tls == "starttls":
                raise DeliveryError(f"{self.peer} does not offer STARTTLS, "
                                    f"which {route.label} requires (tls = \"starttls\")")
        if route.user is not None:
            self.authenticate()

    def hello(self):
        """EHLO (LHLO for LMTP), falling back to HELO on a 5xx (RFC 5321 3.2)."""
        verb = b"LHLO " if self.lmtp else b"EHLO "
        helo = self.route.helo
        # the idna codec costs milliseconds to import: only for a name that needs it
        name = helo.encode("ascii") if helo.isascii() else helo.encode("idna")
        reply = self.command(verb + name, "to " + verb.decode().strip())
        if reply.code // 100 == 5 and not self.lmtp:
            reply = self.command(b"HELO " + name, "to HELO")
            self.extensions = {}
        elif reply.code // 100 == 2:
            self.extensions = {}
            for line in reply.lines[1:]:
                word, _, params = line.strip().partition(" ")
                if word.upper().startswith("AUTH="):      # the old form
                    word, params = "AUTH", word[5:] + " " + params
                self.extensions[word.upper()] = params.strip()
        if reply.code // 100 != 2:
            raise DeliveryError(f"{self.peer} refused my greeting: {reply.text}",
                                temporary=reply.code // 100 != 5)

    def authenticate(self):
        """AUTH with the best mechanism both sides know (RFC 4954)."""
        route = self.route
        # the password goes only where we know who reads it: over TLS whose
        # certificate and name we checked, or through the route's own wrapper
        safe = (self.conn.tls and route.verify) or self.conn.proc
        if not safe and not route.allow_auth_without_tls:
            why = "unverified TLS" if self.conn.tls else "TLS"
            what = "access token" if route.mechanism else "password"
            raise DeliveryError(f"not sending the {what} for {route.label} to "
                                f"{self.peer} over {why} (set tls_verify = true, or "
                                f"allow_auth_without_tls = true to allow it)")
        offered = self.extensions.get("AUTH", "").upper().split()
        if "AUTH" not in self.extensions:
            return          # as Postfix: send without AUTH, the server decides
        if route.mechanism:
            return self._authenticate_oauth(offered)
        mechanism = next((m for m in route.mechanisms if m in offered and m in MECHANISMS),
                         None)
        if mechanism is None:
            raise DeliveryError(f"{self.peer} offers AUTH {' '.join(offered)}, none of "
                                f"which I may use ({' '.join(route.mechanisms)})")
        import base64   # only for AUTH: it costs a few ms at start
        user, secret = route.user.encode(), route.secret
        b64 = base64.b64encode
        what = f"to AUTH {mechanism}"
        if mechanism == "PLAIN":
            reply = self.command(b"AUTH PLAIN " + b64(b"\0" + user + b"\0" + secret), what)
        elif mechanism == "LOGIN":
            reply = self.command(b"AUTH LOGIN " + b64(user), what)
            if reply.code == 334:
                reply = self.command(b64(secret), what)
        else:
            import hmac     # costly, and only for CRAM-MD5
            reply = self.command(b"AUTH CRAM-MD5", what)
            if reply.code == 334:
                challenge = base64.b64decode(reply.lines[0].strip() or b"", validate=False)
                digest = hmac.new(secret, challenge, "md5").hexdigest().encode()
                reply = self.command(b64(user + b" " + digest), what)
        if reply.code == 334:       # the server wants more than we have: cancel
            reply = self.command(b"*", what)
        if reply.code // 100 != 2:
            # a wrong password is fixed by people, then retried (Postfix soft-bounces)
            raise DeliveryError(f"{self.peer} refused authentication as "
                                f"{route.user}: {reply.text}")

    def _authenticate_oauth(self, offered):
        """AUTH XOAUTH2 or OAUTHBEARER (RFC 7628) with the route's access token."""
        from masq import oauth
        route = self.route
        mechanism = route.mechanism
        if mechanism not in offered:
            raise DeliveryError(f"{self.peer} offers AUTH {' '.join(offered)}, not "
                                f"{mechanism}, which {route.label} uses")
        import base64   # as in authenticate()
        token = oauth.get(route)
        response = oauth.initial_response(mechanism, route.user, token,
                                          self.server_hostname, route.port)
        what = f"to AUTH {mechanism}"
        reply = self.command(b"AUTH " + mechanism.encode() + b" "
                             + base64.b64encode(response), what)
        status = ""
        if reply.code == 334:
            # an error as a challenge (RFC 7628 3.2.3: the client answers ^A;
            # XOAUTH2 servers want an empty line), then the final reply
            status = oauth.error_status(reply.lines[0] if reply.lines else "")
            reply = self.command(b"AQ==" if mechanism == "OAUTHBEARER" else b"", what)
        if reply.code // 100 != 2:
            oauth.forget(route)     # revoked or expired early: the next attempt asks anew
            # fixed by people (or a fresh token), then retried, as a wrong password
            raise DeliveryError(f"{self.peer} refused the {mechanism} token of {route.user}: "
                                f"{reply.text}" + (f" (status {status})" if status else ""))

    def command(self, line, what):
        """Send one command line and read its reply."""
        self.conn.write(line + b"\r\n", self.timeouts["command_timeout"])
        return self._reply(self.timeouts["command_timeout"], what)

    def _reply(self, timeout, what):
        """One reply; 421 means the server is closing the connection (RFC 5321 3.8)."""
        reply = read_reply(self.conn, timeout, what)
        if reply.code == 421:
            raise DeliveryError(f"{self.peer} said: {reply.text}")
        return reply

    # -- one message -----------------------------------------------------
    def send(self, sender, recipients, stream):
        """Send one message; [(letter, text)] in the order of `recipients`.

        Recipients the server has no room for go in the next transaction on
        this connection: over its LIMITS RCPTMAX (RFC 9422), or answered 452
        once others were taken (RFC 5321 section 4.5.3.1.10: a client that
        gets 452 for too many recipients sends the rest in another one).
        """
        recipients = list(recipients)
        results = [None] * len(recipients)
        todo = list(range(len(recipients)))
        message = stream if isinstance(stream, wiremessage.WireMessage) \
            else wiremessage.WireMessage(stream)
        while todo:
            size = self._rcpt_max() or len(todo)
            batch, rest = todo[:size], todo[size:]
            try:
                answers = self._send(sender, [recipients[i] for i in batch], message)
            except DeliveryError as e:
                self.usable = False
                self.close()
                answers = [(e.letter, e.text)] * len(batch)
            for i, answer in zip(batch, answers, strict=True):
                results[i] = answer
            todo = [i for i, answer in zip(batch, answers, strict=True) if answer is None] + rest
            if todo and not self.usable:
                for i in todo:
                    results[i] = ("Z", f"{self.peer}: the connection was closed before "
                                       "the transaction for this recipient")
                break
        return results

    def _rcpt_max(self):
        """The recipients one transaction may have, from LIMITS RCPTMAX=n (RFC 9422), or None."""
        for word in self.extensions.get("LIMITS", "").split():
            name, _, value = word.partition("=")
            if name.upper() == "RCPTMAX" and value.isdigit() and value.isascii() \
                    and int(value) > 0:
                return int(value)
        return None

    def _send(self, sender, recipients, message):
        """One transaction: (letter, text) per recipient; None: send it in the next one."""
        if not self.usable:
            raise DeliveryError(f"{self.peer}: the connection is closed")
        ext = self.extensions
        envelope_utf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
        if (envelope_utf8 or message.utf8_addresses) and "SMTPUTF8" not in ext:
            where = "the envelope" if envelope_utf8 else "the headers"
            return self._all(recipients, "D", f"{self.peer} does not support SMTPUTF8, "
                             f"which this message needs (non-ASCII addresses in {where})")
        limit = ext.get("SIZE", "").strip()
        if limit.isdigit() and 0 < int(limit) < message.size:
            return self._all(recipients, "D", f"message too big for {self.peer}: "
                             f"{message.size} bytes, its limit is {limit} (SIZE)")
        params = b""
        if "SIZE" in ext:
            params += b" SIZE=%d" % message.size
        if message.eightbit and "8BITMIME" in ext:
            params += b" BODY=8BITMIME"
        utf8 = (envelope_utf8 or message.utf8_addresses) and "SMTPUTF8" in ext
        if utf8:
            params += b" SMTPUTF8"
        encoding = "utf-8" if utf8 else "ascii"
        try:
            mail = b"MAIL FROM:<" + _address(sender, encoding) + b">" + params + b"\r\n"
            rcpts = [b"RCPT TO:<" + _address(r, encoding) + b">\r\n" for r in recipients]
        except ValueError as e:
            return self._all(recipients, "D", f"bad address: {e}")
        timeouts = self.timeouts
        mail_reply, rcpt_replies, data_reply = None, [], None
        try:
            if "PIPELINING" in ext:
                # RFC 2920: MAIL, every RCPT and DATA in one write, then the replies
                self.conn.write(mail + b"".join(rcpts) + b"DATA\r\n",
                                timeouts["command_timeout"])
                mail_reply = self._reply(timeouts["command_timeout"], "to MAIL FROM")
                for _ in rcpts:
                    rcpt_replies.append(self._reply(timeouts["command_timeout"], "to RCPT TO"))
                data_reply = self._reply(timeouts["data_timeout"], "to DATA")
            else:
                mail_reply = self.command(mail[:-2], "to MAIL FROM")
                if mail_reply.code // 100 == 2:
                    for r in rcpts:
                        rcpt_replies.append(self.command(r[:-2], "to RCPT TO"))
                    if any(r.code // 100 == 2 for r in rcpt_replies):
                        data_reply = self.command(b"DATA", "to DATA")
        except DeliveryError as e:
            # a 421 or a lost connection ends the session (RFC 5321 section 3.8),
            # not the answers read before it: a refused recipient stays refused
            if mail_reply is None or not rcpt_replies:
                raise
            self.usable = False
            self.close()
            if mail_reply.code // 100 != 2:
                return self._all(recipients, mail_reply.letter,
                                 f"{self.peer} said to MAIL FROM: {mail_reply.text}")
            return [(reply.letter, f"{self.peer} said: {reply.text}")
                    if reply.code // 100 != 2 else (e.letter, e.text) for reply in rcpt_replies] \
                + [(e.letter, e.text)] * (len(recipients) - len(rcpt_replies))
        if mail_reply.code // 100 != 2:
            self._reset(data_reply)
            return self._all(recipients, mail_reply.letter,
                             f"{self.peer} said to MAIL FROM: {mail_reply.text}")
        results = [None] * len(recipients)
        accepted, over = [], []
        for i, reply in enumerate(rcpt_replies):
            if reply.code // 100 == 2:
                accepted.append(i)
            else:
                results[i] = (reply.letter, f"{self.peer} said: {reply.text}")
                if reply.code == 452:
                    over.append(i)
        if not accepted or data_reply.code != 354:
            self._reset(data_reply)
            for i in accepted:
                results[i] = ("D" if data_reply.code // 100 == 5 else "Z",
                              f"{self.peer} said to DATA: {data_reply.text}")
            return results
        self._write_message(message)
        final = []
        try:
            for _ in (accepted if self.lmtp else [None]):
                final.append(self._reply(timeouts["data_done_timeout"],
                                         "to the end of the message"))
        except DeliveryError as e:
            if not final:
                raise
            # LMTP, cut off after some replies: those recipients have their answer;
            # only the others are tried again (no duplicate for the delivered ones)
            peer = self.peer
            self.usable = False
            self.close()
            for n, i in enumerate(accepted):
                results[i] = ((final[n].letter, f"{peer} said: {final[n].text}")
                              if n < len(final) else (e.letter, e.text))
            return results
        for n, i in enumerate(accepted):
            reply = final[n] if self.lmtp else final[0]
            results[i] = (reply.letter, f"{self.peer} said: {reply.text}")
        if any(results[i][0] == "K" for i in accepted):
            for i in over:          # the server made progress: the rest go next
                results[i] = None
        return results

    def _write_message(self, message):
        """The message in writes of about WRITE_CHUNK_BYTES (few syscalls, no stall)."""
        pending, size = [], 0
        for chunk in message.chunks():
            pending.append(chunk)
            size += len(chunk)
            if size >= wiremessage.WRITE_CHUNK_BYTES:
                self.conn.write(b"".join(pending), self.timeouts["data_timeout"])
                pending, size = [], 0
        if pending:
            self.conn.write(b"".join(pending), self.timeouts["data_timeout"])

    def _reset(self, data_reply):
        """End a failed transaction so the session can carry the next one."""
        if data_reply is not None and data_reply.code == 354:
            # the server took DATA although no recipient is left: send nothing
            self.conn.write(b".\r\n", self.timeouts["data_timeout"])
            read_reply(self.conn, self.timeouts["data_done_timeout"], "to the end of the message")
        reply = self.command(b"RSET", "to RSET")
        if reply.code // 100 != 2:
            self.usable = False

    @staticmethod
    def _all(recipients, letter, text):
        return [(letter, one_line(text))] * len(recipients)

    def close(self):
        """QUIT (if still talking) and close."""
        if self.conn is None:
            return
        if self.usable:
            try:
                self.conn.write(b"QUIT\r\n", self.timeouts["quit_timeout"])
                read_reply(self.conn, self.timeouts["quit_timeout"], "to QUIT")
            except DeliveryError:
                pass
        self.usable = False
        self.conn.close()
        self.conn = None


def _address(address, encoding):
    """An address as bytes for MAIL or RCPT; CR, LF, NUL and <> are refused."""
    if any(c in address for c in "\r\n\0<>"):
        raise ValueError(f"forbidden character in {address!r}")
    try:
        return address.encode(encoding)
    except UnicodeEncodeError:
        raise ValueError(f"non-ASCII address {address!r} without SMTPUTF8") from None
