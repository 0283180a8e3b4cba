"""OAuth 2.0 login to a smarthost: the token a route's token_command prints, and
the SASL XOAUTH2 and OAUTHBEARER (RFC 7628) messages that carry it.

    token = oauth.get(route)            # cached, or runs the command; DeliveryError
    line = oauth.initial_response(route.mechanism, route.user, token, host, port)
    oauth.forget(route)                 # after the server refused the token

The command runs without a shell (split as masq's other commands: shlex),
in the configuration's folder, with stdin on /dev/null, for at most
TOKEN_TIMEOUT_SECONDS.  Its first output line is the token; a second line,
if any, says how long it lasts: a number is seconds from now (OAuth's
expires_in), anything else an ISO 8601 time ("2026-12-07T08:00:00Z").

The cache is one file per route in the spool, spool/oauth/NAME (folder 0700,
file 0600, replaced by rename), so that every masq-smtp and masq-send
process and every queue run shares it:

    masq-oauth 1
    key 3f5c...          sha256 of user NUL token_command: a changed route
    expires 1765100000   misses the cache
    token ya29....

A token without an expiry is not cached.  One that expires within
EXPIRY_MARGIN_SECONDS counts as expired, so that it does not run out during
a session.  A lock on the folder makes concurrent processes run the command
once.  The token never appears in a log line, an error or a process title.
"""
import os
import time

from masq import passwords
from masq.outcome import DeliveryError, one_line

TOKEN_TIMEOUT_SECONDS = 60
EXPIRY_MARGIN_SECONDS = 60
MAX_OUTPUT_BYTES = 65536
MAGIC = "masq-oauth 1"
FOLDER = "oauth"


def get(route):
    """The route's access token (str), from the cache or a fresh run of its command."""
    import fcntl
    folder = os.path.dirname(route.token_cache)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        lock = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise DeliveryError(f"unable to use the token cache {folder}: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        token = _cached(route)
        if token is None:
            token, expires = run(route)
            if expires is not None:
                _store(route, token, expires)
        return token
    finally:
        os.close(lock)


def forget(route):
    """Drop the cached token (the server refused it: the next attempt asks anew)."""
    try:
        os.unlink(route.token_cache)
    except OSError:
        pass


def run(route):
    """(token, expires or None): run token_command once; DeliveryError when it fails."""
    import subprocess
    import tempfile
    from masq import child
    what = f"token_command of {route.label}"
    argv = child.split_command(route.token_command, what)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            status = child.run(argv, None, time.monotonic() + TOKEN_TIMEOUT_SECONDS,
                               stdout=out, stderr=err, cwd=route.token_cwd or None)
        except OSError as e:
            raise DeliveryError(f"{what} cannot run {argv[0]}: {e.strerror}") from None
        except subprocess.TimeoutExpired:
            said = child.last_line(err)
            raise DeliveryError(f"{what} ran longer than {TOKEN_TIMEOUT_SECONDS} s"
                                + (f": {said}" if said else "")) from None
        said = child.last_line(err)
        if status != 0:
            how = f"killed by signal {-status}" if status < 0 else f"exit {status}"
            raise DeliveryError(f"{what} failed ({how})" + (f": {said}" if said else ""))
        out.seek(0)
        lines = out.read(MAX_OUTPUT_BYTES).decode("utf-8", "replace").splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise DeliveryError(f"{what} printed no token" + (f": {said}" if said else ""))
    if not token.isascii() or not token.isprintable() or " " in token:
        raise DeliveryError(f"{what} printed a first line that is no token "
                            "(spaces or characters other than printable ASCII)")
    expires = parse_expiry(lines[1]) if len(lines) > 1 else None
    return token, expires


def parse_expiry(text, now=None):
    """The moment (epoch seconds) a token printed with `text` ends, or None."""
    text = text.strip()
    now = time.time() if now is None else now
    if not text:
        return None
    try:
        return now + float(text)
    except ValueError:
        pass
    from datetime import datetime, timezone
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def initial_response(mechanism, user, token, host=None, port=None):
    """The bytes (before base64) of an XOAUTH2 or OAUTHBEARER initial response."""
    if mechanism == "XOAUTH2":
        # Google's and Microsoft's XOAUTH2: user=U ^A auth=Bearer T ^A ^A
        return b"user=%s\x01auth=Bearer %s\x01\x01" % (user.encode(), token.encode())
    # RFC 7628 section 3.1: a GS2 header, then key=value pairs, each ended by ^A;
    # in the authzid, "," and "=" are written =2C and =3D (RFC 5801 section 4)
    authzid = user.replace("=", "=3D").replace(",", "=2C")
    pairs = ""
    if host:
        pairs += f"host={host}\x01"
    if port:
        pairs += f"port={port}\x01"
    return f"n,a={authzid},\x01{pairs}auth=Bearer {token}\x01\x01".encode()


def error_status(challenge):
    """The "status" of the JSON error a server sends in a 334 challenge (RFC 7628 3.2.2)."""
    import base64
    import json
    try:
        said = json.loads(base64.b64decode(challenge.strip(), validate=False))
        return one_line(said.get("status", ""))[:100] if isinstance(said, dict) else ""
    except (ValueError, TypeError):
        return ""


def cache_path(spool, route_name):
    """spool/oauth/NAME; a name that is no plain file name is hashed."""
    safe = route_name and all(c.isalnum() or c in "._-" for c in route_name) \
        and not route_name.startswith(".")
    if not safe:
        import hashlib
        route_name = "route-" + hashlib.sha256((route_name or "").encode()).hexdigest()[:16]
    return os.path.join(spool, FOLDER, route_name)


def _key(route):
    import hashlib
    return hashlib.sha256(f"{route.user}\0{route.token_command}".encode()).hexdigest()


def _cached(route):
    """The cached token while it is good for more than the margin, else None."""
    try:
        fd = os.open(route.token_cache, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077 \
                or passwords.secret_problem(route.token_cache, st):
            return None         # not ours, or others could read it: not trusted
        with os.fdopen(fd, "r", encoding="utf-8", errors="replace", closefd=False) as f:
            lines = f.read(MAX_OUTPUT_BYTES).splitlines()
    finally:
        os.close(fd)
    fields = dict(line.partition(" ")[::2] for line in lines[1:])
    if not lines or lines[0] != MAGIC or fields.get("key") != _key(route):
        return None
    try:
        expires = float(fields.get("expires", ""))
    except ValueError:
        return None
    token = fields.get("token", "")
    if not token or expires - EXPIRY_MARGIN_SECONDS <= time.time():
        return None
    return token


def _store(route, token, expires):
    """Write the cache file (0600) by rename; a failure only costs a later run."""
    if expires - EXPIRY_MARGIN_SECONDS <= time.time():
        return
    from masq import files
    path = route.token_cache
    text = f"{MAGIC}\nkey {_key(route)}\nexpires {expires:.0f}\ntoken {token}\n"
    try:
        files.write_atomic(path, text.encode(), 0o600)
    except OSError as e:
        from masq import log
        log.warn(f"unable to write the token cache {path}: {e.strerror}")
