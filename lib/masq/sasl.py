"""SASL for masq-smtpd's AUTH: the PLAIN and LOGIN mechanisms, and what checks the password.

credentials() runs one mechanism (RFC 4616 PLAIN, the LOGIN of common
practice) through `ask(challenge)`, a function of the session that sends
a challenge and returns the client's answer as text; it decodes the
base64 and gives (user, password bytes), or None for credentials no user
can have.  Acting for another user (an authzid that is not the authcid)
is not offered.  authenticate() then checks the password with the
session's `check(user, password)` (which counts and limits the checks:
masq.anvil) and gives the user or None; unusable() tells whether the
backend, the password file (masq.passwords: hashes only, compared in
constant time) or a checkpassword program, can serve at all.  The SMTP
text around it (334, 235, 535) is the session's; here, errors are
SaslError subclasses.

Its own module, not part of masq.passwords: that is the file format
(masq-setup writes it too); this is the protocol that reads the client.
"""
import binascii

from masq import Error, passwords

LOGIN_USER_CHALLENGE = "VXNlcm5hbWU6"          # base64 "Username:"
LOGIN_PASSWORD_CHALLENGE = "UGFzc3dvcmQ6"      # base64 "Password:"


def credentials(mechanism, initial, ask):
    """(user, password bytes) the client gave with `mechanism`, or None."""
    if mechanism == "PLAIN":
        return plain(response(initial, "", ask))
    if mechanism == "LOGIN":
        name = response(initial, LOGIN_USER_CHALLENGE, ask)
        password = response("", LOGIN_PASSWORD_CHALLENGE, ask)
        user = user_name(name)
        return None if user is None else (user, password)
    raise MechanismError(f"unsupported mechanism {mechanism[:20]!r}")


def response(initial, challenge, ask):
    """The client's answer as bytes: the initial response, or asked for with `challenge`."""
    text = initial if initial else ask(challenge)
    if text == "*":
        raise CancelledError("the client cancelled the authentication")
    if text == "=" and initial:         # RFC 4954 section 4: an empty initial response
        return b""
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise Base64Error("the client's response is not base64") from None


def plain(data):
    """(user, password bytes) of RFC 4616 `authzid NUL authcid NUL passwd`, or None."""
    parts = data.split(b"\0")
    if len(parts) != 3:
        return None
    authzid, authcid, password = parts
    user = user_name(authcid)
    if user is None or (authzid and authzid != authcid):
        return None
    return user, password


def user_name(data):
    """A user name from AUTH data, or None when it cannot be one."""
    try:
        return passwords.check_user(data.decode("utf-8"))
    except (UnicodeDecodeError, passwords.BadUserError):
        return None


def unusable(path, program=""):
    """Why the backend cannot serve AUTH, or None; False when there is none.

    The backend is the checkpassword `program` when one is named, else
    the password file at `path`.
    """
    if program:
        import os
        return None if os.access(program, os.X_OK) else \
            f"checkpassword {program} is not an executable file"
    try:
        return passwords.status(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        return f"unable to read {e.filename}: {e.strerror}"


def authenticate(mechanism, initial, ask, check):
    """The user the client proved to be, or None; `check(user, password)` says."""
    found = credentials(mechanism, initial, ask)
    if found is None:
        return None
    user, password = found
    return user if check(user, password) else None


class SaslError(Error):
    """The exchange ended without credentials to check."""

    code = 65
    temporary = False


class MechanismError(SaslError):
    """A mechanism we do not offer."""


class CancelledError(SaslError):
    """The client answered `*` (RFC 4954 section 4)."""


class Base64Error(SaslError):
    """An answer that is not base64."""
