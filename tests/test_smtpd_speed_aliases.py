"""The aliases table masq-smtpd's RCPT reads: kept between sessions, never stale."""
import os

from masq import config, localpart, smtpdconfig


def _counting_loads(monkeypatch):
    """Start with nothing kept; count the reads of the aliases file."""
    monkeypatch.setattr(smtpdconfig, "_aliases", None)
    loads = []
    real = localpart.load_aliases

    def load(conf, strict=False):
        loads.append(conf.path("aliases"))
        return real(conf, strict)
    monkeypatch.setattr(localpart, "load_aliases", load)
    return loads


def _write(path, text):
    with open(path, "r+" if os.path.exists(path) else "w", encoding="ascii") as f:
        f.write(text)
        f.truncate()


def test_unchanged_aliases_are_read_once(masq, monkeypatch):
    loads = _counting_loads(monkeypatch)
    monkeypatch.setattr(smtpdconfig, "RECENT_CHANGE_NS", 0)
    conf = config.load(masq.conf)
    first = smtpdconfig.aliases(conf)
    assert smtpdconfig.aliases(conf) is first
    assert len(loads) == 1


def test_changed_aliases_are_read_again(masq, monkeypatch):
    loads = _counting_loads(monkeypatch)
    monkeypatch.setattr(smtpdconfig, "RECENT_CHANGE_NS", 0)
    conf = config.load(masq.conf)
    path = conf.path("aliases")
    _write(path, "alice: bob\n")
    assert "alice" in smtpdconfig.aliases(conf)
    before = os.stat(path)
    _write(path, "carol: bob\n")      # same size, same file, its old mtime put back
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    table = smtpdconfig.aliases(conf)
    assert "carol" in table and "alice" not in table
    assert len(loads) == 2


def test_a_file_changed_just_now_is_not_kept(masq, monkeypatch):
    # its next change could come within the same timestamp and leave no trace
    loads = _counting_loads(monkeypatch)
    conf = config.load(masq.conf)
    _write(conf.path("aliases"), "alice: bob\n")
    smtpdconfig.aliases(conf)
    smtpdconfig.aliases(conf)
    assert len(loads) == 2


def test_unreadable_aliases_are_an_error_each_time(masq, monkeypatch):
    _counting_loads(monkeypatch)
    monkeypatch.setattr(smtpdconfig, "RECENT_CHANGE_NS", 0)
    conf = config.load(masq.conf)
    path = conf.path("aliases")
    smtpdconfig.aliases(conf)
    os.remove(path)
    os.mkdir(path)                  # reading a folder fails, even as root
    for _ in range(2):
        try:
            smtpdconfig.aliases(conf)
        except localpart.aliases.AliasError as e:
            assert e.temporary
        else:
            raise AssertionError("an unreadable aliases file was taken")
