"""The pipe transport: a route whose mail goes to a command (masqmail's route `pipe`).

    [route.uucp]
    pipe = "uux - -r -gC gateway!rmail ({rcpt})"

A route with `pipe` opens no connection: for each message masq-send (and
masq-smtp --route) runs the command once per recipient, or once with all
of them (pipe_per_recipient = false), the message on its stdin, and reads
its exit status as an MDA's (masq.program.classify, unknown codes
permanent): 0 delivered; 75, 111 and the other temporary codes, a signal,
a failed exec or pipe_timeout deferred; any other code bounces with the
last line the command wrote on stderr or stdout.  masq-route decides as
for any route; rewrite_sender applies to the envelope and the header.

The command is split as a shell would split it (shlex), without a shell,
and each word is expanded after splitting, so a value never makes a new
argument: {sender} (the envelope sender, "" for the null sender), {rcpt}
(also {recipient}), {local} and {domain} (the recipient's), {id} (the
queue id).  A word with a recipient's value becomes one word per
recipient: with pipe_per_recipient = false, `rmail -- {rcpt}` gets every
recipient as an argument of its own.  Before the first "--" word of the
command, an argument that the expansion made begin with "-" (its word
does not) could be read as an option, whichever values made it so
({sender}{local} with the null sender and the local part "-oQ/x", say):
that recipient (or, when the sender's value alone does it, the message)
fails with a reason saying to write "--" before the word.

The environment is wiped and rebuilt as masqmail does: SENDER and
RETURN_PATH (the sender), SENDER_LOCAL, SENDER_DOMAIN, RECEIVED_HOST (the
client masq-smtpd took the message from, if any), MESSAGE_ID (the queue
id), QUALIFY_DOMAIN (hostname), PATH, and, when the command runs for one
recipient, RECIPIENT, LOCAL_PART, DOMAIN, USER and LOGNAME (the local
part).  MASQ_CONF is not passed: an `rmail` of another masq at the other
end must find its own configuration.  pipe_fromline puts a "From sender
date" line first (as an mbox does; MAILER-DAEMON for the null sender),
pipe_fromhack a ">" before every line that begins with "From ".
"""
import time

from masq import address, mailbox, schema
from masq.outcome import DeliveryError, one_line

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
RCPT_NAMES = ("rcpt", "recipient", "local", "domain")
COPY_BYTES = 65536


class Pipe:
    """The pipe of [route.NAME]: its argv template and options."""

    def __init__(self, conf, name, table=None):
        from masq import child
        self.conf, self.name = conf, name
        if table is None:
            table = dict(conf.routes).get(name) or {}
        self.table = table
        keys = schema.table_keys("route.*.")
        where = f"{conf.file}: [route.{name}] pipe"
        self.words = child.split_command(str(table.get("pipe") or ""), where)
        option = {key: table.get(key, keys[key].default) for key in
                  ("pipe_per_recipient", "pipe_fromline", "pipe_fromhack", "pipe_timeout",
                   "connect_error_fail")}
        self.per_recipient = option["pipe_per_recipient"] is not False
        self.fromline = option["pipe_fromline"] is True
        self.fromhack = option["pipe_fromhack"] is True
        self.timeout = float(option["pipe_timeout"])
        self.exec_error_fails = option["connect_error_fail"] is True
        # the words before "--" that do not begin with "-": an option if expanded to one
        self.guarded = []
        for word in self.words:
            if word == "--":
                break
            if not word.startswith("-") and "{" in word:
                self.guarded.append(word)

    def send(self, sender, recipients, open_message, qid=None, trace=None):
        """Pipe one message; (letter, text) per recipient, in order.

        open_message() gives a fresh binary stream of the message (LF line
        ends) as a context manager, once for each run of the command.
        """
        results = [None] * len(recipients)
        for i, rcpt in enumerate(recipients):
            refused = self.option_like(sender, rcpt, qid)
            if refused and refused[0] == "sender":
                return [("D", refused[1])] * len(recipients)
            if refused:
                results[i] = ("D", refused[1])
        todo = [i for i, result in enumerate(results) if result is None]
        groups = [[i] for i in todo] if self.per_recipient else ([todo] if todo else [])
        for group in groups:
            rcpts = [recipients[i] for i in group]
            answer = self.run(sender, rcpts, open_message, qid, trace or {})
            for i in group:
                results[i] = answer
        return results

    def option_like(self, sender, rcpt, qid):
        """("sender" or "rcpt", reason) when a word before "--" that does not begin
        with "-" would, expanded for this sender and recipient; else None."""
        from masq.local import substitute
        common = {"sender": sender, "id": qid or ""}
        for word in self.guarded:
            if not substitute(word, dict(common, **_rcpt_values(rcpt))).startswith("-"):
                continue
            # the sender's fault when the word begins with "-" whatever the recipient
            if substitute(word, dict(common, **_rcpt_values(""))).startswith("-"):
                return ("sender", f"the sender <{sender}> makes the word {word} begin with "
                        f"'-': {self.words[0]} could take it for an option (write -- before "
                        f"{word} in [route.{self.name}] pipe) (5.1.7)")
            return ("rcpt", f"the address <{rcpt}> makes the word {word} begin with '-': "
                    f"{self.words[0]} could take it for an option (write -- before {word} "
                    f"in [route.{self.name}] pipe) (5.1.3)")
        return None

    def run(self, sender, rcpts, open_message, qid, trace):
        """Run the command once for these recipients; its (letter, text)."""
        argv = self.argv(sender, rcpts, qid)
        head = b""
        if self.fromline:
            head = f"From {sender or 'MAILER-DAEMON'} {time.asctime()}\n".encode(
                "utf-8", "surrogateescape")
        try:
            with open_message() as stream:
                reader = FromHack(stream) if self.fromhack else stream
                mailbox.command(argv, head, reader, self.env(sender, rcpts, qid, trace),
                                cwd=self.conf.dir, timeout=self.timeout, stderr_first=True)
        except DeliveryError as e:
            if self.exec_error_fails and e.text.startswith("unable to run "):
                return ("D", f"{e.text} (connect_error_fail)")
            return e.answer()
        except ValueError as e:         # a NUL in an argument: no address has one
            return ("D", one_line(f"unable to run {argv[0]}: {e}"))
        return ("K", f"piped to {argv[0].rpartition('/')[2]}")

    def argv(self, sender, rcpts, qid):
        """The command's words, each expanded after splitting."""
        from masq.local import substitute
        common = {"sender": sender, "id": qid or ""}
        out = []
        for word in self.words:
            if any("{" + key + "}" in word for key in RCPT_NAMES):
                out += [substitute(word, dict(common, **_rcpt_values(r))) for r in rcpts]
            else:
                out.append(substitute(word, common))
        return out

    def env(self, sender, rcpts, qid, trace):
        """The environment masqmail's pipe gets, and PATH."""
        local, domain = address.split(sender)
        env = {"PATH": DEFAULT_PATH, "SENDER": sender, "RETURN_PATH": sender,
               "SENDER_LOCAL": local, "SENDER_DOMAIN": domain,
               "RECEIVED_HOST": trace.get("client_name") or trace.get("client") or "",
               "MESSAGE_ID": qid or "", "QUALIFY_DOMAIN": self.conf.hostname}
        if len(rcpts) == 1:
            values = _rcpt_values(rcpts[0])
            env.update(RECIPIENT=rcpts[0], LOCAL_PART=values["local"], DOMAIN=values["domain"],
                       USER=values["local"], LOGNAME=values["local"])
        return env


