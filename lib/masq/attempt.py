"""One delivery attempt per message, and its outcome: what masq-send does to a message.

An attempt locks the message, decides each recipient without a final
outcome (masq.route), delivers the local ones at once (masq.deliverer),
hands the others to the relay (masq.relay), then finishes: the outcomes
are recorded in the spool before the next attempt is decided (masq-spool(5)
S5), a recipient deferred for longer than queue.max_age, or waiting for a
route longer than queue.max_age_offline, fails, the failed ones are bounced
and the late ones warned about (the reports masq.bounce builds, queued
here), and the message gets its next due time (backoff()).  A loop or a
policy failure of mail a stranger sent (quiet_failure()) is not bounced:
its sender is likely forged, and the bounce would be backscatter; it is
dropped or held (queue.outside_failures).  A recipient
waiting for a route gets a `waiting` record, only when its reason changes
(mailq shows it; masq-spool(5)).  A Report, when the run has one, shows
each outcome (runq -v) and the run's progress on stderr.

A Run is the attempts of one queue run; it keeps the ids of the bounces and
warnings it queued, so that runq can send them in the same run.

Group commit (in-process local delivery only): a maildir delivery leaves
the fsync of new/ to the Run (mailbox.FolderSync), which finishes the
messages delivered locally only after a group of up to GROUP_MESSAGES of
them, or GROUP_SECONDS, then fsyncs each folder once, then records each
outcome.  finish() always syncs first, so no outcome is recorded before the
deliveries it reports are durable; a folder whose fsync fails makes its
messages' local deliveries deferred (tried again: a duplicate at worst).
"""
import io
import os
import time

from masq import Error, bounce, deliverer, envelope, handoff, headers, log, mailbox, net
from masq import program, route
from masq import outcome, spool

BUSY_RETRY_SECONDS = 60         # a message another process holds is due again after this
BATCH_MESSAGES = 256            # messages held locked at once while routes deliver them
GROUP_MESSAGES = 50             # local deliveries finished after one fsync of their folders
GROUP_SECONDS = 0.05            # ... or after this long, whichever comes first
BUSY = object()                 # Run.plan(): another process holds the message
OUTSIDE_PROTOS = ("smtp", "esmtp", "utf8smtp", "qmtp")  # trace proto, RFC 3848's s and a
NOT_BOUNCED = "from outside, not bounced"


class Plan:
    """One attempt at one message: its decisions, then its outcomes.

    A recipient deferred on a route is tried on the next route of its
    decision (route.Decision.routes) in the same attempt, once per route;
    only its last answer is an outcome, naming every route tried.
    """

    def __init__(self, msg, now):
        self.msg, self.now = msg, now
        self.outcomes = []          # (word, index, text, relay)
        self.waiting = []           # (index, reason)
        self.remote = {}            # destination -> [index]
        self.open = 0               # remote groups not answered yet
        self.next_routes = {}       # index -> the routes still to try after a deferral
        self.deferred = {}          # index -> [(route, text)] deferrals before this route

    def add(self, indices, results, relay):
        """Keep each recipient's (letter, text) answer as its spool word; returns
        {route: [index]}: the deferred ones that go on to their next route."""
        again = {}
        for i, (letter, text) in zip(indices, results, strict=True):
            word = outcome.WORDS.get(letter, outcome.WORDS[outcome.TEMPORARY])
            earlier = self.deferred.get(i, [])
            if word == "deferred" and self.next_routes.get(i):
                earlier.append((relay, text))
                self.deferred[i] = earlier
                again.setdefault(self.next_routes[i].pop(0), []).append(i)
                continue
            if earlier:
                tried = earlier + [(relay, text)]
                text = "; ".join(f"route {r}: {t}" for r, t in tried)
                relay = ",".join(r for r, _ in tried)
            self.outcomes.append((word, i, text, relay))
        return again

    def not_durable(self, reason):
        """The local deliveries' folder was not fsynced: they are deferred, not done."""
        self.outcomes = [("deferred", i, f"{text}, but {reason}", relay)
                         if (word, relay) == ("done", "local") else (word, i, text, relay)
                         for word, i, text, relay in self.outcomes]


