"""Where mail for a domain goes: MX lookup with dnspython (RFC 5321 section 5.1).

`lookup(domain, dns_servers=None)` returns the hosts to try, best first, as a
list of `MXHost(name, preference, addresses)`:

- MX records in preference order, equal preferences shuffled (section 5.1:
  "the order should be randomized" among equals);
- no MX record (the name exists): the domain itself, preference 0 (the
  "implicit MX");
- the addresses of each host, A then AAAA; a host whose name does not
  resolve keeps an empty list and the caller skips it.

A null MX (RFC 7505: one MX record whose exchange is ".") and a domain that
does not exist raise `MXError(..., temporary=False)`; a server failure or a
timeout raises it with `temporary=True`.  `dns_servers` is a list of "ip" or
"ip:port" ("[v6]:port" for IPv6 with a port); None uses the system resolver.

dnspython (and random) are imported only on the path that needs them.
"""
from masq import Error, net

DNS_LIFETIME_SECONDS = 20       # a whole query, all servers and retries


class MXError(Error):
    """No usable host for a domain; `temporary` says whether to retry."""

    code = 111


class MXHost:
    """One host to try: its name, MX preference and addresses (strings)."""

    def __init__(self, name, preference, addresses):
        self.name, self.preference, self.addresses = name, preference, addresses

    def __repr__(self):
        return f"MXHost({self.name!r}, {self.preference}, {self.addresses!r})"


def resolver(dns_servers=None):
    """A dnspython resolver asking `dns_servers`, or the system's."""
    import dns.resolver     # costly: only when DNS is asked
    if not dns_servers:
        res = dns.resolver.Resolver()
    else:
        import dns.nameserver
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = [dns.nameserver.Do53Nameserver(ip, port)
                           for ip, port in (net.host_port(t, 53) for t in dns_servers)]
    res.lifetime = DNS_LIFETIME_SECONDS
    return res


def lookup(domain, dns_servers=None):
    """The hosts to try for `domain`, best first; raises MXError."""
    import random       # these are costly, and only needed for a lookup
    import dns.exception
    import dns.rdatatype
    import dns.resolver
    res = resolver(dns_servers)
    domain = domain.rstrip(".")
    try:
        answer = res.resolve(domain, "MX", search=False)
        records = [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer]
    except dns.resolver.NXDOMAIN:
        raise MXError(f"domain {domain} does not exist (DNS: NXDOMAIN)",
                      temporary=False) from None
    except dns.resolver.NoAnswer:
        records = None
    except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.YXDOMAIN) as e:
        raise MXError(f"DNS lookup of MX for {domain} failed: {why(e)}",
                      temporary=True) from None
    except dns.exception.DNSException as e:
        raise MXError(f"DNS lookup of MX for {domain} failed: {why(e)}",
                      temporary=True) from None
    if records is None:
        addresses = addresses_of(res, domain)
        if not addresses:
            raise MXError(f"domain {domain} has no MX record and no address",
                          temporary=False)
        return [MXHost(domain, 0, addresses)]
    if len(records) == 1 and records[0][1] in ("", "."):
        raise MXError(f"domain {domain} accepts no mail (null MX, RFC 7505)",
                      temporary=False)
    records = [r for r in records if r[1] not in ("", ".")]
    random.shuffle(records)
    records.sort(key=lambda r: r[0])          # stable: equal preferences stay shuffled
    return [MXHost(name, pref, addresses_of(res, name, soft=True)) for pref, name in records]


def addresses_of(res, name, soft=False):
    """A then AAAA addresses of `name`; with soft, DNS failures give []."""
    import dns.exception    # costly: only when DNS is asked
    import dns.resolver
    found = []
    for rtype in ("A", "AAAA"):
        try:
            found += [r.address for r in res.resolve(name, rtype, search=False)]
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except dns.exception.DNSException as e:
            if soft:
                continue
            raise MXError(f"DNS lookup of {rtype} for {name} failed: {why(e)}",
                          temporary=True) from None
    return found


def why(exc):
    """A one-line reason from a dnspython exception."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
