"""masq-setup import-masqmail: masqmail's configuration made a masq folder.

Read are masqmail's own example files (tests/data/masqmail/0.2 and 0.3, see
the README there) and a hand-made laptop configuration (tests/data/masqmail/
laptop: two ISPs, online_file detection, conditions, a get file).  The
written masq.toml passes `masq-setup check`, and masq-route decides as
masqmail's route files say, per route that is up.  One difference is meant:
mail that no route may ever carry stays in masqmail's queue for ever and
bounces at once in masq (5.7.1).
"""
import os
import shutil
import stat
import tomllib

import pytest
from conftest import run

from masq import masqmailconf

DATA = os.path.join(os.path.dirname(__file__), "data", "masqmail")
UMASK = os.umask(0o022)
os.umask(UMASK)


def data_file(*path):
    with open(os.path.join(DATA, *path), "rb") as f:
        return f.read()


def imported(tmp_path, source, name="masq"):
    """Run the import; (folder, its masq.toml parsed, what it printed)."""
    folder = tmp_path / name
    r = run(["masq-setup", "import-masqmail", source, folder]).ok()
    run(["masq-setup", "check", folder / "masq.toml"]).ok()
    with open(folder / "masq.toml", "rb") as f:
        return folder, tomllib.load(f), r.out.decode()


def route(folder, address, sender="", up=None):
    """masq-route's line for one address (with route `up` forced up)."""
    argv = ["masq-route", "-C", folder / "masq.toml", "--from", sender]
    r = run(argv + (["--route", up] if up else []) + [address])
    assert r.rc in (0, 67, 69), r
    return r.out.decode().split(": ", 1)[1].strip()


def copy(tmp_path, version, edit=None):
    """A copy of one data folder, its masqmail.conf edited by (old, new) pairs."""
    folder = tmp_path / "etc-masqmail"
    shutil.copytree(os.path.join(DATA, version), folder)
    conf = folder / "masqmail.conf"
    text = conf.read_text()
    for old, new in edit or ():
        assert old in text, old
        text = text.replace(old, new)
    conf.write_text(text)
    return folder


# -- masqmail's own examples ------------------------------------------------------------

def test_masqmail_0_2_example(tmp_path):
    folder, conf, said = imported(tmp_path, os.path.join(DATA, "0.2"))
    assert conf["hostname"] == "striped.patchwork.net"
    assert conf["local_domains"] == ["striped", "striped.patchwork.net", "localhost"]
    assert conf["aliases"] == "/etc/aliases"
    assert conf["local"] == {"mailbox": "mbox", "path": "/var/mail/{user}", "users": "system"}
    assert conf["route"]["GWDG"] == {
        "allowed_senders": ["okurth@*"], "denied_recipients": ["*@cpwright.com"],
        "host": "mail.isp.com", "rewrite_sender": {"okurth@*": "kurth@innominate.de"}}
    # no online_detect: masqmail never used the route; masq does when DIR/online names it
    assert conf["online"] == {"detect": "file", "file": "online"}
    for line in ("masqmail.conf:35: listen_addresses: not carried over: masq-smtpd listens",
                 "masqmail.conf:42: spool_dir: not carried over: masq keeps its own spool",
                 "example.route:44: do_correct_helo: not carried over: masq greets with helo",
                 "example.route:75: map_h_from_addresses: the display names are not carried",
                 "no online_query or online_detect"):
        assert line in said, said
    assert "do_queue" not in said       # do_queue=false: what masq does anyway
    up = "GWDG"
    assert route(folder, "x@example.com", "okurth@striped.patchwork.net", up) == \
        "route GWDG, via mail.isp.com, sender rewritten to <kurth@innominate.de>"
    assert route(folder, "x@cpwright.com", "okurth@striped.patchwork.net", up).startswith(
        "bounce: no route may carry mail")
    assert route(folder, "x@example.com", "other@striped.patchwork.net", up).startswith(
        "bounce: no route may carry mail")
    assert route(folder, "x@example.com", "okurth@striped.patchwork.net") == \
        "wait: waiting for route GWDG to come online"


def test_masqmail_0_3_example_as_shipped_has_only_its_host_name(tmp_path):
    folder, conf, said = imported(tmp_path, os.path.join(DATA, "0.3"))
    assert conf["hostname"] == "striped.patchwork.net"
    assert conf["local_domains"] == ["localhost", "striped", "striped.patchwork.net"]
    assert "route" not in conf and conf["online"] == {"detect": "always"}
    assert route(folder, "x@example.com", "a@striped.patchwork.net") == \
        "bounce: no route for mail to example.com: this host delivers locally only (5.4.4)"


