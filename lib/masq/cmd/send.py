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
local delivery in-process, SMTP by route in up to queue.parallel threads
with one connection per destination, each outcome recorded durably in the
spool before the next attempt, bounces for permanent failures.
"""
import os
import select
import signal
import time

from masq import Error, config, headers, local, log, program, route, spool
from masq.program import Exit

POLL_SECONDS = 60               # the daemon looks at the online routes this often
BATCH_MESSAGES = 256            # messages held locked at once while routes deliver them
LOST_SESSIONS_LIMIT = 2         # connections lost in a row before a destination is down
BUSY = object()                 # Runner.plan(): another process holds the message


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
    runner = Runner(conf, queue, up, runq=True)
    try:
        for _ in range(3):
            promote(conf, queue, ids)
            if ids:
                messages = [m for m in (_find(queue, q) for q in ids) if m]
            else:
                messages = [m for m in queue.messages(("active",)) if m.id not in tried]
            tried.update(m.id for m in messages)
            del _created[:]
            runner.run(messages)
            if not messages:
                return
            if ids:                 # a run for some ids also sends the bounces they made
                ids = list(_created)
                if not ids:
                    return
    finally:
        runner.close()


def _find(queue, qid):
    """The active message with this id, or None (with a warning)."""
    try:
        msg = queue.find(qid)
    except spool.SpoolError as e:
        log.warn(str(e))
        return None
    return msg if msg.stage == "active" else None


def promote(conf, queue, ids=()):
    """Run the filters, then move accepted messages from incoming/ to active/."""
    moved = False
    filters = conf.get("queue.filters")
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
        try:
            verdict, why = "pass", ""
            if filters:
                from masq import filter
                program.title(f"masq-send: filtering {msg.id}")
                verdict, why = filter.run(conf, msg)
            if verdict == "pass":
                msg.move("active", sync=False)
                moved = True
            elif verdict == "hold":
                msg.move("hold")
                log.event(msg.id, why, status="hold")
            else:
                log.event(msg.id, why, status="deferred")
        except spool.SpoolError as e:
            log.warn(str(e))
        finally:
            msg.unlock()
    if moved:
        queue.sync("active")


class Plan:
    """One attempt at one message: its decisions, then its outcomes."""

    def __init__(self, msg, now):
        self.msg, self.now = msg, now
        self.outcomes = []          # (word, index, text, relay)
        self.waiting = []           # (index, reason)
        self.remote = {}            # destination -> [index]
        self.open = 0               # remote groups not answered yet


class Runner:
    """The deliveries of one queue run.

    Local recipients are delivered in this thread, as masq-local would
    (bench/README.md: a fork per message would cost more than the delivery).
    Recipients for a route are grouped by destination -- (route, None) for a
    smarthost or wrapper, (route, domain) for direct MX delivery -- and each
    destination's messages go, in order, over one connection made by
    masq.smtpclient, in one of up to queue.parallel threads.  Connections
    stay open until close(), at the end of the run.  Every outcome is
    recorded in the spool by this thread, under the message's lock, as soon
    as the message's last group has its answer.
    """

    def __init__(self, conf, queue, up, runq=False, stopping=None):
        self.conf, self.queue, self.up, self.runq = conf, queue, up, runq
        self.stopping = stopping or (lambda: False)
        self.sessions = {}          # destination -> an idle smtpclient.Session
        self.down = {}              # destination -> (since, letter, text)
        self.lost = {}              # destination -> connections lost in a row
        self.noted = {}             # destination -> (status, text) to store
        self.routes = {}            # name -> smtpclient.Route, or the Error it raised
        self.parallel = max(1, int(conf.get("queue.parallel") or 1))
        self.needs_from = _needs_from(conf)
        self.hosts = None           # the HostStat, opened on first use
        self.aborted = False        # deliver_remote failed: workers stop taking messages

    # -- the run ----------------------------------------------------------
    def run(self, messages):
        """Try each message once; {qid: when it is due next, or None}."""
        due, held = {}, []
        for msg in messages:
            if self.stopping():
                break
            try:
                plan = self.plan(msg)
                if plan is BUSY:        # another process has it now: look again later
                    due[msg.id] = time.time() + POLL_SECONDS
                elif plan is None:      # gone: delivered or removed meanwhile
                    due[msg.id] = None
                elif plan.remote:
                    held.append(plan)
                else:
                    due[msg.id] = self.finish(plan)
            except Error as e:
                log.warn(f"{msg.id}: {e}")
                due[msg.id] = time.time() + self.conf.get("queue.retry_min")
            if len(held) >= BATCH_MESSAGES:
                self.deliver_remote(held, due)
                held = []
        if held:
            self.deliver_remote(held, due)
        return due

    def plan(self, msg):
        """Lock, read and decide one message; local recipients are delivered now.

        Returns BUSY when another process holds the message, None when it is gone.
        """
        if not msg.lock():
            return BUSY if os.path.exists(msg.path) else None
        try:
            msg.reload()
        except (FileNotFoundError, spool.FormatError):
            msg.unlock()
            return None
        try:
            program.title(f"masq-send: delivering {msg.id}")
            plan = Plan(msg, time.time())
            from_header = _from_header(msg) if self.needs_from else None
            local = []
            for i in msg.pending():
                rcpt = msg.recipients[i]
                d = route.decide(self.conf, rcpt, msg.sender, self.up, from_header, msg.size)
                if d.kind == "local":
                    local.append(i)
                elif d.kind == "route":
                    plan.remote.setdefault(self.destination(d.route, rcpt), []).append(i)
                elif d.kind == "wait":
                    plan.waiting.append((i, d.reason))
                else:
                    plan.outcomes.append(("failed", i, d.reason, "none"))
            if local:
                results = _deliver_local(self.conf, msg, msg.sender,
                                         [msg.recipients[i] for i in local])
                plan.outcomes += _outcomes(local, results, "local")
            return plan
        except BaseException:
            msg.unlock()
            raise

    def destination(self, name, rcpt):
        """(route, None) for a smarthost or wrapper, (route, domain) for MX delivery."""
        table = route.route_table(self.conf, name)
        if table.get("host") or table.get("wrapper"):
            return (name, None)
        from masq import address
        return (name, address.domain_of(rcpt).lower())

    def finish(self, plan):
        """Record the outcomes of one attempt, bounce, unlock; the next due time."""
        try:
            return _finish(self.conf, self.queue, plan)
        finally:
            plan.msg.unlock()

    # -- routes -----------------------------------------------------------
    def deliver_remote(self, plans, due):
        """Send the route groups of these plans, finishing each message as it is done."""
        import queue as queues
        import threading
        jobs = {}
        for plan in plans:
            plan.open = len(plan.remote)
            for dest, indices in plan.remote.items():
                jobs.setdefault(dest, []).append((plan, indices))
        work, answers, threads = queues.SimpleQueue(), queues.SimpleQueue(), []

        def take(answer):
            """Apply one worker's answer; False when that worker has ended."""
            if answer is None:
                return False
            if answer[0] == "host":
                self.note_host(*answer[1:])
                if answer[2] != "up":
                    self.save_hosts()           # other runs must know at once
                return True
            _, plan, dest, indices, results = answer
            if results is not None:
                plan.outcomes += _outcomes(indices, results, dest[0])
            plan.open -= 1
            if plan.open == 0:
                due[plan.msg.id] = self._finish_safely(plan)
            return True

        try:
            self.check_hosts(jobs)
            for item in jobs.items():
                work.put(item)
            for _ in range(min(self.parallel, len(jobs))):
                threads.append(threading.Thread(target=self._worker, args=(work, answers),
                                                daemon=True))
                threads[-1].start()
            running = len(threads)
            while running:
                running -= not take(answers.get())
        finally:
            # after an error here: no worker may still be sending a message
            # that is finished (recorded, unlocked) below
            self.aborted = True
            for thread in threads:
                thread.join()
            self.aborted = False
            while not answers.empty():
                take(answers.get())
            for plan in plans:
                if plan.open > 0:       # not answered: recorded as tried so far, unlocked
                    plan.open = 0
                    due[plan.msg.id] = self._finish_safely(plan)
            self.save_hosts()

    def _finish_safely(self, plan):
        try:
            return self.finish(plan)
        except Error as e:
            log.warn(f"{plan.msg.id}: {e}")
            return time.time() + self.conf.get("queue.retry_min")

    def _worker(self, work, answers):
        """Take destinations until none is left; answer each group on `answers`."""
        import queue as queues
        try:
            while True:
                try:
                    dest, items = work.get_nowait()
                except queues.Empty:
                    return
                for plan, indices in items:
                    if self.stopping() or self.aborted:
                        results = None          # not tried: nothing is recorded
                    else:
                        program.title(f"masq-send: delivering {plan.msg.id} via {dest[0]}")
                        try:
                            results = self.send(dest, plan.msg, indices, answers)
                        except Exception as e:  # noqa: BLE001 -- a bug defers, never loses
                            import traceback
                            traceback.print_exc()
                            results = [("Z", f"internal error in masq-send: {e!r}")] \
                                * len(indices)
                    answers.put(("group", plan, dest, indices, results))
        finally:
            answers.put(None)

    def send(self, dest, msg, indices, answers):
        """One message's recipients for one destination; [(letter, text)]."""
        from masq import smtpclient
        name, domain = dest
        rcpts = [msg.recipients[i] for i in indices]
        down = self.down.get(dest)
        if down:
            since, letter, text = down
            return [(letter, f"{_label(self.conf, dest)}: not tried, failed "
                     f"{time.time() - since:.0f} s ago: {text}")] * len(rcpts)
        smtp_route = self.routes[name]
        table = route.route_table(self.conf, name)
        sender = route.rewrite(table, msg.sender) if msg.sender else msg.sender
        session = self.sessions.pop(dest, None)
        if session is None:
            try:
                session = smtpclient.connect(self.conf, smtp_route, domain)
            except smtpclient.DeliveryError as e:
                self.down[dest] = (time.time(), e.letter, e.text)
                answers.put(("host", dest, "down" if e.letter == "Z" else "refused", e.text))
                return [(e.letter, e.text)] * len(rcpts)
            except Error as e:          # the route cannot work as configured
                self.down[dest] = (time.time(), "Z", str(e))
                return [("Z", str(e))] * len(rcpts)
        with _Data(msg, table) as data:
            results = session.send(sender, rcpts, data)
        if session.usable:
            self.lost.pop(dest, None)
            answers.put(("host", dest, "up", results[-1][1]))
            if table.get("reuse_connection", True):
                self.sessions[dest] = session
            else:
                session.close()
            return results
        # the connection broke under this message: it is deferred (sent again
        # at once it could arrive twice), the next one gets a new connection
        session.close()
        self.lost[dest] = self.lost.get(dest, 0) + 1
        if self.lost[dest] >= LOST_SESSIONS_LIMIT:
            self.down[dest] = (time.time(), "Z", results[0][1])
            answers.put(("host", dest, "down", results[0][1]))
        return results

    def check_hosts(self, jobs):
        """Mark destinations down as the host status store says; make the routes."""
        from masq import smtpclient
        now = time.time()
        for dest in jobs:
            name = dest[0]
            if name not in self.routes:
                try:
                    self.routes[name] = smtpclient.Route(self.conf, name)
                except Error as e:
                    self.routes[name] = e
            if isinstance(self.routes[name], Error):
                self.down[dest] = (now, "Z", str(self.routes[name]))
                continue
            if dest in self.down:
                continue
            host = self.host_status(dest)
            if host is None or host.status != "down":
                continue
            until = host.updated + backoff(self.conf, host.failures)
            if self.runq:
                until = min(until, host.updated + self.conf.get("queue.hoststat_timeout"))
            if now < until:
                self.down[dest] = (host.updated, "Z", host.text)

    def host_status(self, dest):
        from masq import hoststat
        try:
            return self._store().get(dest[0], _label(self.conf, dest))
        except hoststat.HostStatError as e:
            log.warn(str(e))
            return None

    def note_host(self, dest, status, text):
        """Keep a destination's last status; save_hosts() stores it."""
        if status == "up" and self.noted.get(dest, ("",))[0] == "down":
            return                  # down in this run stays down
        self.noted[dest] = (status, text)

    def save_hosts(self):
        """Write the statuses noted (one write per destination, not per message)."""
        from masq import hoststat
        noted, self.noted = self.noted, {}
        for dest, (status, text) in noted.items():
            try:
                self._store().record(dest[0], _label(self.conf, dest), status, text)
            except hoststat.HostStatError as e:
                log.warn(str(e))
                return

    def _store(self):
        if self.hosts is None:
            from masq import hoststat
            self.hosts = hoststat.HostStat(self.queue.path)
        return self.hosts

    def close(self):
        """QUIT every connection still open; close the host status store."""
        for session in self.sessions.values():
            session.close()
        self.sessions = {}
        if self.hosts is not None:
            self.hosts.close()


