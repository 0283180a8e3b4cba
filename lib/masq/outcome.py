"""What one delivery attempt answers for each recipient.

An answer is a pair (letter, text) with qmail's letters: K delivered, Z
temporary failure (try again later), D permanent failure (bounce).  A
delivery program prints one such line per recipient (masq-local(8),
masq-smtp(8)); inside a process a failure that covers every recipient is
raised as DeliveryError, whose `temporary` says which letter it is.  The
spool records the same outcomes as words (masq-spool(5)).
"""
from masq import Error

DELIVERED, TEMPORARY, PERMANENT = "K", "Z", "D"
WORDS = {DELIVERED: "done", TEMPORARY: "deferred", PERMANENT: "failed"}
MAX_TEXT_CHARS = 1000


class DeliveryError(Error):
    """A delivery that failed for every recipient it was for."""

    def __init__(self, text, temporary=True):
        text = one_line(text)
        super().__init__(text, code=111 if temporary else 100, temporary=temporary)
        self.text = text

    @property
    def letter(self):
        return TEMPORARY if self.temporary else PERMANENT

    def answer(self):
        """(letter, text), as a delivery program would print it."""
        return (self.letter, self.text)


def of_error(error):
    """(letter, text) for any masq.Error: D only when it says retrying cannot help."""
    return (PERMANENT if error.temporary is False else TEMPORARY, one_line(error) or "no details")


def one_line(text):
    """Text fit for one line: control characters (CR, LF, NUL...) and runs of
    white space made one space, at most MAX_TEXT_CHARS."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
    return text[:MAX_TEXT_CHARS]
