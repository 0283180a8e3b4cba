"""masq.aliases: parsing, expansion and checking of an /etc/aliases file."""
import pytest

from masq import aliases
from masq.aliases import AliasError


def load(tmp_path, text, local_domains=("localhost", "test.example")):
    path = tmp_path / "aliases"
    path.write_text(text)
    return aliases.load(str(path), local_domains)


def check(tmp_path, text):
    path = tmp_path / "aliases"
    path.write_text(text)
    return aliases.check(str(path))


def test_list_continuation_comments_and_case(tmp_path):
    table = load(tmp_path, "# staff\nStaff: Bob,\n carol,\n\n# inside\n\tdave@Remote.Example\n")
    assert "STAFF" in table and "bob" not in table
    assert table.expand("staff") == ["bob", "carol", "dave@remote.example"]
    assert table.expand("Nobody") == ["nobody"]


def test_quoted_targets_pipes_files_and_includes(tmp_path):
    (tmp_path / "members").write_text("# members\nx, y\n\nz\n")
    table = load(tmp_path, 'a: "|grep -q a, b", /var/mail/a, /srv/maildir/, :include:members, '
                           '"john doe"@remote.example\n')
    assert table.expand("a") == ["|grep -q a, b", "/var/mail/a", "/srv/maildir/", "x", "y", "z",
                                 '"john doe"@remote.example']
    assert [aliases.kind(t) for t in table.expand("a")] == [
        "pipe", "file", "file", "local", "local", "local", "remote"]


def test_local_domain_addresses_expand_again(tmp_path):
    table = load(tmp_path, "a: b@TEST.example, c@other.example\nb: bob\n")
    assert table.expand("a") == ["bob", "c@other.example"]


def test_cycles_and_self_reference_end_in_a_mailbox(tmp_path):
    table = load(tmp_path, "a: b\nb: c\nc: a, carol\nroot: \\root, bob\nme: me\n")
    assert table.expand("a") == ["a", "carol"]
    assert table.expand("b") == ["b", "carol"]
    assert table.expand("root") == ["root", "bob"]
    assert table.expand("me") == ["me"]


def test_repeats_are_delivered_once(tmp_path):
    table = load(tmp_path, "a: bob, b, BOB\nb: bob, x@r.example, X@R.EXAMPLE\n")
    assert table.expand("a") == ["bob", "x@r.example"]


def test_depth_and_size_limits(tmp_path):
    chain = "".join(f"a{i}: a{i + 1}\n" for i in range(aliases.MAX_DEPTH + 5))
    with pytest.raises(AliasError) as e:
        load(tmp_path, chain).expand("a0")
    assert not e.value.temporary and "deeper" in str(e.value)
    diamond = "".join(f"d{i}: d{i + 1}a, d{i + 1}b\nd{i + 1}a: d{i + 1}\nd{i + 1}b: d{i + 1}\n"
                      for i in range(0, 30, 1))
    with pytest.raises(AliasError):
        load(tmp_path, diamond).expand("d0")


def test_missing_include_is_temporary(tmp_path):
    with pytest.raises(AliasError) as e:
        load(tmp_path, "a: :include:/nonexistent/list\n").expand("a")
    assert e.value.temporary


def test_absent_file_means_no_aliases(tmp_path):
    table = aliases.load(str(tmp_path / "none"))
    assert len(table) == 0 and table.expand("root") == ["root"]
    assert aliases.check(str(tmp_path / "none")) == []


def test_first_entry_wins_and_bad_lines_are_skipped(tmp_path):
    table = load(tmp_path, "a: one\na: two\nbroken line\nb: \"open\nc: ok\n")
    assert table.expand("a") == ["one"]
    assert "b" not in table and table.expand("c") == ["ok"]


def test_check_reports_every_bad_line(tmp_path):
    (tmp_path / "inc").write_text("fine\nbad address@\n")
    problems = check(tmp_path, "\n".join([
        "# comment",                        # 1
        "good: bob, carol@remote.example,", # 2
        "  dave",                           # 3
        "no colon here",                    # 4
        "empty:",                           # 5
        "bad: bob@, ok",                    # 6
        "quote: \"never closed",            # 7
        "good: again",                      # 8
        "pipe: |",                          # 9
        "inc: :include:missing",            # 10
        "inc2: :include:inc",               # 11
        "two words: x",                     # 12
        "",
    ]))
    numbers = [n for n, _ in problems]
    assert numbers == [4, 5, 6, 7, 8, 9, 10, 11, 12]
    text = dict(problems)
    assert "no colon" in text[4]
    assert "no targets" in text[5]
    assert "bad address bob@" in text[6]
    assert "unterminated quote" in text[7]
    assert "duplicate alias good (first on line 2" in text[8]
    assert "empty command" in text[9]
    assert "include file" in text[10] and "missing" in text[10]
    assert "line 2: bad address" in text[11]
    assert "bad alias name" in text[12]


def test_check_of_a_good_file_is_empty(tmp_path):
    assert check(tmp_path, "postmaster: root\nMAILER-DAEMON: postmaster\n"
                           "root: \\root, \"|/usr/bin/logger -t mail\"\n") == []


def test_continuation_without_entry(tmp_path):
    assert check(tmp_path, "  stray\n") == [(1, "continuation line without an entry above it")]
