"""masq.toml: one schema, every key of masq.toml(5) and no other (issue 9).

A misspelt key or table, or a value of the wrong kind, is refused with the
file, the line and the nearest known name, by `masq-setup check` and by
every program at start; a daemon that rereads a bad file keeps the last
good configuration.  The marshal cache is trusted only when it is as safe
as the file itself.
"""
import marshal
import os
import re
import stat

import pytest

from masq import config, log, schema

MAN = os.path.join(os.path.dirname(__file__), "..", "man", "masq.toml.5")


@pytest.fixture(autouse=True)
def own_masq_conf(monkeypatch):
    """config.load() sets $MASQ_CONF in this process: put it back after each test."""
    monkeypatch.delenv("MASQ_CONF", raising=False)


# -- the schema and the page --------------------------------------------------

def man_entries():
    """[(dotted names, kind, entry text)] of the key lists of masq.toml(5)."""
    entries, prefix, current = [], None, None
    with open(MAN) as f:
        for line in f.read().splitlines():
            if line.startswith(".Sh "):
                prefix = None
            elif line.startswith(".Ss "):
                title = line[4:]
                prefix = ("" if title == "Top-level keys" else "route.*."
                          if title.startswith("[route.") else title.strip("[]") + ".")
            elif prefix is not None and line.startswith(".It Cm "):
                m = re.fullmatch(r"\.It Cm (.*?) Pq (.*)", line)
                names = [prefix + n.strip() for n in m.group(1).split(",")]
                current = (names, m.group(2).removesuffix("s") if m.group(2) == "lists"
                           else m.group(2), [])
                entries.append(current)
            elif current is not None and prefix is not None:
                current[2].append(line)
    return [(names, kind, " ".join(text)) for names, kind, text in entries]


def toml(value):
    """A default as masq.toml(5) writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return str(value)


def test_every_key_of_the_schema_is_in_the_man_page_and_no_other():
    documented = {name for names, _, _ in man_entries() for name in names}
    assert documented == set(schema.KEYS)


def test_the_man_page_gives_each_key_its_kind_default_and_words():
    for names, kind, text in man_entries():
        keys = [schema.KEYS[name] for name in names]
        assert {key.kind for key in keys} == {kind}, names
        defaults = [toml(key.default) for key in keys if key.default is not None]
        if len(names) == 1 and defaults:
            assert f"Default: {defaults[0]}" in text, names
        elif defaults:
            assert "Defaults: " + ", ".join(defaults[:-1]) + " and " + defaults[-1] in text
        for key in keys:
            for word in key.choices:
                assert f'"{word}"' in text, (names, word)


def test_the_readers_take_their_defaults_from_the_schema():
    from masq import clientroute, smtpdconfig
    empty = config.Config("/nonexistent/masq.toml", {})
    assert smtpdconfig.read_settings(empty) == \
        {k: v.default for k, v in schema.table_keys("smtpd.").items()}
    assert clientroute.DEFAULT_TIMEOUTS["data_timeout"] == \
        schema.KEYS["route.*.data_timeout"].default
    assert clientroute.TLS_MODES == schema.KEYS["route.*.tls"].choices


SAMPLES = {"integer": 1, "seconds": 1.5, "boolean": True, "list": ["127.0.0.1"]}


def sample(name, key):
    """A good value of the key's kind, as TOML."""
    if key.choices:
        return toml(key.choices[-1])
    if name == "route.*.auth":
        return '{ user = "me", password_file = "isp.secret" }'
    if name == "route.*.rewrite_sender":
        return '{ "*@laptop.example.org" = "me@isp.example" }'
    if name == "route.*.fetch":
        return '[{ server = "pop.isp.example", user = "me", password_file = "pop.secret" }]'
    return toml(SAMPLES.get(key.kind, "x"))


def test_every_key_of_the_man_page_is_accepted(masq):
    tables = {}
    for names, _, _ in man_entries():
        for name in names:
            table, _, key = name.rpartition(".")
            # a route that pipes has no host or wrapper (masq.pipe): one of its own
            route = "route.gateway" if key.startswith("pipe") else "route.isp"
            tables.setdefault(table.replace("route.*", route), []).append(
                f"{key} = {sample(name, schema.KEYS[name])}")
    text = "\n".join(tables.pop(""))
    text += "".join(f"\n[{t}]\n" + "\n".join(lines) for t, lines in tables.items())
    masq.set_config(text + "\n")
    masq.run(["masq-setup", "check"]).ok()
    conf = config.load(masq.conf)
    assert conf.get("queue.retry_min") == 1.5
    assert dict(conf.routes)["isp"]["connect_error_fail"] is True


# -- misspellings and wrong kinds, with their line -----------------------------

