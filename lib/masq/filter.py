"""The filter step between incoming/ and active/ ([queue] filters), and promote().

promote() is how a message gets from incoming/ to active/: under its
lock, through the filters, if any.

Each filter is a command line, run without a shell (split as a shell
would), with the message on stdin and SENDER, RECIPIENTS (space-separated),
QUEUE_ID, MASQ_CLIENT_IP and MASQ_AUTH_USER (the spool's trace records
client and auth; empty when absent) in its environment.  Its exit status
decides:

    0                   pass; if it wrote anything on stdout, that is the
                        message from now on (a filter that adds headers)
    100                 refused: the message fails for every recipient, the
                        filter's last line on stderr the reason; it is
                        bounced as any permanent failure (masq.attempt:
                        mail from outside is dropped or held instead,
                        queue.outside_failures)
    99                  dropped: logged, the message removed, nobody told
    75, 111, 70-74, 78  temporary: the message stays in incoming/ and is
    or a signal         filtered again at the next queue run
    any other code      the message goes on hold: nothing is lost or bounced;
                        `masq-queue release` or `remove` decides (spamc -E
                        exits 1 for spam)

The codes but 99 and 100 are program.classify's, an unknown one
permanent as for an MDA.
A filter that runs longer than FILTER_TIMEOUT_SECONDS is killed (temporary).
The message goes to the filter through a temporary copy, so memory stays
bounded whatever its size.
"""
import os

from masq import log, program, spool

FILTER_TIMEOUT_SECONDS = 600
REFUSE = 100        # qmail's permanent failure: bounce
DROP = 99           # qmail-queue's "drop silently" in a $QMAILQUEUE filter (qmail-qfilter)


def promote(conf, queue, ids=()):
    """Run the filters, then move accepted messages from incoming/ to active/."""
    moved = False
    filters = conf.get("queue.filters")
    incoming = queue.ids("incoming")
    todo = [q for q in ids if q in incoming] if ids else incoming
    for qid in todo:                    # grows by the bounces filters cause
        try:
            msg = spool.Message(queue, "incoming", qid)
        except FileNotFoundError:
            continue
        except spool.FormatError as e:
            log.warn(f"{e}; run masq-queue check")
            continue
        if not msg.lock():
            continue
        try:
            verdict, why = "pass", ""
            if filters:
                program.title(f"masq-send: filtering {msg.id}")
                verdict, why = run(conf, msg)
            if verdict == "pass":
                msg.move("active", sync=False)
                moved = True
            elif verdict == "hold":
                _hold(msg, why)
            elif verdict == "drop":
                msg.remove()
                log.event(msg.id, why, status="dropped")
            elif verdict == "refuse":
                todo += _refuse(conf, queue, msg, why)
            else:
                log.event(msg.id, why, status="deferred")
        except spool.SpoolError as e:
            log.warn(str(e))
        finally:
            msg.unlock()
    if moved:
        queue.sync("active")


def _hold(msg, why):
    msg.note_held(f"on hold by {why}")      # why: "filter CMD: exit N: ..."
    msg.move("hold")
    log.event(msg.id, why, status="hold")


def _refuse(conf, queue, msg, reason):
    """A filter's exit 100: every recipient fails; the ids of the bounce queued."""
    from masq import attempt        # only a refusal pays for it
    quiet = attempt.quiet_failure(conf, msg, reason)
    if quiet == "hold":
        _hold(msg, reason)
        return []
    qid = None
    if quiet is None:           # queued first: a failure leaves the message where it is
        qid = attempt.queue_report(conf, queue, msg, [(r, reason) for r in msg.recipients])
    msg.remove()
    if qid:
        log.event(msg.id, reason, bounce=qid, status="bounced")
        return [qid]
    why = "from outside" if quiet else "from <> (RFC 5321 6.1)"
    log.event(msg.id, f"{reason}: {why}, not bounced", status="dropped")
    return []


def run(conf, msg):
    """Run every filter on msg (locked); return ("pass"|"defer"|"hold"|"drop"|"refuse", why)."""
    import shlex           # only with filters: a queue run without them must not
    import subprocess      # pay for importing these (see masq.child)
    import tempfile
    for command in conf.get("queue.filters") or []:
        env = dict(os.environ, SENDER=msg.sender, RECIPIENTS=" ".join(msg.recipients),
                   QUEUE_ID=msg.id, MASQ_CLIENT_IP=msg.trace.get("client", ""),
                   MASQ_AUTH_USER=msg.trace.get("auth", ""))
        tmp = msg.spool.folder("tmp")
        with tempfile.TemporaryFile(dir=tmp) as copy, tempfile.TemporaryFile(dir=tmp) as out:
            with msg.open_data() as data:
                while chunk := data.read(65536):
                    copy.write(chunk)
            copy.seek(0)
            try:
                p = subprocess.run(shlex.split(command), stdin=copy, stdout=out,
                                   stderr=subprocess.PIPE, env=env,
                                   timeout=FILTER_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                return "defer", f"filter {command} ran longer than {FILTER_TIMEOUT_SECONDS} s"
            except (OSError, ValueError) as e:
                return "defer", f"filter {command} cannot run: {e}"
            said = p.stderr.decode("utf-8", "replace").strip().splitlines()
            last = said[-1].strip() if said else ""
            if p.returncode == REFUSE:
                from masq import bounce
                reason = last or f"refused by the filter {command}"
                if bounce.status_code(reason, "") == "":
                    reason += " (5.7.1)"        # a filter's refusal is the site's policy
                return "refuse", reason
            why = f"filter {command}: exit {p.returncode}" + (f": {last}" if last else "")
            if p.returncode == DROP:
                return "drop", why
            temporary, _ = program.classify(p.returncode, unknown_temporary=False)
            if temporary:
                return "defer", why
            if temporary is False:
                return "hold", why
            if out.tell():
                out.seek(0)
                msg.replace_data(out)
    return "pass", ""
