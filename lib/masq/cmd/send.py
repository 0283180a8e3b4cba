"""masq-send: the scheduler: deliver what can go now, keep the rest for later.

Usage:
  masq-send [-C FILE] [--once] [--route NAME] [ID...]
  masq-send -h | --help

Options:
  -C FILE       Read this configuration instead of $MASQ_CONF.
  --once        One queue run, then exit (runq): every message that can go is
                tried once, whatever its back-off says.
  --route NAME  Run as if route NAME were online (sendmail -qo NAME).
  -h --help     Show this.

Without --once it is the daemon: woken by masq-queue through the spool's
trigger FIFO after every enqueue, it retries deferred mail on a back-off
schedule, rescans when the online routes change, and stops cleanly on SIGTERM
(a delivery under way is finished first).  IDs limit a run to those messages.
For each message: incoming -> active, masq-route's decision per recipient,
masq-local or masq-smtp for each group of recipients, each outcome recorded
durably in the spool before the next attempt, bounces for permanent failures.
"""
import os
import select
import signal
import sys
import time

from masq import Error, config, log, program, route, spool
from masq.program import Exit

CHILD_ALARM_SECONDS = 7200      # a delivery program hung longer than this is killed
POLL_SECONDS = 60               # the daemon looks at the online routes this often


def main(argv=None):
    args = program.parse(__doc__, argv, usage_code=Exit.USAGE)
    conf = config.load(args["-C"])
    log.setup(conf)
    queue = spool.Spool(conf.path("spool"))
    if args["--once"] or args["ID"]:
        run_once(conf, queue, args["--route"], args["ID"])
        return Exit.OK
    return Daemon(conf, queue, args["--route"]).run()


def run_once(conf, queue, forced=None, ids=()):
    """One queue run: promote incoming, try every active message once.

    Bounces made during the run are delivered in the same run (a few passes
    at most), so that runq leaves nothing behind that it could have sent.
    """
    program.title("masq-send: queue run")
    up = route.online(conf, forced)
    tried = set()
    for _ in range(3):
        promote(conf, queue, ids)
        if ids:
            messages = [m for m in (_find(queue, q) for q in ids) if m]
        else:
            messages = [m for m in queue.messages(("active",)) if m.id not in tried]
        for msg in messages:
            tried.add(msg.id)
            attempt(conf, queue, msg, up)
        if ids or not messages:
            return


def _find(queue, qid):
    """The active message with this id, or None (with a warning)."""
    try:
        msg = queue.find(qid)
    except spool.SpoolError as e:
        log.warn(str(e))
        return None
    return msg if msg.stage == "active" else None


def promote(conf, queue, ids=()):
    """Move accepted messages from incoming/ to active/ (filters go here)."""
    moved = False
    incoming = queue.ids("incoming")
    for qid in ([q for q in ids if q in incoming] if ids else incoming):
        try:
            msg = spool.Message(queue, "incoming", qid)
        except FileNotFoundError:
            continue
        except spool.FormatError as e:
            log.warn(f"{e}; run masq-queue check")
            continue
        if not msg.lock():
            continue
        msg.move("active", sync=False)
        msg.unlock()
        moved = True
    if moved:
        queue.sync("active")


def attempt(conf, queue, msg, up, now=None):
    """Try every pending recipient of one message once; return its next due time.

    Returns None when the message is finished (removed), or when another
    process holds it.
    """
    if not msg.lock():
        return None
    try:
        try:
            msg.reload()
        except (FileNotFoundError, spool.FormatError):
            return None
        program.title(f"masq-send: delivering {msg.id}")
        return _attempt(conf, queue, msg, up, now or time.time())
    finally:
        msg.unlock()


