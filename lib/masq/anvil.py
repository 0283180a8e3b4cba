"""AUTH limits shared by every masq-smtpd of one spool: failures per address, checks at once.

Postfix's anvil and fail2ban, built in, with no daemon: many masq-smtpd
processes, one per connection, share two things in the spool.

spool/anvil.db, a sqlite3 database made 0600 (masq.sqlstore; WAL: readers
never wait for a writer; each change one short IMMEDIATE transaction), one
row per client address:

    address   the client's IP, or "local"
    failures  password checks begun and not passed since `since`
    since     when this window of counting began
    locked    until when AUTH from the address is refused (0: it is not)
    expires   after this the row means nothing; rows past it are deleted
              by the next reserve(), so the table holds only the addresses
              that failed lately

reserve() counts a check as failed *before* it runs, in the transaction
that tests the count: however many sessions one address opens at once, at
most `limit` checks run in a window, and the one that reaches the limit
starts the lockout.  passed() forgets the address (a user who mistyped
and then got it right); cancel() takes back a check that could not run.

spool/auth-slots/0 .. N-1, one empty file per slot: a check runs only
while it holds an exclusive flock on one of them (slot()), so at most N
run at once over all sessions and guessing cannot take every CPU.  The
kernel drops a lock when its process dies: a killed session leaks nothing.

Errors are AnvilError (temporary): the session then refuses AUTH for now
rather than check without limits.
"""
import os
import time

from masq import Error

FILE = "anvil.db"
SLOTS_FOLDER = "auth-slots"
BUSY_TIMEOUT_SECONDS = 5        # another session writing: wait, then give up (454)
SLOT_POLL_SECONDS = 0.02        # a free slot is looked for this often while waiting
SCHEMA = ("CREATE TABLE IF NOT EXISTS failures (address TEXT PRIMARY KEY, "
          "failures INTEGER NOT NULL, since REAL NOT NULL, locked REAL NOT NULL, "
          "expires REAL NOT NULL)",
          "CREATE INDEX IF NOT EXISTS failures_expires ON failures (expires)")


class AnvilError(Error):
    """The failure table or the slots cannot be used now."""

    code = 75
    temporary = True


class LockedError(AnvilError):
    """The address failed too often lately: no check for it now."""


class BusyError(AnvilError):
    """Every slot stayed taken for the whole wait."""


class Anvil:
    """The failure table of one spool; opened on first use, close() when done.

    `limit` checks per address may fail within `window` seconds; the one
    that reaches it locks the address out for `lockout` seconds.
    """

    def __init__(self, spool_path, limit, window, lockout):
        self.path = os.path.join(spool_path, FILE)
        self.limit, self.window, self.lockout = limit, window, lockout
        self.db = None

    def _open(self):
        if self.db is None:
            import sqlite3
            from masq import sqlstore   # both: only a session that needs it
            try:
                db = sqlstore.connect(self.path, SCHEMA, BUSY_TIMEOUT_SECONDS)
            except sqlite3.Error as e:
                raise AnvilError(f"unable to open {self.path}: {e}; it holds no mail: "
                                 "remove it if it is damaged") from None
            self.db = db
        return self.db

    def _transaction(self, work):
        """Run work(db) in one IMMEDIATE transaction (masq.sqlstore); its result."""
        from masq import sqlstore
        return sqlstore.transaction(self._open(), work, self._error)

    def _error(self, e):
        return AnvilError(f"{self.path}: {e}; it holds no mail: remove it if it is damaged")

    def locked(self, address, now=None):
        """Seconds the address stays locked out (0: it may try)."""
        now = time.time() if now is None else now
        import sqlite3
        try:
            rows = self._open().execute("SELECT locked FROM failures WHERE address = ?",
                                        (address,)).fetchall()
        except sqlite3.Error as e:
            raise AnvilError(f"{self.path}: {e}") from None
        return max(0.0, rows[0][0] - now) if rows else 0.0

    def reserve(self, address, now=None):
        """Count one check for the address as failed, or raise LockedError."""
        now = time.time() if now is None else now

        def work(db):
            db.execute("DELETE FROM failures WHERE expires < ?", (now,))
            rows = db.execute("SELECT failures, since, locked FROM failures "
                              "WHERE address = ?", (address,)).fetchall()
            failures, since, locked = rows[0] if rows else (0, now, 0)
            if locked > now:
                return False
            if locked or now - since >= self.window:
                failures, since = 0, now        # a lockout served, or an old window
            failures += 1
            locked = now + self.lockout if failures >= self.limit else 0
            db.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?)",
                       (address, failures, since, locked, max(since + self.window, locked)))
            return True

        if not self._transaction(work):
            raise LockedError(f"{address} is locked out after {self.limit} failed checks")

    def cancel(self, address):
        """Take back a reserved check that did not run (no slot, a broken backend)."""
        self._transaction(lambda db: db.execute(
            "UPDATE failures SET failures = failures - 1, "
            "locked = CASE WHEN failures - 1 < ? THEN 0 ELSE locked END "
            "WHERE address = ? AND failures > 0", (self.limit, address)))

    def passed(self, address):
        """The address proved a password: forget its failures."""
        self._transaction(lambda db: db.execute("DELETE FROM failures WHERE address = ?",
                                                (address,)))

    def close(self):
        if self.db is not None:
            self.db.close()
            self.db = None


class Slot:
    """One of `count` slots of the spool, held from entry to exit (flock).

    Waits up to `wait_seconds` for a free one, then raises BusyError.
    """

    def __init__(self, spool_path, count, wait_seconds):
        self.folder = os.path.join(spool_path, SLOTS_FOLDER)
        self.count, self.wait_seconds = count, wait_seconds
        self.fd = None

    def __enter__(self):
        import fcntl
        try:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            fds = [os.open(os.path.join(self.folder, str(i)),
                           os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                   for i in range(self.count)]
        except OSError as e:
            raise AnvilError(f"unable to open the AUTH slots in {self.folder}: "
                             f"{e.strerror}") from None
        deadline = time.monotonic() + self.wait_seconds
        start = os.getpid() % self.count    # sessions start their search apart
        try:
            while True:
                for i in range(self.count):
                    fd = fds[(start + i) % self.count]
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    self.fd = fd
                    return self
                if time.monotonic() >= deadline:
                    raise BusyError(f"all {self.count} AUTH slots stayed busy for "
                                    f"{self.wait_seconds:g} s")
                time.sleep(SLOT_POLL_SECONDS)
        finally:
            for fd in fds:
                if fd != self.fd:
                    os.close(fd)

    def __exit__(self, *exc):
        os.close(self.fd)               # the lock goes with the descriptor
        self.fd = None
