"""masq-fetch: fetch mail from POP3 accounts into the queue.

Usage:
  masq-fetch [-C FILE] [-v] [--route NAME | --all]
  masq-fetch -h | --help

Options:
  -C FILE       Read this configuration instead of $MASQ_CONF.
  --route NAME  Fetch for the accounts of route NAME, up or not.
  --all         Fetch for the accounts of every route, up or not.
  -v            One line on stderr per message fetched or left.
  -h --help     Show this.

Without --route or --all: the accounts ([[route.NAME.fetch]]) of the
routes that are up.  Each message is queued as masq-queue queues (or by
$MASQ_QUEUE) under a Received line naming the server, and is deleted on
the server only once it is durable (never with keep).  Envelope, unique
ids and exit codes: masq-fetch(8).
"""
import io
import sys

from masq import (Error, address, config, handoff, headers, log, message, pop3, program,
                  route, spool)
from masq.envelope import Envelope, check
from masq.outcome import one_line
from masq.program import Exit

# where the server's MTA wrote the envelope recipient, most telling first; only
# those above the message's first Received: field count (the ISP's, at delivery)
ENVELOPE_FIELDS = ("envelope-to", "x-envelope-to", "x-original-to", "delivered-to")
HEAD_BYTES = 65536              # the header section read for the envelope, at most
MAX_RECIPIENTS = 100            # a message for more stays on the server


def main(argv=None):
    args = program.parse(__doc__, argv, usage_code=Exit.USAGE)
    conf = config.load(args["-C"])
    # root (sendmail -g in system mode): write the spool as its owner, the
    # masq user, from here on; password files are read after this
    from masq import privilege
    privilege.as_spool_owner(conf.path("spool"))
    log.setup(conf)
    names = [name for name, table in conf.routes if table.get("fetch")]
    if args["--route"]:
        if args["--route"] not in dict(conf.routes):
            raise Error(f"no route named {args['--route']} in {conf.file}", code=Exit.USAGE,
                        temporary=False)
        names = [args["--route"]]
    elif not args["--all"]:
        up = route.online(conf)
        names = [name for name in names if name in up]
    say = (lambda text: program._say(f"{program.name()}: {one_line(text)}")) if args["-v"] \
        else (lambda text: None)
    queue = spool.Spool(conf.path("spool"))
    codes, queued = [Exit.OK], []
    for name in names:
        try:
            accounts = pop3.accounts(conf, name)
        except Error as e:
            codes.append(_failed(f"route {name}", e))
            continue
        for account in accounts:
            program.title(f"masq-fetch: {name} {account.label}")
            try:
                fetch(conf, queue, account, say, queued)
            except Error as e:
                codes.append(_failed(f"route {name}, {account.label}", e))
    # no daemon woke for what we queued (nor one we could tell of): deliver it now
    if queued and not queue.trigger() and handoff.may_run_queue(conf):
        handoff.background(["-C", conf.file, "--once"])
    # the worst first: 78 configuration, 77 login refused, 75 try again
    return max(codes)


def _failed(where, error):
    """Say and log why an account (or a route's accounts) could not be fetched."""
    where, text = one_line(where), one_line(str(error))     # server text: one printable line
    program._say(f"{program.name()}: fatal: {where}: {text}")
    log.line(f"fetch {where}: failed: {text}")
    return error.code


def fetch(conf, queue, account, say, queued):
    """Fetch one account's new messages into the queue, each one's queue id (None
    behind $MASQ_QUEUE) appended to `queued` as it is queued.

    Per message: RETR, queue (durable), its unique id appended to the spool's
    record (fsynced), then DELE unless keep.  A message that cannot be queued
    stays on the server and the next one is tried; a lost connection, or a
    server that sends more than we take (pop3.TooMuch), ends the account
    (POP3Error) without QUIT: nothing deleted that is not queued.  A message
    without a usable unique id (pop3.Session.uidl) is fetched by number and
    deleted only once read in this session; with keep it is left alone.
    """
    where = f"route {account.route}, {account.label}"
    session = pop3.Session(account)
    store = None
    try:
        session.login()
        sizes = session.list()
        uids = session.uidl()
        if uids is None and account.keep:
            raise pop3.POP3Error(f"{account.label}: the server has no UIDL: keep = true "
                                 "would fetch every message at every run", code=Exit.CONFIG)
        if uids is not None:
            store = pop3.UIDStore(queue.path, account)
            store.prune(uids.values())
        limits = [n for n in (account.max_size, conf.get("max_size")) if n]
        limit = min(limits) if limits else None
        count = seen = left = 0
        for number in sorted(sizes):
            uid = uids.get(number) if uids else None
            if uids is not None and uid is None and account.keep:
                left += 1
                _left(where, number, uid, "no unique id that UIDL gives it alone (with keep "
                      "it would be fetched at every run)", say)
                continue
            if store is not None and uid in store.ids:
                seen += 1
                if not account.keep:    # queued by a session whose QUIT was lost
                    session.dele(number)
                continue
            if account.max_count is not None and count >= account.max_count:
                left += 1
                continue
            if limit is not None and sizes[number] > limit:
                left += 1
                _left(where, number, uid, f"{sizes[number]} bytes, more than the limit "
                      f"of {limit}", say)
                continue
            qid = fetch_one(conf, queue, session, account, number, uid, where, say, limit)
            if qid is False:
                left += 1
                continue
            count += 1
            queued.append(qid)
            if store is not None and uid is not None:
                store.add(uid)
            if not account.keep:
                session.dele(number)
        session.quit()
    finally:
        if store is not None:
            store.close()
        session.close()
    log.line(f"fetch {where}: {count} fetched, {left} left, {seen} fetched before"
             + (" (kept)" if account.keep else ""))


