"""Greylisting: a triplet seen for the first time is deferred, its retry accepted.

A triplet is the client's network (its /24 for IPv4, its /64 for IPv6:
a sending farm retries from a neighbour), the envelope sender and one
recipient, both lowercased.  The first RCPT of a triplet gets a temporary
refusal; one at least `delay` seconds later, and within `window` seconds
of the first, passes; a passed triplet passes at once from then on, for
`expire` seconds after it was last seen.  A spammer's one-shot program
does not come back; a real MTA does (RFC 5321 section 4.5.4.1).

spool/greylist.db, a sqlite3 database shared by every masq-smtpd of the
spool (WAL: readers never wait for a writer; each change one short
IMMEDIATE transaction that reads the row again, so two sessions that see
a new triplet at once store it once), one row per triplet:

    client     the network, "192.0.2.0/24" or "2001:db8:1:2::/64"
    sender     the envelope sender, "" for <>
    recipient  the recipient
    first      when the triplet was first seen (seconds since the epoch)
    passed     when it first passed (0: it has not yet)
    expires    after this the row means nothing: first + window while it
               has not passed, last seen + expire once it has; rows past
               it are deleted PURGE_ROWS at a time, in a transaction of
               their own, at most once every PURGE_SECONDS a process, when
               a new triplet comes (never a long write that others wait on)

A known triplet costs one SELECT; its row is written again only when
its expiry would move by more than REFRESH_SECONDS.  A client chooses
its sender and recipients, so new rows are capped (the table must not
fill the spool's disk): a session may ask for a new triplet not to be
stored (may_add=False: masq-smtpd's cap per session), at most
`network_max` triplets of one network are first seen within a window,
and none is added once the table holds `max_bytes`; a triplet not stored
is refused for now all the same (UNRECORDED, NETWORK_FULL, TABLE_FULL).
The file is made 0600 before sqlite opens it (masq.sqlstore; sqlite gives
its -wal and -shm files the same mode).  Errors are GreylistError: the session decides
(masq-smtpd lets the recipient through); a database another process
holds locked for longer than BUSY_TIMEOUT_SECONDS is GreylistBusy, which
refuses the one recipient for now.  sqlite3 is imported only when opened.
"""
import os
import time

from masq import Error, address, net

FILE = "greylist.db"
BUSY_TIMEOUT_SECONDS = 5        # another session writing: wait, then give up
REFRESH_SECONDS = 86400         # a passed triplet's expiry is rewritten at most daily
PURGE_ROWS = 500                # expired rows deleted in one short transaction
PURGE_SECONDS = 60              # at most one such batch a minute a process
NETWORK_MAX = 1000              # triplets of one network first seen within a window
MAX_BYTES = 256 * 1024 * 1024   # of the table (about a million triplets): then no new ones
CLEAR_ROWS = 1000               # rows read, and deleted in one transaction, by clear()
SCHEMA = ("CREATE TABLE IF NOT EXISTS triplets (client TEXT NOT NULL, sender TEXT NOT NULL, "
          "recipient TEXT NOT NULL, first REAL NOT NULL, passed REAL NOT NULL, "
          "expires REAL NOT NULL, PRIMARY KEY (client, sender, recipient))",
          "CREATE INDEX IF NOT EXISTS triplets_expires ON triplets (expires)",
          "CREATE INDEX IF NOT EXISTS triplets_first ON triplets (client, first)")

# what check() says
NEW = "new"                     # first sight: refuse for now
EARLY = "early"                 # seen, retried before the delay: refuse for now
PASSED = "passed"               # retried after the delay: passes, now and later
KNOWN = "known"                 # passed before: passes
# a new triplet not stored, refused for now all the same: a cap was reached
UNRECORDED = "unrecorded"       # the caller said so (its own cap per session)
NETWORK_FULL = "network full"   # network_max new triplets of the network in the window
TABLE_FULL = "table full"       # the table holds max_bytes
NOT_STORED = (UNRECORDED, NETWORK_FULL, TABLE_FULL)


class GreylistError(Error):
    """The greylist database cannot be used now."""

    code = 75
    temporary = True


class GreylistBusy(GreylistError):
    """Another process held the database locked for BUSY_TIMEOUT_SECONDS: not broken."""


class Triplet:
    """One row of the table as masq-queue greylist lists it."""

    __slots__ = ("client", "sender", "recipient", "first", "passed", "expires")

    def __init__(self, client, sender, recipient, first, passed, expires):
        self.client, self.sender, self.recipient = client, sender, recipient
        self.first, self.passed, self.expires = first, passed, expires


def client_network(ip):
    """The network a client is greylisted by: "a.b.c.0/24", or the /64 of an IPv6 address."""
    return net.prefix(ip, 64, 24) if ip else ip