class Run:
    """The attempts of one queue run.

    Local recipients are delivered in this thread, as soon as their message
    is planned; a message with local recipients only is finished with its
    group (GROUP_MESSAGES).  The route groups of up to BATCH_MESSAGES messages, still
    locked, go to the relay, which sends them in its threads and calls back
    in this one as each message's last group is answered: every outcome is
    recorded by this thread, under the message's lock.
    """

    def __init__(self, conf, queue, up, relay, stopping=None, report=None):
        self.conf, self.queue, self.up, self.relay = conf, queue, up, relay
        self.stopping = stopping or (lambda: False)
        self.report = report        # a Report (runq -v, progress), or None
        self.local = deliverer.choose(conf)
        self.needs_from = _needs_from(conf)
        self.queued = []            # ids of the bounces and warnings queued, not yet taken
        # masq-local in this process: its maildir deliveries' new/ fsyncs are grouped
        self.folders = mailbox.FolderSync() if isinstance(self.local, deliverer.InProcess) \
            else None
        self.not_durable = {}       # qid -> why its local deliveries are not durable

    def run(self, messages):
        """Try each message once; {qid: when it is due next, or None}."""
        due, held, group = {}, [], []
        started = 0.0               # when the group's first delivery was made
        try:
            for msg in messages:
                if self.stopping():
                    break
                try:
                    plan = self.plan(msg)
                    if plan is BUSY:        # another process has it now: look again later
                        due[msg.id] = time.time() + BUSY_RETRY_SECONDS
                    elif plan is None:      # gone: delivered or removed meanwhile
                        due[msg.id] = None
                    elif plan.remote:
                        held.append(plan)
                    elif self.folders is not None and self.folders.pending():
                        if not group:
                            started = time.monotonic()
                        group.append(plan)  # finished after its folders' fsync
                    else:
                        due[msg.id] = self.finish(plan)
                except Error as e:
                    log.warn(f"{msg.id}: {e}")
                    due[msg.id] = time.time() + self.conf.get("queue.retry_min")
                if self.report and msg.id in due:
                    self.report.finished()
                if group and (len(group) >= GROUP_MESSAGES
                              or time.monotonic() - started >= GROUP_SECONDS):
                    self.finish_group(group, due)
                    group = []
                if len(held) >= BATCH_MESSAGES:
                    self.deliver_remote(held, due)
                    held = []
            self.finish_group(group, due)
            group = []
        finally:
            for plan in group:      # a bug or an interrupt: nothing recorded, tried again
                plan.msg.unlock()
        if held:
            self.deliver_remote(held, due)
        return due

    def finish_group(self, plans, due):
        """Finish these messages delivered locally: one fsync per folder, then each record."""
        for plan in plans:
            due[plan.msg.id] = self.finish_safely(plan)
            if self.report:
                self.report.finished()

    def sync(self):
        """fsync the folders owed (group commit); note the messages whose fsync failed."""
        if self.folders is not None and self.folders.pending():
            self.not_durable.update(self.folders.sync())

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
                    plan.remote.setdefault(self.relay.destination(d.route, rcpt), []).append(i)
                    plan.next_routes[i] = d.routes[1:]
                elif d.kind == "wait":
                    plan.waiting.append((i, d.reason))
                else:
                    plan.outcomes.append(("failed", i, d.reason, "none"))
            if local:
                if self.folders is not None:
                    self.folders.label = msg.id
                    mailbox.deferred = self.folders     # new/'s fsync is owed to sync()
                try:
                    results = self.local.deliver(msg, [msg.recipients[i] for i in local])
                finally:
                    mailbox.deferred = None
                plan.add(local, results, "local")
            return plan
        except BaseException:
            msg.unlock()
            raise

    def deliver_remote(self, plans, due):
        """Send the route groups of these plans, finishing each message as it is done."""
        def done(plan):
            due[plan.msg.id] = self.finish_safely(plan)
            if self.report:
                self.report.finished()
        self.relay.deliver(plans, done)

    def finish_safely(self, plan):
        """finish(), with an error warned about and the message due again later."""
        try:
            return self.finish(plan)
        except Error as e:
            log.warn(f"{plan.msg.id}: {e}")
            return time.time() + self.conf.get("queue.retry_min")

    def finish(self, plan):
        """Record the outcomes of one attempt, bounce, unlock; the next due time.

        The folders the local deliveries went into are fsynced first (sync()).
        """
        try:
            self.sync()
            reason = self.not_durable.pop(plan.msg.id, None)
            if reason:
                plan.not_durable(reason)
            return self._finish(plan)
        finally:
            plan.msg.unlock()

    def _finish(self, plan):
        conf, msg, now = self.conf, plan.msg, plan.now
        age = now - msg.arrived
        # queue.max_age counts from the first temporary failure, so that days spent
        # waiting for a route to come up are not held against a route that is up
        failing = now - (msg.first_deferred or now)
        final = []
        for word, i, text, relay in plan.outcomes:
            if word == "deferred" and failing >= conf.get("queue.max_age"):
                word, text = "failed", f"gave up after {failing / 86400:.1f} days: {text}"
            final.append((word, i, text, relay))
        still_waiting, waits = [], []
        for i, reason in plan.waiting:
            if age > conf.get("queue.max_age_offline"):
                final.append(("failed", i, f"no route came online within "
                              f"{age / 86400:.1f} days (4.4.1)", "none"))
                continue
            still_waiting.append(i)
            if self.report:
                self.report.outcome(msg, i, "waiting", reason, "none")
            word, _, said = msg.state.get(i, ("", 0, ""))
            if (word, said) != ("waiting", reason):
                # mailq says why it waits; written only when that changes, so that
                # a run over mail waiting for a route costs no fsync per message
                waits.append(("waiting", i, reason))
        quiet = {i: how for word, i, text, _ in final
                 if word == "failed" and (how := quiet_failure(conf, msg, text))}
        held = [(i, text) for word, i, text, _ in final if quiet.get(i) == "hold"]
        final = [o for o in final if quiet.get(o[1]) != "hold"]    # pending, in hold/
        answered = {i for _, i, _, _ in final} | {i for i, _ in held}
        untried = [i for i in msg.pending() if i not in answered and i not in still_waiting]
        failed = [(msg.recipients[i], text) for word, i, text, _ in final
                  if word == "failed" and i not in quiet]
        to_record = [(word, i, text) for word, i, text, _ in final] + waits
        if failed:
            # the other outcomes first: if the bounce cannot be queued (a full
            # disk), the recipients already delivered are not delivered again
            others = [r for r in to_record if r[0] != "failed"]
            if others:
                msg.record(others)
            to_record = [r for r in to_record if r[0] == "failed"]
            self.bounce(msg, failed)
        for word, i, text, relay in final:
            status = {"done": "sent", "failed": "bounced", "deferred": "deferred"}[word]
            if i in quiet:
                status, text = "dropped", f"{text}: {NOT_BOUNCED}"
            log.event(msg.id, text, to=f"<{msg.recipients[i]}>", relay=relay,
                      delay=f"{now - msg.arrived:.2f}", status=status)
            if self.report:
                self.report.outcome(msg, i, status, text, relay)
        if held:
            if to_record:
                msg.record(to_record)
            why = "; ".join(f"<{msg.recipients[i]}>: {text}" for i, text in held)
            msg.note_held(f"{why}: {NOT_BOUNCED}")
            msg.move("hold")
            log.event(msg.id, f"{why}: {NOT_BOUNCED}", status="hold")
            return None
        left = [o for o in final if o[0] == "deferred"]
        if not left and not still_waiting and not untried:
            msg.remove()                # every recipient is done or bounced
            return None
        if to_record:
            msg.record(to_record)
        if left:
            self.warn_if_late(msg, left, failing)
            tries = max(msg.attempts.get(i, 0) for _, i, _, _ in left) + 1
            return now + backoff(conf, tries)
        if untried:
            return time.time()
        if conf.get("online.detect") == "command":
            return now + conf.get("queue.interval")     # the daemon polls the command
        # the online file and links wake the daemon when a route comes up: until
        # then only the offline limit is a reason to look at this message again
        return max(now + conf.get("queue.interval"),
                   msg.arrived + conf.get("queue.max_age_offline") + 1)

    def bounce(self, msg, failed):
        """Report the failed recipients to the sender; a bounce itself is not bounced."""
        qid = queue_report(self.conf, self.queue, msg, failed)
        if qid:
            self.queued.append(qid)
            log.event(msg.id, f"{len(failed)} recipient(s) failed", bounce=qid, status="bounce")
        else:
            log.event(msg.id, "a bounce failed: not bounced again (RFC 5321 6.1)",
                      status="dropped")

    def warn_if_late(self, msg, left, failing):
        """Tell the sender once that mail is late (queue.warn_after; 0: never)."""
        after = self.conf.get("queue.warn_after")
        if not after or msg.warned or failing < after or not msg.sender:
            return
        late = [(msg.recipients[i], text) for _, i, text, _ in left]
        qid = queue_report(self.conf, self.queue, msg, late, delayed=True)
        if qid:
            self.queued.append(qid)
        msg.note_warned()
        log.event(msg.id, f"{len(late)} recipient(s) late", warning=qid, status="delayed")

    def take_queued(self):
        """The ids of the bounces and warnings queued since the last call."""
        taken, self.queued = self.queued, []
        return taken

    def close(self):
        if self.folders is not None:
            self.folders.close()
        self.relay.close()


