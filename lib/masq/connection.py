"""The client's byte stream to the next hop: TCP, or a socketpair to a wrapper.

`tcp(address, port, peer, timeout)` connects with TCP_NODELAY;
`unix(path, peer, timeout)` connects to a Unix socket;
`wrapper(command, peer)` runs `/bin/sh -c command` with its stdin and stdout
on the other end of a socketpair and its stderr in a temporary file, whose
last line is quoted in errors.  Either gives a Connection: `write(data,
timeout)`, `readline(timeout, what, deadline)`, `starttls(context, name,
timeout)`, `close()`.  Every failure raises DeliveryError (temporary) with
the peer's name and what we were waiting for; a failed TLS handshake raises
TLSFailed, so a caller may try once more without TLS.

socket, subprocess and signal are imported only when a connection is made or
closed.
"""
import os
import time

from masq.outcome import DeliveryError, one_line

MAX_LINE_BYTES = 4096           # a reply line longer than this is refused
RECV_BYTES = 65536
WRAPPER_EXIT_SECONDS = 5        # after closing its socket; then SIGKILL


class Connection:
    """A socket (TCP, or one end of a socketpair to a wrapper) with line reads."""

    def __init__(self, sock, peer, proc=None, errfile=None):
        self.sock, self.peer, self.proc, self.errfile = sock, peer, proc, errfile
        self.buf = bytearray()
        self.tls = False

    def write(self, data, timeout):
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise DeliveryError(f"{self.peer}: timeout after {timeout:g} s "
                                f"while sending") from None
        except OSError as e:
            raise DeliveryError(f"{self.peer}: lost connection while sending: "
                                f"{self._why(e)}") from None

    def readline(self, timeout, what, deadline=None):
        """One line with its line end, by `deadline` (monotonic) or within `timeout`."""
        deadline = deadline or time.monotonic() + timeout
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line
            if len(self.buf) > MAX_LINE_BYTES:
                raise DeliveryError(f"{self.peer}: reply line too long {what}")
            try:
                # the whole reply within `timeout`, however slowly it trickles in
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data = self.sock.recv(RECV_BYTES)
            except TimeoutError:
                raise DeliveryError(f"{self.peer}: timeout after {timeout:g} s "
                                    f"waiting for the reply {what}") from None
            except OSError as e:
                raise DeliveryError(f"{self.peer}: lost connection {what}: "
                                    f"{self._why(e)}") from None
            if not data:
                raise DeliveryError(f"{self.peer}: lost connection {what}"
                                    + self._wrapper_said())
            self.buf += data

    def starttls(self, context, server_hostname, timeout):
        """Wrap the socket in TLS (after STARTTLS's 220, or at once for tls)."""
        import ssl      # loaded already: `context` is an ssl.SSLContext
        if self.buf:
            # RFC 3207 section 6: nothing may come before the handshake
            raise DeliveryError(f"{self.peer}: data after the STARTTLS reply "
                                f"(response injection?)")
        self.sock.settimeout(timeout)
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        except ssl.SSLCertVerificationError as e:
            raise TLSFailed(f"{self.peer}: TLS certificate not trusted: "
                            f"{e.verify_message or e.reason}", temporary=True) from None
        except (ssl.SSLError, OSError) as e:
            raise TLSFailed(f"{self.peer}: TLS handshake failed: {self._why(e)}") from None
        self.tls = True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
        if self.proc is not None:
            import subprocess   # costly; loaded already when a wrapper ran
            try:
                self.proc.wait(WRAPPER_EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                import signal   # costly, and only for a wrapper that hangs
                try:                    # the wrapper leads its own process group
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                self.proc.wait()
            if self.errfile is not None:
                self.errfile.close()

    def _why(self, exc):
        return (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__) \
            + self._wrapper_said()

    def _wrapper_said(self):
        """The last line the wrapper wrote on stderr, if any."""
        if self.errfile is None:
            return ""
        try:
            self.errfile.seek(0)
            lines = [ln for ln in self.errfile.read()[-2000:].splitlines() if ln.strip()]
        except OSError:
            return ""
        return f" (wrapper said: {one_line(lines[-1])})" if lines else ""


def tcp(address, port, peer, timeout):
    """A TCP connection with TCP_NODELAY: each batch is one write, no Nagle stall."""
    import socket       # costly, and only needed when a connection is made
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    _connect(sock, (address, port), f"{peer}:{port}", timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Connection(sock, peer)


def unix(path, peer, timeout):
    """A connection to a Unix stream socket (an LMTP server's, as Dovecot's)."""
    import socket       # as in tcp()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _connect(sock, path, peer, timeout)
    return Connection(sock, peer)


def _connect(sock, target, peer, timeout):
    """Connect `sock` to `target` within timeout; else close it and raise
    ConnectFailed naming `peer`."""
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except TimeoutError:
        sock.close()
        raise ConnectFailed(f"connect to {peer}: timeout after {timeout:g} s") from None
    except OSError as e:
        sock.close()
        raise ConnectFailed(f"connect to {peer}: {e.strerror or e}") from None


def wrapper(command, peer):
    """Run `command` with /bin/sh -c, its stdin and stdout one end of a socketpair."""
    import socket       # these three are costly and needed only when a wrapper runs
    import subprocess
    import tempfile
    ours, theirs = socket.socketpair()
    errfile = tempfile.TemporaryFile(mode="w+", errors="replace")
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=theirs, stdout=theirs,
                                stderr=errfile, close_fds=True, start_new_session=True)
    except OSError as e:
        ours.close()
        errfile.close()
        raise ConnectFailed(f"unable to run wrapper: {e.strerror}") from None
    finally:
        theirs.close()
    return Connection(ours, peer, proc, errfile)


class ConnectFailed(DeliveryError):
    """No connection was made: refused, timed out, no address, the wrapper
    could not run (a route's connect_error_fail makes it permanent)."""


class TLSFailed(DeliveryError):
    """A TLS handshake failed: with opportunistic TLS, try once more without it."""