class Greylist:
    """The triplet table of one spool; opened on first use, close() when done."""

    def __init__(self, spool_path, delay=300, window=86400, expire=35 * 86400,
                 network_max=NETWORK_MAX, max_bytes=MAX_BYTES):
        self.path = os.path.join(spool_path, FILE)
        self.delay, self.window, self.expire = delay, window, expire
        self.network_max, self.max_bytes = network_max, max_bytes
        self.db = None
        self.purged = None          # when this process last deleted expired rows

    def _open(self, create=True):
        if self.db is None:
            import sqlite3
            from masq import sqlstore   # both: only a session that needs it
            try:
                if not create and not os.path.exists(self.path):
                    return None
                db = sqlstore.connect(self.path, SCHEMA, BUSY_TIMEOUT_SECONDS)
            except sqlite3.Error as e:
                raise self._error(e, "unable to open ") from None
            self.db = db
        return self.db

    def _transaction(self, work):
        """Run work(db) in one IMMEDIATE transaction (masq.sqlstore); its result."""
        from masq import sqlstore
        return sqlstore.transaction(self._open(), work, self._error)

    def _error(self, e, doing=""):
        """GreylistBusy for a lock held too long, else GreylistError."""
        if (getattr(e, "sqlite_errorcode", 0) & 0xff) in (5, 6):    # SQLITE_BUSY, _LOCKED
            return GreylistBusy(f"{doing}{self.path}: {e} (for {BUSY_TIMEOUT_SECONDS} s)")
        return GreylistError(f"{doing}{self.path}: {e}; it holds no mail: remove it if it "
                             "is damaged")

    def check(self, client, sender, recipient, now=None, may_add=True):
        """(state, seconds to wait or since first seen).

        `client` is a network (client_network()); the state NEW, EARLY,
        PASSED or KNOWN, or for a new triplet not stored UNRECORDED (not
        `may_add`), NETWORK_FULL or TABLE_FULL.  The seconds are those
        still to wait for NEW, EARLY and those not stored, those since the
        first sight for PASSED and KNOWN.
        """
        import sqlite3
        now = time.time() if now is None else now
        key = (client, sender.lower(), recipient.lower())
        try:
            rows = self._open().execute(
                "SELECT first, passed, expires FROM triplets WHERE client = ? AND sender = ? "
                "AND recipient = ?", key).fetchall()
        except sqlite3.Error as e:
            raise self._error(e) from None
        if rows and rows[0][1] and rows[0][2] >= now:
            first, _, expires = rows[0]
            if expires < now + self.expire - REFRESH_SECONDS:
                try:
                    self._transaction(lambda db: db.execute(
                        "UPDATE triplets SET expires = ? WHERE client = ? AND sender = ? "
                        "AND recipient = ?", (now + self.expire, *key)))
                except GreylistBusy:
                    pass            # the row passes as it is; a later sight refreshes it
            return KNOWN, now - first
        if not rows or rows[0][2] < now:
            if not may_add:
                return UNRECORDED, self.delay
            self.purge(now)
        return self._transaction(lambda db: self._decide(db, key, now))

    def purge(self, now):
        """Delete a batch of expired rows, at most once every PURGE_SECONDS; how many."""
        if self.purged is not None and now - self.purged < PURGE_SECONDS:
            return 0
        self.purged = now
        try:
            return self._transaction(lambda db: db.execute(
                "DELETE FROM triplets WHERE rowid IN (SELECT rowid FROM triplets "
                "WHERE expires < ? LIMIT ?)", (now, PURGE_ROWS)).rowcount)
        except GreylistBusy:
            return 0                # another time

    def _decide(self, db, key, now):
        """The write path, the row read again inside the transaction."""
        rows = db.execute("SELECT first, passed, expires FROM triplets WHERE client = ? "
                          "AND sender = ? AND recipient = ?", key).fetchall()
        if not rows or rows[0][2] < now:
            if self.network_max and db.execute(
                    "SELECT count(*) FROM (SELECT 1 FROM triplets WHERE client = ? AND "
                    "first >= ? LIMIT ?)", (key[0], now - self.window, self.network_max)
                    ).fetchone()[0] >= self.network_max:
                return NETWORK_FULL, self.delay
            if self.max_bytes and not rows:
                pages, free, size = (db.execute(f"PRAGMA {name}").fetchone()[0] for name in
                                     ("page_count", "freelist_count", "page_size"))
                if (pages - free) * size >= self.max_bytes:
                    return TABLE_FULL, self.delay
            db.execute("INSERT OR REPLACE INTO triplets VALUES (?, ?, ?, ?, 0, ?)",
                       (*key, now, now + self.window))
            return NEW, self.delay
        first, passed, _ = rows[0]
        if passed:                  # another session passed it a moment ago
            return KNOWN, now - first
        if now - first < self.delay:
            return EARLY, self.delay - (now - first)
        db.execute("UPDATE triplets SET passed = ?, expires = ? WHERE client = ? AND "
                   "sender = ? AND recipient = ?", (now, now + self.expire, *key))
        return PASSED, now - first

    def triplets(self, now=None):
        """Every row still meaning something, oldest first ([] without a database)."""
        import sqlite3
        now = time.time() if now is None else now
        try:
            db = self._open(create=False)
            if db is None:
                return []
            rows = db.execute("SELECT client, sender, recipient, first, passed, expires "
                              "FROM triplets WHERE expires >= ? ORDER BY first",
                              (now,)).fetchall()
        except sqlite3.Error as e:
            raise self._error(e) from None
        return [Triplet(*row) for row in rows]

    def clear(self, pattern=None):
        """Forget the triplets whose client, sender or recipient matches the
        pattern (fnmatch, case-insensitive), or all; how many were forgotten.

        A batch of CLEAR_ROWS at a time, each deleted in a short transaction
        of its own: sessions greylisting meanwhile wait for one batch only.
        """
        import sqlite3
        db = self._open(create=False)
        if db is None:
            return 0
        count, after = 0, -1
        while True:
            if pattern is None:
                done = self._transaction(lambda db: db.execute(
                    "DELETE FROM triplets WHERE rowid IN (SELECT rowid FROM triplets "
                    "LIMIT ?)", (CLEAR_ROWS,)).rowcount)
                count += done
                if not done:
                    return count
                continue
            try:
                rows = db.execute("SELECT rowid, client, sender, recipient FROM triplets "
                                  "WHERE rowid > ? ORDER BY rowid LIMIT ?",
                                  (after, CLEAR_ROWS)).fetchall()
            except sqlite3.Error as e:
                raise self._error(e) from None
            if not rows:
                return count
            after = rows[-1][0]
            gone = [row for row in rows if matches(row[1:], pattern)]
            if gone:
                count += self._transaction(lambda db, gone=gone: sum(
                    db.execute("DELETE FROM triplets WHERE rowid = ? AND client = ? AND "
                               "sender = ? AND recipient = ?", row).rowcount for row in gone))

    def close(self):
        if self.db is not None:
            self.db.close()
            self.db = None