def _outcomes(indices, results, relay):
    """(word, index, text, relay) for each recipient's (letter, text)."""
    out = []
    for i, (letter, text) in zip(indices, results, strict=True):
        word = {"K": "done", "D": "failed"}.get(letter, "deferred")
        out.append((word, i, text, relay))
    return out


def _finish(conf, queue, plan):
    msg, now = plan.msg, plan.now
    age = now - msg.arrived
    # queue.max_age counts from the first temporary failure, so that days spent
    # waiting for a route to come up are not held against a route that is up
    failing = now - (msg.first_deferred or now)
    final = []
    for word, i, text, relay in plan.outcomes:
        if word == "deferred" and failing >= conf.get("queue.max_age"):
            word, text = "failed", f"gave up after {failing / 86400:.1f} days: {text}"
        final.append((word, i, text, relay))
    still_waiting = []
    for i, _reason in plan.waiting:
        if age > conf.get("queue.max_age_offline"):
            final.append(("failed", i, f"no route came online within "
                          f"{age / 86400:.1f} days (4.4.1)", "none"))
        else:
            still_waiting.append(i)
    answered = {i for _, i, _, _ in final}
    untried = [i for i in msg.pending() if i not in answered and i not in still_waiting]
    failed = [(msg.recipients[i], text) for word, i, text, _ in final if word == "failed"]
    to_record = [(word, i, text) for word, i, text, _ in final]
    if failed:
        # the other outcomes first: if the bounce cannot be queued (a full
        # disk), the recipients already delivered are not delivered again
        others = [r for r in to_record if r[0] != "failed"]
        if others:
            msg.record(others)
        to_record = [r for r in to_record if r[0] == "failed"]
        _bounce(conf, queue, msg, failed)
    for word, i, text, relay in final:
        status = {"done": "sent", "failed": "bounced", "deferred": "deferred"}[word]
        log.event(msg.id, text, to=f"<{msg.recipients[i]}>", relay=relay,
                  delay=f"{now - msg.arrived:.2f}", status=status)
    left = [o for o in final if o[0] == "deferred"]
    if not left and not still_waiting and not untried:
        msg.remove()                # every recipient is done or bounced
        return None
    if to_record:
        msg.record(to_record)
    if left:
        _warn_if_late(conf, queue, msg, left, failing)
        tries = max(msg.attempts.get(i, 0) for _, i, _, _ in left) + 1
        return now + backoff(conf, tries)
    if untried:
        return time.time()
    return now + conf.get("queue.interval")


