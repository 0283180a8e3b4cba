"""masq-smtp: deliver one message over SMTP, LMTP or QMTP to a smarthost or the recipients' MX.

Usage:
  masq-smtp [-C FILE] [--route NAME] [--id QID] [--] SENDER RECIPIENT...
  masq-smtp -h | --help

Options:
  -C FILE       Read this configuration instead of $MASQ_CONF.
  --route NAME  Send the way [route.NAME] says; without it, to each
                recipient domain's MX.
  --id QID      The queue id, for the process title.
  -h --help     Show this.

The message comes on stdin with LF line ends; SENDER may be "" (null
sender).  stdout gets one line per RECIPIENT, in order: "K text" (accepted),
"Z text" (temporary failure) or "D text" (permanent failure).  Exit 0 once
every recipient has its line; 100 for bad usage, 111 when it cannot start.
A route with `pipe` runs its command instead of SMTP (masq-smtp(8)).
"""
import sys

from masq import Error, clientroute, config, nexthop, pipe, program, wiremessage
from masq.outcome import DeliveryError


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = _quick(argv) or program.parse(__doc__, argv, usage_code=100)
    try:
        conf = config.load(args["-C"])
        route = clientroute.Route(conf, args["--route"])
    except Error as e:
        raise Error(str(e), code=111) from None
    sender, recipients = args["SENDER"], args["RECIPIENT"]
    qid = args["--id"]
    if pipe.configured(conf, args["--route"]):     # a command instead of SMTP (masq.pipe)
        results = pipe.send_stream(conf, args["--route"], sender, recipients,
                                   sys.stdin.buffer, qid)
        sys.stdout.buffer.write(b"".join(f"{letter} {text}\n".encode("utf-8", "replace")
                                         for letter, text in results))
        sys.stdout.flush()
        return 0
    program.title(f"masq-smtp: {qid or ''} via {route.label}".replace("  ", " "))
    message = wiremessage.WireMessage(sys.stdin.buffer)
    if route.dkim is not None:          # a bad key: exit 111, the message waits
        from masq import dkim, log
        try:
            message.prepend(route.dkim.sign(b"".join(message.lines()), sender))
        except dkim.UnsignedError as e:
            log.warn(str(e))
    results = [None] * len(recipients)
    if route.host or route.wrapper:
        groups = {None: list(range(len(recipients)))}
    else:
        groups = {}
        for i, rcpt in enumerate(recipients):
            domain = rcpt.rpartition("@")[2].lower() if "@" in rcpt else ""
            groups.setdefault(domain, []).append(i)
    for domain, indexes in groups.items():
        if domain == "":
            for i in indexes:
                results[i] = ("D", f"no domain in recipient address {recipients[i]}")
            continue
        try:
            if (dict(conf.routes).get(args["--route"]) or {}).get("pop_before_smtp"):
                from masq import pop3   # POP-before-SMTP: only routes that ask load it
                try:
                    pop3.login_before_smtp(conf, args["--route"])
                except Error as e:
                    raise DeliveryError(f"POP-before-SMTP: {e}") from None
            session = nexthop.connect(conf, route, domain)
        except DeliveryError as e:
            for i in indexes:
                results[i] = (e.letter, e.text)
            continue
        try:
            sent = session.send(sender, [recipients[i] for i in indexes], message)
        finally:
            session.close()
        for i, result in zip(indexes, sent, strict=True):
            results[i] = result
    sys.stdout.buffer.write(b"".join(
        f"{letter} {text}\n".encode("utf-8", "replace") for letter, text in results))
    sys.stdout.flush()
    return 0


def _quick(argv):
    """The usual argv parsed without docopt (it costs more than sending a message).

    Anything unusual (--help, --opt=value, an option after the addresses)
    returns None and docopt decides.
    """
    args = {"-C": None, "--route": None, "--id": None}
    i, dashdash = 0, False
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i, dashdash = i + 1, True
            break
        if arg in args and i + 1 < len(argv):
            args[arg] = argv[i + 1]
            i += 2
            continue
        break
    rest = argv[i:]
    if len(rest) < 2 or (not dashdash and any(a.startswith("-") for a in rest)):
        return None
    args["SENDER"], args["RECIPIENT"] = rest[0], rest[1:]
    return args
