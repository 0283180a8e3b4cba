"""masq-setup system: masq as the machine's MTA, and its uninstall (issue 8).

Each test runs in a throwaway root (tests/sysroot.py): overlays over /etc,
/var, /usr and /root in a private mount namespace, real users made there.
"""
import os
import stat
import subprocess

from conftest import BIN

from masq import install

pytest_plugins = ["sysroot"]        # the sysroot fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK_PATHS = [path for path, _ in install.LINKS]
UNITS = ["masq-send.service", "masq-smtpd.socket", "masq-smtpd.service"]
# path: (owner, group, mode) as system-mode.md's table says
LAYOUT = {
    "/etc/masq/masq.toml": ("root", "root", 0o644),
    "/var/spool/masq": ("masq", "masq", 0o711),
    "/var/spool/masq/tmp": ("masq", "masq", 0o700),
    "/var/spool/masq/incoming": ("masq", "masq", 0o700),
    "/var/spool/masq/active": ("masq", "masq", 0o700),
    "/var/spool/masq/hold": ("masq", "masq", 0o700),
    "/var/spool/masq/corrupt": ("masq", "masq", 0o700),
    "/var/spool/masq/drop": ("masq", "masq", 0o3733),
    "/var/spool/masq/trigger": ("masq", "masq", 0o622),
    "/var/log/masq": ("masq", "masq", 0o750),
    "/var/mail": ("root", "mail", 0o2775),
}


def setup(sysroot, *args, user=None):
    return sysroot.run(["masq-setup", "system", *args], user=user)


def without_other_mta(sysroot):
    """Take the links of whatever MTA this machine has away (inside the namespace)."""
    sysroot.run(["rm", "-f", *LINK_PATHS]).ok()


def names(sysroot, path):
    """(owner, group) of path inside, by name as the namespace's passwd says."""
    r = sysroot.run(["stat", "-c", "%U %G", path]).ok()
    return tuple(r.out.decode().split())


def mode(sysroot, path):
    return stat.S_IMODE(os.lstat(sysroot.path(path)).st_mode)


def read(sysroot, path):
    with open(sysroot.path(path)) as f:
        return f.read()


def listing(sysroot):
    """What an install may touch and an uninstall must put back, as comparable text."""
    r = sysroot.run("for p in " + " ".join(LINK_PATHS) + " /etc/aliases /etc/masq "
                    "/var/lib/masq /var/spool/masq /var/log/masq /etc/systemd/system/*; do "
                    "if [ -L $p ]; then echo $p '->' $(readlink $p); "
                    "elif [ -e $p ]; then echo $p $(stat -c '%U:%G %a' $p) "
                    "$(sha256sum < $p 2>/dev/null); else echo $p absent; fi; done; "
                    "getent passwd masq; getent group masq; true").ok()
    return r.out.decode()


def test_local_only_makes_the_user_the_layout_the_links_and_the_units(sysroot):
    without_other_mta(sysroot)
    sysroot.adduser("alice")
    sysroot.run(["rm", "-f", "/etc/aliases"]).ok()
    r = setup(sysroot, "local-only", "--hostname", "test.example", "--admin", "alice").ok()
    out = r.out.decode()
    assert "smtp stream tcp nowait masq " in out and "/usr/bin/runq" in out, r
    r = sysroot.run(["getent", "passwd", "masq"]).ok()
    assert r.out.decode().strip().endswith(":/var/spool/masq:/usr/sbin/nologin"), r
    for path, (owner, group, want) in LAYOUT.items():
        assert names(sysroot, path) == (owner, group), path
        assert mode(sysroot, path) == want, f"{path}: {oct(mode(sysroot, path))}"
    assert stat.S_ISFIFO(os.lstat(sysroot.path("/var/spool/masq/trigger")).st_mode)
    conf = read(sysroot, "/etc/masq/masq.toml")
    for line in ('user = "masq"', 'spool = "/var/spool/masq"', 'aliases = "/etc/aliases"',
                 'log = "/var/log/masq/masq.log"', 'users = "system"',
                 'default_privs = "nobody"', 'mailbox = "mbox"', 'path = "/var/mail/{user}"'):
        assert line in conf.splitlines(), line
    aliases = read(sysroot, "/etc/aliases")
    assert "postmaster: alice" in aliases and "root: alice" in aliases, aliases
    for path in LINK_PATHS:
        assert os.readlink(sysroot.path(path)) == os.path.join(BIN, "masq-inject"), path
    for unit in UNITS:
        text = read(sysroot, f"/etc/systemd/system/{unit}")
        assert text == install.units(BIN)[unit]
    assert f"ExecStart={BIN}/masq-send -C /etc/masq/masq.toml" in \
        read(sysroot, "/etc/systemd/system/masq-send.service")
    assert "User=masq" in read(sysroot, "/etc/systemd/system/masq-smtpd.service")
    r = sysroot.run(["/usr/sbin/sendmail", "--help"], user="alice")
    assert r.rc == 0 and b"Usage:" in r.out, r


