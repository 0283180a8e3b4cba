"""masq.pathenv answers as os.path and os.environ do (sendmail's path does without os)."""
import os
import subprocess
import sys

import pytest

from masq import pathenv

PATHS = ["", "/", "//", "a", "a/", "/a", "/a/", "/a/b", "/a/b/", "a/b", "//a", "/a//b", ".", "..",
         "./a", "a/./b/../c", "/../a", "/a/b/../../..", "~", "~/x", "~root/x", "~nosuchuserx/y"]


@pytest.mark.parametrize("path", PATHS)
def test_paths_as_os_path(path, monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone/")
    assert pathenv.dirname(path) == os.path.dirname(path)
    assert pathenv.basename(path) == os.path.basename(path)
    assert pathenv.expanduser(path) == os.path.expanduser(path)
    assert pathenv.exists(path) == os.path.exists(path)
    assert pathenv.lexists(path) == os.path.lexists(path)
    if not path.startswith("//"):   # POSIX lets "//" mean something else; os.path keeps it
        assert pathenv.abspath(path) == os.path.abspath(path)


@pytest.mark.parametrize("parts", [("a", "b"), ("a/", "b"), ("a", "/b"), ("", "b"), ("a", ""),
                                   ("/", "a", "b/"), ("a", "b", "/c", "d"), ("",)])
def test_join_as_os_path(parts):
    assert pathenv.join(*parts) == os.path.join(*parts)


def test_the_environment_before_and_after_os(tmp_path):
    """Without os: posix.environ as the process began, putenv() seen by children and by
    os imported later; with os: os.environ, changes included."""
    script = (
        "import sys; sys.path.insert(0, %r)\n"
        "from masq import pathenv\n"
        "assert 'os' not in sys.modules\n"
        "assert pathenv.getenv('MASQ_T1') == 'caf\\xe9', pathenv.getenv('MASQ_T1')\n"
        "assert pathenv.getenv('MASQ_NONE', 'd') == 'd'\n"
        "pathenv.putenv('MASQ_T2', 'two')\n"
        "assert pathenv.getenv('MASQ_T2') == 'two'\n"
        "import os, subprocess\n"
        "assert os.environ['MASQ_T2'] == 'two'\n"
        "os.environ['MASQ_T3'] = 'three'\n"
        "assert pathenv.getenv('MASQ_T3') == 'three'\n"
        "pathenv.putenv('MASQ_T4', 'four')\n"
        "print(subprocess.run(['sh', '-c', 'echo $MASQ_T2 $MASQ_T4'], capture_output=True,"
        " text=True).stdout.strip())\n"
    ) % os.path.join(os.path.dirname(__file__), "..", "lib")
    env = {"PATH": "/usr/bin:/bin", "MASQ_T1": "caf\u00e9"}
    r = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "two four"
