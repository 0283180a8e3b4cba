"""masq-setup: write a working masq folder from a standard profile.

Usage:
  masq-setup local-only DIR [--hostname NAME] [--mailbox KIND]
  masq-setup -h | --help

Options:
  --hostname NAME  The host's mail name [default: the host's name].
  --mailbox KIND   maildir, mbox or mda [default: maildir].
  -h --help        Show this.

Writes DIR/masq.toml, DIR/aliases, DIR/spool/, DIR/mail/ and DIR/bin/ with
the sendmail, mailq, runq, newaliases, rmail and mailrm links, so that
DIR/bin/sendmail works at once and finds DIR/masq.toml by itself.
An existing masq.toml or aliases file is left as it is.
"""
import os
import pwd
import sys

from masq import Error, program
from masq.program import Exit

LINKS = ("sendmail", "mailq", "runq", "newaliases", "rmail", "mailrm")
PROGRAMS = ("masq-send", "masq-queue", "masq-route", "masq-local")

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
users = "any"

[online]
detect = "always"
"""

ALIASES = """\
# aliases(5) for masq: "name: target, target, ..."; see masq-local(8).
# A target is a local user, an address, "|command", "/path/to/mbox" or
# ":include:/path/to/file".  Check this file with newaliases.
postmaster: {user}
MAILER-DAEMON: postmaster
abuse: postmaster
{root}"""


def main(argv=None):
    args = program.parse(__doc__, argv, usage_code=Exit.USAGE)
    folder = os.path.abspath(args["DIR"])
    mailbox = args["--mailbox"]
    if mailbox not in ("maildir", "mbox", "mda"):
        raise Error("--mailbox must be maildir, mbox or mda", code=Exit.USAGE, temporary=False)
    hostname = args["--hostname"]
    if hostname == "the host's name":
        hostname = os.uname().nodename
    user = _user()
    try:
        write(folder, "local-only", hostname, mailbox, user)
    except OSError as e:
        raise Error(f"unable to write {e.filename}: {e.strerror}", code=Exit.CANTCREAT) from None
    print(f"masq-setup: wrote {folder}; send with {folder}/bin/sendmail, "
          f"mail lands in {folder}/mail/")
    return Exit.OK


def write(folder, profile, hostname, mailbox, user):
    """Make the folder; keep files a person may have edited."""
    from masq import spool
    os.makedirs(folder, exist_ok=True)
    path = {"maildir": "mail/{user}/", "mbox": "mail/{user}", "mda": "mail/{user}"}[mailbox]
    _write_new(os.path.join(folder, "masq.toml"), LOCAL_ONLY.format(
        profile=profile, hostname=hostname, mailbox=mailbox, path=path))
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


def _write_new(path, text):
    if os.path.exists(path):
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _user():
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return "postmaster"
