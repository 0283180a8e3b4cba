"""masq as the machine's MTA: what `masq-setup system` makes, and its undoing.

The layout (system-mode.md; masq-setup(8) has the same table):

    /etc/masq/masq.toml         root:root  0644  kept as it is when it exists
    /etc/masq/smarthost.secret  root:masq  0640
    /etc/aliases                root:root  0644  kept as it is when it exists
    /var/spool/masq             masq:masq  0711  users may traverse, not list
      tmp incoming active hold corrupt       0700  the queue: masq only
      drop                      masq:masq  3733  anyone creates, only masq lists
      trigger (FIFO)            masq:masq  0622  anyone may wake masq-send
    /var/log/masq               masq:masq  0750
    /var/mail                   root:mail  2775  Debian's; made only when absent
    /usr/sbin/sendmail, /usr/lib/sendmail, /usr/bin/mailq,
    /usr/bin/newaliases, /usr/bin/runq       links to masq-inject
    /etc/systemd/system/masq-send.service, masq-smtpd.socket, masq-smtpd.service

The manifest, /var/lib/masq/install.json, lists every change in the order
it was made: {"version": 1, "made_lib": bool, "steps": [...]}, each step
one of
    {"do": "group"|"user", "name"}       made by groupadd/useradd --system
    {"do": "dir"|"spool", "path"}        a folder that did not exist
    {"do": "file", "path", "sha256"}     a file written where none was
    {"do": "link", "path", "target"}     a symbolic link to masq
    {"do": "moved-link", "path", "target"}   another's link, replaced (--force)
    {"do": "moved-file", "path", "saved"}    another's file, renamed to `saved`
    {"do": "enabled", "units"}           `systemctl enable --now` ran
A step is written down (temporary file, fsync, rename, fsync of the folder)
before the change it records, so after a crash at any instant `uninstall`
knows at least everything that was done.  Uninstall undoes the steps in
reverse order, each only while the thing is still what the install left
(a link still pointing where masq pointed it, a file with its sha256, an
empty folder); anything else stays, and the report says so.  A spool that
holds mail stays, and with it the masq user and group that own its files.

The library raises (InstallError and its kinds, each with its exit code) and
returns report lines; masq-setup prints them.

One module of about 700 lines on purpose: the install, its manifest and the
uninstall are one contract (each step recorded before it is made, undone in
reverse only while still as made), and reading them side by side is how one
checks that uninstall undoes exactly what install did.
"""
import grp
import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess

from masq import Error, files

CONF_DIR = "/etc/masq"
CONF = "/etc/masq/masq.toml"
SECRET_FILE = "smarthost.secret"
ALIASES = "/etc/aliases"
SPOOL = "/var/spool/masq"
LOG_DIR = "/var/log/masq"
MAIL_DIR = "/var/mail"
LIB_DIR = "/var/lib/masq"
MANIFEST = "/var/lib/masq/install.json"
UNIT_DIR = "/etc/systemd/system"
USER = "masq"
NOLOGIN = "/usr/sbin/nologin"
# (link, the masq program it points to): masq-inject works by the name it is called by
LINKS = (("/usr/sbin/sendmail", "masq-inject"), ("/usr/lib/sendmail", "masq-inject"),
         ("/usr/bin/mailq", "masq-inject"), ("/usr/bin/newaliases", "masq-inject"),
         ("/usr/bin/runq", "masq-inject"))
# Programs other users run: every user (the links), masq (masq-smtpd, masq-send
# after its drop), each recipient (masq-local); masq-lspawn once it exists.
CHECKED_PROGRAMS = ("masq-inject", "masq-smtpd", "masq-send", "masq-queue", "masq-route",
                    "masq-local", "masq-smtp", "masq-lspawn")
SPOOL_MODES = {"tmp": 0o700, "incoming": 0o700, "active": 0o700, "hold": 0o700,
               "corrupt": 0o700, "drop": 0o3733}
MAIL_FOLDERS = ("tmp", "incoming", "active", "hold", "corrupt", "drop")
SYMLINK_HOPS = 40

