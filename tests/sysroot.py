"""A throwaway machine for system-mode tests: the `sysroot` fixture.

Use it from a test module with

    pytest_plugins = ["sysroot"]        # the sysroot fixture

    def test_x(sysroot):
        sysroot.adduser("alice")
        sysroot.run(["masq-setup", "system", "local-only", "--admin", "alice"]).ok()
        r = sysroot.run("echo hi | /usr/sbin/sendmail alice", user="alice")

The fixture needs root; without it, or when unshare(1) or overlayfs do not
work here, the test is skipped with the reason.  It starts
`unshare --mount --propagation private` running a shell that mounts an
overlay (upper and work folders under the test's tmp_path) on each of
OVERLAID, so that every change there lives in the test's tmp_path and
vanishes with the namespace; an empty tmpfs on /run (so systemd looks not
running, and no systemctl reaches the real one); `chmod o+x /root` inside
(other users can then run the venv's python under /root/.pyenv: a test of
the refusal does `chmod 700 /root` itself).  Then it prints a ready line
and becomes `sleep infinity`, the holder of the namespace.

API (every command enters the namespace with `nsenter --target PID --mount`):
  run(cmd, user=None, input=b"", env=None, timeout=60) -> conftest.Result
      cmd: an argv list (argv[0] without a slash is taken from the venv's
      bin/ when there, as conftest.run does) or shell text (run by sh -c);
      user: run as this user (runuser -u), else as root; env: the whole
      environment, default root_env() (conftest.clean_env() plus sbin).
  popen(cmd, user=None, env=None, **popen_kw) -> subprocess.Popen
      for daemons; each is killed (its process group) at teardown.
  adduser(name) -> name: `useradd -m` inside; the user vanishes with it.
  path(p) -> the host path of p as the namespace sees it (/proc/PID/root/p),
      for reading files and stat; a test writes through run(), not here.
  pid: the holder's process id.
Teardown kills what popen() started, then the holder: the overlays go with it.
"""
import os
import shutil
import signal
import subprocess

import pytest

from conftest import BIN, Result, clean_env

OVERLAID = ("/etc", "/var", "/usr/sbin", "/usr/bin", "/usr/lib", "/root", "/home", "/opt")
READY = "sysroot ready"
START_SECONDS = 30

HOLDER = r"""
set -e
base=$1; shift
for d in "$@"; do
  [ -d "$d" ] || continue
  n=$(printf %s "$d" | tr / _)
  mkdir -p "$base/upper$n" "$base/work$n"
  mount -t overlay overlay -o "lowerdir=$d,upperdir=$base/upper$n,workdir=$base/work$n" "$d"
done
mount -t tmpfs -o mode=0755 tmpfs /run
chmod o+x /root
echo "sysroot ready"
exec sleep infinity
"""


def root_env(**extra):
    """conftest.clean_env() with the sbin folders on PATH, as root's has them."""
    env = clean_env(**extra)
    env["PATH"] += ":/usr/local/sbin:/usr/sbin:/sbin"
    return env


class Sysroot:
    """A private mount namespace over the real machine; see the module docstring."""

    def __init__(self, base):
        self.base = base
        self.started = []
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", HOLDER, "sysroot",
             base, *OVERLAID],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pid = self.holder.pid      # unshare execs sh, sh execs sleep: one process
        line = self._first_line()
        if line != READY:
            err = self.holder.stderr.read().decode("utf-8", "replace").strip()
            self.close()
            pytest.skip(f"no throwaway root: unshare/overlayfs failed here: {line} {err}")

    def _first_line(self):
        """The holder's ready line, or "" if it died or took too long."""
        import select
        ready, _, _ = select.select([self.holder.stdout], [], [], START_SECONDS)
        if not ready:
            return ""
        return self.holder.stdout.readline().decode("utf-8", "replace").strip()

    def _argv(self, cmd, user):
        if isinstance(cmd, str):
            cmd = ["sh", "-c", cmd]
        cmd = [str(a) for a in cmd]
        if "/" not in cmd[0] and os.path.exists(os.path.join(BIN, cmd[0])):
            cmd[0] = os.path.join(BIN, cmd[0])
        enter = ["nsenter", "--target", str(self.pid), "--mount", "--"]
        if user is not None:
            enter += ["runuser", "-u", user, "--"]
        return enter + cmd

    def run(self, cmd, user=None, input=b"", env=None, timeout=60):
        """Run cmd inside, wait for it; a Result(rc, out, err)."""
        argv = self._argv(cmd, user)
        p = subprocess.run(argv, input=input, capture_output=True, timeout=timeout,
                           env=env or root_env())
        return Result(argv, p.returncode, p.stdout, p.stderr)

    def popen(self, cmd, user=None, env=None, **kw):
        """Start cmd inside without waiting; killed at teardown."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(self._argv(cmd, user), env=env or root_env(),
                             start_new_session=True, **kw)
        self.started.append(p)
        return p

    def adduser(self, name):
        """A real user (useradd -m) that exists only in here."""
        self.run(["useradd", "-m", "-s", "/bin/sh", name]).ok()
        return name

    def path(self, p):
        """p as the namespace sees it, through /proc/PID/root."""
        return f"/proc/{self.pid}/root{p}"

    def close(self):
        for p in self.started:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait()
        for stream in (self.holder.stdout, self.holder.stderr):
            stream.close()


@pytest.fixture
def sysroot(tmp_path):
    """A Sysroot whose overlays keep their changes in tmp_path/sysroot."""
    if os.geteuid() != 0:
        pytest.skip("system-mode tests need root: they mount overlays over /etc, /var "
                    "and /usr in a private mount namespace")
    for tool in ("unshare", "nsenter", "runuser", "useradd"):
        if shutil.which(tool) is None:
            pytest.skip(f"system-mode tests need {tool}(8)")
    base = tmp_path / "sysroot"
    base.mkdir()
    root = Sysroot(str(base))
    try:
        yield root
    finally:
        root.close()
