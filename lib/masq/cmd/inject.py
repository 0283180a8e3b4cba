"""masq-inject: submit mail from local users, as sendmail does.

Usage:
  sendmail [-t] [-i] [-f ADDR] [-F NAME] [-odb | -odq | -odi] [-v] [-C FILE] [--] [ADDRESS...]
  sendmail -bp | -bs | -bi | -bh | -bH | -q | -qo ROUTE [-C FILE]
  sendmail -bv [-C FILE] ADDRESS...
  sendmail -g [ROUTE] | -go [ROUTE] [-v] [-C FILE]
  mailq | runq | newaliases | hoststat | purgestat [-C FILE]
  rmail [-C FILE] ADDRESS...
  mailrm [-C FILE] ID...
  masq-inject --help

Options:
  -t        Also send to the addresses in To, Cc and Bcc (Resent-To, -Cc,
            -Bcc when the message has any), added to the ADDRESS arguments.
  -i, -oi   A line holding only "." does not end the message.
  -f ADDR   Envelope sender (also -r ADDR); "<>" is the null sender.
  -F NAME   Full name for a From line that masq-inject adds.
  -bm       Read a message and queue it (the default).
  -bp       List the queue (mailq).
  -bs       Speak SMTP on stdin and stdout.
  -bi       Check the aliases file (newaliases).
  -bv       Say where mail to each ADDRESS would go; send nothing.
  -bh       Show the host status store (hoststat).
  -bH       Empty the host status store (purgestat).
  -q        Run the queue once (runq).
  -qo ROUTE Run the queue once as if ROUTE were online.
  -g        Fetch mail by POP3 for every route (masq-fetch --all); with
            ROUTE, for that route's accounts.
  -go       Fetch mail for the routes that are online; with ROUTE, as if
            ROUTE were online.
  -odb      Deliver in the background after queuing (the default).
  -odq      Queue only; the next queue run delivers.
  -odi      Deliver before exiting (the exit code still says "queued").
  -v        Say on stderr what happens.
  -C FILE   Read this configuration instead of $MASQ_CONF.
  --        End of options: the rest are addresses.
  --help    Show this.

Flags may be grouped (-ti) and values attached (-fADDR, -oi).  Accepted and
ignored: -m, -B ARG, -N ARG, -oem, -oep, -oee and every -oe...; other -oX
options are ignored with a warning.  The name called decides the default
mode: mailq is -bp, runq is -q, newaliases is -bi, hoststat is -bh,
purgestat is -bH, rmail is -i and drops a leading UUCP "From " line,
mailrm ID... removes messages from the queue.
The message comes on stdin; exit codes are sysexits(3): masq-inject(8).
"""
import posix
import pwd
import sys

from masq import Error, cleanup, config, handoff, headers, pathenv, program, spool
from masq.envelope import Envelope
from masq.program import Exit

MODES_BY_NAME = {"mailq": "p", "runq": "q", "newaliases": "i", "mailrm": "rm",
                 "hoststat": "h", "purgestat": "H"}
MODE_WORDS = {"m": "-bm", "p": "-bp", "s": "-bs", "i": "-bi", "v": "-bv",
              "q": "-q", "rm": "mailrm", "h": "-bh", "H": "-bH", "g": "-g"}
VALUE_FLAGS = "fFrCNBob"         # these take a value, attached or as the next word
IGNORED_FLAGS = "m"


class UsageError(Error):
    """A command line sendmail would refuse."""

    code = Exit.USAGE
    temporary = False


class Options:
    """What the command line asks for."""

    def __init__(self):
        self.mode = None            # m p s i v q rm
        self.route = None           # -qo ROUTE, -g ROUTE, -go ROUTE
        self.online = False         # -go: the routes that are online
        self.extract = False        # -t
        self.dots = True            # a lone "." ends input (until -i)
        self.sender = None          # -f / -r
        self.fullname = None        # -F
        self.delivery = "b"         # -od: b, q or i
        self.verbose = False
        self.conf = None
        self.args = []
        self.rmail = False


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv[:argv.index("--") if "--" in argv else len(argv)]:
        sys.stdout.write(__doc__)
        return Exit.OK
    try:
        opts = parse(argv, program.name())
    except UsageError as e:
        usage = __doc__.split("\n\n")[1]
        program._say(f"{program.name()}: fatal: {e}")
        program._say(usage)
        return Exit.USAGE
    conf = config.load(opts.conf)
    mode = opts.mode or "m"
    if mode == "m":
        return submit(conf, opts)
    return RUN_MODE[mode](conf, opts)