def configured(conf, name):
    """True when [route.NAME] pipes its mail."""
    return bool(name) and bool((dict(conf.routes).get(name) or {}).get("pipe"))


def send(pipe, msg, rcpts, open_message):
    """masq-send's relay: pipe the spool message msg to these of its recipients
    with `pipe` (a Pipe, made once per route for the queue run).

    open_message() gives the message as the route sends it (rewrite_sender
    applied).
    """
    from masq import route
    sender = route.rewrite(pipe.table, msg.sender) if msg.sender else msg.sender
    return pipe.send(sender, rcpts, open_message, msg.id, msg.trace)


def send_stream(conf, name, sender, rcpts, stream, qid=None):
    """masq-smtp --route NAME: pipe the message on `stream` (copied once to a file)."""
    import tempfile     # only a pipe route from masq-smtp needs the copy
    pipe = Pipe(conf, name)
    with tempfile.TemporaryFile() as copy:
        while chunk := stream.read(COPY_BYTES):
            copy.write(chunk)
        return pipe.send(sender, rcpts, lambda: _Rewound(copy), qid)


class _Rewound:
    """A file read from its start each time it is entered; never closed here."""

    def __init__(self, file):
        self.file = file

    def __enter__(self):
        self.file.seek(0)
        return self.file

    def __exit__(self, *exc):
        pass


def _rcpt_values(rcpt):
    local, domain = address.split(rcpt)
    return {"rcpt": rcpt, "recipient": rcpt, "local": local, "domain": domain}


class FromHack:
    """A binary reader that puts ">" before each line beginning with "From "
    (masqmail's pipe_fromhack; not mboxrd: ">From " stays as it is)."""

    def __init__(self, stream):
        self.stream, self.at_start, self.carry = stream, True, b""

    def read(self, size=COPY_BYTES):
        while True:
            chunk = self.stream.read(size)
            data = self.carry + chunk
            if not chunk:
                self.carry = b""
                return self._quote(data)
            end = data.rfind(b"\n") + 1
            tail = data[end:]
            if len(tail) < 5 and (end > 0 or self.at_start):
                data, self.carry = data[:end], tail     # a line start not yet decided
            else:
                self.carry = b""
            if data:
                return self._quote(data)

    def _quote(self, data):
        out = data.replace(b"\nFrom ", b"\n>From ")
        if self.at_start and data.startswith(b"From "):
            out = b">" + out
        if data:
            self.at_start = data.endswith(b"\n")
        return out
