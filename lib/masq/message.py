"""Header helpers shared by the programs that write headers.

Only what must be cheap lives here (dates, ids, the trace line); parsing a
header section is masq.headers' job.
"""
import os
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
    """The Received: line masq-queue puts on top (RFC 5321 section 4.4)."""
    proto = trace.get("proto") or "local"
    lines = []
    if proto == "local":
        who = trace.get("user") or str(os.getuid())
        lines.append(f"Received: by {hostname} (masq, from user {who})")
    else:
        helo = trace.get("helo") or "unknown"
        name = trace.get("client_name") or "unknown"
        ip = trace.get("client") or "unknown"
        if ":" in ip and not ip.startswith("IPv6:"):
            ip = "IPv6:" + ip
        lines.append(f"Received: from {helo} ({name} [{ip}])")
        lines.append(f"\tby {hostname} (masq) with {proto.upper()}")
    lines[-1] += f" id {qid}"
    if trace.get("for"):
        lines.append(f"\tfor <{trace['for']}>")
    lines[-1] += f"; {date()}"
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
