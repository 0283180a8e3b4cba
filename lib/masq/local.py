"""Local delivery: aliases, then each distinct mailbox, file or command once.

deliver() is masq-local's body, called by masq-local(8) for a message on
its stdin and by masq-send in its own process (single-user mode).  It
answers (letter, text) per recipient (masq.outcome).  What a local part
may name is masq.localpart's rule, which masq-smtpd shares.

System mode (masq.toml `user`, masq-local(8)) splits the same plan in two.
masq-send, as the masq user, expands the aliases (Plan(system=True)) and
gives every delivery the user it runs as: a mailbox (and its ~/.forward)
its owner, an alias's own |command and /file [local] default_privs, the
|command and /file targets of an :include: file that file's owner (root's:
default_privs).  Each user's deliveries go in one request to masq-lspawn(8),
which runs `masq-local --targets` as that user: deliver_targets() here,
which delivers exactly what it is told and reads the user's ~/.forward.
With [local] mailbox = "lmtp" masq-send hands the mailboxes to the LMTP
server itself, as masq, in one transaction per message: the server stores
the mail as its user, so no user switch is needed, and no ~/.forward is
read (the server's own filters do that job).

One module of about 500 lines on purpose: both halves build and answer the
same Plan (its delivery keys, its per-recipient answers), and reading them
side by side is how to see that masq-local --targets does exactly what
masq-send planned, no more.
"""
import os
import pwd
import stat
import sys

from masq import Error, address, aliases, child, handoff, headers, localpart, log, mailbox
from masq import program
from masq.envelope import Envelope
from masq.outcome import DeliveryError

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
MAX_FORWARD_BYTES = 65536       # a ~/.forward is a few lines


def deliver(conf, sender, recipients, stream_factory, qid=None, spawn=None):
    """Deliver to each recipient; return [(letter, text)], one per recipient.

    stream_factory() gives a fresh binary stream of the whole message each
    time it is called (once to read the header, once per copy written).
    """
    return deliver_from(conf, sender, recipients, _Factory(stream_factory), qid, spawn)


def deliver_from(conf, sender, recipients, source, qid=None, spawn=None):
    """deliver() from a source: head() -> headers.Section, expect(copies), open().

    With spawn (masq-send in system mode), the plan is made by user and
    each user's deliveries go to spawn(user, [(target, recipient)], source).
    """
    seen = _delivered_to(source.head())
    plan = Plan(conf, sender, qid, system=spawn is not None)
    answers = []
    for rcpt in recipients:
        delivered = _normal(rcpt)
        if delivered.lower() in seen:
            plan.wants.append([])
            answers.append(("D", f"mail loop: already delivered to {delivered} (5.4.6)"))
        else:
            answers.append(plan.add(rcpt, delivered))
    source.expect(plan.copies())
    plan.run(source, spawn)
    return [answer if answer else plan.answer(i) for i, answer in enumerate(answers)]


