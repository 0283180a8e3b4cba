"""Header helpers shared by the programs that write headers.

Only what must be cheap lives here (dates, ids, the trace line); parsing a
header section is masq.headers' job.
"""
import posix
import time


def date(when=None):
    """An RFC 5322 date in local time: `Wed, 25 Nov 2026 19:40:03 +0100`."""
    t = time.localtime(when)
    # time.strftime's %a and %b follow the C locale: Python never calls setlocale
    return time.strftime("%a, %d %b %Y %H:%M:%S %z", t)


def message_id(qid, hostname):
    """A Message-ID that is unique because the queue id is."""
    return f"<{qid}@{hostname}>"


def received(qid, hostname, trace):
    """The Received: line masq-queue puts on top (RFC 5321 section 4.4).

    With trace["add"] ("date", "message-id" or both), the Date: and
    Message-ID: fields the message lacks follow it (RFC 5322 section 3.6).
    """
    proto = trace.get("proto") or "local"
    lines = []
    if proto == "local":
        who = trace.get("user") or str(posix.getuid())
        lines.append(f"Received: by {hostname} (masq, from user {who})")
    else:
        helo = trace.get("helo") or "unknown"
        name = trace.get("client_name") or "unknown"
        ip = trace.get("client") or "unknown"
        if ":" in ip and not ip.startswith("IPv6:"):
            ip = "IPv6:" + ip
        lines.append(f"Received: from {helo} ({name} [{ip}])")
        if trace.get("cert"):           # a TLS client certificate's subject, in a comment
            cert = "".join(c if " " <= c <= "~" and c not in "()\\" else "?"
                           for c in trace["cert"])
            lines.append(f"\t(cert {cert})")
        lines.append(f"\tby {hostname} (masq) with {proto.upper()}")
    lines[-1] += f" id {qid}"
    if trace.get("for"):
        lines.append(f"\tfor <{trace['for']}>")
    lines[-1] += f"; {date()}"
    added = (trace.get("add") or "").split()
    if "date" in added:
        lines.append(f"Date: {date()}")
    if "message-id" in added:
        lines.append(f"Message-ID: {message_id(qid, hostname)}")
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def missing(stream, limit=65536):
    """(names, stream): which of "date" and "message-id" the message lacks, and
    a stream that gives the whole message again.  Reads the header section
    only; one longer than `limit` bytes is said to lack nothing."""
    import io
    from masq import headers    # only a message that may get fields pays for it
    head = b""
    while not (head.startswith(b"\n") or b"\n\n" in head):
        if len(head) >= limit:
            return [], Replay(head, stream)
        data = stream.read(limit)
        if not data:
            break
        head += data
    section = headers.scan(io.BytesIO(head))
    return [n for n in ("date", "message-id") if not section.has(n)], Replay(head, stream)


class Replay:
    """A stream that gives `head`, then what `stream` gives."""

    def __init__(self, head, stream):
        self.head, self.stream = head, stream

    def read(self, n=-1):
        if self.head:
            data, self.head = self.head, b""
            return data
        return self.stream.read(n)
