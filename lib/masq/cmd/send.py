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
local delivery in-process (or by masq-local: [local] deliver), SMTP by
route in up to queue.parallel threads with one connection per destination,
each outcome recorded durably in the spool before the next attempt,
bounces for permanent failures.  In system mode (masq.toml `user`) every
run first queues users' drop files (masq.drop), and the daemon answers
users' mailq and runq on spool/control (masq.control).
"""
import os
import select
import signal
import time

from masq import Error, attempt, config, control, drop, log, privilege, program, relay, route
from masq import spool
from masq.filter import promote
from masq.program import Exit

POLL_SECONDS = 60               # the daemon looks at the online routes this often


def main(argv=None):
    args = program.parse(__doc__, argv, usage_code=Exit.USAGE)
    conf = config.load(args["-C"])
    privilege.start(conf)       # system mode as root: masq-lspawn, then masq for good
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
    relay.route_came_up(conf, queue, [forced] if forced else ())   # -qo NAME: try it now
    tried = set()
    runner = _runner(conf, queue, up, runq=True)
    if not ids:
        pick_up(conf, queue)
    try:
        for _ in range(3):
            promote(conf, queue, ids)
            if ids:
                messages = [m for m in (_find(queue, q) for q in ids) if m]
            else:
                messages = [m for m in queue.messages(("active",)) if m.id not in tried]
            tried.update(m.id for m in messages)
            runner.run(messages)
            queued = runner.take_queued()
            if not messages:
                return
            if ids:                 # a run for some ids also sends the bounces they made
                ids = queued
                if not ids:
                    return
    finally:
        runner.close()


def pick_up(conf, queue):
    """System mode: queue the drop files users left (masq.drop); before promote."""
    if not conf.get("user"):
        return
    try:
        drop.pick_up(conf, queue)
    except Error as e:
        log.warn(f"{e}; drop files wait for the next run")


def _runner(conf, queue, up, runq=False, stopping=None):
    """The attempts of one queue run (masq.attempt), with its relay (masq.relay)."""
    return attempt.Run(conf, queue, up, relay.Relay(conf, queue, runq, stopping), stopping)


def _find(queue, qid):
    """The active message with this id, or None (with a warning)."""
    try:
        msg = queue.find(qid)
    except spool.SpoolError as e:
        log.warn(str(e))
        return None
    return msg if msg.stage == "active" else None


class Daemon:
    """The queue runner that stays: trigger FIFO, control socket, back-off schedule, SIGTERM."""

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
        # system mode: users' mailq and runq ask through spool/control (masq.control)
        server = control.Server(self.conf, self.queue) if self.conf.get("user") else None
        waits = [rfd] + ([server] if server else [])
        log.line(f"daemon started on {self.queue.path}")
        while not self.stopping:
            up = self.online()
            if up != self.up:           # at start too: the first full scan
                relay.route_came_up(self.conf, self.queue, up - (self.up or set()))
                self.up = up
                self.full_scan()
            wake = min(self.due.values(), default=time.time() + POLL_SECONDS)
            timeout = max(0.0, min(wake - time.time(), POLL_SECONDS))
            program.title("masq-send: idle, "
                          f"{len(self.due)} message{'s' if len(self.due) != 1 else ''} waiting")
            try:
                ready, _, _ = select.select(waits, [], [], timeout)
            except InterruptedError:
                continue
            if self.stopping:
                break
            if server in ready:
                action = server.serve()
                if action:
                    self.flush(action[1])
            if rfd in ready:
                _drain(rfd)
                self.new_mail()
            elif not ready:
                self.adopt()
            self.run_due()
        if server:
            server.close()
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
        pick_up(self.conf, self.queue)
        promote(self.conf, self.queue)
        now = time.time()
        self.due = {}
        for qid in self.queue.ids("active"):
            self.due[qid] = now
        self.run_due()

    def new_mail(self):
        pick_up(self.conf, self.queue)     # a user's drop file woke us as masq-queue does
        ids = self.queue.ids("incoming")
        promote(self.conf, self.queue, ids)
        now = time.time()
        for qid in ids:
            self.due[qid] = now

    def adopt(self):
        """Filter again what a filter deferred; take on active messages we do not know."""
        pick_up(self.conf, self.queue)
        promote(self.conf, self.queue)
        now = time.time()
        for qid in self.queue.ids("active"):
            self.due.setdefault(qid, now)

    def flush(self, forced):
        """A user's runq (control `flush`): every message is due now; `forced`: runq -qo."""
        if forced:
            try:
                run_once(self.conf, self.queue, forced)
            except Error as e:      # a user's request never stops the daemon
                log.warn(f"queue run for route {forced}: {e}")
        self.adopt()
        now = time.time()
        for qid in self.due:
            self.due[qid] = now

    def run_due(self):
        """One run over the messages that are due, as runq makes them."""
        now = time.time()
        messages = []
        for qid in sorted(q for q, when in self.due.items() if when <= now):
            try:
                messages.append(spool.Message(self.queue, "active", qid))
            except (FileNotFoundError, spool.FormatError):
                self.due.pop(qid, None)
        if not messages:
            return
        runner = _runner(self.conf, self.queue, self.up or set(),
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