def test_a_second_run_changes_nothing(sysroot):
    without_other_mta(sysroot)
    setup(sysroot, "local-only", "--admin", "root@example.org").ok()
    before = listing(sysroot), read(sysroot, install.MANIFEST)
    setup(sysroot, "local-only", "--admin", "root@example.org").ok()
    assert (listing(sysroot), read(sysroot, install.MANIFEST)) == before


def test_a_second_run_follows_no_link_the_masq_user_put_in_the_spool(sysroot):
    """Root runs setup again (after an upgrade of another MTA, say): a spool entry
    that masq replaced by a link must not make root chmod or create what it names."""
    without_other_mta(sysroot)
    setup(sysroot, "local-only", "--admin", "root@example.org").ok()
    shadow = mode(sysroot, "/etc/shadow")
    sysroot.run("cd /var/spool/masq && rm trigger VERSION && ln -s /etc/shadow trigger"
                " && ln -s /etc/nologin VERSION", user="masq").ok()
    r = setup(sysroot, "local-only", "--admin", "root@example.org")
    assert r.rc != 0 and b"symbolic link" in r.err, r
    assert mode(sysroot, "/etc/shadow") == shadow
    assert not os.path.lexists(sysroot.path("/etc/nologin"))


def test_existing_aliases_are_used_as_they_are(sysroot):
    without_other_mta(sysroot)
    sysroot.run("printf 'postmaster: bob\\n' > /etc/aliases").ok()
    r = setup(sysroot, "local-only").ok()
    assert read(sysroot, "/etc/aliases") == "postmaster: bob\n"
    assert b"kept /etc/aliases as it is" in r.out, r


def test_without_aliases_or_admin_it_asks_for_the_admin(sysroot):
    without_other_mta(sysroot)
    sysroot.run(["rm", "-f", "/etc/aliases"]).ok()
    r = setup(sysroot, "local-only")
    assert r.rc == 64 and b"--admin USER" in r.err, r
    assert sysroot.run(["getent", "passwd", "masq"]).rc != 0


def test_mailbox_maildir_delivers_to_home_maildir(sysroot):
    without_other_mta(sysroot)
    setup(sysroot, "local-only", "--mailbox", "maildir").ok()
    conf = read(sysroot, "/etc/masq/masq.toml").splitlines()
    assert 'mailbox = "maildir"' in conf and 'path = "{home}/Maildir/"' in conf


def test_mailbox_mda_is_refused_in_system_mode(sysroot):
    r = setup(sysroot, "local-only", "--mailbox", "mda")
    assert r.rc == 64 and b"mbox or maildir" in r.err, r


def test_another_mtas_links_are_refused_forced_and_restored(sysroot):
    # An "other MTA" of our own, whatever this machine has: a link dpkg knows
    # nothing of; the machine's real MTA (exim4 here) is named by its package.
    sysroot.run("[ -e /usr/bin/runq ] || ln -s /bin/true /usr/bin/runq").ok()
    before = listing(sysroot)
    r = sysroot.run(["dpkg", "-S", "/usr/sbin/sendmail"])
    package = r.out.decode().split(":")[0] if r.rc == 0 else None

    r = setup(sysroot, "local-only", "--admin", "root@example.org")
    assert r.rc == 73, r
    err = r.err.decode()
    assert "/usr/bin/runq" in err and "--force" in err, r
    if package:
        assert f"belongs to {package}" in err and f"apt-get remove {package}" in err, r
    assert listing(sysroot) == before

    r = setup(sysroot, "local-only", "--admin", "root@example.org", "--force").ok()
    for path in LINK_PATHS:
        assert os.readlink(sysroot.path(path)) == os.path.join(BIN, "masq-inject"), path

    r = sysroot.run(["masq-setup", "system", "--uninstall"]).ok()
    assert b"restored /usr/bin/runq -> /bin/true" in r.out, r
    assert listing(sysroot) == before


def test_uninstall_leaves_the_machine_as_it_was(sysroot):
    without_other_mta(sysroot)
    sysroot.run(["rm", "-f", "/etc/aliases"]).ok()
    sysroot.run("printf '[Unit]\\n' > /etc/systemd/system/masq-smtpd.socket").ok()
    before = listing(sysroot)
    setup(sysroot, "smarthost", "--relay", "smtp.example:587", "--admin", "root@example.org",
          "--force").ok()
    assert before != listing(sysroot)
    r = sysroot.run(["masq-setup", "system", "--uninstall"]).ok()
    assert b"masq is uninstalled" in r.out, r
    assert listing(sysroot) == before
    r = sysroot.run(["masq-setup", "system", "--uninstall"]).ok()
    assert b"nothing to undo" in r.out, r


def test_uninstall_keeps_queued_mail_and_says_where(sysroot):
    without_other_mta(sysroot)
    setup(sysroot, "local-only", "--admin", "root@example.org").ok()
    sysroot.run("echo mail > /var/spool/masq/incoming/1234").ok()
    r = sysroot.run(["masq-setup", "system", "--uninstall"]).ok()
    assert b"kept the spool /var/spool/masq: it holds 1 messages" in r.out, r
    assert read(sysroot, "/var/spool/masq/incoming/1234") == "mail\n"
    assert sysroot.run(["getent", "passwd", "masq"]).rc == 0
    assert not os.path.lexists(sysroot.path("/etc/masq/masq.toml"))
    assert not os.path.lexists(sysroot.path("/usr/sbin/sendmail"))


