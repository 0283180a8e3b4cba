"""Local delivery: aliases, then each distinct mailbox, file or command once.

deliver() is masq-local's body, called by masq-local(8) for a message on
its stdin and by masq-send in its own process (single-user mode).  It
answers (letter, text) per recipient (masq.outcome).  The rules for what a
local part may be (targets(), mailbox_problem()) are shared with masq-smtpd,
which applies them at RCPT, so a recipient is refused in the dialogue
rather than bounced later.
"""
import os
import pwd

from masq import Error, address, aliases, child, handoff, headers, mailbox, program
from masq.envelope import Envelope
from masq.outcome import DeliveryError

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def load_aliases(conf):
    """The aliases file named in the configuration (AliasError when unreadable)."""
    return aliases.load(conf.path("aliases") or os.devnull, conf.local_domains)


def targets(conf, table, name):
    """The final targets of a local part (lower-case): aliases, then +detail.

    Only the aliases file may name a |command, a /file or an :include:;
    a local part that is no alias names a mailbox and nothing else, so
    `"|cmd"@localhost` from a stranger is a (refused) mailbox name, never
    a command.  Such names come back as Mailbox(name).
    """
    if name in table:
        return table.expand(name)
    delimiter = conf.get("local.recipient_delimiter")
    delimiter = "+" if delimiter is None else delimiter
    if delimiter and delimiter in name[1:]:
        base = name[:name.index(delimiter, 1)]
        if base in table:
            return table.expand(base)
        if conf.get("local.users") != "system" or _passwd(name) is None:
            return [Mailbox(base)]
    return [Mailbox(name)]


def mailbox_problem(conf, name):
    """Why the mailbox `name` cannot take mail, with its status code, or ""."""
    problem = _unsafe(name)
    if not problem and conf.get("local.mailbox") == "mbox" and name.endswith(".lock"):
        problem = "ends in .lock"     # the dot-lock of the mbox NAME: never a mailbox
    if problem:
        return f"unusable mailbox name {name!r}: {problem} (5.1.3)"
    if conf.get("local.users") == "system" and _passwd(name) is None:
        return f"no such user: {name} (5.1.1)"
    return ""


def recipient_problem(conf, table, local_part):
    """Why deliver() would refuse this local part at once, or "" (masq-smtpd's RCPT)."""
    found = targets(conf, table, address.unquote_local(local_part).lower())
    if len(found) == 1 and isinstance(found[0], Mailbox):
        return mailbox_problem(conf, found[0])
    return ""


def deliver(conf, sender, recipients, stream_factory, qid=None):
    """Deliver to each recipient; return [(letter, text)], one per recipient.

    stream_factory() gives a fresh binary stream of the whole message each
    time it is called (once to read the header, once per copy written).
    """
    return deliver_from(conf, sender, recipients, _Factory(stream_factory), qid)


def deliver_from(conf, sender, recipients, source, qid=None):
    """deliver() from a source: head() -> headers.Section, expect(copies), open()."""
    seen = _delivered_to(source.head())
    plan = Plan(conf, sender, qid)
    answers = []
    for rcpt in recipients:
        delivered = _normal(rcpt)
        if delivered.lower() in seen:
            plan.wants.append([])
            answers.append(("D", f"mail loop: already delivered to {delivered} (5.4.6)"))
        else:
            answers.append(plan.add(rcpt, delivered))
    source.expect(plan.copies())
    plan.run(source)
    return [answer if answer else plan.answer(i) for i, answer in enumerate(answers)]