# Each case is appended to the masq-setup configuration; "# <-" marks the line
# the error must name, and the text what it must say.
MISSPELLINGS = [
    ('[route.dead]\nhots = "smtp.example"  # <-', "unknown key hots in [route.dead] "
     "(did you mean host?)"),
    ('[route.dead]\nhost = "smtp.example"\ndenied_recipent = ["*@x"]  # <-',
     "unknown key denied_recipent in [route.dead] (did you mean denied_recipients?)"),
    ("[route.dead]\nmax_sise = 1000  # <-", "(did you mean max_size?)"),
    ("[quue]  # <-\nretry_min = 60", "unknown table [quue] (did you mean [queue]?)"),
    ("[loacl]  # <-\nmailbox = 'mbox'", "unknown table [loacl] (did you mean [local]?)"),
    ("[stmpd]  # <-\nmax_errors = 3", "unknown table [stmpd] (did you mean [smtpd]?)"),
    ("[local]\nmailbx = 'mbox'  # <-", "unknown key mailbx in [local] (did you mean mailbox?)"),
    ("[local]\nrecipient_delimeter = '-'  # <-", "(did you mean recipient_delimiter?)"),
    ("[queue]\nretry_mim = 60  # <-", "unknown key retry_mim in [queue] (did you mean retry_min?)"),
    ("[queue]\nwarn_afer = 0  # <-", "(did you mean warn_after?)"),
    ("[online]\ndetcet = 'file'  # <-", "(did you mean detect?)"),
    ("[smtpd]\nrelay_net = ['10.0.0.0/8']  # <-", "(did you mean relay_nets?)"),
    ("[smtpd]\nmax_recipient = 5  # <-", "(did you mean max_recipients?)"),
    ("[route.isp]\nallowed_sender = ['*@a.example']  # <-", "(did you mean allowed_senders?)"),
    ("[route.isp]\nrewrite_senders = { '*' = 'me@a.example' }  # <-",
     "(did you mean rewrite_sender?)"),
    ("[route.isp]\ntls_verfy = false  # <-", "(did you mean tls_verify?)"),
    ("[route.isp]\nhost = 'h.example'\nauth = { user = 'me', pasword_file = 's' }  # <-",
     "(did you mean password_file?)"),
    ("[route.isp]\nconect_timeout = 5  # <-", "(did you mean connect_timeout?)"),
    ("[route.isp]\nlast_rout = true  # <-", "(did you mean last_route?)"),
    ("[route.isp.x]  # <-\nhost = 'h'", "unknown key x in [route.isp]"),
    # top-level keys: placed before the first table below
    ('hostnme = "mail.example"  # <-', "unknown key hostnme (did you mean hostname?)"),
    ("max_sise = 10  # <-", "unknown key max_sise (did you mean max_size?)"),
]

WRONG_KINDS = [
    ('[queue]\nretry_min = "5m"  # <-',
     'queue.retry_min must be a number of seconds, not the string "5m"'),
    ('[route.lan]\nhost = "mail.lan.example"\nallowed_recipients = "*@lan.example"  # <-',
     'route.lan.allowed_recipients must be a list of strings, not the string '
     '"*@lan.example" (write ["*@lan.example"])'),
    ("[local]\ndeliver = 'chlid'  # <-", '(did you mean "child"?)'),
    ("[route.isp]\ntls = 'starttsl'  # <-", '(did you mean "starttls"?)'),
    ("[route.isp]\nport = '587'  # <-", "route.isp.port must be a whole number"),
    ("[smtpd]\nauth_without_tls = 1  # <-", "must be true or false, not the number 1"),
    ("max_size = -1  # <-", "max_size must be 0 or more, not -1"),
]


def write_case(masq, case):
    """The masq-setup file with the case added (top-level keys first); the marked line."""
    with open(masq.conf) as f:
        base = f.read()
    header, _, rest = case.partition("\n")
    if case.startswith("[") and f"\n{header}\n" in base:     # into the table there
        text = base.replace(f"\n{header}\n", f"\n{header}\n{rest}\n")
    elif case.startswith("["):
        text = base + "\n" + case + "\n"
    else:                   # a top-level key: instead of the one there, before any table
        key = case.split("=")[0]
        text = case + "\n" + "".join(line for line in base.splitlines(True)
                                      if not line.startswith(key))
    masq.set_config(text)
    marked = [n for n, line in enumerate(text.splitlines(), 1) if "# <-" in line]
    return marked[0]


@pytest.mark.parametrize("case,said", MISSPELLINGS + WRONG_KINDS)
def test_misspelt_or_wrong_is_refused_with_its_line(masq, case, said):
    line = write_case(masq, case)
    where = f"{masq.conf}:{line}: "
    r = masq.run(["masq-setup", "check", masq.conf])
    assert r.rc == 78, r
    assert f"masq-setup: {where}".encode() in r.err and said.encode() in r.err, r
    r = masq.run(["masq-send", "--once"])          # runq: every program refuses to start
    assert r.rc == 78, r
    assert f"masq-send: fatal: {where}".encode() in r.err and said.encode() in r.err, r
    assert not os.path.exists(cache_of(masq))      # a file with a problem is never cached


