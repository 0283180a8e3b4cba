"""Make the installed masq-* launchers start without the `site` module.

Usage: python -m masq.launchers    (run by `make install`, with the venv's python)

`site` costs about 2-3 ms at every start: it scans site-packages for .pth
files and imports what they name.  A program that runs once per message
pays that each time, so the launchers pip wrote into the venv's bin/ are
rewritten to start with `python -IS` and to put the two folders they need
on sys.path themselves: masq's own lib/ first (an editable install), and
site-packages last, where `site` puts it, so that the standard modules a
program imports are found without listing that folder.  The launchers in
the source tree stay ordinary scripts: an install without this step works
the same way, only a little slower.  pip alone cannot give them the flags:
it rewrites a script's `#!python` line whole, dropping any option, and
masq's console scripts would import `re`; so every install path of the
Makefile (install, install-system, the test extra) runs this after pip, and
a plain `pip install` is followed by `python -m masq.launchers`.
"""
import os
import sys
import sysconfig

import masq
from masq import files


def rewrite(path, lib, site_packages):
    """Give one launcher a `-IS` interpreter line and its own sys.path."""
    with open(path) as f:
        lines = f.read().split("\n")
    if not lines[0].startswith("#!") or "python" not in lines[0]:
        return False
    body = [line for line in lines[1:] if not line.startswith("import sys; sys.path")]
    # site-packages after the standard library, where `site` would put it:
    # the standard modules a program imports are found before that folder
    # (some 60 names) is listed; masq's own lib/ first, when it is elsewhere
    search = f"sys.path.append({site_packages!r})"
    if lib != site_packages:
        search = f"sys.path.insert(0, {lib!r}); {search}"
    lines = [f"#!{sys.executable} -IS", f"import sys; {search}", *body]
    files.write_atomic(path, "\n".join(lines).encode(), 0o755)
    os.chmod(path, 0o755)           # whatever the umask: every user runs the programs
    return True


def main():
    lib = os.path.dirname(os.path.dirname(os.path.abspath(masq.__file__)))
    site_packages = sysconfig.get_paths()["purelib"]
    bindir = os.path.dirname(sys.executable)
    for name in sorted(os.listdir(bindir)):
        if name.startswith("masq-"):
            rewrite(os.path.join(bindir, name), lib, site_packages)


if __name__ == "__main__":
    main()
