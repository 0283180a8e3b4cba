"""masq-setup: write a working masq folder from a standard profile.

Usage:
  masq-setup local-only DIR [--hostname NAME] [--mailbox KIND]
  masq-setup smarthost DIR --relay HOST:PORT [--user NAME] [--hostname NAME] [--mailbox KIND]
  masq-setup direct DIR [--hostname NAME] [--mailbox KIND]
  masq-setup lan-server DIR --lan CIDR... [--hostname NAME] [--mailbox KIND]
  masq-setup passwd DIR USER
  masq-setup dkim DIR DOMAIN SELECTOR [--algorithm ALG] [--bits N]
  masq-setup system local-only [--hostname NAME] [--mailbox KIND] [--admin USER]
             [--force] [--enable]
  masq-setup system smarthost --relay HOST:PORT [--user NAME] [--hostname NAME]
             [--mailbox KIND] [--admin USER] [--force] [--enable]
  masq-setup system direct [--hostname NAME] [--mailbox KIND] [--admin USER]
             [--force] [--enable]
  masq-setup system lan-server --lan CIDR... [--hostname NAME] [--mailbox KIND]
             [--admin USER] [--force] [--enable]
  masq-setup system --uninstall
  masq-setup check [CONF]
  masq-setup import-masqmail MASQMAIL DIR
  masq-setup -h | --help

Options:
  --hostname NAME    The host's mail name [default: the host's name].
  --mailbox KIND     maildir, mbox or mda (default: maildir); for system,
                     mbox (/var/mail/USER, the default) or maildir (~/Maildir/).
  --relay HOST:PORT  The smarthost (port 465: implicit TLS, else STARTTLS).
  --user NAME        Log in to the smarthost as NAME; the password is the
                     first line of stdin, kept in DIR/smarthost.secret.
  --lan CIDR         A network whose hosts may relay through this one.
  --admin USER       Who gets the mail of postmaster and root when there is
                     no /etc/aliases yet (default: $SUDO_USER).
  --force            Replace another MTA's links and units, keeping them for
                     --uninstall.
  --enable           Enable and start masq-send.service and masq-smtpd.socket.
  --uninstall        Undo what `masq-setup system` did.
  --algorithm ALG    dkim: rsa (the default) or ed25519.
  --bits N           dkim: the size of an RSA key [default: 2048].
  -h --help          Show this.

Writes DIR/masq.toml, DIR/aliases, DIR/spool/, DIR/mail/ and DIR/bin/ with
the sendmail, mailq, runq, newaliases, rmail, mailrm, hoststat and
purgestat links, so that DIR/bin/sendmail works at once and finds
DIR/masq.toml by itself.  An existing masq.toml or aliases file is left as
it is.

`passwd` adds USER to the password file of masq-smtpd's AUTH ([smtpd]
passwords in DIR/masq.toml, default DIR/passwd), or replaces its password:
the password is the first line of stdin, stored only as a salted hash.

`dkim` makes a DKIM private key for DOMAIN in DIR/keys/ (mode 0600) and
prints the DNS TXT record to publish at SELECTOR._domainkey.DOMAIN and the
keys that make a [route.NAME] sign with it.

`system`, run as root, makes masq the machine's MTA: the user masq,
/etc/masq/masq.toml, /var/spool/masq, the links /usr/sbin/sendmail,
/usr/lib/sendmail, /usr/bin/mailq, /usr/bin/newaliases and /usr/bin/runq,
and systemd units; `system --uninstall` undoes it (masq-setup(8)).

`import-masqmail` writes DIR as for a profile, with a masq.toml made from
masqmail's configuration in the folder MASQMAIL (/etc/masqmail: its
masqmail.conf, route and get files), passwords in DIR/*.secret (mode
0600), and prints every key it could not carry over and why.  Values read
out of files masqmail's values name are copied in: masq.toml is mode 0640
then.

`check` reads CONF (else the file every program would read) as every
program does and prints each problem with its line: an unknown table or
key, a value of the wrong kind (exit 78), or that it has none (exit 0).
"""
import getpass
import ipaddress
import os
import pwd
import sys

from masq import Error, config, files, passwords, program, spool
from masq.program import Exit

PROFILES = ("local-only", "smarthost", "direct", "lan-server")
LINKS = ("sendmail", "mailq", "runq", "newaliases", "rmail", "mailrm", "hoststat",
         "purgestat")
