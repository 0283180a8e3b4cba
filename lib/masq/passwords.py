"""The password file of masq-smtpd's AUTH: one `user:scheme$salt$hash` a line.

`scheme` is "scrypt" (hashlib.scrypt, n=2**14, r=8, p=1) or "pbkdf2_sha256"
(hashlib.pbkdf2_hmac, SHA-256, PBKDF2_ITERATIONS rounds); salt and hash are
base64, the hash 32 bytes.  Lines starting with "#" and empty lines are
skipped.  The file is used only when neither group nor others have any
permission on it (mode 0600 or stricter): a secret others can read is no
secret, so such a file is refused as a whole (PasswordFileError).

write_user() replaces or adds one user's line atomically (a temporary file,
mode 0600 from its creation, fsynced, renamed over the old one, the folder
fsynced), under a flock on the folder so that two writers never lose a line.
A password is only ever compared through its hash, with hmac.compare_digest.
One scrypt check needs 16 MiB (128 * r * n bytes), and hashlib may take no
more than SCRYPT_MAXMEM_BYTES for it.

checkpassword() asks a program instead, with the interface of D. J.
Bernstein's checkpassword(8), as qmail-popup does: `user NUL password NUL
timestamp NUL` on its descriptor 3, `true` as the program it would run on
success; exit 0 means good, 1 bad, anything else (111: temporary) that no
answer can be had now.  Its descriptors 0 and 1 are /dev/null (never the
client's connection), 2 is ours; it runs in a session of its own and is
killed after CHECKPASSWORD_TIMEOUT_SECONDS.
"""
import binascii
import os
import stat

from masq import Error

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1    # 16 MiB, ~50 ms per check
SCRYPT_MAXMEM_BYTES = 17 * 2 ** 20              # those 16 MiB and 1 KiB, no more
CHECKPASSWORD_TIMEOUT_SECONDS = 30
CHECKPASSWORD_BAD = 1                           # checkpassword(8): 1 bad, 111 temporary
PBKDF2_ITERATIONS = 600000                      # OWASP 2023 for PBKDF2-SHA256
HASH_BYTES = 32
SALT_BYTES = 16
MAX_FILE_BYTES = 1 << 20
MAX_USER_BYTES = 255
MAX_PASSWORD_BYTES = 1024
SCHEMES = ("scrypt", "pbkdf2_sha256")
_DUMMY_SALT = b"masq-no-such-user"


class UnavailableError(Error):
    """No password can be checked now (the file, the program): AUTH fails for now."""

    code = 75
    temporary = True


class PasswordFileError(UnavailableError):
    """The file cannot be used (unreadable, or readable by others): no AUTH."""

    code = 78


class CheckpasswordError(UnavailableError):
    """The checkpassword program gave no answer: it failed, crashed or took too long."""


class BadUserError(Error):
    """A user name that cannot go in the file."""

    code = 64
    temporary = False


def check_user(user):
    """Refuse a name that is empty, too long, or holds `:`, space or control characters."""
    if (not user or len(user.encode("utf-8", "surrogateescape")) > MAX_USER_BYTES
            or ":" in user or user.startswith("#")
            or any(not c.isprintable() or c.isspace() for c in user)):
        raise BadUserError(f"bad user name {user[:40]!r}: no ':', spaces, control "
                           f"characters or leading '#', at most {MAX_USER_BYTES} bytes")
    return user


def status(path):
    """None when the file is usable, else why not; FileNotFoundError when absent."""
    st = os.stat(path)
    return _refusal(path, st)


def _refusal(path, st):
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    return secret_problem(path, st)


def secret_problem(path, st):
    """Why a file of secrets is readable by too many, or None (shared with the
    smarthost password files of clientroute).

    Only its owner may read it, or, in system mode, root's file read by the
    masq group (root:masq 0640, as masq-setup system writes it).
    """
    mode = st.st_mode & 0o777
    by_group = (mode & 0o077 == 0o040 and st.st_uid == 0
                and (st.st_gid == os.getegid() or st.st_gid in os.getgroups()))
    if mode & 0o077 and not by_group:
        return (f"{path} is readable by others (mode {mode:04o}): chmod 600 it "
                "(or 640, owned by root and the masq group, in system mode)")
    return None