class Plan:
    """The distinct deliveries of one call, and which recipient wants which."""

    def __init__(self, conf, sender, qid):
        self.conf, self.sender, self.qid = conf, sender, qid
        self.jobs = {}          # key -> job dict (kind, args, rcpt, result)
        self.wants = []         # per recipient: [key or (letter, text)]
        self.forward = []       # remote addresses, in order, without repeats
        self.forwarders = []    # the recipients whose aliases forward
        self.forward_result = None
        self._aliases = None

    # -- planning

    def add(self, rcpt, delivered):
        """Plan one recipient; return an answer now only if it fails at once."""
        local, domain = address.split(rcpt)
        local = address.unquote_local(local)
        info = {"rcpt": delivered, "local": local, "domain": domain.lower()}
        wants = []
        self.wants.append(wants)
        try:
            targets = self._targets(local.lower())
        except (aliases.AliasError, DeliveryError) as e:
            return ("Z" if e.temporary else "D", str(e))
        if not targets:
            return ("D", f"alias {local.lower()} expands to nothing (5.1.1)")
        for target in targets:
            try:
                wants.append(self._job(target, info))
            except DeliveryError as e:
                note = "" if targets == [local.lower()] else f" (alias {local.lower()})"
                wants.append(("Z" if e.temporary else "D", f"{e}{note}"))
        return None

    def _targets(self, name):
        if self._aliases is None:
            self._aliases = load_aliases(self.conf)
        return targets(self.conf, self._aliases, name)

    def _job(self, target, info):
        """The key of the delivery a target needs, made once per distinct key."""
        what = "local" if isinstance(target, Mailbox) else aliases.kind(target)
        target = str(target)
        if what == "remote":
            try:
                address.check(target)
            except address.AddressError as e:
                raise DeliveryError(f"bad address in the aliases: {e}", temporary=False) from None
            if target.lower() not in (t.lower() for t in self.forward):
                self.forward.append(target)
            if info["rcpt"] not in self.forwarders:
                self.forwarders.append(info["rcpt"])
            return "forward"
        if what == "pipe":
            key = ("pipe", target[1:].strip())
        elif what == "file":
            if target == "/dev/null":
                key = ("null",)
            else:
                key = ("maildir" if target.endswith("/") else "mbox", target)
        else:
            key = self._mailbox(target, info)
        if key not in self.jobs:
            self.jobs[key] = {"info": dict(info, user=target if what == "local" else None),
                              "result": None}
        return key

    def _mailbox(self, user, info):
        """The key of a local user's mailbox, by [local] mailbox."""
        problem = mailbox_problem(self.conf, user)
        if problem:
            raise DeliveryError(problem, temporary=False)
        pw = _passwd(user)
        home = pw.pw_dir if pw else self.conf.dir
        info["home"] = home
        kind = self.conf.get("local.mailbox")
        if kind == "mda":
            return ("mda", user)
        template = self.conf.get("local.path") or "mail/{user}/"
        path = self.conf.path(_substitute(template, {"user": user, "home": home}),
                              is_value=True)
        if kind == "mbox":
            return ("mbox", path.rstrip("/") or path)
        return ("maildir", path if path.endswith("/") else path + "/")

    def copies(self):
        return len(self.jobs) + (1 if self.forward else 0)

    # -- delivering

    def run(self, source):
        """Write each distinct delivery once, in order."""
        for key, job in self.jobs.items():
            program.title(f"masq-local: delivering {self.qid or ''} to {key[0]}")
            try:
                with source.open() as stream:
                    job["result"] = ("K", self._write(key, job["info"], stream))
            except DeliveryError as e:
                job["result"] = ("Z" if e.temporary else "D", str(e))
        if self.forward:
            with source.open() as stream:
                self.forward_result = self._forward(stream)

    def _write(self, key, info, stream):
        head = (f"Return-Path: <{self.sender}>\nDelivered-To: {info['rcpt']}\n"
                ).encode("utf-8", "surrogateescape")
        kind = key[0]
        if kind == "null":
            return "discarded (/dev/null)"
        if kind == "maildir":
            return "delivered to " + mailbox.maildir(key[1], head, stream)
        if kind == "mbox":
            return "delivered to " + mailbox.mbox(key[1], head, stream, self.sender)
        timeout = _timeout(self.conf)
        if kind == "pipe":
            env = self._env(info, _me())
            return "delivered to " + mailbox.command(
                ["/bin/sh", "-c", key[1]], head, stream, env, cwd=_cwd(env, self.conf),
                timeout=timeout, name=key[1].split()[0] if key[1].split() else "sh")
        argv = self._mda_argv(info)
        env = self._env(info, (info["user"], info["home"]))
        return "delivered to " + mailbox.command(argv, head, stream, env,
                                                 cwd=_cwd(env, self.conf), timeout=timeout)

    def _mda_argv(self, info):
        import shlex        # it imports re: only an MDA delivery pays for that
        template = self.conf.get("local.mda") or "procmail -d {user}"
        try:
            words = shlex.split(template)
        except ValueError as e:
            raise DeliveryError(f"[local] mda does not parse: {e}") from None
        if not words:
            raise DeliveryError("[local] mda is empty")
        values = {"user": info["user"], "home": info["home"], "sender": self.sender,
                  "recipient": info["rcpt"], "local": info["local"],
                  "domain": info["domain"]}
        # each word on its own, after splitting: a value never makes a new argument
        return [_substitute(word, values) for word in words]

    def _env(self, info, user):
        name, home = user
        env = {"PATH": os.environ.get("PATH") or DEFAULT_PATH, "SHELL": "/bin/sh",
               "SENDER": self.sender, "RECIPIENT": info["rcpt"], "USER": name,
               "LOGNAME": name, "HOME": home, "LOCAL": info["local"],
               "DOMAIN": info["domain"]}
        if os.environ.get("MASQ_CONF"):
            env["MASQ_CONF"] = os.environ["MASQ_CONF"]
        if self.qid:
            env["MASQ_ID"] = self.qid
        return env

    def _forward(self, stream):
        """One new message to every remote target; the answer for forwarders."""
        head = "".join(f"Delivered-To: {r}\n" for r in self.forwarders)
        reader = child.Chain(head.encode("utf-8", "surrogateescape"), stream)
        env = Envelope(self.sender, self.forward)
        trace = {"proto": "local", "user": "masq-local"}
        if len(self.forwarders) == 1:
            trace["for"] = self.forwarders[0]
        where = ", ".join(self.forward)
        if len(where) > 300:
            where = f"{where[:300]}... ({len(self.forward)} addresses)"
        try:
            qid = handoff.submit(self.conf, reader, env, trace, timeout=_timeout(self.conf))
        except Error as e:
            return ("Z" if e.temporary else "D", f"unable to forward to {where}: {e}")
        return ("K", f"forwarded to {where}" + (f" as {qid}" if qid else ""))

    # -- answering

    def answer(self, index):
        """Recipient `index`'s line: K if every target went, else its failure."""
        done, failed = [], []
        for want in self.wants[index]:
            if want == "forward":
                result = self.forward_result
            elif isinstance(want, tuple) and want[0] in ("K", "Z", "D"):
                result = want
            else:
                result = self.jobs[want]["result"]
            (done if result[0] == "K" else failed).append(result)
        if not failed:
            return ("K", "; ".join(text for _, text in dict.fromkeys(done)))
        letter = "Z" if any(r[0] == "Z" for r in failed) else "D"
        first = next(r for r in failed if r[0] == letter)[1]
        if done:
            first += f" (the other {len(done)} target{'s' if len(done) > 1 else ''} " \
                     "of this address were delivered)"
        return (letter, first)


