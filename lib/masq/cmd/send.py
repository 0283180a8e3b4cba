"""masq-send: the scheduler: deliver what can go now, keep the rest for later.

Usage:
  masq-send [-C FILE] [--once] [-v] [--route NAME] [ID...]
  masq-send -h | --help

Options:
  -C FILE       Read this configuration instead of $MASQ_CONF.
  --once        One queue run, then exit (runq): every message that can go is
                tried once, whatever its back-off says.
  --route NAME  Run as if route NAME were online (sendmail -qo NAME).
  -v            With --once: one line on stderr per recipient as it is tried.
  -h --help     Show this.

Without --once it is the daemon: woken by masq-queue through the spool's
trigger FIFO after every enqueue, it retries deferred mail on a back-off
schedule, rescans when the online routes change, and stops cleanly on SIGTERM
(a delivery under way is finished first).  It runs 10 nice levels below
where it was started, so that taking mail in gets the CPU first, and shares
a run of 16 or more messages delivered here with a helper process (the
second core).
IDs limit a run to those messages.
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
import sys
import time

from masq import Error, config, log, program, route, spool
from masq.filter import promote
from masq.program import Exit

# An idle daemon holds only what waiting needs: masq.attempt and masq.relay
# (and the socket, enum, mailbox and SMTP modules behind them), masq.drop,
# masq.control and masq.privilege (system mode) are imported by the code
# that uses them, when it first runs.

POLL_SECONDS = 60               # detect = "command" (or a failed watch): asked this often
DAEMON_NICE = 10                # the daemon's deliveries yield the CPU to what takes mail in
SPLIT_MESSAGES = 16             # this many due messages delivered here: a second process helps
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def main(argv=None):
    args = _quick(sys.argv[1:] if argv is None else argv) \
        or program.parse(__doc__, argv, usage_code=Exit.USAGE)
    conf = config.load(args["-C"])
    if not (args["--once"] or args["ID"]):
        # the daemon delivers while masq-smtpd and sendmail accept: both want
        # the CPU, and a client waits for the one, nobody for the other (a
        # queue run a person starts is not lowered); masq-lspawn inherits it
        try:
            os.nice(DAEMON_NICE)
        except OSError:
            pass
    if conf.get("user"):
        from masq import privilege
        privilege.start(conf)   # system mode as root: masq-lspawn, then masq for good
    log.setup(conf)
    queue = spool.Spool(conf.path("spool"))
    if args["--once"] or args["ID"]:
        from masq import attempt
        report = attempt.Report(sys.stderr, program.name(), args["-v"])
        try:
            run_once(conf, queue, args["--route"], args["ID"], report)
        finally:
            report.close()
        return Exit.OK
    return Daemon(conf, queue, args["--route"]).run()


def _quick(argv):
    """The daemon's argv, none or -C FILE, parsed without docopt: docopt brings
    re, enum and typing, a sixth of the idle daemon's memory.  Anything else
    returns None and docopt decides."""
    if argv and (len(argv) != 2 or argv[0] != "-C" or argv[1].startswith("-")):
        return None
    return {"-C": argv[1] if argv else None, "--once": False, "-v": False, "--route": None,
            "ID": [], "--help": False}


def run_once(conf, queue, forced=None, ids=(), report=None):
    """One queue run: promote incoming, try every active message once.

    Bounces made during the run are delivered in the same run (a few passes
    at most), so that runq leaves nothing behind that it could have sent.
    `report` (attempt.Report) shows each attempt and the progress on stderr.
    """
    from masq import relay
    program.title("masq-send: queue run")
    up = route.online(conf, forced)
    relay.route_came_up(conf, queue, [forced] if forced else ())   # -qo NAME: try it now
    tried = set()
    runner = _runner(conf, queue, up, runq=True, report=report)
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
            if report:
                report.add(len(messages))
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
    from masq import drop
    try:
        drop.pick_up(conf, queue)
    except Error as e:
        log.warn(f"{e}; drop files wait for the next run")


def _runner(conf, queue, up, runq=False, stopping=None, report=None):
    """The attempts of one queue run (masq.attempt), with its relay (masq.relay)."""
    from masq import attempt, relay
    return attempt.Run(conf, queue, up, relay.Relay(conf, queue, runq, stopping), stopping,
                       report)


def _find(queue, qid):
    """The active message with this id, or None (with a warning)."""
    try:
        msg = queue.find(qid)
    except spool.SpoolError as e:
        log.warn(str(e))
        return None
    return msg if msg.stage == "active" else None


class Daemon:
    """The queue runner that stays, asleep in select() until something happens.

    It wakes for the trigger FIFO (an enqueue; SIGTERM writes to it too),
    the control socket (system mode), inotify on masq.toml and the online
    file (detect = "file"), rtnetlink (detect = "link"), and the time the
    next message or filter retry is due.  With nothing due select() has no
    timeout: an idle daemon makes no system call.  Only detect = "command",
    which has no event to wait for, or a watch the kernel refused, makes it
    look every POLL_SECONDS.
    """

    def __init__(self, conf, queue, forced=None):
        self.conf, self.queue, self.forced = conf, queue, forced
        self.stopping = False
        self.due = {}               # qid -> when to try it next
        self.up = None              # the routes up at the last look
        self.look = True            # the routes may have changed: look before sleeping
        self.next_look = None       # polling only: when to look again
        self.refilter = None        # when to filter again what a filter deferred
        self.files = self.links = None
        self.helper = None          # the pid of split()'s helper while it runs

    def run(self):
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._stop)
        fifo = self.queue.folder("trigger")
        try:
            rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            # our own writer: the FIFO never reads EOF, and a signal can wake select
            self.wfd = wfd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            raise Error(f"unable to open {fifo}: {e.strerror}; "
                        "make the spool with masq-setup") from None
        server = None
        if self.conf.get("user"):   # system mode: users' mailq and runq (masq.control)
            from masq import control
            server = control.Server(self.conf, self.queue)
        self.watch()
        log.line(f"daemon started on {self.queue.path}")
        while not self.stopping:
            if self.look or (self.next_look and time.time() >= self.next_look):
                self.look_at_routes()   # at start too: the first full scan
            waits = [w for w in (rfd, server, self.files, self.links) if w is not None]
            timeout = self.timeout()
            program.title("masq-send: idle, "
                          f"{len(self.due)} message{'s' if len(self.due) != 1 else ''} waiting")
            try:
                ready, _, _ = select.select(waits, [], [], timeout)
            except InterruptedError:
                continue
            if self.stopping:
                break
            if self.files is not None and self.files in ready:
                self.changed(self.files.read())
            if self.links is not None and self.links in ready:
                self.look = self.links.read() or self.look
            if server is not None and server in ready:
                action = server.serve()
                if action:
                    self.flush(action[1])
            if rfd in ready:
                _drain(rfd)
                self.new_mail()
            elif not ready:             # the time something was due
                self.adopt()
            self.run_due()
        for w in (server, self.files, self.links):
            if w is not None:
                w.close()
        os.close(rfd)
        os.close(wfd)
        log.line("daemon stopped")
        return Exit.OK

    def watch(self):
        """Watch masq.toml, and what online detection reads: the online file
        (inotify) or the links (rtnetlink); poll when the kernel refuses."""
        from masq import watch      # ctypes or socket: only what this detection needs
        for w in (self.files, self.links):
            if w is not None:
                w.close()
        self.files = self.links = self.next_look = None
        detect = None if self.forced else self.conf.get("online.detect")
        paths = [self.conf.file]
        if detect == "file":
            paths.append(self.conf.path("online.file"))
        poll = detect == "command"
        try:
            self.files = watch.Files(paths)
        except watch.WatchError as e:
            log.warn(f"{e}; looking at {' and '.join(paths)} every {POLL_SECONDS} s")
            poll = True
        if detect == "link":
            try:
                self.links = watch.Links()
            except watch.WatchError as e:
                log.warn(f"{e}; looking at the links every {POLL_SECONDS} s")
                poll = True
        if poll:
            self.next_look = time.time()

    def changed(self, paths):
        """inotify: masq.toml is read again; any change means a look at the routes."""
        if self.conf.file in paths:
            self.reconfigure()
        if paths:
            self.look = True

    def reconfigure(self):
        """masq.toml changed: the new one, or the last good one (the error is logged).

        spool, user and log stay as they were at start: they need a restart.
        """
        conf = config.reload(self.conf)
        if conf is not self.conf:
            log.line(f"configuration {conf.file} read again")
            self.conf = conf
            self.watch()

    def timeout(self):
        """Seconds until the next thing due, or None: sleep until an event."""
        times = [t for t in (min(self.due.values(), default=None), self.refilter,
                             self.next_look) if t is not None]
        return max(0.0, min(times) - time.time()) if times else None

    def online(self):
        """The routes up now; on a broken online file or command, those up before."""
        try:
            return route.online(self.conf, self.forced)
        except Error as e:
            log.warn(f"{e}; keeping the routes known to be up")
            return self.up if self.up is not None else set()

    def look_at_routes(self):
        """A full scan when the routes up are not those of the last look."""
        self.look = False
        if self.next_look is not None:
            self.next_look = time.time() + POLL_SECONDS
        up = self.online()
        if up == self.up:
            return
        came = up - (self.up or set())
        # at start, with nothing queued, no host status could hold mail back:
        # masq.relay (and what it imports) waits for the first delivery
        if came and (self.up is not None or self.queue.ids("active")
                     or self.queue.ids("incoming")):
            from masq import relay
            relay.route_came_up(self.conf, self.queue, came)
        fetch_on_up(self.conf, came)
        self.up = up
        log.line(f"routes up: {', '.join(sorted(up)) or 'none'}")
        self.full_scan()

    def _stop(self, signum, frame):
        self.stopping = True
        if self.helper:
            try:
                os.kill(self.helper, signal.SIGTERM)
            except OSError:
                pass
        try:
            os.write(self.wfd, b"\0")     # select() is restarted after a handler (PEP 475)
        except OSError:
            pass

    def promote_incoming(self, ids=()):
        """incoming -> active; what a filter deferred is due again after queue.retry_min."""
        pick_up(self.conf, self.queue)     # system mode: users' drop files first
        promote(self.conf, self.queue, ids)
        if not self.queue.ids("incoming"):
            self.refilter = None
        elif self.refilter is None or self.refilter <= time.time():
            self.refilter = time.time() + self.conf.get("queue.retry_min")

    def full_scan(self):
        """Every active message becomes due now (after start, or a route change)."""
        self.promote_incoming()
        now = time.time()
        self.due = {}
        for qid in self.queue.ids("active"):
            self.due[qid] = now
        self.run_due()

    def new_mail(self):
        """The trigger: an enqueue, a drop file, a release; new active messages are due now."""
        self.promote_incoming(self.queue.ids("incoming"))
        now = time.time()
        for qid in self.queue.ids("active"):
            self.due.setdefault(qid, now)

    def adopt(self):
        """Filter again what a filter deferred; take on active messages we do not know."""
        self.promote_incoming()
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
        """One run over the messages that are due, as runq makes them; a long
        one shared with a second process (split())."""
        now = time.time()
        messages = []
        for qid in sorted(q for q, when in self.due.items() if when <= now):
            try:
                messages.append(spool.Message(self.queue, "active", qid))
            except (FileNotFoundError, spool.FormatError):
                self.due.pop(qid, None)
        if not messages:
            return
        helper = self.split(messages)
        if helper:
            taken = {m.id for m in helper[2]}
            messages = [m for m in messages if m.id not in taken]
        results = {}
        try:
            results = self.attempt(messages)
        finally:
            if helper:
                self.join(*helper, results)
        for qid, nxt in results.items():
            if nxt is None:
                self.due.pop(qid, None)
            else:
                self.due[qid] = nxt

    def attempt(self, messages):
        """Try each message once (masq.attempt): {qid: when it is due next, or None}."""
        runner = _runner(self.conf, self.queue, self.up or set(),
                         stopping=lambda: self.stopping)
        try:
            return runner.run(messages)
        finally:
            runner.close()

    def split(self, messages):
        """Fork a helper that tries every other message delivered only here, so
        that a burst is delivered on both cores: (pid, read end of its pipe,
        its messages), or None (this process tries them all).

        Only in single-user mode, from SPLIT_MESSAGES such messages on, and
        only while no other thread runs.  Mail for a route stays here: the
        helper opens no connection, so queue.parallel holds.  A message is
        still tried by one process at a time under its lock, and recorded as
        in any run: the split changes no promise.  The helper writes "N WHEN"
        to the pipe for the Nth of its messages.
        """
        if self.stopping or self.conf.get("user") or len(messages) < SPLIT_MESSAGES:
            return None
        local = [m for m in messages
                 if all(route.is_local(self.conf, m.recipients[i]) for i in m.pending())]
        import threading    # only now: an idle daemon holds what waiting needs
        if len(local) < SPLIT_MESSAGES or threading.active_count() > 1:
            return None
        theirs = local[1::2]
        # a SIGTERM waits until the helper's pid is known, so that it is passed on
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            rfd, wfd = os.pipe()
            try:
                pid = os.fork()
            except OSError:
                os.close(rfd)
                os.close(wfd)
                raise
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            log.warn(f"unable to start a helper for the queue run: {e.strerror}; "
                     "one process delivers")
            return None
        if pid:
            os.close(wfd)
            self.helper = pid
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            return pid, rfd, theirs
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        code = Exit.TEMPFAIL
        try:
            os.close(rfd)
            done = self.attempt(theirs)
            data = "".join(f"{n} {'-' if done[m.id] is None else repr(done[m.id])}\n"
                           for n, m in enumerate(theirs) if m.id in done).encode()
            while data:
                data = data[os.write(wfd, data):]
            code = Exit.OK
        except BaseException as e:  # noqa: BLE001 -- said in the log; the parent tries again
            log.warn(f"queue run helper: {e}")
        finally:
            os._exit(code)

    def join(self, pid, rfd, theirs, results):
        """Add the helper's results to ours, once it has exited.  A message it
        did not report (it died, or was stopped first) is tried again after
        queue.retry_min."""
        with os.fdopen(rfd, "rb") as f:
            data = f.read()
        self.helper = None          # before the wait: the pid may be reused after it
        os.waitpid(pid, 0)
        later = time.time() + self.conf.get("queue.retry_min")
        due = [later] * len(theirs)
        for line in data.split(b"\n")[:-1]:   # whole lines: a killed helper may cut the last
            n, _, when = line.partition(b" ")
            try:
                n, when = int(n), None if when == b"-" else float(when)
            except ValueError:
                continue
            if 0 <= n < len(due):
                due[n] = when
        results.update((m.id, when) for m, when in zip(theirs, due, strict=True))


def fetch_on_up(conf, names):
    """Start `masq-fetch --route NAME` for each route come up that says
    fetch_on_up = true: in a grandchild, reaped at once, so the daemon neither
    waits for it nor imports it; what it queues wakes us by the trigger."""
    names = [n for n, table in conf.routes if n in names and table.get("fetch_on_up") is True]
    for name in names:
        path = os.path.join(os.path.dirname(sys.executable), "masq-fetch")
        log.line(f"route {name} came up: masq-fetch --route {name}")
        pid = os.fork()
        if pid == 0:
            try:
                if os.fork() == 0:
                    os.setsid()
                    null = os.open(os.devnull, os.O_RDWR)
                    os.dup2(null, 0)
                    os.dup2(null, 1)
                    os.execv(path, [path, "-C", conf.file, "--route", name])
            except OSError as e:
                log.line(f"warning: unable to run {path}: {e.strerror}")
            except BaseException:   # noqa: BLE001 -- a child of the daemon never returns
                pass
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


def _drain(fd):
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
