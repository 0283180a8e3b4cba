"""Exit codes, argument parsing and the frame every masq program runs in.

Exit codes are the contract with the caller (DESIGN.md).  They are plain
integers in a class, not an IntEnum: importing enum costs milliseconds that
every `sendmail` call would pay.
"""
import posix
import sys

from masq import Error, pathenv


class Exit:
    """Exit codes: qmail's for the chain, sysexits(3) for people's commands."""

    OK = 0
    # chain programs (masq-local, masq-smtp, any pipe transport)
    PERMANENT = 100
    TEMPORARY = 111
    # sysexits(3), for sendmail and the other commands people run
    USAGE = 64
    DATAERR = 65
    NOINPUT = 66
    NOUSER = 67
    NOHOST = 68
    UNAVAILABLE = 69
    SOFTWARE = 70
    OSERR = 71
    OSFILE = 72
    CANTCREAT = 73
    IOERR = 74
    TEMPFAIL = 75
    PROTOCOL = 76
    NOPERM = 77
    CONFIG = 78


# The one table of exit statuses after which trying again can help: the
# sysexits(3) codes for a passing trouble and qmail's 111.  Every other code
# from 64 to 78, and 100, is permanent.  A signal is temporary; so is an
# unknown code from a chain program (retrying is safe, bouncing is not).
TEMPORARY_EXIT_CODES = frozenset({70, 71, 72, 73, 74, 75, 78, Exit.TEMPORARY})
_SYSEXITS_TEXT = {
    64: "command line usage error", 65: "data format error",
    66: "cannot open input", 67: "addressee unknown", 68: "host name unknown",
    69: "service unavailable", 70: "internal software error",
    71: "system error", 72: "critical OS file missing",
    73: "cannot create output file", 74: "input/output error",
    75: "temporary failure", 76: "remote error in protocol",
    77: "permission denied", 78: "configuration error",
}


def classify(status, unknown_temporary=True):
    """Turn a wait status code (as subprocess gives it) into (temporary, text).

    `temporary` is None for success, True when retrying can help, False when
    it cannot.  Negative values are deaths by signal.  A code in no table
    (1, 2, ...) is temporary for a chain program; an MDA or a filter says
    `unknown_temporary=False`: procmail, maildrop and spamc mean such codes.
    """
    if status == 0:
        return None, "success"
    if status < 0:
        return True, f"killed by signal {-status}"
    if 128 < status < 160:      # a shell's report of a child killed by that signal
        return True, f"killed by signal {status - 128}"
    if status == Exit.PERMANENT:
        return False, "permanent failure"
    if status == Exit.TEMPORARY:
        return True, "temporary failure"
    if status in _SYSEXITS_TEXT:
        return status in TEMPORARY_EXIT_CODES, _SYSEXITS_TEXT[status]
    return unknown_temporary, f"exit status {status}"


def name():
    """The name this program was called by (argv[0] without its folder)."""
    return pathenv.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "masq"


def parse(doc, argv=None, usage_code=Exit.PERMANENT, options_first=False):
    """Parse argv with docopt; bad usage raises Error with `usage_code`."""
    from docopt import DocoptExit, docopt   # the chain's fast paths parse argv without it

    try:
        return docopt(doc, argv, options_first=options_first)
    except DocoptExit as e:
        raise Error(str(e).strip(), code=usage_code, temporary=False) from None
    except SystemExit as e:     # --help: docopt printed it and wants to exit 0
        if e.code in (None, 0):
            raise
        raise Error(str(e.code), code=usage_code, temporary=False) from None


def title(text):
    """Show `text` as the process title (ps), if setproctitle is there.

    The C module is loaded on its own: the package's __init__ imports
    logging, which costs more than the rest of a short program.
    """
    global _setproctitle
    if _setproctitle is None:
        _setproctitle = _load_setproctitle()
    _setproctitle(text)


_setproctitle = None


def _load_setproctitle():
    """The C setproctitle function, without importing the package around it.

    importlib.util alone costs milliseconds; the frozen bootstrap modules
    every interpreter has loaded already do the same job.
    """
    try:
        import _frozen_importlib as bootstrap
        import _frozen_importlib_external as external
        for folder in sys.path:
            try:
                names = posix.listdir(pathenv.join(folder or ".", "setproctitle"))
            except OSError:
                continue
            for entry in names:
                if entry.startswith("_setproctitle") and entry.endswith(".so"):
                    name = "setproctitle._setproctitle"
                    loader = external.ExtensionFileLoader(
                        name, pathenv.join(folder, "setproctitle", entry))
                    module = bootstrap.module_from_spec(bootstrap.spec_from_loader(name, loader))
                    loader.exec_module(module)
                    return module.setproctitle
    except Exception:  # noqa: BLE001 -- a missing title must never stop mail
        pass
    return lambda text: None


def run(main, argv=None, temporary_code=Exit.TEMPFAIL):
    """Run main(argv) and return an exit code for sys.exit.

    A masq.Error prints one line and gives its code; an interrupted write to
    a closed pipe is quiet; anything else is an internal error: the traceback
    goes to stderr and the code is temporary, never Python's 1.
    """
    prog = name()
    try:
        code = main(argv)
        return Exit.OK if code is None else code
    except Error as e:
        _say(f"{prog}: fatal: {e}")
        return e.code
    except KeyboardInterrupt:
        _say(f"{prog}: fatal: interrupted")
        return temporary_code
    except BrokenPipeError:
        return temporary_code
    except SystemExit:
        raise
    except BaseException:
        import traceback    # only after a bug
        _say(f"{prog}: fatal: internal error, please report it:")
        traceback.print_exc()
        return temporary_code


def exit_now(code):
    """Exit with code without tearing the interpreter down (sendmail's last 1-2 ms).

    What a program leaves is on disk already (the spool and the log are
    written with plain write(2)s, and fsynced where it matters): only stdout and
    stderr are flushed.  A program that still runs threads exits as usual.
    """
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        sys.exit(code)
    posix._exit(code)


def _say(line):
    """Write one line to stderr, never failing."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
