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
"""
import os
import sys
import time

from masq import Error, child, local, outcome, program

CHILD_TIMEOUT_SECONDS = 86400   # masq-local stuck this long is killed (qmail-queue's DEATH);
                                # each MDA it runs has local.mda_timeout of its own
MAX_OUTPUT_BYTES = 1 << 20      # its answers: one short line per recipient


def choose(conf):
    """The deliverer [local] deliver names."""
    if conf.get("local.deliver") == "child":
        return Child(conf)
    return InProcess(conf)


class InProcess:
    """masq-local's deliver() in this process."""

    def __init__(self, conf):
        self.conf = conf

    def deliver(self, msg, recipients):
        """Deliver the spool message msg to recipients; [(letter, text)] per recipient."""
        try:
            return local.deliver(self.conf, msg.sender, recipients, msg.open_data, msg.id)
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
