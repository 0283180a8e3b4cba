"""IP addresses and networks as text, and the peer on fds 0 and 1.

Parsed here, not with ipaddress: importing it costs a quarter of a
masq-smtpd start under tcpserver.  An address is (4 or 6, integer); an
IPv4-mapped IPv6 address is IPv4.  The peer is what tcp-environ(5) says
(TCPREMOTEIP, TCPREMOTEHOST), else what the socket on fd 0 says; never DNS.
"""
import os
import stat

HOST_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def in_nets(ip, nets):
    """True when the IP (text, "IPv6:" allowed) is inside one of the networks (CIDR strings)."""
    addr = parse_ip(ip.removeprefix("IPv6:")) if ip else None
    if addr is None:
        return False
    for net in nets:
        base, _, length = str(net).partition("/")
        network = parse_ip(base)
        if network is None or (length and not length.isdigit()):
            continue
        bits = 32 if network[0] == 4 else 128
        length = int(length) if length else bits
        if network[0] != addr[0] or length > bits:
            continue
        shift = bits - length
        if network[1] >> shift == addr[1] >> shift:
            return True
    return False


def parse_ip(text):
    """(4 or 6, integer) of an IP address; an IPv4-mapped IPv6 address is IPv4."""
    if ":" not in text:
        parts = text.split(".")
        if len(parts) != 4 or not all(p.isdigit() and p.isascii() and len(p) <= 3
                                      and int(p) < 256 for p in parts):
            return None
        return 4, int.from_bytes(bytes(int(p) for p in parts), "big")
    head, double, tail = text.partition("::")
    groups = [[g for g in side.split(":")] if side else [] for side in (head, tail)]
    if groups[1] and "." in groups[1][-1] or not double and groups[0] and "." in groups[0][-1]:
        side = groups[1] if groups[1] else groups[0]
        v4 = parse_ip(side.pop())
        if v4 is None or v4[0] != 4:
            return None
        side += [f"{v4[1] >> 16:x}", f"{v4[1] & 0xffff:x}"]
    count = len(groups[0]) + len(groups[1])
    if "::" in tail or (double and count > 7) or (not double and count != 8):
        return None
    words = groups[0] + ["0"] * (8 - count) + groups[1]
    value = 0
    for word in words:
        if not (1 <= len(word) <= 4) or not all(c in "0123456789abcdefABCDEF" for c in word):
            return None
        value = value << 16 | int(word, 16)
    if value >> 32 == 0xffff:
        return 4, value & 0xffffffff
    return 6, value


def client_address(ip):
    """(client IP, is a local user): TCPREMOTEIP, else the peer of a socket on fd 0."""
    if ip is not None:
        return ip, False
    if not stat.S_ISSOCK(os.fstat(0).st_mode):
        return "", True             # pipes or a terminal: a local user (sendmail -bs)
    import socket                   # it imports enum: only inetd and systemd pay for it
    try:
        with socket.socket(fileno=os.dup(0)) as s:
            peer = s.getpeername()
    except OSError:
        return "", False
    if isinstance(peer, tuple):
        return peer[0], False
    return "", True                 # a Unix socket: someone on this host


def host_name(name):
    """TCPREMOTEHOST if it looks like a host name (it comes from the DNS), else unknown."""
    if not name or len(name) > 255 or not all(c in HOST_CHARACTERS for c in name):
        return "unknown"
    return name


def stdio_is_one_socket():
    """True when fds 0 and 1 are the same socket (tcpserver, inetd, systemd Accept=yes)."""
    try:
        st0, st1 = os.fstat(0), os.fstat(1)
    except OSError:
        return False
    return stat.S_ISSOCK(st0.st_mode) and (st0.st_dev, st0.st_ino) == (st1.st_dev, st1.st_ino)


def prefix(ip, v6_length, v4_length=None):
    """An IPv6 address as its first v6_length bits ("2001:db8:0:0:0:0:0:0/64"); an IPv4
    one as its first v4_length bits ("192.0.2.0/24"), as it is without v4_length."""
    addr = parse_ip(ip.removeprefix("IPv6:"))
    if addr is None or addr[0] == 4 and v4_length is None:
        return ip
    if addr[0] == 4:
        value = addr[1] >> (32 - v4_length) << (32 - v4_length)
        return ".".join(str(value >> shift & 0xff) for shift in (24, 16, 8, 0)) + \
            f"/{v4_length}"
    value = addr[1] >> (128 - v6_length) << (128 - v6_length)
    words = [f"{(value >> (112 - 16 * i)) & 0xffff:x}" for i in range(8)]
    return ":".join(words) + f"/{v6_length}"


def host_port(text, default=None):
    """(host, port) from "host", "host:port", "[v6]:port" or a bare IPv6 address;
    the port is `default` where the text names none.  A bad port raises ValueError."""
    text = str(text).strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, default
