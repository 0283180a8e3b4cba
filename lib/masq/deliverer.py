"""How masq-send hands local recipients to masq-local: in its process, or as a child.

Both ways answer deliver(msg, recipients) with one (letter, text) per
recipient (masq.outcome), and both treat whatever goes wrong around the
delivery itself as a temporary failure: retrying is safe, bouncing is not.
[local] deliver (masq.toml(5)) chooses:

    "in-process"  masq.local.deliver() in masq-send's own process: the fast
                  path of single-user mode, where masq-local would run as the
                  same user with the same configuration anyway, and a fork
                  per message costs more than the delivery (bench/README.md)
    "child"       masq-local(8) run as a child for each message: the message
                  on its stdin, one "K/Z/D text" line per recipient on its
                  stdout; the process boundary a privileged spawner needs
                  to start it as the recipient

Only in-process delivery shares fsyncs between messages: masq.attempt's
Run makes its maildir deliveries owe new/'s fsync to one group commit
(mailbox.FolderSync); a child, and system mode's masq-local, fsync new/
for each message, as the process boundary lies between them and the record.

System mode (masq.toml `user`) always uses the third, Spawn: masq-send (as
masq) plans the deliveries by user (masq.local), and each user's share is
one request to masq-lspawn(8), which runs `masq-local --targets` as that
user with a read-only copy of the message on its stdin.
"""
import os
import sys
import time

from masq import Error, child, local, outcome, program

CHILD_TIMEOUT_SECONDS = 86400   # masq-local stuck this long is killed (qmail-queue's DEATH);
                                # each MDA it runs has local.mda_timeout of its own
MAX_OUTPUT_BYTES = 1 << 20      # its answers: one short line per recipient
SLOW_USER_SECONDS = 600         # after a delivery as a user was killed late, theirs wait


def choose(conf):
    """The deliverer [local] deliver names; Spawn in system mode."""
    if conf.get("user"):
        from masq import privilege
        return Spawn(conf, privilege.spawner())
    if conf.get("local.deliver") == "child":
        return Child(conf)
    return InProcess(conf)


class InProcess:
    """masq-local's deliver() in this process."""

    def __init__(self, conf):
        self.conf = conf

    def deliver(self, msg, recipients, spawn=None):
        """Deliver the spool message msg to recipients; [(letter, text)] per recipient."""
        try:
            return local.deliver(self.conf, msg.sender, recipients, msg.open_data, msg.id,
                                 spawn)
        except Error as e:
            return [outcome.of_error(e)] * len(recipients)
        except Exception as e:      # noqa: BLE001 -- a bug must defer mail, not lose it
            import traceback       # only on a bug
            traceback.print_exc()
            return [(outcome.TEMPORARY, f"internal error in local delivery: {e!r}")] \
                * len(recipients)


class Child:
    """masq-local(8) as a child process, one per message."""

    def __init__(self, conf):
        self.conf = conf
        self.program = None         # found at the first delivery

    def deliver(self, msg, recipients):
        """Run masq-local for msg; [(letter, text)] per recipient, Z where it said nothing."""
        import subprocess          # only the child variant: the in-process path must not
        import tempfile            # pay for importing them (see masq.child)
        argv = [self.find(), "-C", self.conf.file, "--id", msg.id, "--", msg.sender,
                *recipients]
        with tempfile.TemporaryFile() as out, msg.open_data() as data:
            # the message through a pipe: the spool file holds records after the data
            try:
                status = child.run(argv, data, time.monotonic() + CHILD_TIMEOUT_SECONDS,
                                   stdout=out)
            except OSError as e:
                return _all(len(recipients), f"unable to run {argv[0]}: {e.strerror}")
            except subprocess.TimeoutExpired:
                return _all(len(recipients), f"masq-local ran longer than "
                                        f"{CHILD_TIMEOUT_SECONDS} s and was killed")
            out.seek(0)
            output = out.read(MAX_OUTPUT_BYTES)
        return answers(output, status, len(recipients))

    def find(self):
        """masq-local beside this interpreter (the same installation), else on $PATH."""
        if self.program is None:
            import shutil          # as in deliver()
            beside = os.path.join(os.path.dirname(sys.executable), "masq-local")
            if os.access(beside, os.X_OK):
                self.program = beside
            else:
                self.program = shutil.which("masq-local") or "masq-local"
        return self.program