SEND_UNIT = """\
# masq-send, the queue runner of masq as the machine's MTA (masq-send(8)).
# Written by masq-setup system.  It starts as root only to start masq-lspawn,
# which runs local deliveries as each recipient; then it runs as masq.
[Unit]
Description=masq queue runner
Documentation=man:masq-send(8)
After=network.target

[Service]
ExecStart={bin}/masq-send -C /etc/masq/masq.toml
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""

SMTPD_SOCKET = """\
# masq-smtpd: the SMTP port, handed to masq-smtpd.service (masq-tcpserver,
# whose masq-smtpd processes serve up to 100 connections each, a spare
# waiting).  Written by masq-setup system; enable with
# `systemctl enable --now masq-smtpd.socket`.
[Unit]
Description=masq SMTP server socket
Documentation=man:masq-tcpserver(8)

[Socket]
ListenStream=25
Accept=no

[Install]
WantedBy=sockets.target
"""

SMTPD_SERVICE = """\
# The SMTP listener: masq-tcpserver serves the socket of masq-smtpd.socket
# (it binds nothing itself) with masq-smtpd's code loaded once: at most 40
# sessions at once, 10 from one client address.  Written by masq-setup system.
[Unit]
Description=masq SMTP server
Documentation=man:masq-tcpserver(8)
Requires=masq-smtpd.socket

[Service]
ExecStart={bin}/masq-tcpserver -c 40 -C 10 0 25 {bin}/masq-smtpd -C /etc/masq/masq.toml
User=masq
Group=masq
NoNewPrivileges=yes
PrivateTmp=yes
PrivateDevices=yes
"""

INETD_LINE = "smtp stream tcp nowait masq {bin}/masq-smtpd masq-smtpd -C /etc/masq/masq.toml"
CRON_LINES = ("@reboot root {bin}/masq-send -C /etc/masq/masq.toml",
              "@reboot root {bin}/masq-tcpserver -u masq -c 40 -C 10 0 25 {bin}/masq-smtpd "
              "-C /etc/masq/masq.toml",
              "*/10 * * * * root /usr/bin/runq")


class InstallError(Error):
    """The machine cannot take masq as it is; nothing was changed."""

    code = 73
    temporary = False


class NotRootError(InstallError):
    code = 77


class ConflictError(InstallError):
    """Another MTA's links or files are where masq's go."""

    code = 73


class NotExecutableError(InstallError):
    """Some user could not run the programs the links lead to."""

    code = 78


def units(bindir):
    """{file name: text} of the systemd units for masq installed in bindir."""
    return {"masq-send.service": SEND_UNIT.format(bin=bindir),
            "masq-smtpd.socket": SMTPD_SOCKET,
            "masq-smtpd.service": SMTPD_SERVICE.format(bin=bindir)}


# ---------------------------------------------------------------- the manifest

class Manifest:
    """The steps of the install, saved atomically after each addition."""

    def __init__(self, path=MANIFEST):
        self.path = path
        self.data = {"version": 1, "made_lib": False, "steps": []}
        try:
            with open(path) as f:
                self.data = json.load(f)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            raise InstallError(f"unable to read {path}: {e}: move it away to go on") from None

    @property
    def exists(self):
        return os.path.exists(self.path)

    @property
    def steps(self):
        return self.data["steps"]

    def find(self, do, key):
        """The recorded step of this kind for a path or name, or None."""
        for step in self.steps:
            if step["do"] == do and step.get("path", step.get("name")) == key:
                return step
        return None

    def record(self, step):
        """Write the step down (replacing one of its kind for the same path) before doing it."""
        key = step.get("path", step.get("name"))
        old = self.find(step["do"], key)
        if old is not None:
            if old == step:
                return
            self.steps[self.steps.index(old)] = step
        else:
            self.steps.append(step)
        self.save()

    def save(self):
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            os.makedirs(folder, mode=0o755)
            self.data["made_lib"] = True
        files.write_atomic(self.path, json.dumps(self.data, indent=1).encode() + b"\n", 0o644,
                           owner=(0, 0))

    def remove(self):
        os.unlink(self.path)
        if self.data.get("made_lib"):
            try:
                os.rmdir(os.path.dirname(self.path))
            except OSError:
                pass


# ---------------------------------------------------------------- checks

def require_root():
    if os.geteuid() != 0:
        raise NotRootError("masq-setup system must run as root (sudo masq-setup system ...)")


def not_executable(program):
    """Why a user who is neither owner nor in the group cannot run program, or None.

    Checks what the kernel and Python need: every folder on the way to the
    launcher, the interpreter of its #! line and the real file behind its
    links, and the folders masq's package is imported from (the launcher's
    `import sys; sys.path...` line written by masq.launchers, else masq's own).
    """
    problem = _reach(program, need_read=True)
    if problem:
        return problem
    with open(program, "rb") as f:
        first, second = f.readline(4096), f.readline(4096)
    words = first[2:].decode("utf-8", "replace").split() if first.startswith(b"#!") else []
    if words:
        interpreter = words[0]
        if os.path.basename(interpreter) == "env" and len(words) > 1:
            interpreter = shutil.which(words[1], path="/usr/local/bin:/usr/bin:/bin") \
                or words[1]
        problem = _reach(interpreter, need_read=False)
        if problem:
            return problem
    for folder in _import_folders(second):
        problem = _reach(folder, need_read=True, folder=True)
        if problem:
            return problem
    return None


def _import_folders(line):
    """The folders a launcher puts first on sys.path, and masq's package in the first."""
    import ast
    text = line.decode("utf-8", "replace")
    folders = []
    if text.startswith("import sys; sys.path"):     # every folder the line names, in order
        try:
            folders = [n.value for n in ast.walk(ast.parse(text))
                       if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        except (ValueError, SyntaxError):
            folders = []
    if not folders:
        import masq
        folders = [os.path.dirname(os.path.dirname(os.path.abspath(masq.__file__)))]
    package = os.path.join(folders[0], "masq")
    if os.path.isdir(package):
        folders.append(package)
        folders.append(os.path.join(package, "cmd"))
    return folders


def _reach(path, need_read, folder=False):
    """The first thing on the way to path that others may not pass, as a sentence."""
    try:
        folders, real = _lookup(path)
    except OSError as e:
        return f"{e.filename or path}: {e.strerror}"
    for d in folders:
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return f"{d} is not searchable by other users: chmod o+x {d}"
    mode = os.stat(real).st_mode
    if folder and not (mode & stat.S_IXOTH and mode & stat.S_IROTH):
        return f"the folder {real} is not readable by other users: chmod o+rx {real}"
    if not folder and not mode & stat.S_IXOTH:
        return f"{real} is not executable by other users: chmod o+rx {real}"
    if need_read and not folder and not mode & stat.S_IROTH:
        return f"{real} is not readable by other users: chmod o+r {real}"
    if folder:
        for name in sorted(os.listdir(real)):
            module = os.path.join(real, name)
            if name.endswith(".py") and not os.stat(module).st_mode & stat.S_IROTH:
                return f"{module} is not readable by other users: chmod o+r {module}"
    return None


def _lookup(path):
    """(every folder a lookup of path searches, the file it ends at), links followed."""
    parts = [p for p in path.split("/") if p]
    current, searched, hops = "/", [], 0
    while parts:
        name = parts.pop(0)
        if name == ".":
            continue
        if current not in searched:
            searched.append(current)
        if name == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, name)
        st = os.lstat(candidate)
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > SYMLINK_HOPS:
                raise OSError(40, "too many levels of symbolic links", path)
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            parts = [p for p in target.split("/") if p] + parts
            continue
        current = candidate
    return searched, current