def _attempt(conf, queue, msg, up, now):
    pending = msg.pending()
    groups, outcomes, waiting = {}, [], []
    from_header = _from_header(msg) if _needs_from(conf) else None
    for i in pending:
        d = route.decide(conf, msg.recipients[i], msg.sender, up, from_header)
        if d.kind == "local":
            groups.setdefault(("local", None), []).append(i)
        elif d.kind == "route":
            groups.setdefault(("route", d.route), []).append(i)
        elif d.kind == "wait":
            waiting.append((i, d.reason))
        else:
            outcomes.append(("failed", i, d.reason, "none"))
    for (kind, name), indices in groups.items():
        results = deliver(conf, msg, kind, name, indices)
        relay = name or "local"
        for i, (letter, text) in zip(indices, results, strict=True):
            word = {"K": "done", "D": "failed"}.get(letter, "deferred")
            outcomes.append((word, i, text, relay))
    age = now - msg.arrived
    final = []
    for word, i, text, relay in outcomes:
        if word == "deferred" and age > conf.get("queue.max_age"):
            word, text = "failed", f"gave up after {age / 86400:.1f} days: {text}"
        final.append((word, i, text, relay))
    still_waiting = []
    for i, _reason in waiting:
        if age > conf.get("queue.max_age_offline"):
            final.append(("failed", i, f"no route came online within "
                          f"{age / 86400:.1f} days (4.4.1)", "none"))
        else:
            still_waiting.append(i)
    failed = [(msg.recipients[i], text) for word, i, text, _ in final if word == "failed"]
    if failed:
        _bounce(conf, queue, msg, failed)
    for word, i, text, relay in final:
        status = {"done": "sent", "failed": "bounced", "deferred": "deferred"}[word]
        log.event(msg.id, text, to=f"<{msg.recipients[i]}>", relay=relay,
                  delay=f"{now - msg.arrived:.2f}", status=status)
    left = [o for o in final if o[0] == "deferred"]
    if not left and not still_waiting:
        msg.remove()                # every recipient is done or bounced
        return None
    if final:
        msg.record([(word, i, text) for word, i, text, _ in final])
    if left:
        tries = max(msg.attempts.get(i, 0) for _, i, _, _ in left) + 1
        return now + backoff(conf, tries)
    return now + conf.get("queue.interval")


def backoff(conf, tries):
    """Seconds to wait after the n-th failed attempt: doubling, capped."""
    return min(conf.get("queue.retry_min") * 2 ** (tries - 1), conf.get("queue.retry_max"))


def _bounce(conf, queue, msg, failed):
    from masq import bounce
    qid = bounce.send(conf, queue, msg, failed)
    if qid:
        log.event(msg.id, f"{len(failed)} recipient(s) failed", bounce=qid, status="bounce")
    else:
        log.event(msg.id, "a bounce failed: not bounced again (RFC 5321 6.1)",
                  status="dropped")


def _needs_from(conf):
    return any(t.get("allowed_from_headers") or t.get("denied_from_headers")
               for _, t in conf.routes)


def _from_header(msg):
    """The address in the message's From: header, or "" (read bounded)."""
    from masq import bounce, address
    for line in bounce.original_headers(msg).decode("utf-8", "replace").split("\n"):
        if line[:5].lower() == "from:":
            text = line[5:]
            if "<" in text and ">" in text:
                text = text[text.index("<") + 1:text.index(">")]
            return address.strip_brackets(text)
    return ""


def deliver(conf, msg, kind, route_name, indices):
    """Run the delivery program for some recipients; [(letter, text)] per recipient.

    masq-smtp's code is imported here once and run in a forked child, with
    its argv, the message on fd 0 and its answer on fd 1: the isolation of an
    exec without the start of a new Python each time (DESIGN.md).

    masq-local's deliver() runs in this process: in single-user mode it runs
    as the same user with the same configuration, and a fork per message
    would cost more than the delivery itself (3 ms against 1.2 ms, measured:
    bench/README.md).  Any failure inside it is a temporary failure.
    """
    rcpts = [msg.recipients[i] for i in indices]
    sender = msg.sender
    if kind == "local":
        return _deliver_local(conf, msg, sender, rcpts)
    table = route.route_table(conf, route_name)
    sender = route.rewrite(table, sender) if sender else sender
    argv = ["-C", conf.file, "--id", msg.id, "--route", route_name, "--", sender, *rcpts]
    from masq.cmd import smtp
    status, out = _run_child(lambda: program.run(smtp.main, argv, Exit.TEMPORARY), msg)
    return parse_results(out, len(rcpts), status)


def _deliver_local(conf, msg, sender, rcpts):
    from masq.cmd import local
    try:
        return local.deliver(conf, sender, rcpts, msg.open_data, msg.id)
    except Error as e:
        letter = "D" if e.temporary is False else "Z"
        return [(letter, str(e))] * len(rcpts)
    except Exception as e:      # noqa: BLE001 -- a bug must defer mail, not lose it
        import traceback
        traceback.print_exc()
        return [("Z", f"internal error in local delivery: {e!r}")] * len(rcpts)


