"""Make the installed masq-* launchers start without the `site` module.

Usage: python -m masq.launchers    (run by `make install`, with the venv's python)

`site` costs about 2-3 ms at every start: it scans site-packages for .pth
files and imports what they name.  A program that runs once per message
pays that each time, so the launchers pip wrote into the venv's bin/ are
rewritten to start with `python -IS` and to put the two folders they need
(masq's own lib/ and site-packages) on sys.path themselves.  The launchers
in the source tree stay ordinary scripts: an install without this step
works the same way, only a little slower.
"""
import os
import sys
import sysconfig

import masq


def rewrite(path, lib, site_packages):
    """Give one launcher a `-IS` interpreter line and its own sys.path."""
    with open(path) as f:
        lines = f.read().split("\n")
    if not lines[0].startswith("#!") or "python" not in lines[0]:
        return False
    body = [line for line in lines[1:] if not line.startswith("import sys; sys.path[:0]")]
    lines = [f"#!{sys.executable} -IS",
             f"import sys; sys.path[:0] = [{lib!r}, {site_packages!r}]", *body]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
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
