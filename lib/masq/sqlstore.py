"""The sqlite3 stores of advice in the spool (masq.anvil, masq.greylist).

connect() opens one the way both want it: the file made 0600 first,
without following a symbolic link (sqlite would make it 0644 under a
usual umask, and gives its -wal and -shm files the database's mode: the
stores hold client addresses and envelope addresses), autocommit (each
statement, or an explicit BEGIN, is its own short transaction), WAL so
that readers do not wait for a writer, synchronous = NORMAL because they
hold no mail (a crash may lose the last changes, never a message), and
the schema's statements run.  transaction() runs a change as one
IMMEDIATE transaction.  Every failure is a sqlite3.Error, which the store
turns into its own (the `error` given to transaction()): it says what the
store is and that removing it loses nothing.
"""
import os
import sqlite3


def connect(path, schema, timeout):
    """An open connection to the store at path, its schema made."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except OSError as e:
        raise sqlite3.OperationalError(e.strerror or str(e)) from None
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        for statement in schema:
            db.execute(statement)
    except BaseException:
        db.close()
        raise
    return db


def transaction(db, work, error=None):
    """Run work(db) in one IMMEDIATE transaction and commit it; its result.

    Whatever fails rolls the transaction back and is raised again; a
    sqlite3.Error as error(it), the store's own, when `error` is given.
    """
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
            db.execute("COMMIT")
            return result
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass                # none open any more
            raise
    except sqlite3.Error as e:
        if error is None:
            raise
        raise error(e) from None
