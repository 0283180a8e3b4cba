"""The filter step between incoming/ and active/ ([queue] filters).

Each filter is a command line, run without a shell (split as a shell
would), with the message on stdin and SENDER, RECIPIENTS (space-separated)
and QUEUE_ID in its environment.  Its exit status decides:

    0                   pass; if it wrote anything on stdout, that is the
                        message from now on (a filter that adds headers)
    75, 111, 70-74, 78  temporary: the message stays in incoming/ and is
    or a signal         filtered again at the next queue run
    any other code      the message goes on hold: nothing is lost or bounced;
                        `masq-queue release` or `remove` decides (spamc -E
                        exits 1 for spam)

A filter that runs longer than FILTER_TIMEOUT_SECONDS is killed (temporary).
The message goes to the filter through a temporary copy, so memory stays
bounded whatever its size.
"""
import os

FILTER_TIMEOUT_SECONDS = 600
TEMPORARY_CODES = {70, 71, 72, 73, 74, 75, 78, 111}


def run(conf, msg):
    """Run every filter on msg (locked); return ("pass"|"defer"|"hold", why)."""
    import shlex
    import subprocess
    import tempfile
    for command in conf.get("queue.filters") or []:
        env = dict(os.environ, SENDER=msg.sender, RECIPIENTS=" ".join(msg.recipients),
                   QUEUE_ID=msg.id)
        tmp = msg.spool.folder("tmp")
        with tempfile.TemporaryFile(dir=tmp) as copy, tempfile.TemporaryFile(dir=tmp) as out:
            with msg.open_data() as data:
                while chunk := data.read(65536):
                    copy.write(chunk)
            copy.seek(0)
            try:
                p = subprocess.run(shlex.split(command), stdin=copy, stdout=out,
                                   stderr=subprocess.PIPE, env=env,
                                   timeout=FILTER_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                return "defer", f"filter {command} ran longer than {FILTER_TIMEOUT_SECONDS} s"
            except (OSError, ValueError) as e:
                return "defer", f"filter {command} cannot run: {e}"
            said = p.stderr.decode("utf-8", "replace").strip().splitlines()
            why = f"filter {command}: exit {p.returncode}" + (f": {said[-1]}" if said else "")
            if p.returncode < 0 or p.returncode in TEMPORARY_CODES:
                return "defer", why
            if p.returncode != 0:
                return "hold", why
            if out.tell():
                out.seek(0)
                msg.replace_data(out)
    return "pass", ""