def backoff(conf, tries):
    """Seconds to wait after the n-th failed attempt: doubling, capped."""
    return min(conf.get("queue.retry_min") * 2 ** (max(tries, 1) - 1),
               conf.get("queue.retry_max"))


def _label(conf, dest):
    """The host column of the status store: "host:port", "wrapper" or the domain."""
    name, domain = dest
    if domain:
        return domain
    table = route.route_table(conf, name)
    if table.get("wrapper"):
        return "wrapper"
    host = str(table.get("host"))
    if table.get("port") and not host.endswith("]") and ":" not in host:
        host += f":{table['port']}"
    return host


_created = []          # ids of the bounces and warnings this process queued in this pass


def _warn_if_late(conf, queue, msg, left, failing):
    """Tell the sender once that mail is late (queue.warn_after; 0: never)."""
    after = conf.get("queue.warn_after")
    if not after or msg.warned or failing < after or not msg.sender:
        return
    from masq import bounce
    late = [(msg.recipients[i], text) for _, i, text, _ in left]
    qid = bounce.send(conf, queue, msg, late, delayed=True)
    if qid:
        _created.append(qid)
    msg.note_warned()
    log.event(msg.id, f"{len(late)} recipient(s) late", warning=qid, status="delayed")


def _bounce(conf, queue, msg, failed):
    from masq import bounce
    qid = bounce.send(conf, queue, msg, failed)
    if qid:
        _created.append(qid)
        log.event(msg.id, f"{len(failed)} recipient(s) failed", bounce=qid, status="bounce")
    else:
        log.event(msg.id, "a bounce failed: not bounced again (RFC 5321 6.1)",
                  status="dropped")


