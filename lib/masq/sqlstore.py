"""The sqlite3 stores of advice in the spool (masq.anvil, masq.greylist).

connect() opens one the way both want it: autocommit (each statement, or
an explicit BEGIN, is its own short transaction), WAL so that readers do
not wait for a writer, synchronous = NORMAL because they hold no mail (a
crash may lose the last changes, never a message), and the schema's
statements run.  sqlite3.Error goes to the caller, which says what the
store is and that removing it loses nothing.
"""
import sqlite3


def connect(path, schema, timeout):
    """An open connection to the store at path, its schema made."""
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
