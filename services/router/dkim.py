"""DKIM signing (RFC 6376, RFC 8463) with per-sender-domain keys, once per message.

The router signs the whole message before splitting it by recipient domain and carries the
resulting DKIM-Signature field(s) in `Envelope.meta["dkim"]`; delivery prepends them to the
stored body. So a large body stored in the Object Store is written once, never re-written
for its signature, and every per-domain job sends the same signed bytes.

Signatures use relaxed/relaxed canonicalisation and over-sign the fields a recipient reads or
acts on (`OVERSIGNED`: each is listed once more than it occurs, once when absent; and
`OVERSIGNED_IF_PRESENT` when present), so none of them can be added after signing, as rspamd
does.

A message that cannot be signed goes out unsigned with a warning rather than being retried for
ever; `SigningError.reason` says why, as the label of `relais_dkim_sign_failures_total`.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from email.utils import getaddresses
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from services.core.addresses import domain_key
from services.core.config import Config, ConfigError, DkimKeyConfig

# Signed when present. Trace and transport fields (Received, Return-Path) are not: they change.
DEFAULT_HEADERS = (
    "from",
    "sender",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "to",
    "cc",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
    "in-reply-to",
    "references",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "feedback-id",
)
# A field added after signing could change what the reader sees (a second From or Subject, a
# Reply-To redirecting answers), so these are over-signed: one more than occur, so an absent one
# must stay absent. rspamd's set.
OVERSIGNED = frozenset({"from", "subject", "date", "reply-to", "to", "cc"})
# Over-signed only when present, as rspamd does: a second Message-ID, Sender ("on behalf of"),
# or Content-Type or Content-Transfer-Encoding re-framing the body cannot be added, while a
# mailing list may still add what it needs. List-Unsubscribe is not over-signed at all: Mailman
# adds it, and the signature must survive the list.
OVERSIGNED_IF_PRESENT = frozenset(
    {
        "message-id",
        "sender",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "in-reply-to",
        "references",
    }
)

# Reasons a message went out unsigned, the closed label set of relais_dkim_sign_failures_total.
REASON_MESSAGE = "message"  # its header cannot be parsed
REASON_KEY = "key"  # the private key was refused
REASON_PARAMETER = "parameter"  # the header list was refused (config validation should prevent it)
REASON_DKIM = "dkim"  # any other dkimpy error
REASON_INTERNAL = "internal"  # an unexpected exception inside the signer
REASONS = (REASON_MESSAGE, REASON_KEY, REASON_PARAMETER, REASON_DKIM, REASON_INTERNAL)


class SigningError(Exception):
    """The message cannot be signed; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SigningKey:
    domain: str
    selector: str
    algorithm: str  # "rsa-sha256" | "ed25519-sha256"
    # What dkimpy takes: PEM for RSA, the base64 32-byte seed for Ed25519.
    private: bytes
    headers: tuple[str, ...] = ()


def private_key_material(data: bytes, algorithm: str) -> bytes:
    """Normalise a key file's content to what dkimpy signs with (PEM files for both algorithms)."""
    if algorithm == "ed25519-sha256":
        if b"-----BEGIN" not in data:
            seed = base64.b64decode(data.strip(), validate=True)
            if len(seed) != 32:
                raise ValueError("an Ed25519 seed is 32 bytes")
            return base64.b64encode(seed)
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError("not an Ed25519 private key")
        raw = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return base64.b64encode(raw)
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    if key.key_size < 1024:
        raise ValueError(f"RSA key of {key.key_size} bits is too short (use 2048)")
    # Written out afresh: dkimpy's own PEM reader refuses files that cryptography reads (CRLF
    # line ends, a public key before the private one), which would leave every message unsigned.
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_keys(config: Config) -> dict[str, list[SigningKey]]:
    """Read every configured key file (at service start: a bad key stops the router loudly)."""
    keys: dict[str, list[SigningKey]] = {}
    for domain, entries in config.dkim.items():
        for i, entry in enumerate(entries):
            keys.setdefault(domain_key(domain), []).append(_load(domain_key(domain), entry, i))
    return keys


def _load(domain: str, entry: DkimKeyConfig, index: int) -> SigningKey:
    try:
        material = private_key_material(Path(entry.key_file).read_bytes(), entry.algorithm)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"dkim.{domain}[{index}].key_file: {exc}") from exc
    headers = tuple(h.lower() for h in entry.headers)
    return SigningKey(domain, entry.selector, entry.algorithm, material, headers)


