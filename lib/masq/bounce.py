"""Delivery status notifications (RFC 3464) for recipients that failed or wait.

A bounce goes from the null sender <> to the original sender, as
multipart/report with a text part, a message/delivery-status part and the
original headers (text/rfc822-headers; never the body, and at most
MAX_RETURNED_HEADER_BYTES of them).  A message from <> is never bounced
(RFC 5321 section 6.1): its failure is only logged.  A delay warning is the
same report with `Action: delayed`, sent once when a recipient has failed
temporarily for queue.warn_after seconds.

This module only builds the bytes; masq.attempt decides when a report is
due and queues it.
"""
from masq import headers, message

# the original's header section only, and only this much of it (Postfix sends
# headers only): a bounce must not carry a stranger's payload anywhere
MAX_RETURNED_HEADER_BYTES = 16384

FAILED_TEXT = ("I'm sorry to have to inform you that your message could not",
               "be delivered to one or more recipients. The reasons follow.")
DELAYED_TEXT = ("This is a warning only: your message could not be delivered yet",
                "to the recipients below. I will keep trying; you need not send",
                "it again. The reasons follow.")


def status_code(text, default="5.0.0"):
    """The first enhanced status code (RFC 3463) quoted in a reason, or the default."""
    for word in text.replace("(", " ").replace(")", " ").split():
        parts = word.split(".")
        if len(parts) == 3 and parts[0] in ("2", "4", "5") and all(p.isdigit() for p in parts):
            return word
    return default


def build(conf, msg, failed, qid, delayed=False):
    """The bytes of a bounce (or a delay warning) for msg; failed = [(recipient, reason)]."""
    host = conf.hostname
    boundary = f"{qid}/{host}"
    arrival = message.date(msg.arrived)
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{msg.sender}>",
        "Subject: " + ("Delayed Mail (still being retried)" if delayed
                       else "Undelivered Mail Returned to Sender"),
        f"Date: {message.date()}",
        f"Message-ID: {message.message_id(qid, host)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system at host {host}.",
        "",
        *(DELAYED_TEXT if delayed else FAILED_TEXT),
        "",
    ]
    for rcpt, reason in failed:
        lines += [f"<{rcpt}>: {reason}", ""]
    lines += [
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {host}",
        f"X-Masq-Queue-ID: {msg.id}",
        f"Arrival-Date: {arrival}",
        "",
    ]
    for rcpt, reason in failed:
        kind = "smtp" if reason[:3].isdigit() or " said: " in reason else "x-masq"
        lines += [
            f"Final-Recipient: rfc822; {rcpt}",
            f"Action: {'delayed' if delayed else 'failed'}",
            f"Status: {status_code(reason, '4.0.0' if delayed else '5.0.0')}",
            f"Diagnostic-Code: {kind}; {reason}",
            "",
        ]
    lines += [
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    head = "\n".join(lines).encode("utf-8", "surrogateescape") + b"\n"
    return head + original_headers(msg) + f"\n--{boundary}--\n".encode()


def original_headers(msg):
    """The header section of the queued message, its first MAX_RETURNED_HEADER_BYTES."""
    with msg.open_data() as f:
        return headers.scan(f, MAX_RETURNED_HEADER_BYTES).raw()