def parse(argv, name):
    """Parse sendmail's command line, getopt style: flags first, then addresses."""
    opts = Options()
    base = MODES_BY_NAME.get(name)
    if base:
        opts.mode = base
    if name == "rmail":
        opts.rmail, opts.dots = True, False
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            break
        if not word.startswith("-") or word == "-":
            i -= 1
            break
        if word.startswith("--"):
            raise UsageError(f"unknown option {word}")
        j = 1
        while j < len(word):
            flag = word[j]
            j += 1
            if flag == "g":         # -g [ROUTE], -go [ROUTE]: masqmail 0.2's fetch
                i = fetch_option(opts, word[j:], argv, i)
                break
            if flag == "q" or flag in VALUE_FLAGS:
                value = word[j:]
                if not value and flag in VALUE_FLAGS:
                    if i >= len(argv):
                        raise UsageError(f"option -{flag} needs a value")
                    value = argv[i]
                    i += 1
                if flag == "q" and value == "o":
                    if i >= len(argv):
                        raise UsageError("option -qo needs a route name")
                    value += argv[i]
                    i += 1
                option(opts, flag, value)
                break
            if flag == "t":
                opts.extract = True
            elif flag == "i":
                opts.dots = False
            elif flag == "v":
                opts.verbose = True
            elif flag in IGNORED_FLAGS:
                pass
            else:
                raise UsageError(f"unknown option -{flag}")
    opts.args = argv[i:]
    mode = opts.mode or "m"
    if mode in ("p", "s", "i", "q", "h", "H", "g") and opts.args:
        raise UsageError(f"{MODE_WORDS[mode]} takes no addresses")
    if mode in ("v", "rm") and not opts.args:
        what = "ADDRESS" if mode == "v" else "ID"
        raise UsageError(f"{MODE_WORDS[mode]} needs at least one {what}")
    return opts


def option(opts, flag, value):
    """Take one option that has a value."""
    if flag == "b":
        if value not in ("m", "p", "s", "i", "v", "h", "H"):
            hint = {"d": ": run masq-send as a daemon, and tcpserver with masq-smtpd"}
            raise UsageError(f"-b{value} is not supported{hint.get(value, '')}")
        set_mode(opts, value)
    elif flag == "q":
        if value.startswith("o") and len(value) > 1:
            opts.route = value[1:]
        elif value:
            raise UsageError(f"-q{value} is not supported: for queue runs at intervals "
                             "run masq-send as a daemon")
        set_mode(opts, "q")
    elif flag == "o":
        if value == "i":
            opts.dots = False
        elif value.startswith("d") and value[1:] in ("b", "q", "i", "d"):
            opts.delivery = "q" if value[1:] == "d" else value[1:]
        elif value.startswith("e") or value == "m":
            pass
        else:
            program._say(f"{program.name()}: warning: ignoring unknown option -o{value}")
    elif flag in "fr":
        opts.sender = value
    elif flag == "F":
        opts.fullname = value
    elif flag == "C":
        opts.conf = value
    # -N (DSN notify) and -B (body type) are accepted and ignored: masq is
    # 8-bit clean and sends no DSN requests.


def fetch_option(opts, value, argv, i):
    """-g or -go and the ROUTE that may follow; the index after them."""
    if value not in ("", "o"):
        raise UsageError(f"unknown option -g{value}")
    set_mode(opts, "g")
    opts.online = value == "o"
    if i < len(argv) and not argv[i].startswith("-"):
        if opts.online and argv[i][:1].isdigit():
            raise UsageError("-go INTERVAL is not supported: for fetching when a route "
                             "comes up set fetch_on_up and run masq-send as a daemon")
        opts.route = argv[i]
        i += 1
    return i


def set_mode(opts, mode):
    """Modes exclude each other, as in masqmail."""
    if opts.mode and opts.mode != mode:
        raise UsageError(f"{MODE_WORDS[mode]}: an operation mode was already given "
                         f"({MODE_WORDS[opts.mode]})")
    opts.mode = mode