def test_check_lists_every_problem_and_programs_say_how_many_more(masq):
    masq.set_config('hostnme = "x"\n[quue]\n[route.dead]\nhots = "h"\n')
    r = masq.run(["masq-setup", "check"])
    assert r.rc == 78 and len(r.err.splitlines()) == 3, r
    r = masq.run(["masq-send", "--once"])
    assert r.rc == 78 and b"(and 2 more: masq-setup check" in r.err, r


def test_check_of_a_good_file_says_so(masq):
    r = masq.run(["masq-setup", "check"]).ok()
    assert r.out == f"masq-setup: {masq.conf}: no problems\n".encode()


def test_check_reports_a_relay_net_that_is_no_network(masq):
    masq.config('[smtpd]\nrelay_nets = ["10.0.0.300/8"]')
    r = masq.run(["masq-setup", "check"])
    assert r.rc == 78 and b"smtpd.relay_nets: '10.0.0.300/8'" in r.err, r


# -- retry_min = "5m": refused at start and on reload, no traceback ------------

def test_issue9_retry_min_5m_is_refused_at_start_without_a_traceback(masq):
    masq.config('[queue]\nretry_min = "5m"')
    for argv in (["masq-send", "--once"], ["masq-send"], [masq.bin("runq")],
                 [masq.bin("sendmail"), "-odq", "bob@localhost"]):
        r = masq.run(argv, input=b"Subject: x\n\nhi\n", timeout=20)
        assert r.rc == 78, r
        assert b"retry_min must be a number of seconds" in r.err and b"Traceback" not in r.err, r


def test_issue9_reload_of_a_bad_file_keeps_the_last_good_one_and_logs(masq, monkeypatch):
    monkeypatch.setattr(log, "_target", None)
    good = config.load(masq.conf)
    log.setup(good)
    try:
        masq.config('[queue]\nretry_min = "5m"')
        conf = config.reload(good)
        assert conf is good and conf.get("queue.retry_min") == 300
        assert f'warning: {masq.conf}:'.encode().decode() in masq.log()
        assert "retry_min must be a number of seconds" in masq.log()
        assert "keeping the configuration read before" in masq.log()
        with open(masq.conf) as f:
            text = f.read().replace('retry_min = "5m"', "retry_min = 60")
        masq.set_config(text)
        assert config.reload(good).get("queue.retry_min") == 60
    finally:
        os.close(log._target[1])


# -- the cache ----------------------------------------------------------------

def cache_of(masq):
    return os.path.join(masq.dir, ".masq.toml.cache")


def plant(masq, mode=0o644):
    """Rewrite the current cache to say online.command = "evil" with a mode."""
    config.load(masq.conf)
    path = cache_of(masq)
    with open(path, "rb") as f:
        cached = list(marshal.load(f))
    cached[1] = dict(cached[1], online={"detect": "command", "command": "evil"})
    os.unlink(path)
    with open(path, "wb") as f:
        f.write(marshal.dumps(tuple(cached)))
    os.chmod(path, mode)
    return path


def test_the_cache_is_used_when_owned_by_the_files_owner(masq):
    plant(masq)         # the planting works: the negative tests below mean something
    assert config.load(masq.conf).get("online.command") == "evil"


@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_issue9_a_cache_others_may_write_is_not_read(masq, mode):
    plant(masq, mode)
    assert config.load(masq.conf).get("online.command") == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the cache another owner")
def test_issue9_a_cache_of_another_owner_is_not_read(masq):
    os.chown(plant(masq), 65534, 65534)
    assert config.load(masq.conf).get("online.command") == ""


def test_issue9_a_cache_that_is_a_symbolic_link_is_not_followed(masq):
    path = plant(masq)
    os.rename(path, path + ".elsewhere")
    os.symlink(path + ".elsewhere", path)
    assert config.load(masq.conf).get("online.command") == ""


@pytest.mark.parametrize("mode,expected", [(0o600, 0o600), (0o640, 0o640), (0o664, 0o644)])
def test_issue9_the_cache_is_written_with_the_files_mode(masq, mode, expected):
    os.chmod(masq.conf, mode)
    config.load(masq.conf)
    st = os.stat(cache_of(masq))
    assert stat.S_IMODE(st.st_mode) == expected
    assert (st.st_uid, st.st_gid) == (os.stat(masq.conf).st_uid, os.stat(masq.conf).st_gid)


@pytest.mark.parametrize("args", [
    ["local-only", "--hostname", 'x"\n[route.evil]\nalways = true\n#'],
    ["smarthost", "--relay", "127.0.0.1:25", "--user", "a\n[route.evil]"],
], ids=["hostname", "user"])
def test_setup_refuses_a_name_that_would_write_toml_of_its_own(tmp_path, args):
    from conftest import BIN, run
    folder = str(tmp_path / "m")
    r = run([os.path.join(BIN, "masq-setup"), args[0], folder, *args[1:]], input=b"secret\n")
    assert r.rc == 64 and b"Traceback" not in r.err, r
    assert not os.path.exists(os.path.join(folder, "masq.toml"))
