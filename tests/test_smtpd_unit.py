"""masq.smtp: the DATA decoder and command parsing, bytes in, bytes out."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from masq import smtp


class Chunks:
    """A Reader fed from a list of chunks, as a socket delivers them."""

    def __init__(self, chunks):
        self.chunks = list(chunks)
        self.buf = b""
        self.eof = False

    def fill(self):
        if not self.chunks:
            self.eof = True
            raise smtp.ConnectionLost("end")
        self.buf += self.chunks.pop(0)

    def rest(self):
        return self.buf + b"".join(self.chunks)


def split(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points + [len(data)]:
        pieces.append(data[last:p])
        last = p
    return [p for p in pieces if p]


def decode(wire, cuts=()):
    reader = Chunks(split(wire, cuts))
    stream = smtp.DataStream(reader)
    out = b""
    while chunk := stream.read(65536):
        out += chunk
    return out, reader.rest()


def stuff(lines):
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines) + b".\r\n"


line = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@given(st.lists(line, max_size=20), st.lists(st.integers(min_value=0), max_size=10))
def test_dot_stuffing_round_trip_whatever_the_chunks(lines, cuts):
    wire = stuff(lines) + b"NEXT COMMAND\r\n"
    out, rest = decode(wire, cuts)
    assert out == b"".join(line + b"\n" for line in lines)
    assert rest == b"NEXT COMMAND\r\n"


@pytest.mark.parametrize("wire", [b"a\nb\r\n.\r\n", b"a\rb\r\n.\r\n", b"a\r\n.\n.\r\n",
                                  b"a\n.\n\r\n.\r\n", b"a\r.\r\r\n.\r\n"])
def test_bare_line_ends_raise(wire):
    with pytest.raises(smtp.BareLineEndError):
        decode(wire)


@given(st.sampled_from([b"a\n.\n", b"x\r.\r", b"\n.\r\n", b"\r\n.\n"]),
       st.lists(st.integers(min_value=0), max_size=5))
def test_drain_ends_only_at_crlf_dot_crlf(smuggled, cuts):
    wire = b"start\r\n" + smuggled + b"MAIL FROM:<x@y>\r\n.\r\nQUIT\r\n"
    reader = Chunks(split(wire, cuts))
    stream = smtp.DataStream(reader)
    with pytest.raises(smtp.BareLineEndError):
        while stream.read():
            pass
    stream.drain()
    assert reader.rest() == b"QUIT\r\n"


def test_a_long_line_is_passed_in_pieces_and_a_crlf_never_split():
    wire = b"x" * (smtp.PARTIAL_LINE_BYTES - 1) + b"\r\n.\r\n"
    out, rest = decode(wire, [smtp.PARTIAL_LINE_BYTES])
    assert out == b"x" * (smtp.PARTIAL_LINE_BYTES - 1) + b"\n" and rest == b""


def test_chunk_decoder_keeps_a_cr_for_the_next_chunk():
    d = smtp.ChunkDecoder()
    assert d.feed(b"a\r") + d.feed(b"\nb\r\n", last=True) == b"a\nb\n"
    with pytest.raises(smtp.BareLineEndError):
        smtp.ChunkDecoder().feed(b"a\r", last=True)


@pytest.mark.parametrize("arg, path, params", [
    ("FROM:<a@b>", "a@b", {}), ("from: <a@b> SIZE=10 body=8bitmime", "a@b",
                                {"SIZE": "10", "BODY": "8bitmime"}),
    ("FROM:<>", "", {}), ('FROM:<"a>b"@c>', '"a>b"@c', {}),
    ("FROM:<@x,@y:a@b> SMTPUTF8", "a@b", {"SMTPUTF8": None}),
])
def test_path_and_params(arg, path, params):
    assert smtp.path_and_params(arg, "FROM") == (path, params)


@pytest.mark.parametrize("arg", ["FROM:a@b", "FROM:<a@b", "FROM:<a@b>x", "TO:<a@b>",
                                 "FROM:<a@b> SIZE=", "FROM:<a@b> A A", "FROM:<@x>"])
def test_path_and_params_refuses(arg):
    with pytest.raises(smtp.ProtocolError):
        smtp.path_and_params(arg, "FROM")


@pytest.mark.parametrize("line", [b"NOOP\n", b"NO\rOP\r\n", b"NOOP\r\r\n", b"\xff\r\n"])
def test_command_refuses_bad_lines(line):
    with pytest.raises(smtp.ProtocolError):
        smtp.command(line)


@given(st.one_of(st.ip_addresses(), st.integers(0, 2**32 - 1)),
       st.integers(0, 128))
def test_parse_ip_and_in_nets_agree_with_ipaddress(addr, length):
    import ipaddress

    from masq.net import in_nets, parse_ip
    addr = ipaddress.ip_address(addr)
    text = addr.compressed if isinstance(addr, ipaddress.IPv4Address) or addr.ipv4_mapped \
        is None else f"::ffff:{addr.ipv4_mapped}"
    real = addr.ipv4_mapped if addr.version == 6 and addr.ipv4_mapped else addr
    assert parse_ip(text) == (real.version, int(real))
    assert parse_ip(addr.exploded) == (real.version, int(real))
    length = min(length, real.max_prefixlen)
    net = ipaddress.ip_network(f"{real}/{length}", strict=False)
    assert in_nets(text, [str(net)])
    other = ipaddress.ip_address(int(real) ^ (1 << (real.max_prefixlen - 1)))
    assert in_nets(str(other), [str(net)]) == (other in net)


@pytest.mark.parametrize("text", ["1.2.3", "1.2.3.256", "1::2::3", "1:2:3:4:5:6:7", "::g",
                                  "1.2.3.4.5", "12345::", "", "::1.2.3", "1:2:3:4:5:6:7:8:9"])
def test_parse_ip_refuses(text):
    from masq.net import parse_ip
    assert parse_ip(text) is None