def fetch_one(conf, queue, session, account, number, uid, where, say, limit=None):
    """RETR one message and queue it; its queue id (None behind $MASQ_QUEUE), or
    False when it cannot be queued (logged; the message stays on the server).
    The rest of a message not queued is read and dropped, up to `limit` bytes
    (pop3.TooMuch past it) and within the session's time."""
    try:
        stream = session.retr(number, limit)
    except pop3.ConnectionLost:
        raise
    except pop3.POP3Error as e:         # -ERR: this message only (gone, locked...)
        _left(where, number, uid, str(e), say)
        return False
    head = b""
    while b"\n\n" not in head.replace(b"\r\n", b"\n") and len(head) < HEAD_BYTES:
        data = stream.read(HEAD_BYTES - len(head))
        if not data:
            break
        head += data
    trace = {"proto": "pop3s" if account.tls != "none" else "pop3",
             "helo": account.host, "client_name": account.host, "client": session.address}
    try:
        section = headers.scan(io.BytesIO(head))
        env = envelope(conf, account, section)
        if len(env.recipients) == 1:
            trace["for"] = env.recipients[0]
        if section.complete and section.tail and section.has("return-path"):
            # the sender is in the envelope now; delivery writes it again (RFC 5321 4.4)
            head = b"".join(raw for name, raw in section.fields if name != "return-path") \
                + head[section.size:]
        qid = handoff.submit(conf, message.Replay(head, stream), env, trace, queue=queue)
    except pop3.ConnectionLost:
        raise                   # the session is gone: nothing more can be done with it
    except Error as e:
        stream.drain()
        _left(where, number, uid, str(e), say)
        return False
    stream.drain()              # a $MASQ_QUEUE that stopped reading and said yes
    say(f"{where}: message {number}" + (f" ({uid})" if uid else "")
        + f" queued{' as ' + qid if qid else ''} for " + ", ".join(env.recipients))
    return qid


def _left(where, number, uid, why, say):
    text = one_line(f"{where}: message {number}" + (f" ({uid})" if uid else "")
                    + f" left on the server: {why}")
    log.line(f"fetch {text}")
    say(text)


def envelope(conf, account, section):
    """The envelope of a fetched message (masq-fetch(8)).

    Only the fields above the first Received: count: those the server's MTA
    added at delivery (whoever mails the account writes the rest).  Sender:
    the Return-Path there, else the null sender.  Recipients: deliver_to;
    else the addresses in local domains of the first of ENVELOPE_FIELDS found
    there, at most MAX_RECIPIENTS.  Never To: or Cc:.
    """
    top = []
    for field in section.fields:
        if field[0] == "received":
            break
        top.append(field)
    else:
        top = []            # no Received: line: nothing says the server wrote it
    top = headers.Section(top, b"")
    sender = top.address("return-path")
    try:
        check(sender)
    except Error:
        sender = ""
    if account.deliver_to:
        return Envelope(sender, [address.qualify(account.deliver_to, conf.hostname)])
    names = [n for n in ENVELOPE_FIELDS if top.has(n)][:1]
    if not names:
        raise Error("no " + ", ".join(n.title() for n in ENVELOPE_FIELDS)
                    + " above its first Received: (the server's own): set deliver_to",
                    code=Exit.DATAERR, temporary=False)
    local_domains = conf.local_domains
    found = []
    try:
        found = [a for a in headers.addresses(top.values(names[0])[0])
                 if address.is_local(a, local_domains)]
    except headers.HeaderError:
        pass
    found = list(dict.fromkeys(found))
    if not found:
        raise Error(f"no address in a local domain in its {names[0].title()}: "
                    "set deliver_to", code=Exit.DATAERR, temporary=False)
    if len(found) > MAX_RECIPIENTS:
        raise Error(f"more than {MAX_RECIPIENTS} recipients in its {names[0].title()}",
                    code=Exit.DATAERR, temporary=False)
    return Envelope(sender, found)


if __name__ == "__main__":
    sys.exit(program.run(main))
