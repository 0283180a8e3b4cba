"""Reaching the next hop: which hosts to try, in what order, and connecting.

    from masq import nexthop
    try:
        session = nexthop.connect(conf, route, "example.org")
    except DeliveryError as e:          # masq.outcome
        ...   # e.letter ("Z" or "D") and e.text hold for every recipient
    results = session.send(sender, recipients, stream)   # masq.smtpclient

`connect(conf, route, domain)` takes a masq.clientroute.Route, or a route
name (None: direct delivery), and returns an open smtpclient.ClientSession:

- a route with a wrapper: the wrapper command (masq.connection);
- a route with a host (a smarthost): each of its addresses in turn, from
  dns_servers when set, else from the system's resolver;
- neither: the MX hosts of `domain` (masq.mx) in order (RFC 5321 section
  5.1), without any that is this host (named `hostname`, or on one of
  `my_addresses`) or not better than it.

`local_lmtp(conf)` opens the LMTP session of [local] mailbox = "lmtp" to
the server [local] lmtp names: a Unix socket or host:port.

A failed opportunistic TLS handshake (tls = "may") is tried once more in
plaintext, as Postfix does.  Raises DeliveryError when no host could be
used, masq.Error (code 111) for a configuration that cannot work.
"""
from masq import mx, net
from masq.clientroute import Route, config_error
from masq.connection import ConnectFailed, TLSFailed, tcp, unix, wrapper
from masq.outcome import DeliveryError
from masq.smtpclient import ClientSession

DEFAULT_MY_ADDRESSES = ("127.0.0.0/8", "::1", "0.0.0.0", "::")


def connect(conf, route, domain=None):
    """An open ClientSession for `route` (a Route, a name or None) and `domain`."""
    if not isinstance(route, Route):
        route = Route(conf, route)
    if route.wrapper:
        peer = f"{route.host or 'wrapper'}[wrapper]"
        return _open(lambda: wrapper(route.wrapper, peer), route, route.host)
    if route.host:
        return _open_host(route, route.host, route.port, _resolve_host(conf, route.host))
    return _connect_mx(conf, route, domain)


def local_lmtp(conf):
    """An open LMTP session to [local] lmtp: a Unix socket (a value with a "/",
    relative to the configuration's folder) or host:port; plaintext, no AUTH."""
    route = Route(conf)
    route.protocol, route.tls, route.user = "lmtp", "none", None
    where = str(conf.get("local.lmtp") or "")
    if "/" in where:
        path = conf.path(where, is_value=True)
        return _open(lambda: unix(path, f"lmtp:{path}", route.timeouts["connect_timeout"]),
                     route, None)
    try:
        host, port = net.host_port(where)
    except ValueError:
        port = None
    if not where or not port:
        raise config_error(f'{conf.file}: [local] lmtp must be a socket path or "host:port", '
                           f"not {where!r}")
    return _open_host(route, host, port, _resolve_host(conf, host))


def _open(make, route, server_hostname):
    """Make a connection and open a session on it; one plaintext retry for "may"."""
    conn = make()
    if route.protocol == "qmtp":
        from masq import qmtp       # only a route that speaks it
        session = qmtp.ClientSession(conn, route, server_hostname)
    else:
        session = ClientSession(conn, route, server_hostname)
    try:
        session.open()
        return session
    except TLSFailed as e:
        conn.close()
        if route.tls != "may":
            raise DeliveryError(e.text) from None
    except DeliveryError:
        conn.close()
        raise
    # opportunistic TLS failed: as Postfix, try once more in plaintext
    import copy         # it loads weakref: only for this rare retry
    plain = copy.copy(route)
    plain.tls = "none"
    return _open(make, plain, server_hostname)


def _open_host(route, name, port, addresses):
    """Try the addresses of one host in turn."""
    last = ConnectFailed(f"host {name} has no address")
    for address in addresses:
        peer = f"{name}[{address}]"
        try:
            return _open(lambda a=address, p=peer: tcp(a, port, p, route.timeouts[
                "connect_timeout"]), route, name)
        except DeliveryError as e:
            last = _telling(last, e)
    raise last


def _telling(last, new):
    """The error to report of two: a server's answer says more than no connection
    (and only when no host answered is it a connection error: connect_error_fail)."""
    return last if isinstance(new, ConnectFailed) and not isinstance(last, ConnectFailed) \
        else new


def _resolve_host(conf, host):
    """Addresses of a smarthost: a literal as is, else DNS (dns_servers) or the system."""
    if net.parse_ip(host) is not None:
        return [host]
    servers = conf.get("dns_servers")
    if servers:
        try:
            addresses = mx.addresses_of(mx.resolver(servers), host)
        except mx.MXError as e:
            raise ConnectFailed(str(e)) from None
        if not addresses:
            raise ConnectFailed(f"host {host} has no address")
        return addresses
    import socket       # costly, and only needed when a connection is made
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConnectFailed(f"unable to find the address of {host}: {e.strerror}") from None
    seen = []
    for info in infos:
        if info[4][0] not in seen:
            seen.append(info[4][0])
    return seen


def _connect_mx(conf, route, domain):
    """Try the MX hosts of `domain` in order (RFC 5321 section 5.1)."""
    if not domain:
        raise DeliveryError("no domain to look up MX for", temporary=False)
    try:
        hosts = mx.lookup(domain, conf.get("dns_servers"))
    except mx.MXError as e:
        raise DeliveryError(str(e), temporary=e.temporary) from None
    mine = my_networks(conf)
    usable = []
    for host in hosts:
        if host.name.lower().rstrip(".") == conf.hostname.lower() \
                or any(_is_mine(a, mine) for a in host.addresses):
            # as Postfix: hosts not better than ourselves are no use
            usable = [h for h in usable if h.preference < host.preference]
            break
        usable.append(host)
    if not usable:
        raise DeliveryError(f"mail for {domain} loops back to myself", temporary=False)
    last = None
    for host in usable:
        if not host.addresses:
            last = last or ConnectFailed(f"MX host {host.name} of {domain} has no address")
            continue
        try:
            return _open_host(route, host.name, route.port, host.addresses)
        except DeliveryError as e:
            last = _telling(last, e) if last else e
    raise type(last)(last.text, temporary=last.temporary)


def my_networks(conf):
    """The networks (CIDR text) that mean "this host": my_addresses, by default
    loopback, the unspecified addresses and hostname's addresses."""
    configured = conf.get("my_addresses")
    if configured is None:
        configured = list(DEFAULT_MY_ADDRESSES)
        import socket   # costly, and only needed when a connection is made
        try:
            configured += [i[4][0] for i in socket.getaddrinfo(conf.hostname, None)]
        except (OSError, UnicodeError):
            pass
    networks = []
    for text in configured:
        network = str(text).split("%")[0]           # no zone: fe80::1%eth0
        base, slash, length = network.partition("/")
        ip = net.parse_ip(base)
        if ip is None or slash and not (length.isdigit() and length.isascii()
                                        and int(length) <= (32 if ip[0] == 4 else 128)):
            raise config_error(f"{conf.file}: my_addresses: not an address "
                               f"or network: {text}")
        networks.append(network)
    return networks


def _is_mine(address, networks):
    """True when `address` (text) is in one of `networks` (from my_networks)."""
    return net.in_nets(address.split("%")[0], networks)
