"""DKIM signatures (RFC 6376) on outgoing mail, made by dkimpy; keys for masq-setup.

A route with `dkim_key` signs each message it sends (masq.toml(5)):
relaxed/relaxed, rsa-sha256 or ed25519-sha256 (RFC 8463), over the header
fields RFC 6376 section 5.4.1 recommends that the message has (dkimpy's
list: From, Sender, Reply-To, Subject, Date, Message-ID, To, Cc,
MIME-Version, Content-Type, ...), with From: signed once more than present,
so that no From: can be added.  `Signer(conf, table, where)` holds one
route's settings; `Signer.sign(data, sender)` takes the message exactly as
it goes on the wire (after rewrite_sender, with LF line ends:
masq.wiremessage.WireMessage.lines()) and returns the DKIM-Signature field
to put in front of it, with LF line ends.

The signing domain is `dkim_domain`, else the domain of the From: address as
sent, else the envelope sender's.  `dkim_key` may hold "{domain}" (per
sender domain: "keys/mail._domainkey.{domain}.key"); then a domain without
such a file is sent unsigned.  Every other problem with a key (unreadable,
readable by others, not a key of that algorithm) raises DkimError, which is
temporary: the message is deferred, never sent unsigned, until someone
fixes it.  A message dkimpy cannot sign (a header line it cannot parse, no
From:) raises UnsignedError: it goes unsigned, and the caller logs why.

dkimpy takes the message as one bytes object: it is held in memory while
it is signed (at most max_size).  dkimpy, dnspython and PyNaCl (ed25519)
are imported at the first signature, only in a program that signs.
"""
import re

from masq import Error, address

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
MAX_KEY_BYTES = 16384
# a DNS name made of labels (RFC 1035 2.3.1, with "_" as in DKIM's own names)
DNS_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                      r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\Z")
DNS_STRING_BYTES = 255      # one <character-string> of a TXT record (RFC 1035 3.3)


class DkimError(Error):
    """The key cannot be used: the message waits (temporary)."""

    code = 111
    temporary = True


class UnsignedError(Error):
    """This message cannot be signed; it goes unsigned."""

    code = 111
    temporary = False


class Signer:
    """A route's DKIM settings; sign() makes the field for one message."""

    def __init__(self, conf, table, where):
        self.key_path = conf.path(table["dkim_key"], is_value=True)
        self.selector = table.get("dkim_selector")
        self.domain = table.get("dkim_domain") or None
        self.algorithm = table.get("dkim_algorithm") or None
        if not self.selector or not DNS_NAME.match(self.selector):
            raise DkimError(f"{conf.file}: {where}: dkim_key needs dkim_selector, "
                            "a DNS name such as \"mail\"")
        if self.domain and not DNS_NAME.match(self.domain):
            raise DkimError(f"{conf.file}: {where}: dkim_domain must be a domain name")
        self.keys = {}          # path -> (key bytes, algorithm), read once per run

    def sign(self, data, sender=""):
        """The DKIM-Signature field (bytes, LF line ends) for the message `data`
        as it goes on the wire; b"" when {domain} names no key file."""
        domain = (self.domain or _from_domain(data) or address.domain_of(sender or "")).lower()
        if not domain or not DNS_NAME.match(domain):
            raise UnsignedError("DKIM: not signed: no domain to sign for (no From: "
                                "address with a domain, no dkim_domain)")
        path = self.key_path.replace("{domain}", domain)
        key = self._key(path, optional=path != self.key_path)
        if key is None:
            return b""
        secret, algorithm = key
        if not data.endswith(b"\n"):
            data += b"\n"       # as the wire ends it (masq.wiremessage)
        import dkim as dkimpy   # dkimpy: costly, and only where a route signs
        try:
            signer = dkimpy.DKIM(data, signature_algorithm=algorithm.encode())
            field = signer.sign(self.selector.encode(), domain.encode(), secret,
                                canonicalize=(b"relaxed", b"relaxed"))
        except (dkimpy.KeyFormatError, dkimpy.NaClNotFoundError) as e:
            raise DkimError(f"DKIM: unable to sign with {path} ({algorithm}): {e}; "
                            "fix the key or dkim_algorithm") from None
        except dkimpy.DKIMException as e:
            raise UnsignedError(f"DKIM: not signed: {e}") from None
        return field.replace(b"\r\n", b"\n")

    def _key(self, path, optional=False):
        """(key, algorithm) from a key file only its owner may read; None: absent and optional."""
        if path in self.keys:
            return self.keys[path]
        from masq import clientroute
        try:
            secret = clientroute.read_secret(path, "key file", MAX_KEY_BYTES, absent_ok=True)
        except Error as e:
            raise DkimError(f"DKIM: {e}") from None
        if secret is None:
            if optional:
                return None
            raise DkimError(f"DKIM: unable to read key file {path}: no such file; "
                            "make one with masq-setup dkim")
        # the kind of key says the algorithm, unless dkim_algorithm does
        algorithm = self.algorithm or \
            ("rsa-sha256" if secret.startswith(b"-----BEGIN") else "ed25519-sha256")
        self.keys[path] = (secret, algorithm)
        return self.keys[path]


def _from_domain(data):
    """The domain of the first From: address, or ""."""
    import io
    from masq import headers
    return address.domain_of(headers.scan(io.BytesIO(data)).address("from") or "")


# -- masq-setup dkim --------------------------------------------------------

def key_file_name(selector, domain):
    return f"{selector}._domainkey.{domain}.key"


def make_key(path, algorithm="ed25519-sha256", bits=2048):
    """Write a new private key to `path` (0600, never replacing a file); the
    TXT record's value ("v=DKIM1; k=...; p=...")."""
    if algorithm == "rsa-sha256":
        secret, public = _rsa_key(bits)
        kind = "rsa"
    else:
        import base64
        import nacl.signing     # PyNaCl, as dkimpy uses it for ed25519
        key = nacl.signing.SigningKey.generate()
        # dkimpy's form of an ed25519 key: the 32-byte seed in base64
        secret = base64.b64encode(bytes(key)) + b"\n"
        public = base64.b64encode(bytes(key.verify_key)).decode()
        kind = "ed25519"
    from masq import files
    files.write_atomic(path, secret, 0o600, exclusive=True)
    return f"v=DKIM1; k={kind}; p={public}"


def _rsa_key(bits):
    """(PEM private key, base64 DER public key) made by openssl(1)."""
    import base64
    import subprocess
    try:
        secret = subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                                 f"rsa_keygen_bits:{bits}"], capture_output=True,
                                check=True).stdout
        public = subprocess.run(["openssl", "pkey", "-pubout", "-outform", "DER"],
                                input=secret, capture_output=True, check=True).stdout
    except FileNotFoundError:
        raise Error("openssl is needed to make an RSA key: install it, or use "
                    "--algorithm ed25519", code=69, temporary=False) from None
    except subprocess.CalledProcessError as e:
        raise Error(f"openssl failed to make an RSA key: "
                    f"{e.stderr.decode(errors='replace').strip()}", code=69,
                    temporary=False) from None
    return secret, base64.b64encode(public).decode()


def txt_record(selector, domain, value):
    """The record as a zone file line; long values split into 255-byte strings."""
    parts = [value[i:i + DNS_STRING_BYTES] for i in range(0, len(value), DNS_STRING_BYTES)]
    return f"{selector}._domainkey.{domain}. IN TXT " + " ".join(f'"{p}"' for p in parts)
