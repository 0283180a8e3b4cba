"""The relay side of masq-send: route groups sent by SMTP, over reused connections.

Recipients for a route are grouped by destination -- (route, None) for a
smarthost or wrapper, (route, domain) for direct MX delivery -- and each
destination's messages go, in order, over one connection made by
masq.nexthop, in one of up to queue.parallel threads.  Connections stay
open until close(), at the end of the queue run; one lost under a message
defers that message (sent again at once it could arrive twice), and
LOST_SESSIONS_LIMIT lost in a row make the destination down.

A destination that is down is not tried again in this run, nor in later
ones until its back-off ends (runq: queue.hoststat_timeout) or its route
comes up (route_came_up()); the host status store (masq.hoststat) keeps
that between runs, written once per destination, not per message.

Recipients a route defers go on to the next route of their decision
(route.Decision.routes) in a further round of the same run (deliver()).
"""
import os
import time

from masq import Error, address, attempt, headers, hoststat, log, program, route, spool

LOST_SESSIONS_LIMIT = 2         # connections lost in a row before a destination is down


class Relay:
    """The connections and destination states of one queue run."""

    def __init__(self, conf, queue, runq=False, stopping=None):
        self.conf, self.queue, self.runq = conf, queue, runq
        self.stopping = stopping or (lambda: False)
        self.sessions = {}          # destination -> an idle smtpclient.ClientSession
        self.down = {}              # destination -> (since, letter, text)
        self.lost = {}              # destination -> connections lost in a row
        self.noted = {}             # destination -> (status, text) to store
        self.routes = {}            # name -> clientroute.Route, or the Error it raised
        self.pipes = {}             # name -> masq.pipe.Pipe, or the Error it raised
        self.signature = (None, b"")    # ((queue id, route), its DKIM-Signature field): the last
        self.parallel = max(1, int(conf.get("queue.parallel") or 1))
        self.hosts = None           # the HostStat, opened on first use
        self.aborted = False        # deliver() failed: workers stop taking messages

    def destination(self, name, rcpt):
        """(route, None) for a smarthost or wrapper, (route, domain) for MX delivery."""
        table = route.route_table(self.conf, name)
        if table.get("host") or table.get("wrapper") or table.get("pipe"):
            return (name, None)
        return (name, address.domain_of(rcpt).lower())

    def deliver(self, plans, done):
        """Send the route groups of these plans (attempt.Plan); done(plan) in this
        thread as each plan has all its answers, or is given up unanswered.

        Recipients deferred on one route and allowed on a next one go to it
        in a further round, once all of this round's destinations are done:
        one round per route at most, each destination's messages in order.
        """
        import queue as queues     # threads only for mail that leaves: runq to a maildir
        import threading           # must not pay for importing them
        jobs, later = {}, {}        # this round's groups, the next round's
        for plan in plans:
            plan.open = len(plan.remote)
            for dest, indices in plan.remote.items():
                jobs.setdefault(dest, []).append((plan, indices))
        answers, threads = queues.SimpleQueue(), []

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
                for name, again in plan.add(indices, results, dest[0]).items():
                    groups = {}
                    for i in again:
                        groups.setdefault(self.destination(name, plan.msg.recipients[i]),
                                          []).append(i)
                    for next_dest, group in groups.items():
                        later.setdefault(next_dest, []).append((plan, group))
                    plan.open += len(groups)
            plan.open -= 1
            if plan.open == 0:
                done(plan)
            return True

        try:
            while jobs:
                self.check_hosts(jobs)
                work = queues.SimpleQueue()
                for item in jobs.items():
                    work.put(item)
                threads = [threading.Thread(target=self._worker, args=(work, answers),
                                            daemon=True)
                           for _ in range(min(self.parallel, len(jobs)))]
                for thread in threads:
                    thread.start()
                running = len(threads)
                while running:
                    running -= not take(answers.get())
                jobs = dict(later)
                later.clear()
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
                    done(plan)
            self.save_hosts()

    def _worker(self, work, answers):
        """Take destinations until none is left; answer each group on `answers`."""
        import queue as queues     # as in deliver()
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
                            import traceback   # only on a bug
                            traceback.print_exc()
                            results = [("Z", f"internal error in masq-send: {e!r}")] \
                                * len(indices)
                    answers.put(("group", plan, dest, indices, results))
        finally:
            answers.put(None)

    def send(self, dest, msg, indices, answers):
        """One message's recipients for one destination; [(letter, text)]."""
        from masq import nexthop, outcome, wiremessage  # ssl, socket, DNS: only when mail leaves
        from masq.connection import ConnectFailed
        name, domain = dest
        rcpts = [msg.recipients[i] for i in indices]
        table = route.route_table(self.conf, name)
        if table.get("pipe"):       # a command, no SMTP: masq.pipe
            return self.send_pipe(name, table, msg, rcpts)
        down = self.down.get(dest)
        if down:
            since, letter, text = down
            return [(letter, f"{_label(self.conf, dest)}: not tried, failed "
                     f"{time.time() - since:.0f} s ago: {text}")] * len(rcpts)
        smtp_route = self.routes[name]
        sender = route.rewrite(table, msg.sender) if msg.sender else msg.sender
        with _Data(msg, table) as data:
            message = wiremessage.WireMessage(data)
            if smtp_route.dkim is not None:     # signed after rewriting, before connecting
                try:
                    self.sign(name, smtp_route.dkim, msg, message, sender)
                except Error as e:              # the key: deferred, never sent unsigned
                    return [("Z", str(e))] * len(rcpts)
            session = self.sessions.pop(dest, None)
            if session is None:
                try:
                    if table.get("pop_before_smtp"):    # the smarthost wants a POP3 login
                        from masq import pop3
                        pop3.login_before_smtp(self.conf, name)
                    session = nexthop.connect(self.conf, smtp_route, domain)
                except outcome.DeliveryError as e:
                    letter, text = e.letter, e.text
                    if smtp_route.connect_error_fail and isinstance(e, ConnectFailed):
                        letter, text = outcome.PERMANENT, f"{text} (connect_error_fail)"
                    self.down[dest] = (time.time(), letter, text)
                    answers.put(("host", dest, "down" if e.letter == "Z" else "refused",
                                 e.text))
                    return [(letter, text)] * len(rcpts)
                except Error as e:          # the route cannot work as configured
                    self.down[dest] = (time.time(), "Z", str(e))
                    return [("Z", str(e))] * len(rcpts)
            results = session.send(sender, rcpts, message)
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

    def send_pipe(self, name, table, msg, rcpts):
        """A pipe route's recipients of msg: its command runs, made once per run."""
        from masq import pipe
        command = self.pipes.get(name)
        if command is None:
            try:
                command = pipe.Pipe(self.conf, name, table)
            except Error as e:          # the route cannot work as configured: deferred
                command = e
            self.pipes[name] = command
        if isinstance(command, Error):
            return [("Z", str(command))] * len(rcpts)
        return pipe.send(command, msg, rcpts, lambda: _Data(msg, table))

    def sign(self, name, signer, msg, message, sender):
        """Put the route's DKIM-Signature in front of `message` (a WireMessage).

        The last field made is kept (one, not one per message of the run): a
        message sent to several domains of an MX route one after another is
        signed once."""
        from masq import dkim   # as in clientroute: only where a route signs
        key = (msg.id, name)
        last_key, field = self.signature        # one tuple: other workers replace it whole
        if last_key != key:
            try:
                field = signer.sign(b"".join(message.lines()), sender)
            except dkim.UnsignedError as e:
                log.event(msg.id, str(e), relay=name, dkim="none")
                field = b""
            self.signature = (key, field)
        if field:
            message.prepend(field)

    def check_hosts(self, jobs):
        """Mark destinations down as the host status store says; make the routes."""
        from masq import clientroute   # as in send()
        now = time.time()
        for dest in jobs:
            name = dest[0]
            if name not in self.routes:
                try:
                    self.routes[name] = clientroute.Route(self.conf, name)
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
            until = host.updated + attempt.backoff(self.conf, host.failures)
            if self.runq:
                until = min(until, host.updated + hoststat_timeout(self.conf))
            if now < until:
                self.down[dest] = (host.updated, "Z", host.text)

    def host_status(self, dest):
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
        noted, self.noted = self.noted, {}
        for dest, (status, text) in noted.items():
            try:
                self._store().record(dest[0], _label(self.conf, dest), status, text)
            except hoststat.HostStatError as e:
                log.warn(str(e))
                return

    def _store(self):
        if self.hosts is None:
            self.hosts = hoststat.HostStat(self.queue.path)
        return self.hosts

    def close(self):
        """QUIT every connection still open; close the host status store."""
        for session in self.sessions.values():
            session.close()
        self.sessions = {}
        if self.hosts is not None:
            self.hosts.close()


def hoststat_timeout(conf):
    """How long a queue run by hand believes a host is down (queue.hoststat_timeout).

    A few seconds by default, so that runq tries every host again (masqmail
    keeps no host status at all) unless another run saw it fail just now.
    """
    value = conf.get("queue.hoststat_timeout")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise Error(f"{conf.file}: queue.hoststat_timeout must be a number of seconds",
                    code=78, temporary=True)
    return value


def route_came_up(conf, queue, names):
    """Forget the host status of these routes' destinations: a route that comes up
    (the online file or command names it, sendmail -qo NAME) is tried at once."""
    if not names:
        return
    store = hoststat.HostStat(queue.path)
    try:
        for name in sorted(names):
            store.forget(name)
    except hoststat.HostStatError as e:
        log.warn(str(e))
    finally:
        store.close()


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


class _Data:
    """A message's bytes as stored, seekable, for smtpclient.ClientSession.send.

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