def verify(path, user, password):
    """True when `password` (bytes) is the user's; PasswordFileError if the file is unusable."""
    entry = None
    try:
        with open(path, "rb") as f:
            why = _refusal(path, os.fstat(f.fileno()))
            if why:
                raise PasswordFileError(why)
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise PasswordFileError(f"unable to read {path}: {e.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise PasswordFileError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
    name = user.encode("utf-8", "surrogateescape") + b":"
    for line in data.split(b"\n"):
        if line.startswith(b"#") or not line.strip():
            continue                    # a commented-out user logs in no more
        if line.startswith(name):
            entry = line[len(name):].strip()
            break
    scheme, salt, digest = _parse(entry)
    if scheme is None or len(password) > MAX_PASSWORD_BYTES:
        # the same work for an unknown user: response time tells nothing
        _derive("scrypt", password[:MAX_PASSWORD_BYTES], _DUMMY_SALT)
        return False
    import hmac                     # it imports hashlib (OpenSSL): only a check pays
    return hmac.compare_digest(_derive(scheme, password, salt), digest)


def checkpassword(program, user, password, timestamp):
    """True when the checkpassword program says the password (bytes) is the user's."""
    data = b"\0".join((user.encode("utf-8", "surrogateescape"), password,
                       timestamp.encode(), b""))
    r, w = os.pipe()
    try:
        os.write(w, data)           # under 2 KiB: the pipe's buffer takes it all at once
    finally:
        os.close(w)
    if r == 3:                      # dup2(3, 3) would leave close-on-exec set
        r, old = os.dup(r), r
        os.close(old)
    try:
        pid = os.posix_spawn(program, [program, "true"], os.environ, setsid=True,
                             file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                           (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                                           (os.POSIX_SPAWN_DUP2, r, 3)])
    except OSError as e:
        raise CheckpasswordError(f"unable to run {program}: {e.strerror}") from None
    finally:
        os.close(r)
    status = _wait(pid, CHECKPASSWORD_TIMEOUT_SECONDS)
    if status is None:
        raise CheckpasswordError(f"{program} took longer than "
                                 f"{CHECKPASSWORD_TIMEOUT_SECONDS} s; killed")
    code = os.waitstatus_to_exitcode(status)
    if code in (0, CHECKPASSWORD_BAD):
        return code == 0
    raise CheckpasswordError(f"{program} " + (f"exited {code}" if code >= 0
                                              else f"was killed by signal {-code}"))


def _wait(pid, seconds):
    """The child's wait status, or None after killing its session at the deadline."""
    import select
    fd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        ended = bool(poller.poll(int(seconds * 1000)))
    finally:
        os.close(fd)
    if not ended:
        try:
            os.killpg(pid, 9)
        except OSError:
            pass
        os.waitpid(pid, 0)
        return None
    return os.waitpid(pid, 0)[1]


def _parse(entry):
    """(scheme, salt, hash) of `scheme$salt$hash`; (None, None, None) if it does not parse."""
    try:
        scheme, salt, digest = entry.decode("ascii").split("$")
        if scheme not in SCHEMES:
            raise ValueError(scheme)
        salt = binascii.a2b_base64(salt, strict_mode=True)
        digest = binascii.a2b_base64(digest, strict_mode=True)
    except (AttributeError, ValueError, binascii.Error):
        return None, None, None
    if len(digest) != HASH_BYTES or not salt:
        return None, None, None
    return scheme, salt, digest


def _derive(scheme, password, salt):
    import hashlib                  # OpenSSL, a few ms: only a check or a new password pays
    if scheme == "scrypt":
        return hashlib.scrypt(password, salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                              maxmem=SCRYPT_MAXMEM_BYTES, dklen=HASH_BYTES)
    return hashlib.pbkdf2_hmac("sha256", password, salt, PBKDF2_ITERATIONS, HASH_BYTES)


def encode(password, scheme=None):
    """`scheme$salt$hash` for a password (bytes), with a fresh random salt."""
    import base64                   # as hashlib: only masq-setup passwd writes passwords
    import hashlib
    if scheme is None:
        scheme = "scrypt" if hasattr(hashlib, "scrypt") else "pbkdf2_sha256"
    salt = os.urandom(SALT_BYTES)
    digest = _derive(scheme, password, salt)
    return f"{scheme}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def write_user(path, user, password):
    """Add the user's line, or replace it, atomically; the file ends with mode 0600."""
    import fcntl                    # only masq-setup passwd writes the file
    check_user(user)
    if not password or len(password) > MAX_PASSWORD_BYTES:
        raise BadUserError(f"the password must have 1 to {MAX_PASSWORD_BYTES} bytes")
    if b"\n" in password or b"\r" in password:
        raise BadUserError("the password must be one line")
    line = f"{user}:{encode(password)}\n".encode("utf-8", "surrogateescape")
    folder = os.path.dirname(os.path.abspath(path))
    lock = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path, "rb") as f:
                old = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            old = b""
        if len(old) > MAX_FILE_BYTES:
            raise PasswordFileError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
        old = old.splitlines(keepends=True)
        name = line.split(b":", 1)[0] + b":"
        lines = [x if x.endswith(b"\n") else x + b"\n" for x in old if not x.startswith(name)]
        lines.append(line)
        from masq import files
        files.write_atomic(path, b"".join(lines), 0o600)
    finally:
        os.close(lock)