def public_txt(private_pem: bytes) -> str:
    """The DNS TXT value publishing the public half of a PEM private key (for setup and tests)."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def dns_record(key: SigningKey) -> tuple[str, str]:
    """(`<selector>._domainkey.<domain>`, TXT value) to publish for a loaded signing key."""
    if key.algorithm == "ed25519-sha256":
        private = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(key.private))
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    else:
        pem = key.private
    return f"{key.selector}._domainkey.{key.domain}", public_txt(pem)


# A field name followed by white space before its colon (RFC 5322 obs-optional): the ingress
# accepts such fields, but dkimpy refuses "Subject :" and skips any line starting "From ".
_SPACE_BEFORE_COLON = re.compile(rb"^([!-9;-~]+)[ \t]+:", re.MULTILINE)


def _header_end(message: bytes) -> int:
    """Where the header ends: after the CRLF of its last field (0 when there is none)."""
    if message.startswith(b"\r\n"):
        return 0
    end = message.find(b"\r\n\r\n")
    return len(message) if end < 0 else end + 2


def _head(message: bytes) -> bytes:
    """The header fields, without white space before their colons. Relaxed canonicalisation
    (RFC 6376 3.4.2) deletes it, so a signature over them is that of the fields as sent."""
    return _SPACE_BEFORE_COLON.sub(rb"\1:", message[: _header_end(message)])


def _header(message: bytes) -> Message:
    """The message's header fields, decoded as UTF-8 (RFC 6532, as the ingress reads them): a
    byte-wise parse turns a non-ASCII From: domain into surrogates, which match no key."""
    return HeaderParser().parsestr(_head(message).decode("utf-8", "surrogateescape") + "\r\n")


def header_names(message: bytes) -> list[str]:
    """Lower-cased names of the message's header fields, in order, repeats kept."""
    return [name.lower() for name in _header(message).keys()]


def headers_to_sign(present: Iterable[str], wanted: Iterable[str]) -> list[str]:
    """Each wanted field once per occurrence; once more those in `OVERSIGNED`, and those in
    `OVERSIGNED_IF_PRESENT` that occur."""
    counts: dict[str, int] = {}
    for name in present:
        counts[name] = counts.get(name, 0) + 1
    out: list[str] = []
    for name in dict.fromkeys(wanted):
        n = counts.get(name, 0)
        if name in OVERSIGNED or (n and name in OVERSIGNED_IF_PRESENT):
            n += 1
        out.extend([name] * n)
    return out


def from_domains(message: bytes) -> list[str]:
    return [
        domain_key(addr.rpartition("@")[2])
        for _, addr in getaddresses(_header(message).get_all("from", []))
        if "@" in addr
    ]


def may_sign(
    keys: Mapping[str, list[SigningKey]], sender_domain: str, account_domains: Iterable[str]
) -> bool:
    """Whether `signing_keys` could find a key at all, decided without the message: only domains
    the sender owns are signed for, so when none of them has a key the body need not be read
    (an Object Store fetch for a large one) nor its header parsed."""
    return any(keys.get(domain_key(d)) for d in (*account_domains, sender_domain))


def signing_keys(
    keys: Mapping[str, list[SigningKey]], message: bytes, sender_domain: str, account_domains: Iterable[str]
) -> list[SigningKey]:
    """Keys of the From: domain when the account owns it (DMARC alignment), else of the
    envelope's sender domain; none when neither has keys."""
    owned = {domain_key(d) for d in account_domains} | {domain_key(sender_domain)}
    for domain in [*from_domains(message)[:1], domain_key(sender_domain)]:
        if domain in owned and keys.get(domain):
            return keys[domain]
    return []


@dataclass(frozen=True, slots=True)
class Signatures:
    """What signing one message with its domain's keys gave."""

    fields: str  # DKIM-Signature field(s), CRLF-terminated, to prepend to the message
    failures: tuple[SigningError, ...]  # one per key that could not sign


def sign(message: bytes, keys: Iterable[SigningKey]) -> Signatures:
    """A DKIM-Signature field per key that signs.

    A key that fails costs only its own signature: DMARC passes on any one aligned signature,
    so the others still go (a domain rotating selectors keeps two). Raises only `SigningError`,
    whatever dkimpy raises, when no key signed: the caller sends the message unsigned."""
    end = _header_end(message)
    head = _head(message)
    if len(head) != end:  # white space before a colon: dkimpy gets the header without it
        message = head + message[end:]
    try:
        present = header_names(message)
    except Exception as exc:
        raise SigningError(REASON_MESSAGE, f"cannot parse the header: {exc!r}") from exc
    fields: list[str] = []
    failures: list[SigningError] = []
    for key in keys:
        try:
            fields.append(_sign_one(message, present, key))
        except SigningError as exc:
            failures.append(exc)
    if failures and not fields:
        raise failures[0]
    return Signatures("".join(fields), tuple(failures))


def _sign_one(message: bytes, present: list[str], key: SigningKey) -> str:
    include = headers_to_sign(present, key.headers or DEFAULT_HEADERS)
    where = f"{key.domain} {key.selector}"
    try:
        signer = dkim.DKIM(message, signature_algorithm=key.algorithm.encode())
    except Exception as exc:
        # dkimpy's parser fails with more than MessageFormatError: a first line starting with
        # whitespace is an IndexError. Either way it is the message, not the key.
        raise SigningError(REASON_MESSAGE, f"{where}: cannot parse the header: {exc!r}") from exc
    try:
        field = signer.sign(
            key.selector.encode(),
            key.domain.encode(),
            key.private,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[h.encode() for h in include],
        )
    except Exception as exc:
        raise SigningError(_reason(exc), f"{where}: {exc!r}") from exc
    return field.decode()


def _reason(exc: Exception) -> str:
    if isinstance(exc, dkim.MessageFormatError):
        return REASON_MESSAGE
    if isinstance(exc, dkim.KeyFormatError):
        return REASON_KEY
    if isinstance(exc, dkim.ParameterError):
        return REASON_PARAMETER
    if isinstance(exc, dkim.DKIMException):
        return REASON_DKIM
    return REASON_INTERNAL