def owner_of(path):
    """'package: how' for a path another package installed (dpkg -S), else None."""
    candidates = [path]
    real = os.path.realpath(path)
    if real != path:
        candidates.append(real)
    for candidate in candidates:
        try:
            p = subprocess.run(["dpkg", "-S", candidate], capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        for line in p.stdout.decode("utf-8", "replace").splitlines():
            if p.returncode == 0 and ": " in line and not line.startswith("diversion "):
                return line.split(": ", 1)[0]
    return None


def _describe(path):
    """What is at path, in a few words."""
    if os.path.islink(path):
        return f"a link to {os.readlink(path)}"
    return "a folder" if os.path.isdir(path) else "a file"


# ---------------------------------------------------------------- install

class Plan:
    """What `masq-setup system` writes: the texts, where masq is, the switches."""

    def __init__(self, bindir, conf_text, aliases_text, secret=None, force=False,
                 enable=False):
        self.bindir, self.conf_text, self.aliases_text = bindir, conf_text, aliases_text
        self.secret, self.force, self.enable = secret, force, enable


def install(plan, manifest=None):
    """Make the layout, links and units; return report lines.  Refuses before any change."""
    require_root()
    manifest = manifest or Manifest()
    for name in CHECKED_PROGRAMS:
        program = os.path.join(plan.bindir, name)
        if os.path.exists(program):
            problem = not_executable(program)
            if problem:
                raise NotExecutableError(
                    f"other users cannot run {program}: {problem}, or install masq with "
                    "`make install-system` (a venv in /opt/masq from /usr/bin/python3) and "
                    "run its masq-setup")
    targets = {path: os.path.join(plan.bindir, prog) for path, prog in LINKS}
    unit_texts = {os.path.join(UNIT_DIR, n): t for n, t in units(plan.bindir).items()}
    others = [p for p, t in targets.items() if not _our_link(manifest, p, t)]
    others += [p for p, t in unit_texts.items() if not _our_file(manifest, p, t)]
    others = [p for p in others if os.path.lexists(p)]
    if others and not plan.force:
        raise ConflictError(_conflict_text(others))
    report = []
    _ensure_group(manifest, USER)
    _ensure_user(manifest, USER)
    masq = pwd.getpwnam(USER)
    _ensure_dir(manifest, CONF_DIR, 0, 0, 0o755)
    if _write_new(manifest, CONF, plan.conf_text.encode(), 0o644):
        report.append(f"wrote {CONF}")
    else:
        report.append(f"kept {CONF} as it is (the profile was not applied)")
    if plan.secret is not None:
        secret = os.path.join(CONF_DIR, SECRET_FILE)
        _write_file(manifest, secret, plan.secret.encode() + b"\n", 0o640, gid=masq.pw_gid)
    if plan.aliases_text is None or os.path.exists(ALIASES):
        report.append(f"kept {ALIASES} as it is")
    elif _write_new(manifest, ALIASES, plan.aliases_text.encode(), 0o644):
        report.append(f"wrote {ALIASES}")
    _make_spool(manifest, masq)
    _ensure_dir(manifest, LOG_DIR, masq.pw_uid, masq.pw_gid, 0o750)
    if not os.path.isdir(MAIL_DIR):
        _ensure_dir(manifest, MAIL_DIR, 0, _gid("mail"), 0o2775)
    for path, target in targets.items():
        _link(manifest, path, target)
    if not os.path.isdir(UNIT_DIR):
        _ensure_dir(manifest, UNIT_DIR, 0, 0, 0o755)
    for path, text in unit_texts.items():
        _write_file(manifest, path, text.encode(), 0o644)
    report.append(f"linked {', '.join(targets)} to {plan.bindir}/masq-inject")
    if others:
        report.append(f"replaced {', '.join(others)}, kept for --uninstall; another MTA's "
                      "daemon may still hold port 25 (stop it), and its package's upgrades "
                      "may put its links back (run masq-setup system again)")
    report.append(f"wrote the systemd units {', '.join(units(plan.bindir))} into {UNIT_DIR}")
    report += _enable(manifest, plan.enable)
    report.append("without systemd, these lines in /etc/crontab run the queue and the "
                  "SMTP listener:")
    report += ["  " + line.format(bin=plan.bindir) for line in CRON_LINES]
    report.append("(or, for light use, this line in /etc/inetd.conf: a new masq-smtpd "
                  "per connection)")
    report.append("  " + INETD_LINE.format(bin=plan.bindir))
    return report


def _conflict_text(paths):
    """One sentence naming each path in the way, its package, and the fixes."""
    said, packages = [], []
    for path in paths:
        package = owner_of(path)
        if package:
            packages += [p.strip() for p in package.split(",") if p.strip() not in packages]
            said.append(f"{path} ({_describe(path)}) belongs to {package}")
        else:
            said.append(f"{path} exists ({_describe(path)}, in no package)")
    fix = f"remove {', '.join(packages)} (apt-get remove {' '.join(packages)}) or " \
        if packages else "move them away or "
    return f"another MTA is installed: {'; '.join(said)}: {fix}run again with --force, " \
        "which keeps what it replaces for `masq-setup system --uninstall`"


def _our_link(manifest, path, target):
    """Whether path is a link masq made or one already pointing at target."""
    try:
        now = os.readlink(path)
    except OSError:
        return False
    step = manifest.find("link", path)
    return now == target or (step is not None and step["target"] == now)


def _our_file(manifest, path, text):
    """Whether path is a file masq wrote (still as written) or holds text already."""
    digest = _sha256_file(path)
    step = manifest.find("file", path)
    return digest == _sha256(text.encode()) or (step is not None and step["sha256"] == digest)


def _ensure_group(manifest, name):
    try:
        grp.getgrnam(name)
        return
    except KeyError:
        pass
    manifest.record({"do": "group", "name": name})
    _command(["groupadd", "--system", name])


def _ensure_user(manifest, name):
    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    manifest.record({"do": "user", "name": name})
    _command(["useradd", "--system", "--gid", name, "--home-dir", SPOOL, "--no-create-home",
              "--shell", NOLOGIN, "--comment", "masq mail transfer agent", name])


def _command(argv):
    """Run an admin tool (found in /usr/sbin even when PATH lacks it); raise on failure."""
    path = os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/local/sbin:/usr/sbin:/sbin"
    argv = [shutil.which(argv[0], path=path) or argv[0], *argv[1:]]
    try:
        p = subprocess.run(argv, capture_output=True, timeout=120)
    except OSError as e:
        raise InstallError(f"unable to run {argv[0]}: {e.strerror}") from None
    if p.returncode != 0:
        err = p.stderr.decode("utf-8", "replace").strip().replace("\n", "; ")
        raise InstallError(f"{' '.join(argv)} failed ({p.returncode}): {err}")
    return p


def _gid(name):
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise InstallError(f"there is no group {name}: groupadd --system {name}") from None


def _ensure_dir(manifest, path, uid, gid, mode, do="dir"):
    """A folder with this owner and mode, recorded if it is new."""
    if not os.path.isdir(path):
        manifest.record({"do": do, "path": path})
        os.makedirs(path, exist_ok=True)
    _own(path, uid, gid, mode)


def _own(path, uid, gid, mode):
    """Give a folder, the FIFO or a file its owner and mode, through a descriptor.

    The spool belongs to masq, and root runs this again on every install: a
    symbolic link masq put in place of a spool entry must not make root
    chmod what it points to (os.chmod follows links; Linux has no lchmod).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise InstallError(f"{path}: {e.strerror}: expected a folder, FIFO or file "
                           "of masq's, not a symbolic link; move it aside") from None
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind not in (stat.S_IFDIR, stat.S_IFIFO, stat.S_IFREG):
            raise InstallError(f"{path} is not a folder, FIFO or file: move it aside")
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _make_spool(manifest, masq):
    """The spool, its folders and the trigger FIFO, with the modes of the table."""
    from masq import spool
    uid, gid = masq.pw_uid, masq.pw_gid
    _ensure_dir(manifest, SPOOL, uid, gid, 0o711, do="spool")
    spool.Spool(SPOOL).create()
    for name, mode in SPOOL_MODES.items():
        folder = os.path.join(SPOOL, name)
        os.makedirs(folder, exist_ok=True)
        _own(folder, uid, gid, mode)
    _own(os.path.join(SPOOL, "trigger"), uid, gid, 0o622)
    _own(os.path.join(SPOOL, "VERSION"), uid, gid, 0o644)


def _write_new(manifest, path, data, mode):
    """Write a file only where none is; True if written."""
    if os.path.lexists(path):
        return False
    _write_file(manifest, path, data, mode)
    return True


def _write_file(manifest, path, data, mode, gid=0):
    """Write path (root-owned), recorded; another's file moves aside first (--force)."""
    step = manifest.find("file", path)
    if os.path.lexists(path) and step is None and _sha256_file(path) != _sha256(data):
        _move_aside(manifest, path)
    manifest.record({"do": "file", "path": path, "sha256": _sha256(data)})
    files.write_atomic(path, data, mode, owner=(0, gid))


def _move_aside(manifest, path):
    """Keep another's link or file for uninstall: its target, or the file renamed."""
    if os.path.islink(path):
        manifest.record({"do": "moved-link", "path": path, "target": os.readlink(path)})
        return
    saved = f"{path}.masq-replaced"
    manifest.record({"do": "moved-file", "path": path, "saved": saved})
    os.rename(path, saved)


def _link(manifest, path, target):
    """path -> target, replacing atomically; another's link is recorded first."""
    try:
        now = os.readlink(path)
    except FileNotFoundError:
        now = None
    except OSError:     # a file, not a link
        now = ""
    if now == target and manifest.find("link", path):
        return
    step = manifest.find("link", path)
    if now is not None and now != target and (step is None or step["target"] != now):
        _move_aside(manifest, path)
    manifest.record({"do": "link", "path": path, "target": target})
    tmp = f"{path}.masq-new"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.rename(tmp, path)


def systemd_running():
    """Whether systemd runs this machine (sd_booted(3): /run/systemd/system exists)."""
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def _enable(manifest, enable):
    names = ["masq-send.service", "masq-smtpd.socket"]
    if not enable:
        return [f"start masq with: systemctl enable --now {' '.join(names)}"]
    if not systemd_running():
        return ["--enable: systemd is not running here, nothing enabled "
                "(use the cron or inetd lines below)"]
    manifest.record({"do": "enabled", "units": names})
    _command(["systemctl", "daemon-reload"])
    _command(["systemctl", "enable", "--now", *names])
    return [f"enabled and started {' '.join(names)}"]


# ---------------------------------------------------------------- uninstall

def uninstall(manifest=None):
    """Undo the recorded steps, newest first; return report lines."""
    require_root()
    manifest = manifest or Manifest()
    if not manifest.exists:
        return [f"nothing to undo: no {manifest.path} (masq-setup system did not install here)"]
    report, keep_owner = [], False
    for step in reversed(manifest.steps):
        do, path = step["do"], step.get("path")
        if do == "enabled":
            if systemd_running():
                subprocess.run(["systemctl", "disable", "--now", *step["units"]],
                               capture_output=True, timeout=120)
                report.append(f"disabled {' '.join(step['units'])}")
        elif do == "link":
            if _readlink(path) == step["target"]:
                os.unlink(path)
        elif do == "moved-link":
            if _readlink(path) is None:
                tmp = f"{path}.masq-new"
                if os.path.lexists(tmp):
                    os.unlink(tmp)
                os.symlink(step["target"], tmp)
                os.rename(tmp, path)
                report.append(f"restored {path} -> {step['target']}")
        elif do == "moved-file":
            if not os.path.lexists(path) and os.path.lexists(step["saved"]):
                os.rename(step["saved"], path)
                report.append(f"restored {path}")
        elif do == "file":
            if _sha256_file(path) == step["sha256"]:
                os.unlink(path)
                if path == CONF:
                    _unlink_quietly(os.path.join(CONF_DIR, ".masq.toml.cache"))
            elif os.path.lexists(path):
                report.append(f"kept {path}: it changed since masq-setup wrote it")
        elif do == "spool":
            mail = _mail_count(path)
            if mail:
                keep_owner = True
                report.append(f"kept the spool {path}: it holds {mail} messages "
                              f"(and the user masq who owns them); rm -r {path} when done")
            elif os.path.isdir(path):
                shutil.rmtree(path)
        elif do == "dir":
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError:
                report.append(f"kept {path}: it is not empty")
        elif do in ("user", "group") and not keep_owner:
            try:
                _undo_account(do, step["name"])
            except InstallError as e:   # e.g. masq-send still runs as masq
                report.append(f"kept the {do} {step['name']}: {e}; remove it by hand "
                              "once nothing runs as it")
    manifest.remove()
    report.append("masq is uninstalled")
    return report


def _undo_account(kind, name):
    lookup = pwd.getpwnam if kind == "user" else grp.getgrnam
    try:
        lookup(name)
    except KeyError:
        return          # userdel removed the group of the same name already
    _command(["userdel" if kind == "user" else "groupdel", name])


def _mail_count(path):
    """Messages (and drop files) in a spool; 0 when there is none."""
    count = 0
    for name in MAIL_FOLDERS:
        try:
            count += sum(1 for n in os.listdir(os.path.join(path, name))
                         if not n.startswith("."))
        except OSError:
            pass
    return count


# ---------------------------------------------------------------- small helpers

def _readlink(path):
    try:
        return os.readlink(path)
    except OSError:
        return None


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path):
    """The file's sha256, or None when it is absent or not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "rb", closefd=False) as f:
            for block in iter(lambda: f.read(65536), b""):
                digest.update(block)
        return digest.hexdigest()
    finally:
        os.close(fd)
