"""The host status store: how each destination answered last (sendmail's hoststat).

One sqlite3 database, spool/hoststat.db, with one row per destination:

    route     the [route.NAME] the mail went by
    host      a smarthost's "host:port", "wrapper", or a domain (direct MX delivery)
    status    "up"       the last connection worked (replies to single
                         recipients, even 4xx or 5xx, do not make a host down)
              "down"     a temporary failure before any mail could be sent:
                         connection refused, timeout, 4xx greeting, TLS
              "refused"  a permanent one: 5xx greeting, null MX, mail loop
    failures  "down" results in a row (0 after "up")
    updated   when (seconds since the epoch)
    text      the last reply or error, one line

masq-send reads it before it connects: a destination that is "down" is not
tried again before updated + back-off (masq-send(8)); a route that comes up
forgets its rows (forget()).  It is advice only: a
database that is missing, locked for too long or damaged costs no mail,
masq-send then connects as if it were empty.  sqlite3 is imported only when
the store is opened.
"""
import os
import time

from masq import Error
from masq.outcome import one_line

FILE = "hoststat.db"
BUSY_TIMEOUT_SECONDS = 10       # another masq-send writing: wait, then give up
STATUSES = ("up", "down", "refused")
SCHEMA = ("CREATE TABLE IF NOT EXISTS hosts (route TEXT NOT NULL, host TEXT NOT NULL, "
          "status TEXT NOT NULL, failures INTEGER NOT NULL, updated REAL NOT NULL, "
          "text TEXT NOT NULL, PRIMARY KEY (route, host))")


class HostStatError(Error):
    """The store cannot be read or written now."""

    code = 75
    temporary = True


class Host:
    """One row: route, host, status, failures, updated, text."""

    def __init__(self, route, host, status, failures, updated, text):
        self.route, self.host, self.status = route, host, status
        self.failures, self.updated, self.text = failures, updated, text

    def __repr__(self):
        return f"Host({self.route!r}, {self.host!r}, {self.status!r}, {self.failures})"


class HostStat:
    """The store of one spool; opened on first use, close() when done."""

    def __init__(self, spool_path):
        self.path = os.path.join(spool_path, FILE)
        self.db = None

    def _open(self, create=True):
        if self.db is None:
            import sqlite3
            if not create and not os.path.exists(self.path):
                return None
            db = None
            try:
                # autocommit: each statement is its own short transaction
                db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS,
                                     isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA synchronous = NORMAL")
                db.execute(SCHEMA)
                self.db = db
            except sqlite3.Error as e:
                if db is not None:
                    db.close()
                raise HostStatError(f"unable to open {self.path}: {e}; "
                                    "purgestat removes it if it is damaged") from None
        return self.db

    def _do(self, sql, args=(), create=True):
        import sqlite3
        try:
            db = self._open(create)
            return db.execute(sql, args).fetchall() if db is not None else []
        except sqlite3.Error as e:
            raise HostStatError(f"{self.path}: {e}; purgestat removes it "
                                "if it is damaged") from None

    def record(self, route, host, status, text, now=None):
        """Note how a destination answered; returns the new Host."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        now = time.time() if now is None else now
        old = self.get(route, host)
        failures = (old.failures if old and old.status == "down" else 0) + 1 \
            if status == "down" else 0
        self._do("INSERT OR REPLACE INTO hosts VALUES (?, ?, ?, ?, ?, ?)",
                 (route, host, status, failures, now, one_line(text)))
        return Host(route, host, status, failures, now, one_line(text))

    def get(self, route, host):
        """The Host for this destination, or None."""
        rows = self._do("SELECT * FROM hosts WHERE route = ? AND host = ?", (route, host),
                        create=False)
        return Host(*rows[0]) if rows else None

    def list(self):
        """Every Host, by route and host."""
        return [Host(*row) for row in
                self._do("SELECT * FROM hosts ORDER BY route, host", create=False)]

    def forget(self, route):
        """Forget the hosts of one route (it came up); returns how many there were."""
        count = len(self._do("SELECT host FROM hosts WHERE route = ?", (route,), create=False))
        if count:
            self._do("DELETE FROM hosts WHERE route = ?", (route,))
        return count

    def purge(self):
        """Forget every host; returns how many there were."""
        if not os.path.exists(self.path):
            return 0
        try:
            count = len(self._do("SELECT host FROM hosts"))
            self._do("DELETE FROM hosts")
        except HostStatError:
            self.close()            # damaged: it holds no mail, start anew
            try:
                os.unlink(self.path)
            except OSError as e:
                raise HostStatError(f"unable to remove {self.path}: {e.strerror}") from None
            return 0
        return count

    def close(self):
        if self.db is not None:
            self.db.close()
            self.db = None


def describe(hosts):
    """The lines hoststat prints: a heading, then one line per host."""
    lines = [f"{'ROUTE':<12} {'HOST':<28} {'STATUS':<8} {'WHEN':<20} LAST REPLY\n"]
    for h in hosts:
        status = h.status if h.status != "down" or h.failures < 2 \
            else f"down*{h.failures}"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.updated))
        lines.append(f"{h.route:<12} {h.host:<28} {status:<8} {when:<20} {h.text}\n")
    return lines