PROGRAMS = ("masq-send", "masq-queue", "masq-route", "masq-local")
SECRET_FILE = "smarthost.secret"
LOOPBACK = ["127.0.0.0/8", "::1/128"]

LOCAL_ONLY = """\
# masq configuration for {profile} (masq.toml(5)); written by masq-setup.
# Relative paths are relative to this file's folder.
hostname = "{hostname}"
spool = "spool"
local_domains = ["localhost", "{hostname}"]
aliases = "aliases"
log = "masq.log"
max_size = 52428800

[local]
mailbox = "{mailbox}"
path = "{path}"
mda = "procmail -d {{user}}"
{users}
[online]
detect = "always"
"""

ONLINE_NOTE = """\
# Always online while the network is up.  For a host that is online only
# sometimes: detect = "file", and `echo {route} > {folder}/online` when
# the connection is up (rm it when it goes down); mail waits meanwhile.
file = "online"
"""

SMTPD = """
[smtpd]
# Hosts that may send mail to any domain through masq-smtpd; anyone else
# may only send to the local domains.  Never 0.0.0.0/0: that is an open relay.
relay_nets = [{nets}]
"""

SMARTHOST = """
[route.smarthost]
# Every mail that is not local goes to this host.
host = "{host}"
tls = "{tls}"
{auth}"""

DIRECT = """
[route.direct]
# No host: straight to the MX of each recipient's domain, STARTTLS when
# offered (tls = "may").  Needs a fixed address with working reverse DNS
# and port 25 open to the outside; else use the smarthost profile.
tls = "may"
"""

ALIASES = """\
# aliases(5) for masq: "name: target, target, ..."; see masq-local(8).
# A target is a local user, an address, "|command", "/path/to/mbox" or
# ":include:/path/to/file".  Check this file with newaliases.
postmaster: {user}
MAILER-DAEMON: postmaster
abuse: postmaster
{root}"""


SYSTEM = """\
# masq configuration for {profile}, masq as the machine's MTA (masq.toml(5));
# written by masq-setup system (masq-setup(8)).
hostname = "{hostname}"
user = "masq"
spool = "/var/spool/masq"
local_domains = ["localhost", "{hostname}"]
aliases = "/etc/aliases"
log = "/var/log/masq/masq.log"
max_size = 52428800

[local]
mailbox = "{mailbox}"
path = "{path}"
mda = "procmail -d {{user}}"
{users}# aliases' own |command and /file targets run as this user
default_privs = "nobody"

[online]
detect = "always"
"""

USERS_ANY = 'users = "any"\n'
# Mail from outside must be refused at RCPT when nobody would take it: accepted
# and bounced later, it goes to a forged sender (backscatter).
USERS_SYSTEM = """\
# Only users in the passwd file (and the aliases) take mail: mail for anyone
# else is refused at RCPT, never accepted and bounced later to a sender who
# may be forged.  "any" takes every local part (for local mail only).
users = "system"
"""
OUTSIDE = ("direct", "lan-server")        # profiles that take mail from other hosts

SYSTEM_MAILBOXES = {"mbox": "/var/mail/{user}", "maildir": "{home}/Maildir/"}


class UsageError(Error):
    code = Exit.USAGE
    temporary = False


def main(argv=None):
    args = program.parse(__doc__, argv, usage_code=Exit.USAGE)
    if args["import-masqmail"]:
        return import_masqmail(args)
    if args["check"]:
        return check(args["CONF"])
    if args["system"]:
        return system(args)
    folder = os.path.abspath(args["DIR"])
    if args["passwd"]:
        return set_password(folder, args["USER"])
    if args["dkim"]:
        return make_dkim_key(folder, args)
    profile = next(p for p in PROFILES if args[p])
    mailbox = args["--mailbox"] or "maildir"
    if mailbox not in ("maildir", "mbox", "mda"):
        raise UsageError("--mailbox must be maildir, mbox or mda")
    hostname = _hostname(args)
    extra = profile_text(profile, folder, args)
    password = _password() if args["--user"] else None
    user = _user()
    try:
        write(folder, profile, hostname, mailbox, user, extra)
        if password is not None:
            write_secret(os.path.join(folder, SECRET_FILE), password)
    except OSError as e:
        raise Error(f"unable to write {e.filename}: {e.strerror}", code=Exit.CANTCREAT) from None
    print(f"masq-setup: wrote {folder} ({profile}); send with {folder}/bin/sendmail, "
          f"mail lands in {folder}/mail/")
    return Exit.OK