def submit(conf, opts):
    """Read the message on stdin, clean its header section and queue it."""
    login, gecos = cleanup.user()
    hostname = conf.hostname
    sender = cleanup.sender(opts.sender, login, hostname)
    recipients = []
    for arg in opts.args:
        recipients += cleanup.recipients(arg, hostname, "recipient address")
    if not recipients and not opts.extract:
        raise Error("recipient addresses must be given on the command line or with -t",
                    code=Exit.USAGE, temporary=False)
    source = cleanup.Input(sys.stdin.buffer, opts.dots)
    max_size = conf.get("max_size")
    if opts.rmail:
        sender = cleanup.strip_uucp_from(source, sender if opts.sender else None, hostname)
    limit = headers.MAX_HEADER_BYTES if not max_size else min(max_size, headers.MAX_HEADER_BYTES)
    section = headers.read(source.readline, limit)
    if opts.extract:
        names = ("resent-to", "resent-cc", "resent-bcc")
        if not any(section.has(n) for n in names):
            names = ("to", "cc", "bcc")
        for name in names:
            for value in section.values(name):
                recipients += cleanup.recipients(value, hostname, f"address in {name.title()}")
        if not recipients:
            raise Error("no recipient addresses found in the header",
                        code=Exit.USAGE, temporary=False)
    recipients = list(dict.fromkeys(recipients))
    fullname = opts.fullname if opts.fullname is not None else gecos
    added = cleanup.added_headers(section, login, fullname, sender, opts.sender is not None,
                                  hostname)
    head = added + section.encode(drop=("return-path", "bcc", "resent-bcc"))
    masq_uid = _system_uid(conf)
    if masq_uid is not None and posix.geteuid() != masq_uid:
        # system mode: only masq writes the spool; the drop file's owner says who we are
        from masq import drop       # only system mode's submissions load it
        name = drop.write(conf, cleanup.Body(head, source), Envelope(sender, recipients))
        if opts.verbose:
            program._say(f"{program.name()}: drop/{name}: left for masq-send, from <{sender}> "
                         "to " + ", ".join(f"<{r}>" for r in recipients))
        return Exit.OK
    queue = _queue(conf.path("spool"))
    try:
        qid = handoff.submit(conf, cleanup.Body(head, source), Envelope(sender, recipients),
                             {"proto": "local", "user": login}, queue=queue)
    except handoff.HookError as e:      # a sysexits code from the hook is ours to give too
        if e.status is not None and 64 <= e.status <= 78:
            e.code = e.status
        raise
    if opts.verbose:
        program._say(f"{program.name()}: {qid or 'message'}: queued, from <{sender}> to "
                     + ", ".join(f"<{r}>" for r in recipients))
    return _deliver(conf, opts, qid, queue.woken)


def _deliver(conf, opts, qid, woken):
    """After queuing: -odq nothing, -odb wake or start masq-send, -odi run it."""
    say = program._say if opts.verbose else (lambda text: None)
    name = program.name()
    run_args = ["-C", conf.file, "--once"] + ([qid] if qid else [])
    if opts.delivery == "q":
        say(f"{name}: left in the queue for the next queue run (-odq)")
        return Exit.OK
    if not woken and not handoff.may_run_queue(conf):
        say(f"{name}: no masq-send daemon listening: the message waits for it or root's runq")
        return Exit.OK
    if opts.delivery == "b":
        if woken:
            say(f"{name}: the masq-send daemon was woken")
            return Exit.OK
        say(f"{name}: no masq-send daemon listening: delivering in the background")
        handoff.background(run_args, lambda args: _program("send").main(args))
        return Exit.OK
    try:
        send = _program("send")
    except Error as e:
        program._say(f"{name}: warning: {e}; the message waits in the queue")
        return Exit.OK
    code = send.main(run_args)
    say(f"{name}: masq-send --once exited with {code}")
    return Exit.OK


