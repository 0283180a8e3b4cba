"""masq-route: say which way mail to each address would go, without sending.

Usage:
  masq-route [-C FILE] [--from SENDER] [--route NAME] ADDRESS...
  masq-route -h | --help

Options:
  -C FILE        Read this configuration instead of $MASQ_CONF.
  --from SENDER  Decide for mail from this sender [default: ].
  --route NAME   Decide as if route NAME were online (sendmail -qo NAME).
  -h --help      Show this.

One line per address on stdout: local delivery (after aliases), a route
(and the routes tried in turn after a temporary failure), waiting for a
route to come online, or bounce with the reason.  Exit 0 when every address
has a way; 65 if one does not parse; 67 if a local user is unknown; 69 if
one can never be delivered.
"""
import pwd

from masq import Error, address, aliases, config, program, route
from masq.program import Exit


def main(argv=None):
    args = program.parse(__doc__, argv, usage_code=Exit.USAGE)
    conf = config.load(args["-C"])
    up = route.online(conf, forced=args["--route"])
    sender = address.strip_brackets(args["--from"] or "")
    try:
        address.check(sender, allow_empty=True, need_domain=False)
    except address.AddressError as e:
        raise Error(f"{address.refused(e)} (--from)", code=Exit.DATAERR,
                    temporary=False) from None
    status = Exit.OK
    for raw in args["ADDRESS"]:
        line, code = explain(conf, address.strip_brackets(raw), sender, up)
        print(f"{raw}: {line}")
        status = max(status, code) if code else status
    return status


def explain(conf, rcpt, sender, up):
    """(one line for people, exit code) for one address."""
    try:
        address.check(rcpt, need_domain=False)
    except address.AddressError as e:
        return f"bounce: {address.refused(e)}", Exit.DATAERR
    decision = route.decide(conf, rcpt, sender, up)
    if decision.kind == "local":
        return local(conf, address.unquote_local(address.split(rcpt)[0]))
    if decision.kind == "route":
        table = route.route_table(conf, decision.route)
        line = f"route {decision.route}, {route.describe_route(table)}"
        new_sender = route.rewrite(table, sender) if sender else sender
        if new_sender != sender:
            line += f", sender rewritten to <{new_sender}>"
        for name in decision.routes[1:]:      # masq-send's fall-through order
            line += f"; if deferred, route {name}, " \
                f"{route.describe_route(route.route_table(conf, name))}"
        return line, Exit.OK
    if decision.kind == "wait":
        return f"wait: {decision.reason}", Exit.OK
    return f"bounce: {decision.reason}", Exit.UNAVAILABLE


def local(conf, local_part):
    """Follow aliases to their final targets, the way masq-local will."""
    try:
        table = aliases.load(conf.path("aliases"), conf.local_domains)
        targets = table.expand(local_part)
    except aliases.AliasError as e:
        return f"{'defer' if e.temporary else 'bounce'}: {e}", (
            Exit.TEMPFAIL if e.temporary else Exit.UNAVAILABLE)
    if not targets:
        return f"bounce: alias {local_part} expands to nothing", Exit.UNAVAILABLE
    parts, worst = [], Exit.OK
    for target in targets:
        what = aliases.kind(target)
        if what == "remote":
            parts.append(f"forward to <{target}>")
        elif what == "pipe":
            parts.append(f"pipe to {target[1:].strip()}")
        elif what == "file":
            parts.append(f"append to {target}")
        else:
            text, code = mailbox(conf, target.lstrip("\\"))
            parts.append(text)
            worst = max(worst, code)
    prefix = "" if [t.lower() for t in targets] == [local_part.lower()] else (
        f"alias {local_part} -> ")
    return prefix + "; ".join(parts), worst


def mailbox(conf, user):
    """A local user's mailbox, or why there is none."""
    if conf.get("local.users") == "system":
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"bounce: no such user: {user} (5.1.1)", Exit.NOUSER
    return f"local, {route.mailbox_of(conf, user)}", Exit.OK