def check(conf_file):
    """masq-setup check: every problem of a configuration file, one line each."""
    path = config.find(conf_file)
    problems = config.check(path)
    if not problems:
        from masq import smtpdconfig
        try:
            smtpdconfig.read_settings(config.Config(path, config.parse(path)))
        except config.ConfigError as e:
            problems = e.problems
    for line in problems:
        print(f"masq-setup: {line}", file=sys.stderr)
    if problems:
        return Exit.CONFIG
    print(f"masq-setup: {path}: no problems")
    return Exit.OK


def system(args):
    """masq-setup system: masq as the machine's MTA (masq.install does the work)."""
    from masq import install
    if args["--uninstall"]:
        install.require_root()
        for line in install.uninstall():
            print(f"masq-setup: {line}")
        return Exit.OK
    profile = next(p for p in PROFILES if args[p])
    mailbox = args["--mailbox"] or "mbox"
    if mailbox not in SYSTEM_MAILBOXES:
        raise UsageError("--mailbox must be mbox or maildir for system; an MDA: "
                         "set [local] mailbox = \"mda\" in /etc/masq/masq.toml")
    hostname = _hostname(args)
    extra = profile_text(profile, install.CONF_DIR, args)
    install.require_root()
    password = _password() if args["--user"] else None
    aliases = None
    if not os.path.exists(install.ALIASES):
        admin = _admin(args["--admin"])
        aliases = ALIASES.format(user=admin, root=f"root: {admin}\n")
    conf = SYSTEM.format(profile=profile, hostname=hostname, mailbox=mailbox,
                         path=SYSTEM_MAILBOXES[mailbox], users=USERS_SYSTEM) + extra
    plan = install.Plan(os.path.dirname(os.path.abspath(sys.argv[0])), conf, aliases,
                        secret=password, force=args["--force"], enable=args["--enable"])
    try:
        report = install.install(plan)
    except OSError as e:
        raise Error(f"unable to write {e.filename}: {e.strerror}; what was made so far is "
                    "undone by masq-setup system --uninstall", code=Exit.CANTCREAT) from None
    if aliases is None and not _has_root_alias(install.ALIASES):
        report.append(f"warning: {install.ALIASES} has no alias for root: masq delivers "
                      "nothing as root, add `root: USER` and run newaliases")
    for line in report:
        print(f"masq-setup: {line}")
    where = "/var/mail/USER" if mailbox == "mbox" else "~USER/Maildir/"
    print(f"masq-setup: masq is the MTA ({profile}); mail for local users lands in {where}")
    return Exit.OK


def _has_root_alias(path):
    """Whether an aliases file sends root's mail somewhere (a `root:` line)."""
    try:
        with open(path, "rb") as f:
            return any(line.split(b":", 1)[0].strip().lower() == b"root" for line in f)
    except OSError:
        return False


def _admin(name):
    """The user who reads postmaster's and root's mail: --admin, else $SUDO_USER."""
    name = name or os.environ.get("SUDO_USER")
    if not name or name == "root":
        raise UsageError("there is no /etc/aliases yet: name the user who reads the mail "
                         "of postmaster and root with --admin USER")
    if "@" not in name:
        try:
            pwd.getpwnam(name)
        except KeyError:
            raise UsageError(f"--admin {name}: no such user") from None
    if any(c in name for c in ' ,:"\\\n'):
        raise UsageError(f"--admin {name}: not a user name or address")
    return name


def _hostname(args):
    hostname = args["--hostname"]
    if hostname == "the host's name":
        hostname = os.uname().nodename
    from masq import address    # it goes into masq.toml as a string: a name, nothing more
    try:
        address.check_domain(hostname)
    except address.AddressError:
        raise UsageError(f"--hostname {hostname!r}: not a host name") from None
    return hostname


def profile_text(profile, folder, args):
    """What a profile adds to the local-only configuration."""
    if profile == "local-only":
        return ""
    if profile == "lan-server":
        return SMTPD.format(nets=_list(LOOPBACK + [_lan(c) for c in args["--lan"]]))
    if profile == "direct":
        return ONLINE_NOTE.format(route="direct", folder=folder) \
            + SMTPD.format(nets=_list(LOOPBACK)) + DIRECT
    host, port = _relay(args["--relay"])
    auth = ""
    if args["--user"]:
        from masq import tomlwrite
        name = args["--user"]
        if tomlwrite.escape(name) != name:
            raise UsageError("--user: a control character (or a byte that is not UTF-8) "
                             "in the name")
        auth = f"auth = {tomlwrite.toml_value({'user': name, 'password_file': SECRET_FILE})}\n"
    return ONLINE_NOTE.format(route="smarthost", folder=folder) \
        + SMTPD.format(nets=_list(LOOPBACK)) \
        + SMARTHOST.format(host=f"{host}:{port}", tls="tls" if port == 465 else "starttls",
                           auth=auth)


