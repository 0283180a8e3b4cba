"""masq-route: say which way mail to each address would go, without sending.

Usage:
  masq-route [-C FILE] [--from SENDER] [--route NAME] ADDRESS...
  masq-route -h | --help

Options:
  -C FILE        Read this configuration instead of $MASQ_CONF.
  --from SENDER  Decide for mail from this sender [default: ].
  --route NAME   Decide as if route NAME were online (sendmail -qo NAME).
  -h --help      Show this.

One line per address on stdout: local delivery (after aliases), a route,
waiting for a route to come online, or bounce with the reason.  Exit 0 when
every address has a way; 65 if one does not parse; 67 if a local user is
unknown; 69 if one can never be delivered.
"""
import pwd

from masq import Error, address, config, program, route
from masq.program import Exit


def main(argv=None):
    args = program.parse(__doc__, argv, usage_code=Exit.USAGE)
    conf = config.load(args["-C"])
    up = route.online(conf, forced=args["--route"])
    sender = address.strip_brackets(args["--from"] or "")
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
    except Error as e:
        return f"bounce: does not parse: {e}", Exit.DATAERR
    decision = route.decide(conf, rcpt, sender, up)
    if decision.kind == "local":
        return local(conf, address.split(rcpt)[0], set())
    if decision.kind == "route":
        table = route.route_table(conf, decision.route)
        line = f"route {decision.route}, {route.describe_route(table)}"
        new_sender = route.rewrite(table, sender) if sender else sender
        if new_sender != sender:
            line += f", sender rewritten to <{new_sender}>"
        return line, Exit.OK
    if decision.kind == "wait":
        return f"wait: {decision.reason}", Exit.OK
    return f"bounce: {decision.reason}", Exit.UNAVAILABLE


def local(conf, local_part, seen):
    """Follow aliases to mailboxes, the way masq-local will."""
    targets = _aliases(conf).get(local_part.lower())
    if targets and local_part.lower() not in seen:
        seen = seen | {local_part.lower()}
        parts, worst = [], Exit.OK
        for target in targets:
            if target.startswith(("|", "/", ":include:")) or "@" in target:
                parts.append(target)
                continue
            text, code = local(conf, target.lstrip("\\"), seen)
            parts.append(text)
            worst = max(worst, code)
        return f"alias of {local_part} -> " + ", ".join(parts), worst
    if conf.get("local.users") == "system":
        try:
            pwd.getpwnam(local_part)
        except KeyError:
            return f"bounce: no such user: {local_part} (5.1.1)", Exit.NOUSER
    return f"local, {route.mailbox_of(conf, local_part)}", Exit.OK


_alias_cache = {}


def _aliases(conf):
    """{name: [targets]} from the aliases file, via masq.aliases."""
    path = conf.path("aliases")
    if path not in _alias_cache:
        from masq import aliases
        try:
            table = aliases.load(path)
        except FileNotFoundError:
            table = None
        _alias_cache[path] = _Lookup(table)
    return _alias_cache[path]


class _Lookup:
    def __init__(self, table):
        self.table = table

    def get(self, name):
        if self.table is None:
            return None
        targets = self.table.expand(name)
        return targets if targets and targets != [name] else None