class Plan:
    """The distinct deliveries of one call, and which recipient wants which."""

    def __init__(self, conf, sender, qid, system=False):
        self.conf, self.sender, self.qid = conf, sender, qid
        self.system = system    # masq-send in system mode: each job names its user
        self.resubmit = False   # masq-local as a user: forward through masq-inject
        self.jobs = {}          # key -> job dict (info, user, result)
        self.mailboxes = set()  # keys of mailbox deliveries (mbox may use the mail group)
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
        for target, origin in targets:
            try:
                wants.append(self._job(target, info, origin))
            except DeliveryError as e:
                alone = [t for t, _ in targets] == [local.lower()]
                note = "" if alone else f" (alias {local.lower()})"
                wants.append(("Z" if e.temporary else "D", f"{e}{note}"))
        return None

    def _targets(self, name):
        if self._aliases is None:
            self._aliases = localpart.load_aliases(self.conf, strict=self.system)
        return localpart.targets(self.conf, self._aliases, name, origins=True)

    def _job(self, target, info, origin=None):
        """The key of the delivery a target needs, made once per distinct key."""
        what = "local" if isinstance(target, localpart.Mailbox) else aliases.kind(target)
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
        user = None
        if what == "pipe":
            key = ("pipe", target[1:].strip())
        elif what == "file":
            if target == "/dev/null":
                key = ("null",)
            else:
                key = ("maildir" if target.endswith("/") else "mbox", target)
        elif self.system and self.conf.get("local.mailbox") == "lmtp":
            key = ("lmtp", self._system_user(target))   # masq-send itself: no user switch
        elif self.system:
            key = ("user", self._system_user(target))
        else:
            key = self._mailbox(target, info)
            self.mailboxes.add(key)
        if self.system and key[0] in ("pipe", "maildir", "mbox"):
            user = self._runas(origin)
            key += (user,)
        elif self.system and key[0] == "user":
            user = key[1]
        if key not in self.jobs:
            self.jobs[key] = {"info": dict(info, user=target if what == "local" else None),
                              "user": user, "result": None}
        return key

    def _system_user(self, name):
        """A user's mailbox in system mode: a passwd user other than root."""
        problem = localpart.mailbox_problem(self.conf, name)
        if problem:
            raise DeliveryError(problem, temporary=False)
        pw = localpart.passwd(name)
        if pw is not None and pw.pw_uid == 0:
            raise DeliveryError(f"masq delivers nothing as root: give {name} an alias "
                                f"in {self.conf.path('aliases')} (`{name}: USER`)")
        return pw.pw_name if pw else name

    def _runas(self, origin):
        """Who runs a |command or /file target: its include file's owner, else default_privs."""
        if origin:                      # uid 0 (root's include) takes default_privs too
            try:
                return pwd.getpwuid(origin).pw_name
            except KeyError:
                raise DeliveryError(f"an include file is owned by uid {origin}, which has "
                                    "no passwd entry: refusing to run its targets") from None
        return self.conf.get("local.default_privs") or "nobody"

    def _mailbox(self, user, info):
        """The key of a local user's mailbox, by [local] mailbox."""
        problem = localpart.mailbox_problem(self.conf, user)
        if problem:
            raise DeliveryError(problem, temporary=False)
        kind = self.conf.get("local.mailbox")
        if kind == "lmtp":
            return ("lmtp", user)
        pw = localpart.passwd(user)
        home = pw.pw_dir if pw else self.conf.dir
        info["home"] = home
        if kind == "mda":
            return ("mda", user)
        template = self.conf.get("local.path") or "mail/{user}/"
        path = self.conf.path(substitute(template, {"user": user, "home": home}),
                              is_value=True)
        if kind == "mbox":
            return ("mbox", path.rstrip("/") or path)
        return ("maildir", path if path.endswith("/") else path + "/")

    def copies(self):
        lmtp = sum(key[0] == "lmtp" for key in self.jobs)
        return len(self.jobs) - lmtp + (1 if lmtp else 0) + (1 if self.forward else 0)

    # -- delivering

    def run(self, source, spawn=None):
        """Write each distinct delivery once, in order (or by user: see spawn_all)."""
        if spawn is not None:
            self.spawn_all(source, spawn)
            return
        jobs = [item for item in self.jobs.items() if item[0][0] != "lmtp"]
        if self.resubmit:       # the mailbox first, while the mail group is ours
            jobs.sort(key=lambda item: item[0] not in self.mailboxes)
        self._lmtp(source)
        for key, job in jobs:
            program.title(f"masq-local: delivering {self.qid or ''} to {key[0]}")
            if key not in self.mailboxes:
                mailbox.drop_group()    # a borrowed group is for the user's mbox only
            try:
                with source.open() as stream:
                    job["result"] = ("K", self._write(key, job["info"], stream))
            except DeliveryError as e:
                job["result"] = ("Z" if e.temporary else "D", str(e))
        if self.forward:
            with source.open() as stream:
                self.forward_result = self._forward(stream)

    def spawn_all(self, source, spawn):
        """System mode: one spawn(user, [(target, recipient)]) per user, in order.

        spawn answers (letter, text) per pair; the forwarding stays here, as
        the masq user.
        """
        users = {}
        self._lmtp(source)
        for key, job in self.jobs.items():
            if key[0] == "null":
                job["result"] = ("K", "discarded (/dev/null)")
                continue
            if key[0] == "lmtp":
                continue
            users.setdefault(job["user"], []).append(key)
        for user, keys in users.items():
            program.title(f"masq-send: delivering {self.qid or ''} as {user}")
            pairs = [(_target_word(key), self.jobs[key]["info"]["rcpt"]) for key in keys]
            for key, result in zip(keys, spawn(user, pairs, source), strict=True):
                self.jobs[key]["result"] = result
        if self.forward:
            with source.open() as stream:
                self.forward_result = self._forward(stream)

    def _lmtp(self, source):
        """mailbox = "lmtp": the users' mailboxes of this message in one LMTP transaction."""
        keys = [key for key in self.jobs if key[0] == "lmtp"]
        if not keys:
            return
        program.title(f"masq-local: delivering {self.qid or ''} by LMTP")
        mailbox.drop_group()        # a borrowed group is for the user's mbox only
        with source.open() as stream:
            results = mailbox.lmtp(self.conf, self.sender, [key[1] for key in keys], stream)
        for key, result in zip(keys, results, strict=True):
            self.jobs[key]["result"] = result

    def _write(self, key, info, stream):
        head = (f"Return-Path: <{self.sender}>\nDelivered-To: {info['rcpt']}\n"
                ).encode("utf-8", "surrogateescape")
        kind = key[0]
        if kind == "null":
            return "discarded (/dev/null)"
        if kind == "maildir":
            return "delivered to " + mailbox.maildir(key[1], head, stream)
        if kind == "mbox":
            # the mbox spool's group (system mode) may read it: Debian's 0660 user:mail
            mode = 0o660 if key in self.mailboxes and mailbox.borrowed_group() else 0o600
            return "delivered to " + mailbox.mbox(key[1], head, stream, self.sender, mode)
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
        template = self.conf.get("local.mda") or "procmail -d {user}"
        words = child.split_command(template, "[local] mda")
        values = {"user": info["user"], "home": info["home"], "sender": self.sender,
                  "recipient": info["rcpt"], "local": info["local"],
                  "domain": info["domain"]}
        # each word on its own, after splitting: a value never makes a new argument
        return [substitute(word, values) for word in words]

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
        if self.resubmit:
            return self._inject(reader)
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

    def _inject(self, reader):
        """A user's ~/.forward: resubmit as that user, through masq-inject (sendmail)."""
        argv = [_beside("masq-inject"), "-i", "-f", self.sender or "<>", "--", *self.forward]
        env = self._env({"rcpt": self.forwarders[0], "local": "", "domain": ""}, _me())
        try:
            mailbox.command(argv, b"", reader, env, timeout=_timeout(self.conf))
        except DeliveryError as e:
            return (e.letter, f"unable to forward to {', '.join(self.forward)}: {e}")
        return ("K", f"forwarded to {', '.join(self.forward)} (~/.forward)")

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