def enabled_0_3(tmp_path, online):
    """masqmail 0.3.5's example with its commented routes enabled, and one connection
    (foobar) of two route files, as its comments show."""
    return copy(tmp_path, "0.3", [
        ('#online_query = "/bin/cat /var/tmp/masqmail-route"',
         f'online_query = "/bin/cat {online}"'),
        ("#permanent_routes", "permanent_routes"),
        ("#query_routes.example", "query_routes.example"),
        ('#query_routes.foobar = "/etc/masqmail/foo.route;/etc/masqmail/bar.route"',
         'query_routes.foobar = "/etc/masqmail/example.route;/etc/masqmail/openssl.route"'),
    ])


def test_masqmail_0_3_example_with_its_routes(tmp_path):
    online = tmp_path / "masqmail-route"
    folder, conf, said = imported(tmp_path, enabled_0_3(tmp_path, online))
    routes = conf["route"]
    assert list(routes) == ["localnet", "example", "openssl"]
    assert routes["localnet"] == {"always": True, "connect_error_fail": True,
                                  "allowed_recipients": ["*@*mydomain.invalid",
                                                         "*@also.onlocal.net"]}
    assert routes["example"]["allowed_senders"] == ["okurth@*"]
    # openssl s_client -starttls smtp as a wrapper: masq's own STARTTLS instead
    assert routes["openssl"] == {
        "host": "mail.gmx.net:25", "tls": "starttls",
        "allowed_senders": ["*@gmx.de", "*@gmx.net"],
        "auth": {"user": "UID_OR_EMAIL_ADDRESS", "password_file": "openssl.secret"},
        "auth_mechanisms": ["LOGIN"]}
    secret = folder / "openssl.secret"
    assert secret.read_bytes() == b"YOUR_PASSWORD\n"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "openssl.route:10: instant_helo: not carried over" in said
    assert "openssl.route:11: wrapper: replaced by host = 'mail.gmx.net:25'" in said
    assert "YOUR_PASSWORD" not in said and "YOUR_PASSWORD" not in (
        folder / "masq.toml").read_text()
    # the connection names what is up; the command maps it onto route names
    assert conf["online"]["detect"] == "command"
    okurth, gmx = "okurth@striped.patchwork.net", "me@gmx.de"
    assert route(folder, "x@example.com", okurth).startswith("wait: waiting for route example")
    online.write_text("example\n")
    assert route(folder, "x@example.com", okurth) == \
        "route example, via mail.isp.com, sender rewritten to <kurth@innominate.de>"
    assert route(folder, "x@example.com", gmx).startswith("wait: waiting for route openssl")
    online.write_text("foobar\n")
    assert route(folder, "x@example.com", gmx) == "route openssl, via mail.gmx.net:25"
    assert route(folder, "x@example.com", okurth).startswith("route example")
    # the permanent route is up whatever the connection, and falls through
    online.unlink()
    assert route(folder, "pc@x.mydomain.invalid", gmx) == \
        "route localnet, straight to the MX of the recipient's domain"
    assert route(folder, "x@cpwright.com", okurth).startswith("bounce:")


# -- a laptop -----------------------------------------------------------------------

USER = os.environ.get("USER") or "root"


@pytest.fixture
def laptop(tmp_path):
    online, aliases = tmp_path / "masqmail-route", tmp_path / "aliases"
    aliases.write_text(f"postmaster: {USER}\n")
    source = copy(tmp_path, "laptop", [('online_file = "/var/run/masqmail/masqmail-route"',
                                        f'online_file = "{online}"'),
                                       ('alias_file = "/etc/aliases"',
                                        f'alias_file = "{aliases}"')])
    folder, conf, said = imported(tmp_path, source)
    return folder, conf, said, online