class Report:
    """What a queue run shows on stderr as it goes: runq -v, progress on a terminal.

    With verbose, one line per recipient as its outcome is recorded (queue id,
    recipient, local or route, outcome, text).  On a terminal, from
    PROGRESS_AFTER_SECONDS into the run, the line "done/total, N msg/s" is
    rewritten in place at most every PROGRESS_SECONDS; the outcome lines go
    above it, and the last count stays when the run ends.
    """

    PROGRESS_SECONDS = 0.25
    PROGRESS_AFTER_SECONDS = 1.0    # a short run shows no count

    def __init__(self, stream, name, verbose=False, clock=time.monotonic):
        self.stream, self.name, self.verbose, self.clock = stream, name, verbose, clock
        try:
            self.tty = stream.isatty()
        except (OSError, ValueError):
            self.tty = False
        self.total = self.done = 0
        self.start = clock()
        self.drawn = None           # when the count was last drawn, or None

    def add(self, count):
        """`count` more messages in this run."""
        self.total += count

    def outcome(self, msg, i, status, text, relay):
        if not self.verbose:
            return
        where = {"local": " local", "none": ""}.get(relay, f" route {relay}")
        text = outcome.one_line(text)
        said = text if text.startswith(status) else f"{status}: {text}"
        self._write(f"{self.name}: {msg.id}: <{msg.recipients[i]}>{where}: {said}\n")

    def finished(self):
        """One more message is done with for this run."""
        self.done += 1
        now = self.clock()
        if not self.tty or now - self.start < self.PROGRESS_AFTER_SECONDS:
            return
        if self.drawn is None or now - self.drawn >= self.PROGRESS_SECONDS:
            self.drawn = now
            self._write("")

    def close(self):
        """Leave the last count on its own line."""
        if self.drawn is not None:
            self.drawn = self.clock()
            self._write("")
            self._put("\n")
            self.drawn = None

    def _write(self, line):
        """A line above the count, the count (re)drawn under it."""
        if self.drawn is not None:
            elapsed = max(self.clock() - self.start, 1e-6)
            count = (f"{self.name}: {self.done}/{max(self.total, self.done)}, "
                     f"{self.done / elapsed:.1f} msg/s")
            line = f"\r\033[K{line}{count}"
        self._put(line)

    def _put(self, text):
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass


