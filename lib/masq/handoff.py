"""The hand-off to the queue: every program that gives masq-queue a message.

enqueue() writes one message into the spool in this process, as masq-queue
does (it is masq-queue's body); submit() is what the other programs call
(masq-inject, masq-smtpd, masq-local forwarding, bounces): enqueue(), or
$MASQ_QUEUE when it is set, run as masq-queue would be (qmail's QMAILQUEUE):
message on fd 0, envelope on fd 1, trace data in the MASQ_* variables below.
The trace word "add" (MASQ_ADD_HEADERS) names header fields to write under
the Received line ("date message-id"); "cert" (MASQ_CERT) is the subject of
the client's verified TLS certificate, a comment in the Received line.
Neither is kept in the spool.
background() starts the delivery of what was queued, as sendmail -odb does.
"""
import posix
import time

from masq import Error, log, message, pathenv, program, spool
from masq.program import Exit

TRACE_ENV = {"proto": "MASQ_PROTO", "client": "MASQ_CLIENT",
             "client_name": "MASQ_CLIENT_NAME", "helo": "MASQ_HELO",
             "auth": "MASQ_AUTH", "user": "MASQ_USER", "for": "MASQ_FOR",
             "add": "MASQ_ADD_HEADERS", "cert": "MASQ_CERT", "trusted": "MASQ_TRUSTED"}


def enqueue(conf, stream, env, trace, queue=None):
    """Write one message under its Received line; return the queue id.

    `env` is the Envelope, or a function that reads it once the message has
    been read (the descriptor order of qmail-queue).
    """
    queue = queue or spool.Spool(conf.path("spool"))
    with queue.new_message(conf.get("max_size")) as new:
        received = message.received(new.id, conf.hostname, trace)
        new.uncounted = len(received)       # max_size is for what the sender sent
        new.write(received)
        new.copy_from(stream)
        if callable(env):
            env = env()
        archive = conf.get("queue.archive_bcc")
        if archive and archive not in env.recipients:
            env.recipients.append(archive)      # a copy of every message
        qid = new.commit(env, {k: v for k, v in trace.items() if k not in ("add", "cert")})
    if not log.ready():
        log.setup(conf)
    log.event(qid, None, **{"from": f"<{env.sender}>"}, size=new.size,
              nrcpt=len(env.recipients), proto=trace.get("proto"),
              client=trace.get("client") or trace.get("user"), auth=trace.get("auth"))
    queue.trigger()
    return qid


HOOK_TIMEOUT_SECONDS = 86400    # a $MASQ_QUEUE stuck this long is killed (qmail-queue's DEATH)


class HookError(Error):
    """$MASQ_QUEUE did not take the message; `status` is its exit status (None: never ran)."""

    def __init__(self, message, status=None, temporary=True):
        super().__init__(message, code=Exit.TEMPFAIL if temporary else Exit.DATAERR,
                         temporary=temporary)
        self.status = status


def submit(conf, stream, env, trace, queue=None, timeout=HOOK_TIMEOUT_SECONDS):
    """Queue one message: in-process, or through $MASQ_QUEUE when it is set.

    Returns the queue id (None from a $MASQ_QUEUE program, which tells none).
    Every program that hands messages to masq-queue goes through here.
    """
    path = pathenv.getenv("MASQ_QUEUE")
    if not path:
        return enqueue(conf, stream, env, trace, queue=queue)
    run_hook(path, stream, env, trace, timeout)
    return None


def run_hook(path, stream, env, trace, timeout=HOOK_TIMEOUT_SECONDS):
    """Run $MASQ_QUEUE as masq-queue runs: message on fd 0, envelope on fd 1, trace in MASQ_*.

    The envelope waits in a temporary file, so the program may read it when
    it likes; the message is fed within the timeout.  Raises HookError unless
    the program exits 0.
    """
    import os           # as in masq.child: only a $MASQ_QUEUE hook pays for these
    import subprocess
    import tempfile

    from masq import child
    environ = dict(os.environ)
    for word, var in TRACE_ENV.items():
        environ.pop(var, None)
        if trace.get(word):
            environ[var] = trace[word]
    with tempfile.TemporaryFile() as envelope:
        envelope.write(env.encode())
        envelope.flush()
        envelope.seek(0)
        try:
            status = child.run([path], stream, time.monotonic() + timeout,
                               stdout=envelope, env=environ)
        except OSError as e:
            raise HookError(f"unable to run MASQ_QUEUE={path}: {e.strerror}") from None
        except subprocess.TimeoutExpired:
            raise HookError(f"MASQ_QUEUE={path} took longer than {timeout:g} s") from None
        while stream.read(65536):       # it stopped reading: the rest is not its
            pass
    if status != 0:
        temporary, text = program.classify(status)
        raise HookError(f"MASQ_QUEUE={path} refused the message: {text}", status=status,
                        temporary=temporary)


def may_run_queue(conf):
    """Whether this process may start a queue run: always in single-user mode; in
    system mode only root, since masq-send must start as root to deliver locally
    (masq-lspawn(8)): anyone else leaves the message to the daemon or root's runq."""
    return not conf.get("user") or posix.geteuid() == 0


def background(args, main=None):
    """Run one queue run, masq-send ARGS, detached from us; return at once.

    In a grandchild (no zombie for a caller that lives on, as a masq-smtpd
    child of masq-tcpserver -m does) with no descriptor of ours: main(args)
    when given (sendmail has masq-send's code loaded), else masq-send run
    from beside this interpreter or from $PATH.
    """
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    pid = posix.fork()
    if pid:
        try:
            posix.waitpid(pid, 0)
        except ChildProcessError:   # SIGCHLD ignored: the kernel reaped it
            pass
        return
    code = Exit.TEMPFAIL
    try:
        if posix.fork() == 0:
            posix.setsid()
            null = posix.open("/dev/null", posix.O_RDWR)
            for fd in (0, 1, 2):
                posix.dup2(null, fd)
            posix.close(null)
            # a descriptor the caller passed down must not stay open for as long
            # as the delivery takes: the caller may be waiting for its EOF
            posix.closerange(3, posix.sysconf("SC_OPEN_MAX"))
            if main is not None:
                code = main(args)
            else:
                path = pathenv.join(pathenv.dirname(sys.executable), "masq-send")
                if not posix.access(path, posix.X_OK):
                    import shutil   # as in masq.deliverer: only when not beside us
                    path = shutil.which("masq-send") or "masq-send"
                posix.execv(path, [path, *args])
        else:
            code = Exit.OK
    except BaseException:   # noqa: BLE001 -- nobody is left to tell; the queue keeps it
        pass
    finally:
        posix._exit(code if isinstance(code, int) else Exit.TEMPFAIL)