def _relay(text):
    """(host, port) from HOST:PORT or [v6]:PORT."""
    host, _, port = (text or "").rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 0 < int(port) < 65536 \
            or any(c in host for c in ' "\\[]'):
        raise UsageError(f"--relay {text}: give HOST:PORT, e.g. smtp.isp.example:587")
    return (f"[{host}]" if ":" in host else host), int(port)


def _lan(text):
    """A LAN network for relay_nets; the whole Internet is refused."""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise UsageError(f"--lan {text}: not a network (e.g. 192.168.1.0/24)") from None
    if not (net.is_private or net.is_link_local or net.is_loopback) or net.prefixlen < 8:
        raise UsageError(f"--lan {text}: not a private network: letting it relay "
                         "would make an open relay")
    return str(net)


def _list(items):
    return ", ".join(f'"{i}"' for i in items)


def _password():
    """The smarthost password: the first line of stdin (a prompt on a terminal)."""
    if sys.stdin.isatty():
        line = getpass.getpass("smarthost password: ")
    else:
        line = sys.stdin.readline()
    line = line.rstrip("\r\n")
    if not line:
        raise UsageError("--user needs the password as the first line of stdin")
    return line


def set_password(folder, user):
    """masq-setup passwd: one user's line in the AUTH password file."""
    try:
        passwords.check_user(user)
    except passwords.BadUserError as e:
        raise UsageError(str(e)) from None
    path = password_file(folder)
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {user}: ").encode()
    else:
        password = sys.stdin.buffer.readline()
    password = password.rstrip(b"\r\n")
    if not password:
        raise UsageError("give the password as the first line of stdin")
    try:
        passwords.write_user(path, user, password)
    except passwords.BadUserError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise Error(f"unable to write {e.filename or path}: {e.strerror}",
                    code=Exit.CANTCREAT) from None
    _share_with_masq_user(folder, path)
    print(f"masq-setup: wrote the password of {user} into {path}")
    return Exit.OK


def make_dkim_key(folder, args):
    """masq-setup dkim: a new key in DIR/keys/, its TXT record and route keys printed."""
    from masq import dkim
    domain, selector = args["DOMAIN"].lower().rstrip("."), args["SELECTOR"]
    for what, name in (("DOMAIN", domain), ("SELECTOR", selector)):
        if not dkim.DNS_NAME.match(name):
            raise UsageError(f"{what} must be a DNS name, not {name!r}")
    algorithm = {None: "rsa-sha256", "rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}.get(
        args["--algorithm"])
    if algorithm is None:
        raise UsageError("--algorithm must be rsa or ed25519")
    bits = args["--bits"]
    if not bits.isdigit() or not 1024 <= int(bits) <= 8192:
        raise UsageError("--bits must be a number from 1024 to 8192 (2048 is usual)")
    name = os.path.join("keys", dkim.key_file_name(selector, domain))
    path = os.path.join(folder, name)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        value = dkim.make_key(path, algorithm, int(bits))
    except FileExistsError:
        raise Error(f"{path} exists: a published key stays until no mail signed with it "
                    "is on its way; choose a new SELECTOR", code=Exit.CANTCREAT,
                    temporary=False) from None
    except OSError as e:
        raise Error(f"unable to write {e.filename or path}: {e.strerror}",
                    code=Exit.CANTCREAT) from None
    _share_with_masq_user(folder, path)
    st = os.stat(path)
    if st.st_mode & 0o040:      # system mode: masq-send, as masq, reads it through keys/
        os.chown(os.path.dirname(path), 0, st.st_gid)
        os.chmod(os.path.dirname(path), 0o750)
    print(f"masq-setup: wrote the DKIM key {path}\n"
          f"Publish this DNS record:\n{dkim.txt_record(selector, domain, value)}\n"
          f"and add to each [route.NAME] of {folder}/masq.toml that sends mail of {domain}:\n"
          f'dkim_key = "{name}"\ndkim_selector = "{selector}"\n'
          f'dkim_domain = "{domain}"\ndkim_algorithm = "{algorithm}"')
    return Exit.OK


