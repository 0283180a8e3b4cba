"""masq: a mail transfer agent made of small programs.

Nothing is imported here: each program imports only the modules its path
needs, because Python start-up is the largest cost in a chain of programs.
"""


class Error(Exception):
    """An error a program reports in one line and turns into its exit code.

    `code` is the exit status (see masq.program.Exit); `temporary` says whether
    trying again later can help.
    """

    code = 75
    temporary = True

    def __init__(self, message, code=None, temporary=None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if temporary is not None:
            self.temporary = temporary
