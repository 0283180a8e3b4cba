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
Recipients is what masq-smtpd's RCPT and masq-qmtpd ask: the policy, then
the Guard, with the refused recipients of the session counted.

A recipient so accepted from a client that may not relay then passes the
Guard, when [smtpd] configures one: a client listed in a dnswl zone
passes at once; one listed in a dnsbl zone is LISTED; otherwise the
triplet is greylisted (masq.greylist) unless greylist_whitelist names
the client, the sender or the recipient.  A zone that cannot answer and
a greylist database that cannot be used let the recipient through: they
are advice, and mail must not wait on them.  A greylist database that is
only busy (another process held it locked too long) is not broken: that
one recipient is GREYLISTED, the next is checked again.  A session stores
at most smtpd.max_recipients new triplets; a later new one, or one that
the greylist's own caps (per network, for the table) do not store, is
DEFERRED: refused for now like a greylisted one, and counted by the
session as a refused recipient.  Each decision is a line for the event
log, given to the session's `note`.
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
GREYLISTED = "greylisted"       # the Guard's: not yet, come back later
LISTED = "listed"               # the Guard's: the client is on a dnsbl
DEFERRED = "deferred"           # the Guard's: a new triplet over a cap, not stored
ALIASES_UNAVAILABLE = "aliases unavailable"     # Recipients': no recipient judged for now
TOO_MANY_REFUSED = "too many refused"           # Recipients': over the cap, the session ends
# counted toward [smtpd] max_refused_recipients by masq-smtpd and masq-qmtpd: a
# client guessing addresses, or filling greylist.db with new triplets
REFUSED = (RELAY_DENIED, UNKNOWN_USER, LISTED, DEFERRED)
BUSY_RETRY_SECONDS = 60         # "try again in" when the greylist database was busy


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

    def who(self):
        """The client for the log: its IP, or "local"."""
        return self.ip or "local"

    def trusted_by(self):
        """What let a client outside relay_nets relay without AUTH: "cert", "relayclient".

        Kept in the spool, so that a failure of its mail is bounced, not taken
        for mail from outside (attempt.came_from_outside).
        """
        if self.certificate is not None:
            return "cert"
        return "relayclient" if self.relayclient is not None else None


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
    """The recipients one session accepts; the aliases are read at the first local one
    (masq.smtpdconfig.aliases: again only when the file changed)."""

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
        from masq import localpart, smtpdconfig    # only a session that names a local one
        if self.aliases is None:
            try:
                self.aliases = smtpdconfig.aliases(self.conf)
            except Error as e:
                raise AliasesUnavailableError(f"unable to read the aliases: {e}") from None
        return localpart.recipient_problem(self.conf, self.aliases, local_part)


class Recipients:
    """One session's recipients judged: RecipientPolicy, then the Guard, refusals counted.

    judge() gives (the path as taken, verdict, detail), the detail the
    Guard's (seconds to wait, or (zone, reason)) or None.  "postmaster"
    alone is postmaster@hostname (RFC 5321 section 4.5.1), and RELAYCLIENT
    is appended.  An aliases file that cannot be read is warned about and
    ALIASES_UNAVAILABLE.  A verdict in REFUSED counts toward
    smtpd.max_refused_recipients; the one past it is logged and
    TOO_MANY_REFUSED: the session ends.
    """

    def __init__(self, conf, settings, client, note):
        self.conf, self.settings, self.client, self.note = conf, settings, client, note
        self.policy = RecipientPolicy(conf, client)
        self.guard = Guard(conf, settings, client, note) if Guard.wanted(settings) else None
        self.refused = 0            # recipients refused in the session

    def judge(self, path, sender, authenticated):
        if path.lower() == "postmaster":
            path = f"{path}@{self.conf.hostname}"
        path = self.policy.rewrite(path)
        try:
            verdict = self.policy.verdict(path, authenticated)
        except AliasesUnavailableError as e:
            from masq import log
            log.warn(str(e))
            return path, ALIASES_UNAVAILABLE, None      # our fault, not the client's
        detail = None
        if verdict == ACCEPT and self.guard is not None:
            verdict, detail = self.guard.verdict(sender, path, authenticated)
        if verdict in REFUSED:
            # a client guessing addresses: Postfix's smtpd_hard_error_limit for them
            self.refused += 1
            cap = self.settings["max_refused_recipients"]
            if cap and self.refused > cap:
                self.note(f"too many refused recipients: client={self.client.who()} "
                          f"refused={self.refused}")
                return path, TOO_MANY_REFUSED, None
        return path, verdict, detail

    def close(self):
        if self.guard is not None:
            self.guard.close()