def _needs_from(conf):
    return any(t.get("allowed_from_headers") or t.get("denied_from_headers")
               for _, t in conf.routes)


def _from_header(msg):
    """The address in the message's From: header, or "" (headers.scan: bounded)."""
    with msg.open_data() as data:
        return headers.scan(data).address("from")


def _deliver_local(conf, msg, sender, rcpts):
    """masq-local's deliver() in this process; [(letter, text)] per recipient.

    In single-user mode it runs as the same user with the same
    configuration, and a fork per message would cost more than the delivery
    itself (3 ms against 1.2 ms, measured: bench/README.md).  Any failure
    inside it is a temporary failure.
    """
    try:
        return local.deliver(conf, sender, rcpts, msg.open_data, msg.id)
    except Error as e:
        letter = "D" if e.temporary is False else "Z"
        return [(letter, str(e))] * len(rcpts)
    except Exception as e:      # noqa: BLE001 -- a bug must defer mail, not lose it
        import traceback
        traceback.print_exc()
        return [("Z", f"internal error in local delivery: {e!r}")] * len(rcpts)


class _Data:
    """A message's bytes as stored, seekable, for smtpclient.Session.send.

    With the route's rewrite_sender, the header section is read (by
    headers.scan) and its From:, Sender: and Reply-To: rewritten; this copy
    only: the spool file is never changed.
    """

    def __init__(self, msg, table):
        self.fd = os.open(msg.path, os.O_RDONLY | os.O_CLOEXEC)
        self.start, self.size, self.head = spool.HEADER_BYTES, msg.size, b""
        if table.get("rewrite_sender"):
            with msg.open_data() as data:
                section = headers.scan(data)
            self.head = route.rewrite_headers(table, section)
            self.start, self.size = self.start + section.size, self.size - section.size
        self.length = len(self.head) + self.size
        self.pos = 0

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.length + pos)
        return self.pos

    def read(self, n=-1):
        if n is None or n < 0:
            n = self.length - self.pos
        out = b""
        if self.pos < len(self.head):
            out = self.head[self.pos:self.pos + n]
            self.pos += len(out)
            n -= len(out)
        offset = self.pos - len(self.head)
        if n > 0 and offset < self.size:
            data = os.pread(self.fd, min(n, self.size - offset), self.start + offset)
            self.pos += len(data)
            out += data
        return out

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
        while not self.stopping:
            up = self.online()
            if up != self.up:           # at start too: the first full scan
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
            else:
                self.adopt()
            self.run_due()
        os.close(rfd)
        os.close(wfd)
        log.line("daemon stopped")
        return Exit.OK

    def online(self):
        """The routes up now; on a broken online file or command, those up before."""
        try:
            return route.online(self.conf, self.forced)
        except Error as e:
            log.warn(f"{e}; keeping the routes known to be up")
            return self.up if self.up is not None else set()

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

    def adopt(self):
        """Filter again what a filter deferred; take on active messages we do not know."""
        promote(self.conf, self.queue)
        now = time.time()
        for qid in self.queue.ids("active"):
            self.due.setdefault(qid, now)

    def run_due(self):
        """One run over the messages that are due, through the same Runner as runq."""
        now = time.time()
        messages = []
        for qid in sorted(q for q, when in self.due.items() if when <= now):
            try:
                messages.append(spool.Message(self.queue, "active", qid))
            except (FileNotFoundError, spool.FormatError):
                self.due.pop(qid, None)
        if not messages:
            return
        runner = Runner(self.conf, self.queue, self.up or set(),
                        stopping=lambda: self.stopping)
        try:
            for qid, nxt in runner.run(messages).items():
                if nxt is None:
                    self.due.pop(qid, None)
                else:
                    self.due[qid] = nxt
        finally:
            runner.close()


def _drain(fd):
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
