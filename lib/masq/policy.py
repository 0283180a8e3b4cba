"""Relay and recipient policy: who may relay, and which RCPT addresses masq-smtpd takes.

A client may relay when it is a local user (pipes, a Unix socket), when
RELAYCLIENT is set (tcp-environ(5); its value is appended to each
recipient, as qmail-smtpd does), when its IP is in smtpd.relay_nets,
once it has authenticated, or once it has shown a TLS certificate that
verified against smtpd.tls_client_ca (Client.certificate: its subject,
from certificate_subject()).  Anyone may send to local_domains and
relay_domains, but only a client that may relay may use the routing
characters %!@ in such a local part.  A local recipient must pass
masq-local's own rule (masq.localpart.recipient_problem); postmaster always
passes (RFC 5321 section 4.5.1).

verdict() answers with one of the verdicts below, never with protocol
text: the session turns it into a reply.  An aliases file that cannot be
read raises AliasesUnavailableError (temporary), never "unknown user".
"""
import os
import pwd

from masq import Error, address, net

ROUTING_CHARACTERS = "%!@"      # sender-specified routing in a local part
SUBJECT_MAX_CHARS = 200         # of a certificate's subject, in Received: and the log
SUBJECT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
                 "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
                 "emailAddress": "emailAddress", "domainComponent": "DC"}

# verdicts on a recipient
ACCEPT = "accept"
BAD_ADDRESS = "bad address"
RELAY_DENIED = "relay denied"
UNKNOWN_USER = "unknown user"


class Client:
    """Who is on the other end, from the environment (tcp-environ(5)) and fd 0."""

    def __init__(self, environ, relay_nets):
        self.relayclient = environ.get("RELAYCLIENT")
        self.name = net.host_name(environ.get("TCPREMOTEHOST"))
        self.ip, local = net.client_address(environ.get("TCPREMOTEIP"))
        self.user = local_user() if local else None
        self.trusted = (local or self.relayclient is not None
                        or net.in_nets(self.ip, relay_nets))
        self.certificate = None     # a verified client certificate's subject


def certificate_subject(peercert):
    """`CN=alice,O=Example` of an ssl getpeercert() dict, safe for a header; "-" if empty.

    Characters that could end or confuse a Received: comment or a log
    line (controls, parentheses, backslash, non-ASCII) become "?".
    """
    pairs = [pair for rdn in (peercert or {}).get("subject", ()) for pair in rdn]
    pairs.sort(key=lambda pair: pair[0] != "commonName")     # the name first, as people read
    parts = [f"{SUBJECT_NAMES.get(name, name)}={value}" for name, value in pairs]
    text = ",".join(parts)
    text = "".join(c if " " <= c <= "~" and c not in "()\\" else "?" for c in text)
    return text[:SUBJECT_MAX_CHARS] or "-"


class RecipientPolicy:
    """The recipients one session accepts; the aliases are read at the first local one."""

    def __init__(self, conf, client):
        self.conf = conf
        self.client = client
        self.relay_domains = [d.lower() for d in conf.get("relay_domains") or []]
        self.aliases = None

    def rewrite(self, path):
        """The address as masq-smtpd takes it: RELAYCLIENT appended (qmail-smtpd(8))."""
        return path + self.client.relayclient if self.client.relayclient else path

    def verdict(self, path, authenticated):
        """ACCEPT, BAD_ADDRESS, RELAY_DENIED or UNKNOWN_USER for this recipient."""
        try:
            address.check(path)
        except address.AddressError:
            return BAD_ADDRESS
        local_part, domain = address.split(path)
        domain = domain.lower()
        may_relay = self.client.trusted or authenticated or self.client.certificate is not None
        local_domains = self.conf.local_domains
        if domain in local_domains or domain in self.relay_domains:
            if not may_relay and any(c in local_part for c in ROUTING_CHARACTERS):
                return RELAY_DENIED
            if domain in local_domains and self.local_problem(local_part):
                return UNKNOWN_USER
        elif not may_relay:
            return RELAY_DENIED
        return ACCEPT

    def local_problem(self, local_part):
        """Why masq-local would refuse this local part at once (its own rule), or ""."""
        if address.unquote_local(local_part).lower() == "postmaster":
            return ""
        from masq import localpart     # only a session that names a local recipient
        if self.aliases is None:
            try:
                self.aliases = localpart.load_aliases(self.conf)
            except Error as e:
                raise AliasesUnavailableError(f"unable to read the aliases: {e}") from None
        return localpart.recipient_problem(self.conf, self.aliases, local_part)


def local_user():
    """The name of the user running us (sendmail -bs), or the uid as text."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


class AliasesUnavailableError(Error):
    """The aliases file cannot be read: no recipient can be judged now."""

    temporary = True
