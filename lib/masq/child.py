"""Child processes that read a message: start, feed within a deadline, kill, reap.

Every program masq runs with a message on its stdin (an MDA, a |command
alias, a filter, $MASQ_QUEUE) goes through run(): its own session (so a
kill reaches whatever it started), the message written without ever
blocking past the deadline, and on a timeout the whole group killed.  What
its exit status means is masq.program.classify's job.

subprocess, selectors and signal are imported where they are used: they
bring re, enum and locale (several ms), and a maildir delivery or a
sendmail call that never starts a child must not pay for them.
"""
import os
import time

COPY_BYTES = 65536
MAX_REASON_CHARS = 300


def split_command(text, what):
    """The argv of a command line masq runs without a shell (split as sh would:
    shlex); DeliveryError (temporary) naming `what` when it does not parse or
    is empty."""
    import shlex        # it imports re: only a program that runs a command pays for it
    from masq.outcome import DeliveryError
    try:
        argv = shlex.split(text)
    except ValueError as e:
        raise DeliveryError(f"{what} does not parse: {e}") from None
    if not argv:
        raise DeliveryError(f"{what} is empty")
    return argv


def run(argv, reader, deadline, **popen):
    """Run argv with `reader`'s bytes on stdin (None: /dev/null); return its wait status.

    `deadline` is a time.monotonic() value.  Raises OSError when it cannot
    start and subprocess.TimeoutExpired (after killing it) when it is late.
    """
    import subprocess
    stdin = subprocess.DEVNULL if reader is None else subprocess.PIPE
    child = subprocess.Popen(argv, stdin=stdin, start_new_session=True, **popen)
    try:
        if reader is not None:
            feed(child, reader, deadline)
        return child.wait(max(deadline - time.monotonic(), 0))
    except BaseException:
        kill(child)
        raise


def feed(child, reader, deadline):
    """Write the message to the child's stdin, never past the deadline."""
    import selectors
    import subprocess
    pipe = child.stdin
    fd = pipe.fileno()
    os.set_blocking(fd, False)
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_WRITE)
        try:
            while chunk := reader.read(COPY_BYTES):
                view = memoryview(chunk)
                while view:
                    left = deadline - time.monotonic()
                    if left <= 0 or not sel.select(left):
                        raise subprocess.TimeoutExpired(child.args, 0)
                    try:
                        view = view[os.write(fd, view):]
                    except BlockingIOError:
                        continue
        except BrokenPipeError:
            pass            # the program stopped reading: its status decides
        finally:
            try:
                pipe.close()
            except OSError:
                pass


def kill(child):
    """Kill a program and everything it started, and reap it."""
    import signal
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except OSError:
        pass
    child.wait()


def last_line(output):
    """The last non-empty line a program wrote into the file `output`, printable and short."""
    size = output.seek(0, os.SEEK_END)
    output.seek(max(size - 4096, 0))
    lines = [line.strip() for line in output.read().split(b"\n") if line.strip()]
    if not lines:
        return ""
    from masq import log
    return log.clean(lines[-1].decode("utf-8", "replace"), MAX_REASON_CHARS)


class Chain:
    """`head` then a stream, as one binary reader with read and readline."""

    def __init__(self, head, stream):
        self.head, self.stream = head, stream

    def read(self, size=COPY_BYTES):
        if self.head:
            chunk, self.head = self.head[:size], self.head[size:]
            return chunk
        return self.stream.read(size)

    def readline(self, size=COPY_BYTES):
        if self.head:
            end = self.head.find(b"\n", 0, size)
            end = size if end < 0 else end + 1
            line, self.head = self.head[:end], self.head[end:]
            return line
        return self.stream.readline(size)