def _program(name):
    """The module masq.cmd.NAME, or Error 69 if it is not installed.

    sendmail's other names (mailq, runq, -bv, -bs, mailrm) and -odi/-odb run
    masq-queue's, masq-send's, masq-route's or masq-smtpd's main() in this
    process, with the arguments an exec would get (DESIGN.md: a process
    boundary is the contract, not a fresh interpreter); imported only then.
    """
    import importlib
    try:
        return importlib.import_module(f"masq.cmd.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"masq.cmd.{name}":
            raise
        raise Error(f"masq-{name} is not available yet", code=Exit.UNAVAILABLE,
                    temporary=False) from None


def list_queue(conf, opts):
    if _asks_daemon(conf):
        text = _ask(conf, "list", "the mail queue cannot be listed: masq-send is not running",
                    Exit.UNAVAILABLE)
        sys.stdout.write(text)
        return Exit.OK
    return _program("queue").main(["-C", conf.file, "list"])


def run_queue(conf, opts):
    if _asks_daemon(conf):
        _ask(conf, "flush" + (f" {opts.route}" if opts.route else ""),
             "masq-send is not running: mail waits until it runs", Exit.TEMPFAIL)
        if opts.verbose:
            program._say(f"{program.name()}: masq-send runs the queue now")
        return Exit.OK
    route = ["--route", opts.route] if opts.route else []
    verbose = ["-v"] if opts.verbose else []        # runq -v: a line per attempt
    return _program("send").main(["-C", conf.file, "--once", *verbose, *route])


def _system_uid(conf):
    """The uid of the masq user in system mode (masq.toml `user`), else None."""
    name = conf.get("user")
    if not name:
        return None
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise Error(f"{conf.file} names the user {name}, who does not exist: "
                    "run masq-setup system", code=Exit.CONFIG) from None


def _asks_daemon(conf):
    """System mode and neither root nor masq: mailq and runq go through the daemon."""
    masq_uid = _system_uid(conf)
    return masq_uid is not None and posix.geteuid() not in (0, masq_uid)


def _ask(conf, request, down, down_code):
    """The daemon's answer to a control request (masq.control), or Error with a sysexits code."""
    from masq import control    # socket: only mailq and runq of users load it
    try:
        word, why, text = control.ask(spool.Spool(conf.path("spool")), request)
    except control.NotRunningError:
        raise Error(down, code=down_code) from None
    if word == "denied":
        raise Error(why, code=Exit.NOPERM, temporary=False)
    if word == "error":
        raise Error(why, code=Exit.USAGE, temporary=False)
    return text


def verify(conf, opts):
    """-bv: masq-route's answer for each address, qualified as for sending."""
    hostname = conf.hostname
    addrs = []
    for arg in opts.args:
        addrs += cleanup.recipients(arg, hostname, "address")
    return _program("route").main(["-C", conf.file, *addrs])


def check_aliases(conf, opts):
    """-bi, newaliases: each bad line of the aliases file on stderr."""
    aliases = _program_module("masq.aliases", "the aliases checker")
    path = conf.path("aliases")
    problems = aliases.check(path)
    for number, text in problems:
        program._say(f"{program.name()}: {path}:{number}: {text}")
    return Exit.DATAERR if problems else Exit.OK


def smtp(conf, opts):
    """-bs: masq-smtpd on stdin and stdout, for the user who runs us.

    In system mode only the masq user writes the spool: root's -bs becomes
    masq first (as inetd's user field would make it); another user's is
    refused, as that user could not queue what the dialogue accepts.
    """
    login, _ = cleanup.user()
    masq_uid = _system_uid(conf)
    if masq_uid is not None and posix.geteuid() != masq_uid:
        if posix.geteuid() != 0:
            raise Error("-bs runs as the masq user in system mode: other users submit "
                        "with sendmail, or SMTP to localhost port 25",
                        code=Exit.NOPERM, temporary=False)
        from masq import privilege
        privilege.drop(pwd.getpwuid(masq_uid))
    smtpd = _program("smtpd")
    pathenv.putenv("MASQ_PROTO", "esmtp")
    pathenv.putenv("MASQ_USER", login)
    return smtpd.main(["-C", conf.file])


def fetch(conf, opts):
    """-g, -go: masq-fetch, run from beside this interpreter (its own process)."""
    args = ["-C", conf.file] + (["--route", opts.route] if opts.route
                                else [] if opts.online else ["--all"])
    path = pathenv.join(pathenv.dirname(sys.executable), "masq-fetch")
    if not posix.access(path, posix.X_OK):
        import shutil       # only when masq-fetch is not beside us
        path = shutil.which("masq-fetch")
        if not path:
            raise Error("masq-fetch is not installed", code=Exit.UNAVAILABLE,
                        temporary=False)
    sys.stdout.flush()
    sys.stderr.flush()
    posix.execv(path, [path, *args, *(["-v"] if opts.verbose else [])])


def remove(conf, opts):
    return _program("queue").main(["-C", conf.file, "remove", *opts.args])


def _program_module(module, what):
    import importlib    # as in _program: only the mode that needs the module loads it
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise Error(f"{what} is not available yet", code=Exit.UNAVAILABLE,
                    temporary=False) from None


def host_status(conf, opts):
    """-bh, hoststat: the host status store, one line per destination."""
    from masq import hoststat   # sqlite3: only these two modes pay for it
    store = hoststat.HostStat(conf.path("spool"))
    try:
        sys.stdout.writelines(hoststat.describe(store.list()))
    finally:
        store.close()
    return Exit.OK


def purge_host_status(conf, opts):
    """-bH, purgestat: forget every host's status, so the next run tries them all."""
    from masq import hoststat
    store = hoststat.HostStat(conf.path("spool"))
    try:
        count = store.purge()
    finally:
        store.close()
    if opts.verbose:
        program._say(f"{program.name()}: forgot {count} host(s)")
    return Exit.OK


RUN_MODE = {"p": list_queue, "q": run_queue, "v": verify, "i": check_aliases,
            "s": smtp, "rm": remove, "h": host_status, "H": purge_host_status, "g": fetch}


def _queue(path):
    """A Spool that remembers whether enqueue's trigger woke a daemon."""

    class Spool(spool.Spool):
        woken = False

        def trigger(self):
            self.woken = super().trigger()
            return self.woken

    return Spool(path)