def deliver_targets(conf, sender, pairs, source, qid=None):
    """masq-local --targets: deliver exactly these (target, recipient) pairs as this user.

    A target is `mailbox:USER` (this process's own user: the mailbox, or
    what ~/.forward says instead), `|command` or `/file` (`/folder/`: a
    maildir).  No alias is expanded: masq-send did that.  Answers
    (letter, text) per pair.
    """
    me = pwd.getpwuid(os.getuid())
    plan = Plan(conf, sender, qid)
    plan.resubmit = True
    answers = []
    for target, rcpt in pairs:
        local, domain = address.split(rcpt)
        info = {"rcpt": rcpt, "local": address.unquote_local(local), "domain": domain.lower()}
        wants = []
        plan.wants.append(wants)
        answers.append(None)
        try:
            if target.startswith("mailbox:"):
                if target[len("mailbox:"):] != me.pw_name:
                    raise DeliveryError(f"masq-local runs as {me.pw_name}: it delivers to no "
                                        f"other user's mailbox ({target})")
                wants += _mailbox_or_forward(plan, conf, me, info)
            elif aliases.kind(target) in ("pipe", "file"):
                wants.append(plan._job(target, info))
            else:
                raise DeliveryError(f"not a target masq-local --targets takes: {target}",
                                    temporary=False)
        except DeliveryError as e:
            answers[-1] = e.answer()
    source.expect(plan.copies())
    plan.run(source)
    return [answer if answer else plan.answer(i) for i, answer in enumerate(answers)]


