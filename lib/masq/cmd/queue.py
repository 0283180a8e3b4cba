"""masq-queue: put one message into the spool, and show or change the queue.

Usage:
  masq-queue [-C FILE]
  masq-queue list [-C FILE]
  masq-queue show [-C FILE] ID
  masq-queue remove [-C FILE] ID...
  masq-queue hold [-C FILE] ID...
  masq-queue release [-C FILE] ID...
  masq-queue check [-C FILE] [--repair]
  masq-queue greylist [-C FILE] [--clear] [PATTERN]
  masq-queue -h | --help

Options:
  -C FILE   Read this configuration instead of $MASQ_CONF.
  --repair  Remove orphans and set aside unreadable files.
  --clear   Forget the greylist's triplets that PATTERN matches, or all.
  -h --help  Show this.

Without a command: the message comes on fd 0, the envelope on fd 1
(F<sender>\\0 T<rcpt>\\0 ... \\0), trace data in MASQ_PROTO, MASQ_CLIENT,
MASQ_CLIENT_NAME, MASQ_HELO, MASQ_AUTH, MASQ_USER, MASQ_CERT, MASQ_TRUSTED
and MASQ_FOR.  Exit 0 only once the message is durable.  Exit codes: masq-queue(8).
"""
import os
import pwd
import sys

from masq import Error, address, config, envelope, handoff, log, program, spool
from masq.program import Exit

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (len(argv) == 2 and argv[0] == "-C"):
        # the chain's path: no docopt, it costs more than the rest of the work
        return enqueue_from_fds(argv[1] if argv else None)
    args = program.parse(__doc__, argv, usage_code=Exit.USAGE)
    if args["-C"] is None and not any(args[c] for c in (
            "list", "show", "remove", "hold", "release", "check", "greylist")):
        return enqueue_from_fds(None)
    conf = config.load(args["-C"])
    queue = spool.Spool(conf.path("spool"))
    if args["list"]:
        from masq import control    # it loads socket: the enqueue path must not pay for that
        sys.stdout.writelines(control.describe(queue, conf))
        return Exit.OK
    if args["show"]:
        return show(conf, queue, args["ID"][0])
    if args["greylist"]:
        return greylist(conf, args["PATTERN"], args["--clear"])
    if args["check"]:
        problems = list(spool.check(queue, repair=args["--repair"]))
        for line in problems:
            print(line)
        if problems and args["--repair"]:
            problems = list(spool.check(queue))     # what repair could not mend
            for line in problems:
                print(f"still: {line}")
        return Exit.DATAERR if problems else Exit.OK
    return change(conf, queue, args)


def enqueue_from_fds(conf_file):
    """The chain's job: message on fd 0, envelope on fd 1, then durable."""
    conf = config.load(conf_file)
    trace = {word: os.environ[var] for word, var in handoff.TRACE_ENV.items()
             if os.environ.get(var)}
    with open(0, "rb", buffering=0, closefd=False) as stream:
        handoff.enqueue(conf, stream, lambda: checked(envelope.read(1)), trace)
    return Exit.OK


def checked(env):
    """The envelope, once each address parses (address.check): 65 otherwise, nothing queued."""
    try:
        address.check(env.sender, allow_empty=True, need_domain=False)
        for rcpt in env.recipients:
            address.check(rcpt, need_domain=False)
    except address.AddressError as e:
        raise Error(address.refused(e), code=Exit.DATAERR, temporary=False) from None
    return env


def show(conf, queue, qid):
    """Print a message's envelope, state (each recipient's as mailq says it) and data."""
    from masq import control    # as for list
    msg = queue.find(qid)
    out = sys.stdout.buffer
    out.write(f"id {msg.id}\nstage {msg.stage}\nsender {msg.sender}\n".encode())
    for i, rcpt in enumerate(msg.recipients):
        _, _, text = msg.state.get(i, ("", 0, ""))
        why = control.waiting(msg, i, conf)
        said = f"done: {text}" if why is None else why
        out.write(f"rcpt {rcpt} ({said})\n".encode("utf-8", "surrogateescape"))
    for word, value in msg.trace.items():
        out.write(f"{word} {value}\n".encode())
    out.write(b"\n")
    with msg.open_data() as data:
        while chunk := data.read(65536):
            out.write(chunk)
    return Exit.OK


def greylist(conf, pattern, clear):
    """List the greylist's triplets (those PATTERN matches), or forget them."""
    from masq import greylist, privilege
    path = conf.path("spool")
    # root, in system mode: become the spool's owner, so that the sqlite files
    # made now (-wal, -shm) are the masq user's, whose masq-smtpd must write them
    privilege.as_spool_owner(path)
    table = greylist.Greylist(path)
    try:
        if clear:
            count = table.clear(pattern)
            log.setup(conf)
            log.line(f"greylist: {count} triplet(s) cleared by {_who()}"
                     + (f" matching {pattern}" if pattern else ""))
            print(f"{count} triplet(s) cleared")
        else:
            rows = [t for t in table.triplets() if not pattern or greylist.matches(t, pattern)]
            sys.stdout.writelines(greylist.describe(rows))
    finally:
        table.close()
    return Exit.OK


def change(conf, queue, args):
    """remove, hold, release: each ID in turn; the exit code says if any failed."""
    log.setup(conf)
    status = Exit.OK
    for qid in args["ID"]:
        try:
            msg = queue.find(qid)
            if not msg.lock():
                raise Error(f"{qid}: being delivered now; try again in a moment",
                            code=Exit.TEMPFAIL)
            if args["remove"]:
                msg.remove()
                log.event(qid, "removed by " + _who(), status="removed")
            elif args["hold"]:
                msg.note_held(f"held by the admin ({_who()})")
                msg.move("hold")
                log.event(qid, "held by " + _who(), status="hold")
            elif msg.stage == "hold":
                msg.move("incoming")
                log.event(qid, "released by " + _who(), status="released")
                queue.trigger()
            msg.unlock()
        except Error as e:
            program._say(f"{program.name()}: {e}")
            status = e.code
    return status


def _who():
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"