def backoff(conf, tries):
    """Seconds to wait after the n-th failed attempt: doubling, capped."""
    return min(conf.get("queue.retry_min") * 2 ** (max(tries, 1) - 1),
               conf.get("queue.retry_max"))


def came_from_outside(conf, msg):
    """Mail a stranger sent: over SMTP, not authenticated, from outside smtpd.relay_nets.

    Read from the spool's trace records (proto, client, auth, trusted); a
    local user's `sendmail -bs` has no client address and is not from
    outside, nor is a client that masq-smtpd let relay for its verified
    tls_client_ca certificate or for RELAYCLIENT (trusted).
    """
    trace = msg.trace
    proto = trace.get("proto", "").lower()
    if (not proto.startswith(OUTSIDE_PROTOS) or proto.endswith("a") or trace.get("auth")
            or trace.get("trusted")):
        return False
    client = trace.get("client", "")
    return bool(client) and not net.in_nets(client, conf.get("smtpd.relay_nets") or [])


def quiet_failure(conf, msg, reason):
    """"drop" or "hold" when this failure must not be bounced, else None.

    A loop (5.4.6) or a policy failure (5.7.x) found after mail from outside
    was accepted: the sender is likely forged, and a bounce would go to an
    innocent (backscatter).  queue.outside_failures says what happens instead.
    """
    how = conf.get("queue.outside_failures")
    if how == "bounce":
        return None
    code = bounce.status_code(reason, "")
    if code != "5.4.6" and not code.startswith("5.7."):
        return None
    return how if came_from_outside(conf, msg) else None


def queue_report(conf, queue, msg, failed, delayed=False):
    """Queue a bounce (or a delay warning) for msg; return its id, or None for <>.

    The report (masq.bounce) goes from <> to the sender, written into the
    spool in this process as masq-queue would (handoff.enqueue).
    """
    if not msg.sender:
        return None
    stamp = f"{int(time.time() * 1e6):x}-{os.getpid():x}"
    data = bounce.build(conf, msg, failed, stamp, delayed)
    env = envelope.Envelope("", [msg.sender])
    return handoff.enqueue(conf, io.BytesIO(data), env,
                           {"proto": "local", "user": "MAILER-DAEMON"}, queue=queue)


def _needs_from(conf):
    return any(t.get("allowed_from_headers") or t.get("denied_from_headers")
               for _, t in conf.routes)


def _from_header(msg):
    """The address in the message's From: header, or "" (headers.scan: bounded)."""
    with msg.open_data() as data:
        return headers.scan(data).address("from")