def matches(triplet, pattern):
    """Does a shell pattern (fnmatch, without case) match the client, sender or recipient
    of a triplet (a Triplet or a (client, sender, recipient) row)?"""
    from fnmatch import fnmatchcase
    if isinstance(triplet, Triplet):
        triplet = (triplet.client, triplet.sender, triplet.recipient)
    return any(fnmatchcase(value.lower(), pattern.lower()) for value in triplet[:3])


def describe(triplets):
    """Lines for masq-queue greylist: one per triplet, a header first; a character
    that is not printable as \\xNN or \\uNNNN (masq.log.clean)."""
    from masq.log import clean
    yield f"{'client':<22} {'first seen':<20} {'state':<20} {'expires':<20} sender -> recipient\n"
    for t in triplets:
        state = f"passed after {_span(t.passed - t.first)}" if t.passed else "waiting"
        yield (f"{clean(t.client, escape=True):<22} {_stamp(t.first):<20} {state:<20} "
               f"{_stamp(t.expires):<20} <{clean(t.sender, escape=True)}> -> "
               f"<{clean(t.recipient, escape=True)}>\n")


def _stamp(seconds):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _span(seconds):
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


class Whitelist:
    """greylist_whitelist: addresses, domains and networks whose mail is not greylisted.

    One entry a line, `#` starts a comment.  An entry with `@` is an
    address (`bob@example.org`) or, as `@example.org`, a whole domain; one
    that parses as an IP address or address/length is a network the client
    may be in; anything else is a domain, and `.example.org` means its
    subdomains too.  Addresses and domains match the envelope sender or
    the recipient, case-insensitively.
    """

    def __init__(self, lines=()):
        self.addresses, self.domains, self.suffixes, self.nets = set(), set(), [], []
        for raw in lines:
            entry = raw.split("#", 1)[0].strip().lower()
            if not entry:
                continue
            if entry.startswith("@"):
                self.domains.add(entry[1:])
            elif "@" in entry:
                self.addresses.add(entry)
            elif net.parse_ip(entry.partition("/")[0]) is not None:
                self.nets.append(entry)
            elif entry.startswith("."):
                self.suffixes.append(entry)
            else:
                self.domains.add(entry)

    @classmethod
    def read(cls, path):
        """The whitelist in the file; GreylistError when it cannot be read."""
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return cls(f)
        except OSError as e:
            raise GreylistError(f"unable to read the greylist whitelist {path}: "
                                f"{e.strerror}") from None

    def lists_client(self, ip):
        """Does a network entry hold the client's address?"""
        return bool(ip and self.nets and net.in_nets(ip, self.nets))

    def names(self, sender, recipient):
        """Does an entry name the sender or the recipient?"""
        for addr in (sender, recipient):
            if not addr:
                continue
            addr = addr.lower()
            if addr in self.addresses:
                return True
            domain = address.split(addr)[1]
            if domain in self.domains or any(domain.endswith(s) for s in self.suffixes):
                return True
        return False
