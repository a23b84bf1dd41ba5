"""A site's identity: its key, the federation CA's certificate for it, signatures. No Flower.

Secure aggregation (SecAgg+, Bell et al., CCS 2020) is only as strong as the sites'
key-agreement public keys: a server that could substitute them, or invent sites,
would read the masked updates (the protocol's "active adversary" case, Sec. 4 of the
paper, assumes such a PKI). So each site signs its per-round keys with its identity
key, and sends the certificate the federation CA issued for that key; every other
site checks both against the CA it already holds (its kit's ca.crt).

- The identity key is the site's SuperNode authentication key (site.key); its
  certificate (site.crt) is a leaf for clientAuth with CN = the site's name, issued by
  `fedsilo provision` (fedsilo.privacy.pki.site_cert). The server's own certificate
  (serverAuth) is never accepted as a site's, nor is the CA's.
- Signatures are ECDSA with SHA-384 over `SIGNING_CONTEXT + message`: the prefix
  keeps them apart from anything else the same key signs (Flower's SuperNode
  authentication signs timestamps with it).
- `fedsilo simulate --dp distributed` gives its virtual sites throwaway identities
  under a CA of the run's own (`write_simulated_identities`), so the simulated and the
  deployed protocol are the same code.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsilo.errors import PrivacyError
from fedsilo.privacy import pki

SIGNING_CONTEXT = b"fedsilo site identity v1\x00"  # domain separation: see the module doc
SIGNATURE = ec.ECDSA(hashes.SHA384())
SIMULATED_CA = "ca"  # DIR/ca.key, DIR/ca.crt of simulated identities; no site takes the name
# What hostile bytes make `cryptography` raise while parsing or verifying.
_MALFORMED = (
    ValueError,
    TypeError,
    LookupError,  # a name attribute of an unknown ASN.1 string type: KeyError
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.InvalidVersion,
)


class IdentityError(PrivacyError):
    """A certificate or signature that does not prove a site of this federation."""


@dataclass(frozen=True)
class SiteIdentity:
    """One site's identity key, the CA's certificate for it, and the CA it trusts."""

    name: str  # the certificate's CN, as the CA certified it
    key: ec.EllipticCurvePrivateKey = field(repr=False, compare=False)
    cert: bytes = field(repr=False)  # DER: what the site sends beside its signatures
    ca: x509.Certificate = field(repr=False)  # the federation CA: every check chains to it

    def sign(self, message: bytes) -> bytes:
        """A DER ECDSA (SHA-384) signature over `message` that `verify_signed` accepts."""
        return self.key.sign(SIGNING_CONTEXT + message, SIGNATURE)

    def verify(self, cert_der: bytes, message: bytes, signature: bytes) -> str:
        """`verify_signed` under this site's federation CA: the signer's name."""
        return verify_signed(self.ca, cert_der, message, signature)


def verify_signed(ca: x509.Certificate, cert_der: bytes, message: bytes, signature: bytes) -> str:
    """The name of the site whose certified key signed `message`.

    Checks, cheapest first: `cert_der` parses as a site certificate (a clientAuth leaf,
    not a CA, with a CN) valid now (within pki.CLOCK_SKEW either side), issued and
    signed by `ca`, and `signature` verifies over `message` with its key.

    Raises:
        IdentityError: with a short reason, for any failure, malformed bytes included.
    """
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except _MALFORMED:
        raise IdentityError("the site certificate is not a DER X.509 certificate") from None
    name = _certified_name(cert, ca, now=_now())
    try:
        key = cert.public_key()
    except _MALFORMED:
        raise IdentityError(f"the certificate of {name!r} holds an unreadable key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise IdentityError(f"the certificate of {name!r} holds no ECDSA key")
    try:
        key.verify(signature, SIGNING_CONTEXT + message, SIGNATURE)
    except (InvalidSignature, *_MALFORMED):
        raise IdentityError(f"the signature does not verify with the key of {name!r}") from None
    return name


def _certified_name(cert: x509.Certificate, ca: x509.Certificate, *, now: dt.datetime) -> str:
    """The CN of `cert` if it is a site certificate `ca` issued, valid at `now`."""
    try:
        if cert.issuer != ca.subject:
            raise IdentityError("the certificate was not issued by the federation CA")
        if now < cert.not_valid_before_utc - pki.CLOCK_SKEW:
            raise IdentityError(
                f"the certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
                "UTC"
            )
        if now > cert.not_valid_after_utc + pki.CLOCK_SKEW:
            raise IdentityError(
                f"the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            )
        if _extension(cert, x509.BasicConstraints).ca:
            raise IdentityError("a CA certificate is not a site certificate")
        if ExtendedKeyUsageOID.CLIENT_AUTH not in _extension(cert, x509.ExtendedKeyUsage):
            raise IdentityError("the certificate is not a site certificate (no clientAuth)")
        if not _extension(cert, x509.KeyUsage).digital_signature:
            raise IdentityError("the certificate's key may not sign (KeyUsage)")
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = names[0].value if len(names) == 1 else None
        if not isinstance(name, str) or not name:
            raise IdentityError("the site certificate names no single site (CN)")
        if not _issued_by(cert, ca):
            raise InvalidSignature
    except (InvalidSignature, *_MALFORMED):
        raise IdentityError(
            "the certificate is malformed or not signed by the federation CA"
        ) from None
    return name


# Certificates whose CA signature was checked, per process: every site checks each
# other site's certificate every round (a tenth of a distributed-DP site-round), and a
# certificate's signature by a CA is a fact of their two DER encodings (Certificate
# hashes and compares by them). Its dates and fields are checked at every use.
ISSUED_MEMO = 4096


@functools.lru_cache(maxsize=ISSUED_MEMO)
def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether `ca`'s key signed `cert` (and `cert` names `ca` as its issuer)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, *_MALFORMED):
        return False
    return True


_E = TypeVar("_E", bound=x509.ExtensionType)


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        raise IdentityError(
            f"the certificate is not a site certificate (no {kind.__name__})"
        ) from None


def load_identity(key_path: Path, cert_path: Path, ca_path: Path) -> SiteIdentity:
    """A site's identity from its kit: site.key (OpenSSH), site.crt and ca.crt (PEM).

    Raises:
        ConfigError: a file missing or unreadable, the CA expired, a certificate
            another CA issued, expired, not a site's, or for another key; the message
            names the file and the fix.
    """
    ca = pki.load_cert(ca_path)
    pki.check_valid(ca, ca_path, what="federation CA certificate")
    cert = pki.load_cert(cert_path)
    key = pki.load_site_private_key(key_path)
    fix = (
        "Secure aggregation cannot prove this site to the others. Issue a new one with "
        "`fedsilo provision certify-site --out FEDERATION_DIR NAME` and copy it into the kit."
    )
    try:
        name = _certified_name(cert, ca, now=_now())
    except IdentityError as exc:
        raise pki.PKIError(f"{cert_path}: {exc} (checked against {ca_path}). {fix}") from None
    try:
        same = cert.public_key() == key.public_key()
    except _MALFORMED:
        same = False
    if not same:
        raise pki.PKIError(
            f"{cert_path} certifies another key than {key_path} (the kit mixes two "
            f"provisionings). {fix}"
        )
    return SiteIdentity(name, key, cert.public_bytes(serialization.Encoding.DER), ca)


# ---------------------------------------------------------------- simulated sites


def write_simulated_identities(directory: Path, names: Sequence[str]) -> None:
    """Give each of `names` a key and certificate in `directory` under a throwaway CA.

    Writes ca.key, ca.crt, NAME.key (OpenSSH, 0600) and NAME.crt (PEM). Names that
    have both files under the CA there are left alone; a missing or unreadable CA is
    made anew, and then every name is (re)issued. For simulations only.
    """
    for name in names:
        if pki.validate_site_name(name) == SIMULATED_CA:
            raise pki.PKIError(f"A simulated site may not be named {SIMULATED_CA!r}.")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key_path, ca_path = directory / f"{SIMULATED_CA}.key", directory / f"{SIMULATED_CA}.crt"
    try:
        ca_key, ca_cert = pki.load_ca_key(ca_key_path), pki.load_cert(ca_path)
        fresh = ca_cert.public_key() != ca_key.public_key()
    except pki.PKIError:
        fresh = True
    if fresh:
        ca_key, ca_cert = pki.new_ca("simulated")
        pki.write_secret(ca_key_path, pki.pem_key(ca_key))
        pki.write_public(ca_path, pki.pem_cert(ca_cert))
    for name in names:
        key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
        if not fresh and key_path.is_file() and cert_path.is_file():
            continue
        key = pki.new_key()
        cert = pki.site_cert(ca_key, ca_cert, name, key.public_key())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        pki.write_secret(key_path, private)
        pki.write_public(cert_path, pki.pem_cert(cert))


def simulated_identity(directory: Path, name: str) -> SiteIdentity:
    """Simulated site `name`'s identity, as `write_simulated_identities` wrote it."""
    return load_identity(
        directory / f"{name}.key", directory / f"{name}.crt", directory / f"{SIMULATED_CA}.crt"
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


__all__ = [
    "IdentityError",
    "SiteIdentity",
    "load_identity",
    "simulated_identity",
    "verify_signed",
    "write_simulated_identities",
]
