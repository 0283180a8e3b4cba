"""What a local part names: an alias, or a mailbox, and when a mailbox is refused.

The one rule masq-local delivers by and masq-smtpd applies at RCPT (so a
recipient is refused in the dialogue rather than bounced later): aliases
first, then the +detail, then the mailbox-name rule (no path separators,
dot files, options, alias syntax or control characters; NAME.lock is the
dot-lock of an mbox; with users = "system" a passwd entry).
"""
import os
import pwd

from masq import address, aliases


def load_aliases(conf, strict=False):
    """The aliases file named in the configuration (AliasError when unreadable)."""
    return aliases.load(conf.path("aliases") or os.devnull, conf.local_domains, strict)


def targets(conf, table, name, origins=False):
    """The final targets of a local part (lower-case): aliases, then +detail.

    origins=True: (target, origin) pairs as aliases.Aliases.expand gives.

    Only the aliases file may name a |command, a /file or an :include:;
    a local part that is no alias names a mailbox and nothing else, so
    `"|cmd"@localhost` from a stranger is a (refused) mailbox name, never
    a command.  Such names come back as Mailbox(name).
    """
    alias, mailbox = _resolve(conf, table, name)
    if alias:
        return table.expand(alias, origins)
    return [(Mailbox(mailbox), None)] if origins else [Mailbox(mailbox)]


def _resolve(conf, table, name):
    """(the alias that takes `name`, "") or ("", the mailbox it names); expands nothing.

    A +detail that could not be a path component keeps the whole name, so
    that the mailbox-name rule refuses it: the detail reaches an MDA as
    {local} and $LOCAL.
    """
    if name in table:
        return name, ""
    delimiter = conf.get("local.recipient_delimiter")
    delimiter = "+" if delimiter is None else delimiter
    if delimiter and delimiter in name[1:]:
        base = name[:name.index(delimiter, 1)]
        if base in table:
            return base, ""
        detail = name[len(base):]
        if "/" not in detail and detail.isprintable() and (
                conf.get("local.users") != "system" or passwd(name) is None):
            return "", base
    return "", name


def mailbox_problem(conf, name):
    """Why the mailbox `name` cannot take mail, with its status code, or ""."""
    problem = _unsafe(name)
    if not problem and conf.get("local.mailbox") == "mbox" and name.endswith(".lock"):
        problem = "ends in .lock"     # the dot-lock of the mbox NAME: never a mailbox
    if problem:
        return f"unusable mailbox name {name!r}: {problem} (5.1.3)"
    if conf.get("local.users") == "system" and passwd(name) is None:
        return f"no such user: {name} (5.1.1)"
    return ""


def recipient_problem(conf, table, local_part):
    """Why deliver() would refuse this local part at once, or "" (masq-smtpd's RCPT).

    An alias is taken as it is: masq-smtpd never reads :include: files (they
    are their owners', read as them at delivery).
    """
    alias, mailbox = _resolve(conf, table, address.unquote_local(local_part).lower())
    return "" if alias else mailbox_problem(conf, mailbox)


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


def passwd(name):
    """The passwd entry of a user name, or None."""
    try:
        return pwd.getpwnam(name)
    except (KeyError, ValueError):
        return None