class Spawn:
    """System mode: each user's deliveries by masq-local as that user, via masq-lspawn."""

    def __init__(self, conf, spawner):
        self.conf, self.spawner = conf, spawner

    def deliver(self, msg, recipients):
        """As InProcess.deliver, with the writing done by masq-lspawn's children."""
        if self.spawner is None:
            return _all(len(recipients), "masq-send must start as root in system mode "
                                         "(it starts masq-lspawn, then runs as "
                                         f"{self.conf.get('user')}): local mail waits")
        copy = _Copy(self.conf, msg)
        try:
            return InProcess(self.conf).deliver(msg, recipients, spawn=lambda user, pairs, _:
                                                self.ask(msg, user, pairs, copy))
        finally:
            copy.close()

    def ask(self, msg, user, pairs, copy):
        """One request: masq-local --targets as user; (letter, text) per pair."""
        from masq import privilege
        fields = [user, msg.id, msg.sender, *(x for pair in pairs for x in pair)]
        late = self.spawner.slow.get(user)
        if late is not None and time.monotonic() - late < SLOW_USER_SECONDS:
            # one user's stopped or endless delivery costs one timeout, not one a message
            return _all(len(pairs), f"a delivery as {user} ran past local.mda_timeout "
                                    f"lately; tried again later")
        try:
            fd = copy.fd()
            status, output = self.spawner.ask(
                [f.encode("utf-8", "surrogateescape") for f in fields], fd,
                float(self.conf.get("local.mda_timeout")) + 120)   # masq-lspawn's, and a margin
        except privilege.SpawnError as e:
            return _all(len(pairs), f"{e} (as {user})")
        except OSError as e:
            return _all(len(pairs), f"unable to copy the message for masq-local: {e.strerror}")
        if status == -9:            # masq-lspawn killed it at its deadline
            self.spawner.slow[user] = time.monotonic()
        return answers(output, status, len(pairs))


class _Copy:
    """The message alone in an unlinked file of the spool's tmp/, read-only for masq-local.

    The spool file holds the envelope too (every recipient): a user's
    masq-local gets a descriptor of this copy, opened read-only, so it can
    neither see the others nor change what the next user gets.
    """

    def __init__(self, conf, msg):
        self.conf, self.msg, self.ro = conf, msg, None

    def fd(self):
        """The read-only descriptor, at offset 0 (made at the first call)."""
        if self.ro is None:
            path = os.path.join(self.conf.path("spool"), "tmp",
                                f"local.{os.getpid()}.{os.urandom(8).hex()}")
            rw = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                self.ro = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                os.unlink(path)
                with self.msg.open_data() as data:
                    while chunk := data.read(65536):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(rw, view):]
            except BaseException:
                _quietly(os.unlink, path)
                self.close()
                raise
            finally:
                os.close(rw)
        os.lseek(self.ro, 0, os.SEEK_SET)
        return self.ro

    def close(self):
        if self.ro is not None:
            os.close(self.ro)
            self.ro = None


def _quietly(call, *args):
    try:
        call(*args)
    except OSError:
        pass


def answers(output, status, count):
    """masq-local's stdout and wait status as `count` (letter, text) answers.

    The lines it printed are its answers, in order: a K line was written and
    fsynced before it was printed.  A recipient without a line is Z, with the
    reason its exit status gives; output that is not such lines is Z for all.
    """
    temporary, said = program.classify(status)
    letters = (outcome.DELIVERED, outcome.TEMPORARY, outcome.PERMANENT)
    lines = output.decode("utf-8", "surrogateescape").split("\n")
    if lines[-1] == "":
        lines.pop()
    if len(lines) > count or any(line[:1] not in letters or line[1:2] not in (" ", "")
                                 for line in lines):
        return _all(count, f"masq-local answered badly ({said})")
    got = [(line[0], line[2:]) for line in lines]
    if status != 0 and not got:
        letter = outcome.PERMANENT if temporary is False else outcome.TEMPORARY
        return [(letter, f"masq-local failed: {said}")] * count
    reason = "masq-local gave no answer for this recipient"
    return got + [(outcome.TEMPORARY, f"{reason} ({said})")] * (count - len(got))


def _all(count, text):
    """The same temporary failure for each of `count` recipients."""
    return [(outcome.TEMPORARY, text)] * count
