"""Man pages: one per program, clean under mandoc -Tlint, SYNOPSIS = docopt usage.

The usage a program prints (its module docstring, parsed by docopt) and the
SYNOPSIS of its page must say the same words (STYLE.md section 6).  Both are
compared as token sequences, so that line wrapping, mdoc's spacing
("ID ..." for "ID...") and overstrike formatting do not matter.
"""
import ast
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "bin")
MAN = os.path.join(ROOT, "man")
CMD = os.path.join(ROOT, "lib", "masq", "cmd")

PROGRAMS = sorted(n for n in os.listdir(BIN)
                  if not n.startswith(".") and os.path.isfile(os.path.join(BIN, n)))
PAGES = sorted(n for n in os.listdir(MAN) if re.fullmatch(r"[^.].*\.[1-9]", n))


def mandoc(*args):
    """Run mandoc; a missing mandoc fails loudly (it is in the Makefile's DEBS)."""
    if shutil.which("mandoc") is None:
        pytest.fail("mandoc is not installed: apt-get install mandoc")
    p = subprocess.run(["mandoc", *args], capture_output=True, timeout=60)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def rendered(page):
    """The page as plain text: wide enough not to wrap, overstrike removed."""
    rc, out, err = mandoc("-Tascii", "-Owidth=1000", os.path.join(MAN, page))
    assert rc == 0, err
    return re.sub(r".\x08", "", out)


def section(text, name):
    """The lines of one section of rendered text, continuation lines joined."""
    lines, inside = [], False
    for line in text.splitlines():
        if line and not line[0].isspace():          # a section heading
            if inside:
                break
            inside = line.strip() == name
            continue
        if inside and line.strip():
            lines.append(line)
    if not lines:
        return []
    indent = min(len(x) - len(x.lstrip()) for x in lines)
    joined = []
    for line in lines:
        if joined and len(line) - len(line.lstrip()) > indent:
            joined[-1] += " " + line.strip()
        else:
            joined.append(line.strip())
    return joined


def usage_lines(doc):
    """The patterns of a docopt "Usage:" section (docopt's own rule), or None."""
    match = re.search(r"^[^\n]*usage:[^\n]*\n?(?:[ \t].*?(?:\n|$))*", doc, re.I | re.M)
    if not match:
        return None
    text = match.group(0)
    first, _, rest = text.partition("\n")
    first = first[first.lower().index("usage:") + len("usage:"):]
    lines = [x for x in [first, *rest.split("\n")] if x.strip()]
    if not lines:
        return None
    indent = min(len(x) - len(x.lstrip()) for x in lines[1:] or lines)
    patterns = []
    for line in lines:
        if patterns and len(line) - len(line.lstrip()) > indent:
            patterns[-1] += " " + line.strip()
        else:
            patterns.append(line.strip())
    return patterns


def tokens(text):
    """Words of a usage line, with brackets, bars and ellipses as words of their own."""
    text = text.replace("...", " ... ")
    for c in "[]()|":
        text = text.replace(c, f" {c} ")
    return tuple(text.split())


def docstring(program):
    """The module docstring of program masq-NAME (lib/masq/cmd/NAME.py), or None."""
    if not program.startswith("masq-"):
        return None
    path = os.path.join(CMD, program[len("masq-"):] + ".py")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return ast.get_docstring(ast.parse(f.read()), clean=False)


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_program_has_a_page(program):
    assert os.path.exists(os.path.join(MAN, program + ".8")), \
        f"bin/{program} has no man/{program}.8"


@pytest.mark.parametrize("page", PAGES)
def test_page_is_clean_under_mandoc_lint(page):
    rc, out, err = mandoc("-Tlint", "-W", "warning", os.path.join(MAN, page))
    assert rc == 0 and not out.strip() and not err.strip(), out + err


@pytest.mark.parametrize("page", PAGES)
def test_page_name_section_names_the_page(page):
    name = page.rsplit(".", 1)[0]
    lines = section(rendered(page), "NAME")
    names, dash, description = (lines[0] if lines else "").partition(" - ")
    assert dash and description.strip() and name in names.split(", "), \
        f"{page}: NAME should read '{name} - description' (.Nm and .Nd), got {lines}"


@pytest.mark.parametrize("program", PROGRAMS)
def test_synopsis_says_what_the_usage_says(program):
    doc = docstring(program)
    patterns = usage_lines(doc or "")
    if not patterns:
        pytest.skip(f"{program} has no docopt Usage: section")
    page = program + ".8"
    if not os.path.exists(os.path.join(MAN, page)):
        pytest.skip(f"no man/{page} yet (test_every_program_has_a_page fails for it)")
    synopsis = section(rendered(page), "SYNOPSIS")
    want = sorted(tokens(p) for p in patterns)
    got = sorted(tokens(s) for s in synopsis)
    missing = [" ".join(t) for t in want if t not in got]
    extra = [" ".join(t) for t in got if t not in want]
    assert not missing and not extra, (
        f"man/{page} SYNOPSIS differs from the usage in lib/masq/cmd/: "
        f"usage lines not in SYNOPSIS: {missing}; SYNOPSIS lines not in usage: {extra}")


def test_tokens_ignore_spacing_of_ellipses_and_brackets():
    assert tokens("masq-queue remove [-C FILE] ID...") == \
        tokens("masq-queue remove [ -C FILE ] ID ...")
    assert tokens("a [-x] B") != tokens("a -x B")


def test_usage_lines_join_continuations_and_stop_at_a_blank_line():
    doc = "prog: x.\n\nUsage:\n  prog [-a]\n    [-b] ARG\n  prog -h\n\nOptions:\n  -a  A.\n"
    assert usage_lines(doc) == ["prog [-a] [-b] ARG", "prog -h"]
    assert usage_lines("no usage here") is None
