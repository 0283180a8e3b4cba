"""IP addresses and networks as text: parse, and test membership.

Parsed here, not with ipaddress: importing it costs a quarter of a
masq-smtpd start under tcpserver.  An address is (4 or 6, integer); an
IPv4-mapped IPv6 address is IPv4.
"""


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