def _run_child(job, msg=None):
    """Fork, run job() with msg's data on fd 0 (if given); return (exit code, stdout)."""
    in_r, in_w = os.pipe() if msg else (None, None)
    out_r, out_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = Exit.TEMPORARY
        try:
            os.close(out_r)
            if msg:
                os.close(in_w)
                os.dup2(in_r, 0)
                os.close(in_r)
            os.dup2(out_w, 1)
            os.close(out_w)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            signal.alarm(CHILD_ALARM_SECONDS)
            sys.stdin = open(0, "r", closefd=False)
            sys.stdout = open(1, "w", closefd=False)
            code = program.run(lambda argv: job(), temporary_code=Exit.TEMPORARY)
            sys.stdout.flush()
        finally:
            os._exit(code)
    os.close(out_w)
    if msg:
        os.close(in_r)
        try:
            with msg.open_data() as data:
                while chunk := data.read(65536):
                    _write_all(in_w, chunk)
        except BrokenPipeError:
            pass                    # the program stopped reading: its answer says why
        finally:
            os.close(in_w)
    chunks = []
    while chunk := os.read(out_r, 65536):
        chunks.append(chunk)
    os.close(out_r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def parse_results(out, count, status):
    """One (letter, text) per recipient; a missing answer is temporary."""
    results = []
    for raw in out.decode("utf-8", "replace").splitlines():
        letter, _, text = raw.partition(" ")
        if letter in ("K", "Z", "D") and len(results) < count:
            results.append((letter, text.strip()))
    if len(results) < count:
        temporary, why = program.classify(status)
        if status == Exit.OK:
            why = "the delivery program gave no answer for this recipient"
        letter = "D" if temporary is False and status != Exit.OK else "Z"
        results += [(letter, f"delivery failed: {why}")] * (count - len(results))
    return results


class Daemon:
    """The queue runner that stays: trigger FIFO, back-off schedule, SIGTERM."""

    def __init__(self, conf, queue, forced=None):
        self.conf, self.queue, self.forced = conf, queue, forced
        self.stopping = False
        self.due = {}               # qid -> when to try it next
        self.up = None              # the routes up at the last look

    def run(self):
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        fifo = self.queue.folder("trigger")
        try:
            rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            # our own writer: the FIFO never reads EOF, and a signal can wake select
            self.wfd = wfd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            raise Error(f"unable to open {fifo}: {e.strerror}; "
                        "make the spool with masq-setup") from None
        log.line(f"daemon started on {self.queue.path}")
        self.full_scan()
        while not self.stopping:
            up = route.online(self.conf, self.forced)
            if up != self.up:
                self.up = up
                self.full_scan()
            wake = min(self.due.values(), default=time.time() + POLL_SECONDS)
            timeout = max(0.0, min(wake - time.time(), POLL_SECONDS))
            program.title("masq-send: idle, "
                          f"{len(self.due)} message{'s' if len(self.due) != 1 else ''} waiting")
            try:
                ready, _, _ = select.select([rfd], [], [], timeout)
            except InterruptedError:
                continue
            if self.stopping:
                break
            if ready:
                _drain(rfd)
                self.new_mail()
            self.run_due()
        os.close(rfd)
        os.close(wfd)
        log.line("daemon stopped")
        return Exit.OK

    def _stop(self, signum, frame):
        self.stopping = True
        try:
            os.write(self.wfd, b"\0")     # select() is restarted after a handler (PEP 475)
        except OSError:
            pass

    def full_scan(self):
        """Every active message becomes due now (after start, or a route change)."""
        promote(self.conf, self.queue)
        now = time.time()
        self.due = {}
        for qid in self.queue.ids("active"):
            self.due[qid] = now
        self.run_due()

    def new_mail(self):
        ids = self.queue.ids("incoming")
        promote(self.conf, self.queue, ids)
        now = time.time()
        for qid in ids:
            self.due[qid] = now

    def run_due(self):
        now = time.time()
        for qid in sorted(q for q, when in self.due.items() if when <= now):
            if self.stopping:
                return
            try:
                msg = spool.Message(self.queue, "active", qid)
            except (FileNotFoundError, spool.FormatError):
                self.due.pop(qid, None)
                continue
            try:
                nxt = attempt(self.conf, self.queue, msg, self.up or set())
            except Error as e:
                log.warn(f"{qid}: {e}")
                nxt = time.time() + self.conf.get("queue.retry_min")
            if nxt is None:
                self.due.pop(qid, None)
            else:
                self.due[qid] = nxt


def _drain(fd):
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
