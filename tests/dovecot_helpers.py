"""Dovecot's POP3 server of our own, for masq-fetch's tests and bench/fetch.py.

`Dovecot(folder)` writes a configuration into `folder` (a passwd-file, a
maildir, a certificate from trustme, ports picked here); start() runs
`dovecot -F -c CONF` and waits for its first greeting, stop() ends it,
kill() kills the whole process group at once.  As root, Dovecot's mail
processes must not run as root: the maildir belongs to `nobody` and is
reached through mail_chroot (the chroot is made before the privileges are
dropped, so pytest's 0700 folders above it do not matter); as another
user, Dovecot runs as that user.
"""
import os
import pwd
import signal
import socket
import subprocess
import time

from conftest import free_port

START_SECONDS = 30


class Dovecot:
    """A Dovecot POP3 server of our own: users, their maildirs, start/stop/kill."""

    def __init__(self, folder, tls=True):
        import trustme
        self.dir = folder
        os.makedirs(folder)
        self.root = os.getuid() == 0
        self.mail_uid = pwd.getpwnam("nobody").pw_uid if self.root else os.getuid()
        self.mail_gid = pwd.getpwnam("nobody").pw_gid if self.root else os.getgid()
        self.mailroot = os.path.join(folder, "mailroot")
        os.makedirs(self.mailroot)
        os.chmod(self.mailroot, 0o755)
        self.pop3, self.pop3s = free_port(), free_port()
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = os.path.join(folder, "ca.pem")
        ca.cert_pem.write_to_path(self.ca_file)
        cert.private_key_pem.write_to_path(os.path.join(folder, "key.pem"))
        cert.cert_chain_pems[0].write_to_path(os.path.join(folder, "cert.pem"))
        self.passwd = os.path.join(folder, "passwd")
        open(self.passwd, "w").close()
        self.log = os.path.join(folder, "dovecot.log")
        self.conf = os.path.join(folder, "dovecot.conf")
        me = pwd.getpwuid(os.getuid()).pw_name
        # as root: logins as dovenull (chrooted), auth as root to read our files
        users = ("default_internal_user = root\n" if self.root else
                 f"default_login_user = {me}\ndefault_internal_user = {me}\n")
        location = "maildir:/%u" if self.root else f"maildir:{self.mailroot}/%u"
        chroot = (f"mail_chroot = {self.mailroot}\nvalid_chroot_dirs = {self.mailroot}\n"
                  if self.root else "")
        with open(self.conf, "w") as f:
            f.write(f"""protocols = pop3
listen = 127.0.0.1
base_dir = {folder}/run
state_dir = {folder}/state
instance_name = masqtest{self.pop3}
log_path = {self.log}
{users}first_valid_uid = {self.mail_uid}
first_valid_gid = {self.mail_gid}
{chroot}ssl = {"yes" if tls else "no"}
ssl_cert = <{folder}/cert.pem
ssl_key = <{folder}/key.pem
disable_plaintext_auth = no
auth_mechanisms = plain apop
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.passwd}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.passwd}
}}
mail_location = {location}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.pop3}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {self.pop3s}
    ssl = yes
  }}
}}
""")
        self.proc = None
        self.serial = 0

    def add_user(self, name, password):
        home = f"/{name}" if self.root else os.path.join(self.mailroot, name)
        with open(self.passwd, "a") as f:
            f.write(f"{name}:{{PLAIN}}{password}:{self.mail_uid}:{self.mail_gid}::{home}::\n")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(self.mailroot, name, sub))
        self._own(os.path.join(self.mailroot, name))

    def _own(self, path):
        for folder, _, files in os.walk(path):
            for name in [folder] + [os.path.join(folder, n) for n in files]:
                os.chown(name, self.mail_uid, self.mail_gid)

    def put(self, user, data):
        """Leave a message in the user's maildir, as a delivery agent would."""
        self.serial += 1
        path = os.path.join(self.mailroot, user, "new", f"{time.time():.0f}.{self.serial}.test")
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, self.mail_uid, self.mail_gid)

    def count(self, user):
        return sum(len(os.listdir(os.path.join(self.mailroot, user, sub)))
                   for sub in ("cur", "new"))

    def start(self):
        self.proc = subprocess.Popen(["dovecot", "-F", "-c", self.conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        deadline = time.monotonic() + START_SECONDS
        while True:     # no readiness notice: the first greeting is the sign
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            try:
                with socket.create_connection(("127.0.0.1", self.pop3), timeout=5) as s:
                    if s.recv(100).startswith(b"+OK"):
                        return self
            except OSError:
                pass
            assert time.monotonic() < deadline, "dovecot did not start"
            time.sleep(0.05)

    def kill(self):
        """The whole server dies at once (its process group): no QUIT, no cleanup."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()

    def logged(self):
        try:
            with open(self.log) as f:
                return f.read()
        except FileNotFoundError:
            return ""