class Guard:
    """DNSWL, DNSBL and greylisting for one session's recipients (see above).

    verdict() gives (ACCEPT, None), (GREYLISTED or DEFERRED, seconds to wait)
    or (LISTED, (zone, reason)); the databases and resolver open at first use.
    """

    def __init__(self, conf, settings, client, note):
        self.conf, self.settings, self.client, self.note = conf, settings, client, note
        self.greylist = None        # masq.greylist.Greylist, opened at the first triplet
        self.whitelist = None       # masq.greylist.Whitelist, read at the first triplet
        self.whitelisted = False    # greylist_whitelist names the client's address
        self.network = None         # the client's greylisting network (client_network)
        self.lists = None           # masq.dnsbl.Lists: this session's answers
        self.allowed = None         # the dnswl zone that lists the client, "" for none
        self.broken = False         # the greylist database failed: off for the session
        self.added = 0              # new triplets this session stored
        self.capped = set()         # the caps this session reached (logged once each)
        self.failed = set()         # zones whose lookup failed (logged once)

    @staticmethod
    def wanted(settings):
        """Does [smtpd] ask for any of it?"""
        return bool(settings["greylist"] or settings["dnsbl"] or settings["dnswl"])

    def exempt(self, authenticated):
        """Relay clients, local users, authenticated clients and certificates pass."""
        return (self.client.trusted or authenticated or self.client.certificate is not None
                or not self.client.ip)

    def verdict(self, sender, recipient, authenticated):
        if self.exempt(authenticated) or self.welcome():
            return ACCEPT, None
        listed = self.blocked()
        if listed:
            return LISTED, listed
        if self.settings["greylist"]:
            return self.greylisted(sender, recipient)
        return ACCEPT, None

    def _lookup(self, zone, kind):
        """The zone's reason if it lists the client, else None; a failure logged."""
        from masq import dnsbl
        if self.lists is None:
            self.lists = dnsbl.Lists(self.conf.get("dns_servers"))
        try:
            return self.lists.listed(self.client.ip, zone)
        except dnsbl.QueryError as e:
            if zone not in self.failed:
                self.failed.add(zone)   # the session's cache gives the same error again
                self.note(f"{kind}: client={self.client.ip} zone={zone} lookup failed, "
                          f"let through: {e}")
            return None

    def welcome(self):
        """Is the client on a dnswl zone?  (asked once a session)"""
        if self.allowed is None:
            self.allowed = ""
            for zone in self.settings["dnswl"]:
                if self._lookup(zone, "dnswl") is not None:
                    self.allowed = zone
                    self.note(f"dnswl: client={self.client.ip} listed by {zone}: "
                              "no dnsbl, no greylisting")
                    break
        return bool(self.allowed)

    def blocked(self):
        """(zone, reason) of the first dnsbl zone that lists the client, or None."""
        for zone in self.settings["dnsbl"]:
            reason = self._lookup(zone, "dnsbl")
            if reason is not None:
                self.note(f"dnsbl: client={self.client.ip} listed by {zone}: {reason}")
                return zone, reason
        return None

    def greylisted(self, sender, recipient):
        """(ACCEPT, None) or (GREYLISTED, seconds) for the triplet."""
        from masq import greylist
        if self.broken:
            return ACCEPT, None
        try:
            if self.whitelist is None:      # the client's part once a session
                path = self.settings["greylist_whitelist"]
                whitelist = greylist.Whitelist()
                if path:
                    whitelist = greylist.Whitelist.read(self.conf.path(path, is_value=True))
                self.whitelisted = whitelist.lists_client(self.client.ip)
                self.network = greylist.client_network(self.client.ip)
                self.whitelist = whitelist
            if self.whitelisted or self.whitelist.names(sender, recipient):
                return ACCEPT, None
            if self.greylist is None:
                self.greylist = greylist.Greylist(
                    self.conf.path("spool"), self.settings["greylist_delay"],
                    self.settings["greylist_window"], self.settings["greylist_expire"])
            network = self.network
            state, seconds = self.greylist.check(
                network, sender, recipient,
                may_add=self.added < self.settings["max_recipients"])
        except greylist.GreylistBusy as e:
            self.note(f"greylist: client={self.client.ip} to=<{recipient}> deferred, "
                      f"the database is busy: {e}")
            return GREYLISTED, BUSY_RETRY_SECONDS
        except greylist.GreylistError as e:
            if not self.broken:
                self.broken = True
                from masq import log
                log.warn(f"greylisting off for this session: {e}")
                self.note(f"greylist: client={self.client.ip} not checked, let through: {e}")
            return ACCEPT, None
        triplet = f"client={self.client.ip} net={network} from=<{sender}> to=<{recipient}>"
        if state in greylist.NOT_STORED:
            if state not in self.capped:
                self.capped.add(state)
                why = {greylist.UNRECORDED: f"{self.added} new triplets this session",
                       greylist.NETWORK_FULL: f"{self.greylist.network_max} new triplets "
                                              f"of {network} within greylist_window",
                       greylist.TABLE_FULL: f"{self.greylist.path} holds "
                                            f"{self.greylist.max_bytes} bytes"}[state]
                if state == greylist.TABLE_FULL:
                    from masq import log
                    log.warn(f"greylist: new triplets not stored: {why}")
                self.note(f"greylist: {triplet} deferred, not stored ({state}: {why}); "
                          "later ones of the session too")
            return DEFERRED, seconds
        if state == greylist.NEW:
            self.added += 1
        if state in (greylist.NEW, greylist.EARLY):
            self.note(f"greylist: {triplet} greylisted ({state}), retry in {seconds:.0f} s")
            return GREYLISTED, seconds
        if state == greylist.PASSED:
            self.note(f"greylist: {triplet} passed after {seconds:.0f} s")
        return ACCEPT, None

    def close(self):
        if self.greylist is not None:
            self.greylist.close()


def local_user():
    """The name of the user running us (sendmail -bs), or the uid as text."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


class AliasesUnavailableError(Error):
    """The aliases file cannot be read: no recipient can be judged now."""

    temporary = True
