"""The chain's shape in the imports: program bodies (masq.cmd) are leaves.

Only a program's launcher in bin/ and the documented in-process runners
import a program body: masq-tcpserver forks a loaded masq-smtpd or
masq-qmtpd, and
masq-inject (sendmail) runs the main() of masq-send, masq-queue, masq-route
and masq-smtpd for its other names and -odi/-odb (masq-inject(8)).
"""
import ast
import os
import sys

import pytest

LIB = os.path.join(os.path.dirname(__file__), "..", "lib", "masq")
RUNNERS = {"tcpserver.py": {"smtpd", "qmtpd"}, "inject.py": {"send", "queue", "route", "smtpd"}}


def modules(folder):
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".py"))


def cmd_imports(path):
    """The program bodies a file imports: import statements, and the names
    importlib.import_module is given as a literal or f-string starting masq.cmd."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
            if node.module == "masq":
                names += [f"masq.{a.name}" for a in node.names]
            elif node.module == "masq.cmd":
                names += [f"masq.cmd.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if node.value.startswith("masq.cmd.") else []
        elif isinstance(node, ast.JoinedStr) and node.values and \
                isinstance(node.values[0], ast.Constant) and \
                str(node.values[0].value).startswith("masq.cmd."):
            names = ["masq.cmd.*"]
        else:
            continue
        for name in names:
            if name == "masq.cmd" or name.startswith("masq.cmd."):
                found.add(name.removeprefix("masq.cmd").lstrip("."))
    found.discard("")
    return found


@pytest.mark.parametrize("path", modules(LIB), ids=os.path.basename)
def test_no_library_module_imports_a_program_body(path):
    assert cmd_imports(path) == set(), f"{path} imports a program body"


@pytest.mark.parametrize("path", modules(os.path.join(LIB, "cmd")), ids=os.path.basename)
def test_no_program_body_imports_another_except_the_documented_runners(path):
    allowed = RUNNERS.get(os.path.basename(path), set())
    got = cmd_imports(path) - {"*"} if allowed else cmd_imports(path)
    assert got <= allowed, f"{path} imports the program bodies {sorted(got - allowed)}"


def test_the_check_sees_an_import_of_a_program_body(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from masq.cmd import queue\n    import masq.cmd.send\n"
                    "    from masq.cmd.local import main\n")
    assert cmd_imports(str(path)) == {"queue", "send", "local"}


def imported(stderr):
    """The modules a -X importtime run imported."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.decode().splitlines()
            if line.startswith("import time:") and "|" in line}


def test_a_sendmail_call_imports_neither_os_nor_stat(masq):
    """masq.pathenv: a submission takes its system calls from posix, as os would
    give them (importing os is 1 ms of every call)."""
    inject = os.path.join(os.path.dirname(sys.executable), "masq-inject")
    masq.run([inject, "-odq", "-i", "bob@localhost"], input=b"Subject: x\n\nhi\n").ok()  # the cache
    r = masq.run([sys.executable, "-I", "-S", "-X", "importtime", inject, "-odq", "-i",
                  "bob@localhost"],
                 input=b"Subject: x\n\nhi\n")
    assert r.rc == 0, r
    loaded = imported(r.err)
    assert {"masq.cmd.inject", "masq.spool", "masq.config"} <= loaded, loaded
    assert not loaded & {"os", "stat", "posixpath", "_collections_abc", "re", "enum"}, loaded
    assert len(masq.queue_ids()) == 2
