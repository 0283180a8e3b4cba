"""Run the installed masq programs as a caller would: argv, stdin, env, fds.

`run()` gives a Result(rc, out, err) whose failed checks show the command,
the code and both streams.  The `masq` fixture is a folder made by the real
`masq-setup local-only` in tmp_path.
"""
import os
import socket
import subprocess
import sys
import time

import pytest

BIN = os.path.dirname(sys.executable)      # the venv's bin: the installed programs


class Result:
    def __init__(self, argv, rc, out, err):
        self.argv, self.rc, self.out, self.err = argv, rc, out, err

    def __repr__(self):
        return (f"command: {' '.join(map(str, self.argv))}\nexit: {self.rc}\n"
                f"stdout: {self.out!r}\nstderr: {self.err!r}")

    def ok(self):
        assert self.rc == 0, self
        return self


def clean_env(**extra):
    """A child's environment: nothing from ours but PATH and HOME (cf. `env -`)."""
    env = {"PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/"),
           "LC_ALL": "C.UTF-8"}
    env.update({k: str(v) for k, v in extra.items() if v is not None})
    return env


def run(argv, input=b"", env=None, timeout=60, pass_fds=(), cwd=None, **kw):
    """Run a program; argv[0] without a slash is looked up in the venv's bin."""
    argv = [str(a) for a in argv]
    if "/" not in argv[0] and os.path.exists(os.path.join(BIN, argv[0])):
        argv[0] = os.path.join(BIN, argv[0])
    p = subprocess.run(argv, input=input, capture_output=True, env=env or clean_env(),
                       timeout=timeout, pass_fds=pass_fds, cwd=cwd, **kw)
    return Result(argv, p.returncode, p.stdout, p.stderr)


def free_port():
    """A loopback TCP port nobody listens on (connecting is refused), for a server to take."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, seconds=20, poll=0.01):
    """Poll a condition with a deadline (a daemon has no readiness fd): True once it holds."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def enqueue(masq, message, sender, recipients, env=None):
    """Run masq-queue with the message on fd 0 and the envelope on fd 1."""
    envelope = b"F" + sender.encode() + b"\0"
    envelope += b"".join(b"T" + r.encode() + b"\0" for r in recipients) + b"\0"
    r, w = os.pipe()
    os.write(w, envelope)
    os.close(w)
    try:
        p = subprocess.run([os.path.join(BIN, "masq-queue")], input=message, stdout=r,
                           stderr=subprocess.PIPE, env=env or masq.env(), timeout=60)
    finally:
        os.close(r)
    return Result(["masq-queue"], p.returncode, b"", p.stderr)


class Masq:
    """A masq folder made by masq-setup, and ways to run its programs."""

    def __init__(self, folder):
        self.dir = folder
        self.conf = os.path.join(folder, "masq.toml")
        self.spool = os.path.join(folder, "spool")

    def env(self, **extra):
        return clean_env(MASQ_CONF=self.conf, **extra)

    def run(self, argv, input=b"", env=None, **kw):
        """Run a program with MASQ_CONF pointing here."""
        return run(argv, input=input, env=env or self.env(), **kw)

    def bin(self, name):
        """A command from the folder's own bin/ (sendmail, mailq, runq, ...)."""
        return os.path.join(self.dir, "bin", name)

    def config(self, text):
        """Append TOML to masq.toml (top-level keys must come before tables)."""
        with open(self.conf, "a") as f:
            f.write("\n" + text + "\n")

    def set_config(self, text):
        with open(self.conf, "w") as f:
            f.write(text)

    def use_mailbox(self, kind, path=None, mda=None):
        """Switch [local] of the masq-setup config: mailbox kind, path, MDA command."""
        with open(self.conf) as f:
            text = f.read().replace('mailbox = "maildir"', f'mailbox = "{kind}"')
        if path is None and kind == "mbox":
            path = "mail/{user}"
        if path is not None:
            text = text.replace('path = "mail/{user}/"', f'path = "{path}"')
        if mda is not None:
            text = text.replace('mda = "procmail -d {user}"', f'mda = "{mda}"')
        self.set_config(text)

    def queue_ids(self, stage=None):
        stages = [stage] if stage else ["incoming", "active", "hold"]
        return sorted(n for s in stages for n in os.listdir(os.path.join(self.spool, s)))

    def log(self):
        """The event log so far ("" before its first line)."""
        try:
            with open(os.path.join(self.dir, "masq.log")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def maildir(self, user):
        import mailbox
        return mailbox.Maildir(os.path.join(self.dir, "mail", user), create=False)


@pytest.fixture(scope="session", autouse=True)
def fresh_bytecode():
    """Compile lib/ before any test: a program run under RLIMIT_FSIZE that wrote a
    stale .pyc would leave it cut short (CPython ignores the short write), and every
    later import of that module would fail."""
    import compileall
    lib = os.path.join(os.path.dirname(__file__), "..", "lib")
    compileall.compile_dir(lib, quiet=1)


def reap(proc):
    """After a test, however it ended: kill the daemon if it still runs, reap it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe:
            pipe.close()


def listen_trigger(spool):
    """Open the spool's trigger FIFO for reading, as a masq-send daemon does: with a
    reader there, sendmail -odb and masq-smtpd only wake it and start no queue run."""
    return os.open(os.path.join(spool, "trigger"), os.O_RDONLY | os.O_NONBLOCK)


@pytest.fixture
def daemon_listens(masq):
    """A reader on the trigger standing in for a daemon: each message stays queued for
    the test to see.  Yields the descriptor (a test may close it: no daemon then)."""
    fd = listen_trigger(masq.spool)
    yield fd
    try:
        os.close(fd)
    except OSError:
        pass


@pytest.fixture
def servers():
    """Servers a test starts (each with a stop()); all stopped after it."""
    started = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def masq(tmp_path):
    folder = str(tmp_path / "masq")
    run(["masq-setup", "local-only", folder, "--hostname", "test.example"]).ok()
    return Masq(folder)