def _mailbox_or_forward(plan, conf, me, info):
    """The wants of a user's own mailbox: ~/.forward's targets if it is safe, else the mailbox."""
    found, note = read_forward(me)
    if note:
        log.warn(note)
    if found is None:
        return [plan._job(localpart.Mailbox(me.pw_name), info)]
    wants = []
    for target in found:
        what = aliases.kind(target)
        if what == "remote":
            local, _, domain = target.rpartition("@")
            if domain.lower() in conf.local_domains:
                what, target = "local", local
        if what == "local":
            name = address.unquote_local(target.lstrip("\\")).lower()
            if name == me.pw_name:
                wants.append(plan._job(localpart.Mailbox(name), info))
                continue
            what, target = "remote", f"{name}@{conf.hostname}"
        if what == "include":
            log.warn(f"{me.pw_dir}/.forward: {target}: :include: is for the aliases file; "
                     "ignored")
            continue
        wants.append(plan._job(target, info))
    if not wants:
        wants.append(("K", f"{me.pw_dir}/.forward names nothing to deliver to"))
    return wants


def read_forward(pw):
    """(targets or None, note): the targets of a user's ~/.forward, read as that user.

    None when there is none, or when it is not safe: not a regular file,
    a symbolic link, not owned by the user, or writable by group or others
    (whoever can change it chooses what runs as the user); the note says why
    it was ignored, for the log.
    """
    path = os.path.join(pw.pw_dir, ".forward")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, ""
    except OSError as e:
        return None, f"{path} ignored: {e.strerror}"
    try:
        st = os.fstat(fd)
        problem = ("is not a regular file" if not stat.S_ISREG(st.st_mode)
                   else f"is owned by uid {st.st_uid}, not {pw.pw_name}"
                   if st.st_uid != pw.pw_uid
                   else "is writable by group or others" if st.st_mode & 0o022 else "")
        if problem:
            return None, f"{path} ignored: it {problem}"
        data = os.read(fd, MAX_FORWARD_BYTES + 1)
    except OSError as e:
        return None, f"{path} ignored: {e.strerror}"
    finally:
        os.close(fd)
    if len(data) > MAX_FORWARD_BYTES:
        return None, f"{path} ignored: larger than {MAX_FORWARD_BYTES} bytes"
    found = []
    for line in data.decode("utf-8", "surrogateescape").split("\n"):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                found += aliases.split_targets(line)
            except ValueError as e:
                return None, f"{path} ignored: {e}"
    return (found or None), ("" if found else f"{path} ignored: it names no target")


def _target_word(key):
    """How masq-local --targets names the delivery of a system-mode key."""
    if key[0] == "user":
        return f"mailbox:{key[1]}"
    if key[0] == "pipe":
        return f"|{key[1]}"
    return key[1]


def _beside(name):
    """A masq program from this installation: beside the interpreter, else on $PATH."""
    import shutil   # only a forward from ~/.forward needs it
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.access(path, os.X_OK) else (shutil.which(name) or name)


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


def substitute(text, values):
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