def _delivered_to(section):
    """The addresses of the Delivered-To fields of a headers.Section, lower-cased."""
    found = set()
    for value in section.values("delivered-to"):
        if value.startswith("<") and value.endswith(">"):
            value = value[1:-1].strip()
        found.add(value.lower())
    return found


def _normal(rcpt):
    """The address as Delivered-To shows it: the domain lower-cased."""
    local, sep, domain = rcpt.rpartition("@")
    if not sep or local.endswith("\\") or rcpt.endswith('"'):
        return rcpt
    return f"{local}@{domain.lower()}"


class Mailbox(str):
    """A local part that names a mailbox: not an alias target, never a command or file."""


def _unsafe(name):
    """Why a name cannot be a path component (nor an MDA's argument), or ""."""
    if not name:
        return "empty"
    if "/" in name:
        return "holds a /"
    if name.startswith("."):
        return "starts with a dot"
    if name.startswith("-"):
        return "starts with a dash (it could pass for an option of the MDA)"
    if name.startswith(("|", ":", "\\")):
        return "starts with |, : or a backslash"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "holds a control character"
    return ""


def _passwd(name):
    try:
        return pwd.getpwnam(name)
    except (KeyError, ValueError):
        return None


def _me():
    """(user name, home) of this process, for pipe aliases."""
    try:
        pw = pwd.getpwuid(os.getuid())
        return pw.pw_name, pw.pw_dir
    except KeyError:
        return str(os.getuid()), os.environ.get("HOME") or "/"


def _cwd(env, conf):
    return env["HOME"] if os.path.isdir(env["HOME"]) else conf.dir


def _timeout(conf):
    try:
        return float(conf.get("local.mda_timeout") or 3600)
    except (TypeError, ValueError):
        return 3600.0


def _substitute(text, values):
    """Replace {name} for the names in `values`, in one pass (no re-expansion)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "{":
            end = text.find("}", i)
            if end > 0 and text[i + 1:end] in values:
                out.append(values[text[i + 1:end]])
                i = end + 1
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


class _Factory:
    """A message source from deliver()'s stream_factory."""

    def __init__(self, factory):
        self.factory = factory

    def head(self):
        with self.factory() as stream:
            return headers.scan(stream)

    def expect(self, copies):
        pass

    def open(self):
        return self.factory()

    def close(self):
        pass
