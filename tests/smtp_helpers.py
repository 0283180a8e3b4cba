"""Real SMTP servers on loopback for the client's tests: aiosmtpd and a tiny sink.

`AioServer` runs aiosmtpd (SMTP or LMTP) in a thread on a socket bound here
(port 0 unless told), so the port is known before the first connection and
no sleep is needed.  `Sink` is a minimal threaded SMTP sink that records
what each recv() brought, to show that commands were pipelined.
"""
import asyncio
import socket
import ssl
import threading


class Recorder:
    """An aiosmtpd handler that keeps every message and can refuse recipients."""

    def __init__(self, refuse=None, pipelining=True):
        self.messages = []          # (mail_from, rcpt_tos, content bytes, mail_options)
        self.mails = 0              # MAIL commands seen
        self.refuse = refuse or {}  # recipient -> reply
        self.pipelining = pipelining
        self.auth = []

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mails += 1
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.original_content or envelope.content,
                              list(envelope.mail_options)))
        return "250 2.0.0 queued as 42"


def authenticator(user, password):
    """An aiosmtpd authenticator accepting one user and password."""
    from aiosmtpd.smtp import AuthResult, LoginPassword

    def check(server, session, envelope, mechanism, data):
        ok = isinstance(data, LoginPassword) and data.login == user.encode() \
            and data.password == password.encode()
        return AuthResult(success=ok, handled=False)
    return check


class AioServer:
    """aiosmtpd in a thread; `port` is known once the object exists."""

    def __init__(self, handler, host="127.0.0.1", port=0, ssl_context=None, lmtp=False,
                 **kwargs):
        self.handler, self.ssl_context, self.lmtp, self.kwargs = handler, ssl_context, lmtp, kwargs
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "aiosmtpd did not start"

    def _factory(self):
        if self.lmtp:
            from aiosmtpd.lmtp import LMTP
            return LMTP(self.handler, loop=self.loop, **self.kwargs)
        from aiosmtpd.smtp import SMTP
        return SMTP(self.handler, loop=self.loop, **self.kwargs)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            self.loop.create_server(self._factory, sock=self.sock, ssl=self.ssl_context))
        self.loop.call_soon(self.ready.set)
        self.loop.run_forever()
        self.server.close()
        self.loop.run_until_complete(self.server.wait_closed())
        self.loop.close()

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Sink:
    """A minimal SMTP sink in threads: greets, says 250 to all, counts messages.

    `batches` holds the bytes each recv() brought outside DATA, so a test can
    see that MAIL, RCPT and DATA came in one write.
    """

    def __init__(self, extensions=("PIPELINING", "8BITMIME", "SIZE 10000000"),
                 host="127.0.0.1", greeting=b"220 sink ESMTP", replies=None):
        self.extensions = list(extensions)
        self.greeting = greeting
        self.replies = replies or {}    # verb (bytes, upper case) -> reply line
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.batches = []
        self.messages = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ehlo = "250-sink\r\n" + "".join(
            f"250{' ' if i == len(self.extensions) - 1 else '-'}{e}\r\n"
            for i, e in enumerate(self.extensions)) if self.extensions else "250 sink\r\n"
        conn.sendall(self.greeting + b"\r\n")
        buf, in_data = b"", False
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                if not in_data:
                    with self.lock:
                        self.batches.append(data)
                buf += data
                out = []
                while True:
                    if in_data:
                        end = buf.find(b"\r\n.\r\n")
                        if end < 0 and not buf.startswith(b".\r\n"):
                            break
                        buf = buf[end + 5:] if end >= 0 else buf[3:]
                        in_data = False
                        with self.lock:
                            self.messages += 1
                        out.append(b"250 ok\r\n")
                        continue
                    i = buf.find(b"\r\n")
                    if i < 0:
                        break
                    line, buf = buf[:i].upper(), buf[i + 2:]
                    if line[:4] in self.replies:
                        out.append(self.replies[line[:4]] + b"\r\n")
                        if self.replies[line[:4]].startswith(b"421"):
                            conn.sendall(b"".join(out))
                            return
                    elif line.startswith(b"EHLO"):
                        out.append(ehlo.encode())
                    elif line.startswith(b"DATA"):
                        out.append(b"354 go on\r\n")
                        in_data = True
                        buf = b"\r\n" + buf     # so an empty body's "." is found
                    elif line.startswith(b"QUIT"):
                        conn.sendall(b"".join(out) + b"221 bye\r\n")
                        return
                    else:
                        out.append(b"250 ok\r\n")
                if out:
                    conn.sendall(b"".join(out))
        except OSError:
            return
        finally:
            conn.close()

    def stop(self):
        self.sock.close()


def tls_contexts(tmp_path, name="127.0.0.1"):
    """(server ssl context, CA file path) made with a fresh trustme CA."""
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert(name, "localhost")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return server, str(ca_file)


def top_config(masq, text):
    """Put top-level keys at the start of masq.toml (before any table)."""
    with open(masq.conf) as f:
        old = f.read()
    with open(masq.conf, "w") as f:
        f.write(text + "\n" + old)