def test_laptop_keys(laptop):
    folder, conf, said, online = laptop
    assert conf["online"] == {"detect": "file", "file": str(online)}
    assert conf["queue"] == {"max_age": 5 * 86400, "warn_after": 7200,
                             "archive_bcc": "archive@laptop.example.org"}
    assert conf["local"] == {"mailbox": "mda", "mda": "/usr/bin/procmail -Y -d {user}",
                             "users": "system"}
    assert conf["local_domains"] == ["localhost", "laptop", "laptop.example.org"]
    isp = conf["route"]["isp"]
    assert isp["host"] == "smtp.isp.example:587" and isp["helo"] == "laptop.isp.example"
    assert isp["allowed_senders"] == ["alice@*", "bob@*"]
    assert isp["denied_recipients"] == ["*@intranet.corp.example", "*@*.home.lan"]
    assert isp["auth"] == {"user": "alice", "password_file": "isp.secret"}
    assert isp["auth_mechanisms"] == ["CRAM-MD5"]
    assert isp["rewrite_sender"] == {"alice@*": "alice@isp.example", "bob@*": "bob@isp.example"}
    assert isp["fetch"] == [{"server": "pop.isp.example:110", "tls": "stls", "user": "alice",
                             "password_file": "isp-pop.secret", "apop": True,
                             "deliver_to": "alice@laptop.example.org", "keep": True,
                             "max_size": 10000000}]
    assert isp["fetch_on_up"] is True and isp["pop_before_smtp"] == "alice"
    assert (folder / "isp.secret").read_bytes() == b"s3cret pass\n"
    assert (folder / "isp-pop.secret").read_bytes() == b"pop secret\n"
    for name in ("isp.secret", "isp-pop.secret"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    mobile = conf["route"]["mobile"]
    assert mobile == {"allowed_recipients": ["*@corp.example", "*@*.corp.example"],
                      "denied_recipients": ["*@intranet.corp.example", "*@*.home.lan"],
                      "last_route": True, "allowed_senders": ["alice@corp.example"],
                      "rewrite_sender": {"*@*": "*@corp.example"}}
    assert conf["route"]["localnet"] == {"always": True, "allowed_recipients": ["*@*.home.lan"]}


def test_laptop_prints_what_it_could_not_carry_over(laptop):
    folder, conf, said, online = laptop
    for line in (
            "masqmail.conf:5: local_hosts: *.laptop.example.org not carried over: "
            "local_domains are exact domains, no patterns",
            "masqmail.conf:21: warn_intervals: not carried over: masq warns once",
            "masqmail.conf:23: do_relay: not carried over: masq-smtpd relays for [smtpd] "
            "relay_nets and AUTH users only",
            "mobile.route:6: do_pipelining: not carried over: masq pipelines whenever",
            "mobile.route:5: set_return_path_domain: masq rewrites From:, Sender: and "
            "Reply-To: by these rules too",
            "isp.route:9: map_h_from_addresses: the display names are not carried over",
            "isp.get:3: server: masqmail fetched without TLS; masq asks for STLS"):
        assert line in said, said
    assert "s3cret" not in said and "pop secret" not in said


ALICE, BOB, CAROL = ("alice@laptop.example.org", "bob@laptop.example.org",
                     "carol@laptop.example.org")
WORK = "alice@corp.example"
# (connection up, sender, recipient, what masqmail's route files imply)
DECISIONS = [
    ("isp", ALICE, "x@example.com",
     "route isp, via smtp.isp.example:587, sender rewritten to <alice@isp.example>"),
    ("isp", BOB, "z@corp.example",
     "route isp, via smtp.isp.example:587, sender rewritten to <bob@isp.example>"),
    ("isp", WORK, "z@corp.example",
     "route isp, via smtp.isp.example:587, sender rewritten to <alice@isp.example>"),
    ("isp", ALICE, "y@intranet.corp.example", "bounce: no route may carry mail"),
    ("isp", CAROL, "x@example.com", "bounce: no route may carry mail"),
    ("isp", ALICE, "printer@box.home.lan",
     "route localnet, straight to the MX of the recipient's domain"),
    ("mobile", WORK, "z@corp.example",
     "route mobile, straight to the MX of the recipient's domain"),
    ("mobile", WORK, "z@dev.corp.example",
     "route mobile, straight to the MX of the recipient's domain"),
    ("mobile", ALICE, "z@corp.example", "wait: waiting for route isp to come online"),
    ("mobile", WORK, "x@example.com", "wait: waiting for route isp to come online"),
    ("mobile", ALICE, "printer@box.home.lan",
     "route localnet, straight to the MX of the recipient's domain"),
    (None, ALICE, "x@example.com", "wait: waiting for route isp to come online"),
    (None, ALICE, "printer@box.home.lan",
     "route localnet, straight to the MX of the recipient's domain"),
]


@pytest.mark.parametrize("up, sender, rcpt, decision", DECISIONS)
def test_laptop_routes_decide_as_masqmail(laptop, up, sender, rcpt, decision):
    folder, conf, said, online = laptop
    if up:
        online.write_text(up + "\n")          # as the ip-up script writes it
    assert route(folder, rcpt, sender).startswith(decision)


def test_laptop_local_mail_goes_to_the_mda_after_masqmails_aliases(laptop):
    folder, conf, said, online = laptop
    assert route(folder, "postmaster@laptop.example.org", BOB) == \
        f"alias postmaster -> local, MDA /usr/bin/procmail -Y -d {USER}"
    assert route(folder, "nobody-such-user@laptop.example.org", BOB).startswith(
        "bounce: no such user")


def test_last_route_keeps_work_mail_off_the_isp(laptop):
    """mobile.route says last_route: what it defers is not tried on a later route."""
    folder, conf, said, online = laptop
    online.write_text("mobile\n")
    assert "if deferred" not in route(folder, "z@corp.example", WORK)


# -- errors, and the parser ------------------------------------------------------------

def test_a_folder_without_masqmail_conf_is_a_clear_error(tmp_path):
    r = run(["masq-setup", "import-masqmail", tmp_path, tmp_path / "masq"])
    assert r.rc == 66 and b"unable to read" in r.err and b"Traceback" not in r.err, r
    assert not (tmp_path / "masq").exists()


def test_an_existing_masq_toml_is_not_replaced(tmp_path, masq):
    before = open(masq.conf).read()
    r = run(["masq-setup", "import-masqmail", os.path.join(DATA, "0.2"), masq.dir])
    assert r.rc == 64 and b"masq.toml exists" in r.err, r
    assert open(masq.conf).read() == before


def test_unreadable_route_file_is_named(tmp_path):
    source = copy(tmp_path, "0.2", [('connect_route.GWDG = "/etc/masqmail/example.route"',
                                     'connect_route.GWDG = "/etc/masqmail/gone.route"')])
    folder, conf, said = imported(tmp_path, source)
    assert "gone.route: route file not read: No such file or directory" in said


@pytest.mark.parametrize("wrapper, server, tls", [
    ('openssl s_client -quiet -connect pop.isp.example:995 2>/dev/null',
     "pop.isp.example:995", "pop3s"),
    # an open quote: not a tunnel masq can read, so not carried over (no crash)
    ('openssl s_client -connect \\"pop:995', "pop.isp.example:110", "stls")])
def test_a_get_files_wrapper_is_read_as_a_route_files_is(tmp_path, wrapper, server, tls):
    get = data_file("laptop", "isp.get") + f'wrapper = "{wrapper}"\n'.encode()
    source = laptop_copy(tmp_path, files={"isp.get": get})
    folder, conf, said = imported(tmp_path, source)
    account = conf["route"]["isp"]["fetch"][0]
    assert (account["server"], account["tls"]) == (server, tls)
    assert ("wrapper: not carried over: masq-fetch does POP3S" in said) == (tls == "stls"), said


def test_parse_reads_as_masqmail_does():
    text = ('# comment\nhost_name = host.example  # trailing\n'
            'a="quoted \\"x\\" ; y" rest ignored\n'
            'b = unquoted words stop at a space\n  c=on\nd = "" \n')
    got = [(s.key, s.value, s.line) for s in masqmailconf.parse(text)]
    assert got == [("host_name", "host.example", 2), ("a", 'quoted "x" ; y', 3),
                   ("b", "unquoted", 4), ("c", "on", 5), ("d", "", 6)]


def test_booleans_intervals_and_commands():
    assert masqmailconf.boolean("Yes") is True and masqmailconf.boolean("off") is False
    assert masqmailconf.boolean("maybe") is None
    assert masqmailconf.interval("4d") == 345600 and masqmailconf.interval("90") is None
    text, unknown = masqmailconf.transform_command(
        "/usr/bin/procmail -Y -d ${rcpt_local} -a $return_path \\$HOME ${ident}",
        masqmailconf.MDA_VARIABLES)
    assert text == "/usr/bin/procmail -Y -d {user} -a {sender} $HOME ${ident}"
    assert unknown == ["ident"]


def test_list_items_may_come_from_a_file(tmp_path):
    listed = tmp_path / "senders"
    listed.write_text("# who may\nokurth@*\n\n<>\n")
    (tmp_path / "masqmail.conf").write_text(
        'host_name = h.example\nquery_routes.x = "r.route"\n')
    (tmp_path / "r.route").write_text(f'allowed_senders = "a@b.example;{listed};c"\n')
    conf = masqmailconf.convert(str(tmp_path))
    assert conf.routes["x"]["allowed_senders"] == ["a@b.example", "okurth@*", "", "c@*"]


def test_a_pipe_route_keeps_its_command_with_masq_words(tmp_path):
    (tmp_path / "masqmail.conf").write_text(
        'host_name = h.example\npermanent_routes = "uucp.route"\n')
    (tmp_path / "uucp.route").write_text(
        'protocol = pipe\npipe = "/usr/bin/uux - -r gate!rmail (${rcpt})"\n'
        'pipe_fromline = true\nallowed_recipients = "*@uucp.example"\n')
    conf = masqmailconf.convert(str(tmp_path))
    assert conf.routes["uucp"] == {"always": True, "pipe": "/usr/bin/uux - -r gate!rmail ({rcpt})",
                                   "pipe_fromline": True,
                                   "allowed_recipients": ["*@uucp.example"]}


# -- what the import writes: nothing but TOML, secrets first, private when copied ------

def laptop_copy(tmp_path, edit=None, files=None):
    """The laptop configuration, masqmail.conf edited by (old, new) pairs and other
    files given as {name: bytes}."""
    source = copy(tmp_path, "laptop", edit)
    for name, data in (files or {}).items():
        (source / name).write_bytes(data)
    return source


def test_a_value_with_a_newline_never_becomes_a_table_of_its_own(tmp_path):
    # masqmail reads a newline inside quotes as part of the value
    injected = 'a\n[route.x]\nalways = true\npipe = \\"/bin/sh -c id\\"\n#'
    source = laptop_copy(tmp_path, [('connect_route.isp = "/etc/masqmail/isp.route"',
                                     f'connect_route.isp = "{injected}"')])
    folder, conf, said = imported(tmp_path, source)
    assert "x" not in conf["route"] and "\n[route.x]" not in (folder / "masq.toml").read_text()
    assert "masqmail.conf:11: connect_route.isp: not carried over: its value holds the " \
        "control character \\n" in said, said


def test_a_comment_holds_a_newline_of_the_masqmail_folder_escaped(tmp_path):
    source = laptop_copy(tmp_path)
    odd = source.parent / "etc\n[route.y]\nalways = true\n#"
    source.rename(odd)
    folder, conf, said = imported(tmp_path, odd)
    text = (folder / "masq.toml").read_text()
    assert "y" not in conf["route"] and "\n[route.y]" not in text
    assert text.startswith("# masq configuration imported from masqmail's ")
    assert "etc\\n[route.y]\\nalways = true\\n#/masqmail.conf" in text.splitlines()[0]
    assert "\n[route.y]" not in said and "etc\\n[route.y]" in said


@pytest.mark.parametrize("char", [chr(c) for c in range(0x20) if c != 9] + ["\x7f", "\x85"])
def test_every_control_character_is_written_escaped_and_read_back(char):
    value = f'a{char}"b\\c'
    text = f"k = {masqmailconf.toml_value(value)}\n# {masqmailconf.escape(value)}\n" \
        f"{masqmailconf.toml_key(value)} = 1\n"
    assert text.count("\n") == 3 and char not in text.replace("\n", "") or char == "\n"
    assert tomllib.loads(text) == {"k": value, value: 1}


def test_a_control_character_in_a_list_file_line_is_left_out(tmp_path):
    listed = tmp_path / "senders"
    listed.write_bytes(b"ok@*\nbad\x1b[2J@*\nnul\x00@*\n")
    (tmp_path / "masqmail.conf").write_text(
        'host_name = h.example\nquery_routes.x = "r.route"\n')
    (tmp_path / "r.route").write_text(f'allowed_senders = "{listed}"\n')
    conf = masqmailconf.convert(str(tmp_path))
    assert conf.routes["x"]["allowed_senders"] == ["ok@*"]
    assert f"{listed}: bad\\u001b[2J@*: not carried over: a control character" in conf.notes


def test_a_value_that_is_not_utf8_is_left_out_with_a_note(tmp_path):
    source = laptop_copy(tmp_path, files={"isp.route": b'mail_host = "smtp.isp.example:587"\n'
                                          b'helo_name = "caf\xe9.example"\n'})
    folder, conf, said = imported(tmp_path, source)
    assert conf["route"]["isp"]["host"] == "smtp.isp.example:587"
    assert "helo" not in conf["route"]["isp"]
    assert "route.isp.helo: not carried over: caf\\xe9.example is not UTF-8" in said, said


def no_leftovers(folder):
    """Every password_file masq.toml names exists; no temporary file is left."""
    names = os.listdir(folder)
    assert not [n for n in names if ".secret." in n or n.endswith(".tmp")], names
    if "masq.toml" in names:
        with open(folder / "masq.toml", "rb") as f:
            conf = tomllib.load(f)
        for route in conf.get("route", {}).values():
            for table in [route.get("auth", {})] + route.get("fetch", []):
                if "password_file" in table:
                    assert table["password_file"] in names, table


def test_a_password_that_is_not_utf8_is_kept_as_its_bytes(tmp_path):
    get = (data_file("laptop", "isp.get").replace(b'pass = "pop secret"', b'pass = "p\xf6p"'))
    source = laptop_copy(tmp_path, files={"isp.get": get})
    folder, conf, said = imported(tmp_path, source)
    assert conf["route"]["isp"]["fetch"][0]["password_file"] == "isp-pop.secret"
    assert (folder / "isp-pop.secret").read_bytes() == b"p\xf6p\n"
    assert "p\\xf6p" not in said and "p\xf6p" not in said
    no_leftovers(folder)


@pytest.mark.parametrize("secret", ["p\nq", "p\rq", "p\0q"])
def test_a_password_with_a_line_end_is_not_carried_over(tmp_path, secret):
    get = data_file("laptop", "isp.get").replace(b'pass = "pop secret"',
                                                 f'pass = "{secret}"'.encode())
    source = laptop_copy(tmp_path, files={"isp.get": get})
    folder, conf, said = imported(tmp_path, source)
    assert "password_file" not in conf["route"]["isp"]["fetch"][0]
    assert not (folder / "isp-pop.secret").exists()
    # (a CR is read as a line end, as Python reads text)
    assert "isp.get:5: pass: not carried over: its value holds the control character " \
        f"{masqmailconf.escape(secret[1].replace(chr(13), chr(10)))} (a password file holds " \
        "one line)" in said, said
    no_leftovers(folder)


def test_masq_toml_is_written_only_once_the_secrets_are_in_place(tmp_path):
    folder = tmp_path / "masq"
    (folder / "isp.secret").mkdir(parents=True)        # a secret that cannot be written
    r = run(["masq-setup", "import-masqmail", laptop_copy(tmp_path), folder])
    assert r.rc == 73 and b"unable to write" in r.err and b"Traceback" not in r.err, r
    assert not (folder / "masq.toml").exists()
    no_leftovers(folder)


def test_values_read_out_of_files_make_masq_toml_private(tmp_path):
    hostfile = tmp_path / "mailname"
    hostfile.write_text("laptop.example.org\n")
    source = laptop_copy(tmp_path, [('host_name = "laptop.example.org"',
                                     f'host_name = "{hostfile}"')])
    folder, conf, said = imported(tmp_path, source)
    assert conf["hostname"] == "laptop.example.org"
    assert stat.S_IMODE((folder / "masq.toml").stat().st_mode) == 0o640 & ~UMASK
    assert f"masq.toml is mode 0640, not readable by others: it holds what was read from " \
        f"{hostfile} (host_name)" in said, said


def test_a_private_masqmail_file_makes_masq_toml_private(tmp_path):
    source = laptop_copy(tmp_path)
    os.chmod(source / "mobile.route", 0o600)
    folder, conf, said = imported(tmp_path, source)
    assert stat.S_IMODE((folder / "masq.toml").stat().st_mode) == 0o640 & ~UMASK
    assert "mobile.route (not readable by others)" in said


def test_otherwise_masq_toml_has_the_mode_of_a_profiles(tmp_path):
    folder, conf, said = imported(tmp_path, os.path.join(DATA, "0.2"))
    profile = tmp_path / "profile"
    run(["masq-setup", "local-only", profile]).ok()
    mode = stat.S_IMODE((folder / "masq.toml").stat().st_mode)
    assert mode == stat.S_IMODE((profile / "masq.toml").stat().st_mode) == 0o666 & ~UMASK
    assert "not readable by others" not in said