def _share_with_masq_user(folder, path):
    """In system mode masq-smtpd runs as the masq user: the file becomes root:masq 0640."""
    conf_file = os.path.join(folder, "masq.toml")
    if os.geteuid() != 0 or not os.path.exists(conf_file):
        return
    name = config.load(conf_file).get("user")
    if isinstance(name, str) and name:
        import grp
        try:
            gid = grp.getgrnam(name).gr_gid
        except KeyError:
            raise Error(f"{conf_file}: user = \"{name}\", and there is no such group",
                        code=Exit.CONFIG) from None
        os.chown(path, 0, gid)
        os.chmod(path, 0o640)


def password_file(folder):
    """[smtpd] passwords of DIR/masq.toml, relative to DIR; DIR/passwd without one."""
    conf_file = os.path.join(folder, "masq.toml")
    if not os.path.exists(conf_file):
        return os.path.join(folder, "passwd")
    conf = config.load(conf_file)
    value = conf.table("smtpd").get("passwords", "passwd")
    if not isinstance(value, str) or not value:
        raise config.ConfigError(f"{conf_file}: smtpd.passwords must be a file name")
    return conf.path(value, is_value=True)


def write_secret(path, password):
    """The password file, mode 0600 from its creation, replaced atomically: a str
    as one line, bytes as they are.  No temporary file is left behind."""
    data = password if isinstance(password, bytes) else \
        password.encode("utf-8", "surrogateescape") + b"\n"
    files.write_atomic(path, data, 0o600)


def import_masqmail(args):
    """masq-setup import-masqmail: a folder whose masq.toml says what masqmail's did."""
    from masq import masqmailconf
    folder = os.path.abspath(args["DIR"])
    if os.path.exists(os.path.join(folder, "masq.toml")):
        raise UsageError(f"{folder}/masq.toml exists: import into a new folder")
    result = masqmailconf.convert(args["MASQMAIL"])
    # values read out of files (or files others cannot read) stay from others' eyes
    mode = 0o640 if result.private else 0o666
    try:
        os.makedirs(folder, exist_ok=True)
        for name, secret in result.secrets.items():     # before the masq.toml naming them
            write_secret(os.path.join(folder, name), secret)
        make_folder(folder, _user())
        _write_new(os.path.join(folder, "masq.toml"), result.toml, mode)
    except OSError as e:
        raise Error(f"unable to write {e.filename}: {e.strerror}", code=Exit.CANTCREAT) from None
    for note in result.notes:
        print(f"masq-setup: {note}")
    if result.private:
        print(f"masq-setup: {folder}/masq.toml is mode 0640, not readable by others: it "
              f"holds what was read from {masqmailconf.escape(', '.join(result.private))}; "
              "chmod o+r only if anyone may read that")
    print(f"masq-setup: wrote {folder} from {masqmailconf.escape(result.conf_file)}; check "
          f"it with masq-setup check {folder}/masq.toml")
    return Exit.OK


def write(folder, profile, hostname, mailbox, user, extra=""):
    """Make the folder and its masq.toml; keep files a person may have edited."""
    make_folder(folder, user)
    path = {"maildir": "mail/{user}/", "mbox": "mail/{user}", "mda": "mail/{user}"}[mailbox]
    users = USERS_SYSTEM if profile in OUTSIDE else USERS_ANY
    _write_new(os.path.join(folder, "masq.toml"), LOCAL_ONLY.format(
        profile=profile, hostname=hostname, mailbox=mailbox, path=path, users=users) + extra)


def make_folder(folder, user):
    """A folder's aliases (kept if there), spool, mail/ and bin/ links: all but masq.toml."""
    os.makedirs(folder, exist_ok=True)
    root = f"root: {user}\n" if user != "root" else ""
    _write_new(os.path.join(folder, "aliases"), ALIASES.format(user=user, root=root))
    spool.Spool(os.path.join(folder, "spool")).create()
    os.makedirs(os.path.join(folder, "mail"), exist_ok=True)
    bindir = os.path.join(folder, "bin")
    os.makedirs(bindir, exist_ok=True)
    here = os.path.dirname(os.path.abspath(sys.argv[0]))
    targets = {name: os.path.join(here, "masq-inject") for name in LINKS}
    targets.update({name: os.path.join(here, name) for name in PROGRAMS})
    for name, target in targets.items():
        link = os.path.join(bindir, name)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(target, link)


def _write_new(path, text, mode=0o666):
    if os.path.exists(path):
        return
    files.write_atomic(path, text.encode(), mode)


def _user():
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return "postmaster"
