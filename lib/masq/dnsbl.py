"""DNS block and allow lists (DNSBL, DNSWL): is a client's address listed in a zone?

RFC 5782: the address is asked for as a name in the zone, IPv4 with its
octets reversed (192.0.2.7 in zen.example: 7.2.0.192.zen.example), IPv6
with its 32 nibbles reversed.  An A record in 127.0.0.0/8 means listed,
and the zone's TXT record at that name says why; no such name (NXDOMAIN)
or no A record means not listed.  An answer in 127.255.255.0/24 is a
list's way to refuse the query (Spamhaus: a public resolver, over quota),
and an answer outside 127/8 is no answer a list gives: both, a timeout
and a server failure are QueryError, the caller lets the client through.

Lookups go to `dns_servers` with masq.mx's resolver, each bounded by
LOOKUP_SECONDS over all servers.  A Lists object belongs to one session
and remembers each answer (failures too) for its life: a client with 50
recipients costs one query per zone, not 50.  dnspython is imported at
the first lookup, never by a session whose configuration names no zone.
"""
from masq import Error, net

LOOKUP_SECONDS = 5              # one zone's answer, all servers and retries
REASON_MAX_CHARS = 200          # of a zone's TXT reason, in our reply and the log


class QueryError(Error):
    """The zone could not be asked, or answered with an error code."""

    code = 75
    temporary = True


def query_name(ip, zone):
    """The name to ask for: reversed octets or nibbles, then the zone; None if no IP."""
    parsed = net.parse_ip(ip.removeprefix("IPv6:")) if ip else None
    if parsed is None:
        return None
    family, value = parsed
    if family == 4:
        labels = [str(value >> shift & 0xff) for shift in (0, 8, 16, 24)]
    else:
        labels = [f"{value >> shift & 0xf:x}" for shift in range(0, 128, 4)]
    return ".".join(labels) + "." + zone.strip(".")


def clean_reason(text):
    """A TXT string safe inside an SMTP reply (ASCII) and a log line."""
    from masq import log
    text = "".join(c if c.isascii() else "?" for c in " ".join(text.split()))
    return log.clean(text, REASON_MAX_CHARS)


class Lists:
    """The answers of one session's lookups, asked once each."""

    def __init__(self, dns_servers=None):
        self.dns_servers = dns_servers
        self.resolver = None
        self.answers = {}           # (ip, zone) -> reason text, None, or a QueryError

    def listed(self, ip, zone):
        """The zone's reason when the IP is listed ("listed by ZONE" without a TXT),
        None when it is not; QueryError when the zone cannot tell."""
        key = (ip, zone)
        if key not in self.answers:
            try:
                self.answers[key] = self._ask(ip, zone)
            except QueryError as e:
                self.answers[key] = e
        answer = self.answers[key]
        if isinstance(answer, QueryError):
            raise answer
        return answer

    def _ask(self, ip, zone):
        import dns.exception        # costly: only a session with a zone to ask
        import dns.resolver
        name = query_name(ip, zone)
        if name is None:
            return None
        from masq import mx
        if self.resolver is None:
            self.resolver = mx.resolver(self.dns_servers)
            self.resolver.lifetime = LOOKUP_SECONDS
            self.resolver.timeout = LOOKUP_SECONDS / 2
        try:
            codes = [r.address for r in self.resolver.resolve(name, "A", search=False)]
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.DNSException as e:
            raise QueryError(f"{name}: {mx.why(e)}") from None
        if any(not c.startswith("127.") or c.startswith("127.255.255.") for c in codes):
            raise QueryError(f"{name}: the list answered {', '.join(codes)}, an error "
                               "code, not a listing")
        try:
            texts = [b"".join(r.strings).decode("utf-8", "replace")
                     for r in self.resolver.resolve(name, "TXT", search=False)]
        except dns.exception.DNSException:
            texts = []
        return clean_reason(texts[0]) if texts and texts[0].strip() else f"listed by {zone}"
