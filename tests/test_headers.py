"""masq.headers: header sections and address lists, bytes in, values out."""
import io

import pytest

from masq import headers


def section(data):
    return headers.read(io.BytesIO(data).readline)


def test_fields_continuations_and_the_empty_line_are_kept_byte_exact():
    s = section(b"Subject: a\r\n long\r\nTo: b@c\n\nbody\n")
    assert s.fields == [["subject", b"Subject: a\r\n long\r\n"], ["to", b"To: b@c\n"]]
    assert s.tail == b"\n"
    assert s.values("subject") == ["a long"]
    assert s.encode(drop=("to",)) == b"Subject: a\r\n long\r\n\n"


def test_input_ending_inside_the_header_section():
    s = section(b"Subject: a")
    assert s.encode() == b"Subject: a" and s.tail == b""


@pytest.mark.parametrize("data", [b"hello world\nx\n", b"From a Mon Jan 1 10:00:00 2024\n",
                                  b"word\n"])
def test_first_line_not_a_field_means_no_header_section(data):
    s = section(data)
    assert s.fields == [] and s.tail == b"\n" + data.split(b"\n")[0] + b"\n"


def test_a_later_non_field_line_ends_the_section_with_an_empty_line():
    s = section(b"Subject: a\nbody starts\n")
    assert s.encode() == b"Subject: a\n\nbody starts\n"


def test_obsolete_space_before_colon_is_a_field():
    assert section(b"Subject : a\n\n").fields[0][0] == "subject"


@pytest.mark.parametrize("data, line", [(b" cont\n", 1), (b"A: b\nX: \0\n", 2),
                                        (b"A: b\n\xe9t\xe9: x\n", 2), (b"\x01A: b\n", 1)])
def test_malformed(data, line):
    with pytest.raises(headers.HeaderError, match=f"malformed at line {line}"):
        section(data)


def test_a_section_over_the_limit_is_refused():
    with pytest.raises(headers.HeaderError, match="larger than 100 bytes"):
        headers.read(io.BytesIO(b"X: " + b"y" * 200 + b"\n\n").readline, 100)


@pytest.mark.parametrize("text, found", [
    ('Name <a@b>, "Last, First" <c@d>, e@f (comment)', ["a@b", "c@d", "e@f"]),
    ("list: g@h, i@j;, k@l", ["g@h", "i@j", "k@l"]),
    ("undisclosed-recipients:;", []),
    ("<@relay1,@relay2:x@y>", ["x@y"]),
    ('"a b"@c, bob', ['"a b"@c', "bob"]),
    ("=?utf-8?q?J=C3=B6rg?= <j@x>", ["j@x"]),
    ("(a (nested) comment) a@b", ["a@b"]),
    ("x@[192.0.2.1], , ", ["x@[192.0.2.1]"]),
    ("a@b\n\t, c@d", ["a@b", "c@d"]),
])
def test_addresses(text, found):
    assert headers.addresses(text) == found


@pytest.mark.parametrize("text", ["John Smith john@x", "a@b, <c", "a@b>", '"open',
                                  "(open", "g: a@b", "<a@b> trailing"])
def test_addresses_that_do_not_parse(text):
    with pytest.raises(headers.HeaderError):
        headers.addresses(text)