def test_a_changed_configuration_is_kept_by_uninstall(sysroot):
    without_other_mta(sysroot)
    setup(sysroot, "local-only", "--admin", "root@example.org").ok()
    sysroot.run("echo '# mine' >> /etc/masq/masq.toml").ok()
    r = sysroot.run(["masq-setup", "system", "--uninstall"]).ok()
    assert b"kept /etc/masq/masq.toml: it changed" in r.out, r
    assert read(sysroot, "/etc/masq/masq.toml").endswith("# mine\n")


def test_refused_when_other_users_cannot_run_masq(sysroot):
    # The venv's python lives under /root/.pyenv here; /root is 0700 on Debian.
    # Elsewhere (Debian's python3), the venv itself is made unsearchable: it is
    # not under an overlay, so its mode is put back whatever happens.
    real = os.path.realpath(os.path.join(BIN, "python"))
    venv = os.path.dirname(BIN)
    mode = os.stat(venv).st_mode & 0o7777
    if not real.startswith("/root/"):
        sysroot.run(["chmod", "o-x", venv]).ok()
        folder = venv
    else:
        sysroot.run(["chmod", "700", "/root"]).ok()
        folder = "/root"
    try:
        without_other_mta(sysroot)
        before = listing(sysroot)
        r = setup(sysroot, "local-only", "--admin", "root@example.org")
    finally:
        os.chmod(venv, mode)
    assert r.rc == 78, r
    err = r.err.decode()
    assert f"{folder} is not searchable by other users: chmod o+x {folder}" in err, r
    assert "make install-system" in err, r
    assert listing(sysroot) == before


def test_only_root_may_install(sysroot):
    sysroot.adduser("alice")
    r = setup(sysroot, "local-only", "--admin", "alice", user="alice")
    assert r.rc == 77 and b"must run as root" in r.err, r


def test_enable_without_a_running_systemd_says_so(sysroot):
    without_other_mta(sysroot)
    r = setup(sysroot, "local-only", "--admin", "root@example.org", "--enable").ok()
    assert b"systemd is not running here, nothing enabled" in r.out, r


def test_nothing_leaks_out_of_the_throwaway_root(sysroot):
    real_sendmail = os.path.realpath("/usr/sbin/sendmail")
    without_other_mta(sysroot)
    sysroot.adduser("leaktest")
    setup(sysroot, "local-only", "--admin", "leaktest").ok()
    assert subprocess.run(["getent", "passwd", "masq"], capture_output=True).returncode != 0
    assert subprocess.run(["getent", "passwd", "leaktest"], capture_output=True).returncode != 0
    assert os.path.realpath("/usr/sbin/sendmail") == real_sendmail
    assert not os.path.exists("/etc/masq/masq.toml")
    assert not os.path.exists("/etc/systemd/system/masq-send.service")
    assert not os.path.exists("/home/leaktest")


def test_the_sysroot_runs_daemons_inside_it(sysroot):
    sysroot.run("echo inside > /etc/sysroot-probe").ok()
    p = sysroot.popen(["cat", "/etc/sysroot-probe"], stdout=subprocess.PIPE)
    assert p.communicate(timeout=60)[0] == b"inside\n"
    assert not os.path.exists("/etc/sysroot-probe")


def test_shipped_units_are_what_setup_writes_for_usr_bin():
    for name, text in install.units("/usr/bin").items():
        with open(os.path.join(ROOT, "etc", "systemd", name)) as f:
            assert f.read() == text, name


def test_secrets_are_readable_by_the_masq_group_only(sysroot):
    without_other_mta(sysroot)
    sysroot.run(["masq-setup", "system", "smarthost", "--relay", "smtp.example:587",
                 "--user", "me", "--admin", "root@example.org"], input=b"s3cret\n").ok()
    sysroot.run(["masq-setup", "passwd", "/etc/masq", "bob"], input=b"pw\n").ok()
    for path in ("/etc/masq/smarthost.secret", "/etc/masq/passwd"):
        assert names(sysroot, path) == ("root", "masq"), path
        assert mode(sysroot, path) == 0o640, path
    assert read(sysroot, "/etc/masq/smarthost.secret") == "s3cret\n"
    # and the masq group's programs take them (the review: both were refused as 0640)
    check = ("from masq import clientroute, passwords; "
             "print(passwords.status('/etc/masq/passwd'), "
             "clientroute.read_secret('/etc/masq/smarthost.secret'))")
    r = sysroot.run([os.path.join(BIN, "python"), "-c", check], user="masq").ok()
    assert r.out == b"None b's3cret'\n", r
    r = sysroot.run(["cat", "/etc/masq/smarthost.secret"], user="nobody")
    assert r.rc != 0, r
