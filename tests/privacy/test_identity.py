"""Site identities: who may sign secure-aggregation keys, and what a hostile server tries.

Each refusal plays the adversary of fedsilo.privacy.identity: a server that substitutes
a site's signature or certificate, mints one with its own TLS key or another CA (even
one with the federation CA's name), replays the CA certificate, or sends garbage.
"""

from __future__ import annotations

import datetime as dt
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.errors import ConfigError
from fedsilo.privacy import pki
from fedsilo.privacy.identity import (
    SIGNING_CONTEXT,
    IdentityError,
    SiteIdentity,
    load_identity,
    simulated_identity,
    verify_signed,
    write_simulated_identities,
)

MESSAGE = b"round 3 | node 17 | c-pk | s-pk"


@dataclass(frozen=True)
class Federation:
    ca_key: ec.EllipticCurvePrivateKey
    ca: x509.Certificate

    def site(self, name: str, **kwargs: dt.datetime) -> SiteIdentity:
        key = pki.new_key()
        cert = pki.site_cert(self.ca_key, self.ca, name, key.public_key(), **kwargs)
        return SiteIdentity(name, key, cert.public_bytes(serialization.Encoding.DER), self.ca)


def federation(name: str = "fed") -> Federation:
    return Federation(*pki.new_ca(name))


@pytest.fixture(scope="module")
def fed() -> Federation:
    return federation()


@pytest.fixture(scope="module")
def site_a(fed: Federation) -> SiteIdentity:
    return fed.site("a")


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_a_signature_verifies_to_the_certified_name(fed: Federation, site_a: SiteIdentity) -> None:
    signature = site_a.sign(MESSAGE)
    assert verify_signed(fed.ca, site_a.cert, MESSAGE, signature) == "a"
    assert fed.site("b").verify(site_a.cert, MESSAGE, signature) == "a"
    # The certificate is what the CA issued: CN, a leaf for signatures, clientAuth.
    cert = x509.load_der_x509_certificate(site_a.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "a"
    ext = cert.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).critical
    assert not ext.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(site_a.key.public_key())
    )
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA384)
    assert "key" not in repr(site_a)  # the private key never reaches a log


def test_another_sites_signature_under_a_certificate_is_refused(
    fed: Federation, site_a: SiteIdentity
) -> None:
    """The server pairs site a's certificate with keys site b (or it) signed."""
    b = fed.site("b")
    with pytest.raises(IdentityError, match=r"does not verify with the key of 'a'"):
        verify_signed(fed.ca, site_a.cert, MESSAGE, b.sign(MESSAGE))


def test_a_tampered_message_is_refused(fed: Federation, site_a: SiteIdentity) -> None:
    """The server swaps the keys a site signed for its own."""
    signature = site_a.sign(MESSAGE)
    with pytest.raises(IdentityError, match=r"does not verify"):
        verify_signed(fed.ca, site_a.cert, MESSAGE.replace(b"17", b"18"), signature)
    with pytest.raises(IdentityError, match=r"does not verify"):
        verify_signed(fed.ca, site_a.cert, MESSAGE, signature[:-1] + bytes([signature[-1] ^ 1]))


def test_a_signature_made_for_another_purpose_is_refused(
    fed: Federation, site_a: SiteIdentity
) -> None:
    """The same key authenticates the SuperNode: a signature without the context prefix
    (as Flower's, or anyone's, over the bare bytes) proves nothing here."""
    bare = site_a.key.sign(MESSAGE, ec.ECDSA(hashes.SHA384()))
    with pytest.raises(IdentityError, match=r"does not verify"):
        verify_signed(fed.ca, site_a.cert, MESSAGE, bare)
    prefixed = site_a.key.sign(SIGNING_CONTEXT + MESSAGE, ec.ECDSA(hashes.SHA384()))
    assert verify_signed(fed.ca, site_a.cert, MESSAGE, prefixed) == "a"


def test_a_site_of_another_federation_is_refused(fed: Federation) -> None:
    other = federation("other").site("a")
    with pytest.raises(IdentityError, match=r"not issued by the federation CA"):
        verify_signed(fed.ca, other.cert, MESSAGE, other.sign(MESSAGE))
    # A CA the server made with the federation CA's very name: the names match, the
    # signature on the certificate does not.
    impostor = federation("fed")
    assert impostor.ca.subject == fed.ca.subject
    forged = impostor.site("a")
    with pytest.raises(IdentityError, match=r"not signed by the federation CA"):
        verify_signed(fed.ca, forged.cert, MESSAGE, forged.sign(MESSAGE))


def test_the_ca_certificate_is_not_a_site_certificate(fed: Federation) -> None:
    """It is signed by the CA (itself): only its BasicConstraints tell it apart."""
    signature = fed.ca_key.sign(SIGNING_CONTEXT + MESSAGE, ec.ECDSA(hashes.SHA384()))
    with pytest.raises(IdentityError, match=r"CA certificate is not a site certificate"):
        verify_signed(fed.ca, der(fed.ca), MESSAGE, signature)


def test_the_servers_own_certificate_is_not_a_site_certificate(fed: Federation) -> None:
    """A hostile server holds its TLS key and a certificate the CA issued for it."""
    key, cert = pki.server_cert(fed.ca_key, fed.ca, ["fl.example.org"])
    signature = key.sign(SIGNING_CONTEXT + MESSAGE, ec.ECDSA(hashes.SHA384()))
    with pytest.raises(IdentityError, match=r"not a site certificate \(no clientAuth\)"):
        verify_signed(fed.ca, der(cert), MESSAGE, signature)


def test_an_expired_or_future_certificate_is_refused(fed: Federation) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = fed.site("a", not_after=now - dt.timedelta(days=1))
    with pytest.raises(IdentityError, match=r"expired on"):
        verify_signed(fed.ca, expired.cert, MESSAGE, expired.sign(MESSAGE))
    # Within pki.CLOCK_SKEW of its end, a site whose clock runs ahead still accepts it.
    just = fed.site("a", not_after=now - pki.CLOCK_SKEW / 2)
    assert verify_signed(fed.ca, just.cert, MESSAGE, just.sign(MESSAGE)) == "a"
    future = x509.load_der_x509_certificate(fed.site("a").cert)
    key = pki.new_key()
    late = (
        x509.CertificateBuilder()
        .subject_name(future.subject)
        .issuer_name(fed.ca.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now + dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
    )
    for extension in future.extensions:
        late = late.add_extension(extension.value, extension.critical)
    cert = late.sign(fed.ca_key, hashes.SHA384())
    signature = key.sign(SIGNING_CONTEXT + MESSAGE, ec.ECDSA(hashes.SHA384()))
    with pytest.raises(IdentityError, match=r"not valid before"):
        verify_signed(fed.ca, der(cert), MESSAGE, signature)


def test_a_certificate_of_a_non_ecdsa_key_is_refused(fed: Federation) -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    cert = pki.site_cert(fed.ca_key, fed.ca, "a", ed.public_key())  # type: ignore[arg-type]
    with pytest.raises(IdentityError, match=r"holds no ECDSA key"):
        verify_signed(fed.ca, der(cert), MESSAGE, ed.sign(SIGNING_CONTEXT + MESSAGE))


@pytest.mark.parametrize(
    "cert_der,signature",
    [
        (b"", b""),
        (b"\x30\x03\x02\x01\x01", b"sig"),
        (b"not a certificate at all", b"\x30\x06\x02\x01\x01\x02\x01\x01"),
        ("a string", b"sig"),
        (None, None),
    ],
)
def test_garbage_is_an_identity_error(fed: Federation, cert_der: object, signature: object) -> None:
    with pytest.raises(IdentityError):
        verify_signed(fed.ca, cert_der, MESSAGE, signature)  # type: ignore[arg-type]


def test_wrong_types_beside_a_good_certificate_are_identity_errors(
    fed: Federation, site_a: SiteIdentity
) -> None:
    signature = site_a.sign(MESSAGE)
    for message, sig in ((None, signature), ("text", signature), (MESSAGE, None), (MESSAGE, b"")):
        with pytest.raises(IdentityError):
            verify_signed(fed.ca, site_a.cert, message, sig)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_damaged_certificate_never_raises_anything_else(
    fed: Federation, site_a: SiteIdentity, data: st.DataObject
) -> None:
    """Bytes flipped or cut anywhere in a good certificate: refused with IdentityError,
    or (a flip the parser ignores) still a's own certificate, never another name."""
    cert = bytearray(site_a.cert)
    i = data.draw(st.integers(0, len(cert) - 1))
    if data.draw(st.booleans()):
        cert[i] ^= data.draw(st.integers(1, 255))
        damaged = bytes(cert)
    else:
        damaged = bytes(cert[:i])
    try:
        name = verify_signed(fed.ca, damaged, MESSAGE, site_a.sign(MESSAGE))
    except IdentityError:
        return
    assert name == "a"


# ---------------------------------------------------------------- loading from files


def write_identity(directory: Path, fed: Federation, name: str) -> tuple[Path, Path, Path]:
    key = pki.new_key()
    paths = directory / f"{name}.key", directory / f"{name}.crt", directory / "ca.crt"
    pki.write_secret(
        paths[0],
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    pki.write_public(
        paths[1], pki.pem_cert(pki.site_cert(fed.ca_key, fed.ca, name, key.public_key()))
    )
    pki.write_public(paths[2], pki.pem_cert(fed.ca))
    return paths


def test_load_identity_checks_the_files_agree(tmp_path: Path, fed: Federation) -> None:
    key, cert, ca = write_identity(tmp_path, fed, "a")
    identity = load_identity(key, cert, ca)
    assert identity.name == "a" and identity.ca == fed.ca
    assert identity.verify(identity.cert, MESSAGE, identity.sign(MESSAGE)) == "a"
    # A key the certificate is not for.
    other_key, _, _ = write_identity(tmp_path, fed, "b")
    with pytest.raises(
        ConfigError, match=r"a.crt certifies another key than .*b.key.*certify-site"
    ):
        load_identity(other_key, cert, ca)
    # A certificate from another federation's CA.
    (tmp_path / "other").mkdir()
    _, _, other_ca = write_identity(tmp_path / "other", federation("other"), "a")
    with pytest.raises(
        ConfigError, match=r"a.crt: .*not issued by the federation CA .*certify-site"
    ):
        load_identity(key, cert, other_ca)
    with pytest.raises(ConfigError, match=r"missing.crt: certificate file does not exist"):
        load_identity(key, tmp_path / "missing.crt", ca)


def test_simulated_identities_are_distinct_and_kept(tmp_path: Path) -> None:
    d = tmp_path / "identities"
    write_simulated_identities(d, ["site-0", "site-1"])
    a, b = simulated_identity(d, "site-0"), simulated_identity(d, "site-1")
    assert (a.name, b.name) == ("site-0", "site-1")
    assert a.cert != b.cert and a.key.public_key() != b.key.public_key()
    assert a.verify(b.cert, MESSAGE, b.sign(MESSAGE)) == "site-1"
    assert stat.S_IMODE((d / "site-0.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    # Idempotent: present names keep their files; a new one joins under the same CA.
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    write_simulated_identities(d, ["site-0", "site-1", "site-2"])
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.name in before} == before
    assert simulated_identity(d, "site-2").verify(a.cert, MESSAGE, a.sign(MESSAGE)) == "site-0"
    # Without its CA key no new name can be issued under the old CA: all are reissued.
    (d / "ca.key").unlink()
    write_simulated_identities(d, ["site-0"])
    assert (d / "site-0.crt").read_bytes() != before["site-0.crt"]
    assert simulated_identity(d, "site-0").name == "site-0"
    with pytest.raises(ConfigError, match=r"may not be named 'ca'"):
        write_simulated_identities(d, ["ca"])
    with pytest.raises(ConfigError, match=r"Site name '../x'"):
        write_simulated_identities(d, ["../x"])


def test_a_ca_signature_is_checked_once_but_dates_and_forgeries_every_time(
    fed: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every site checks every other site's certificate every round, so a certificate's
    CA signature is remembered; its validity dates are checked at each use, and a
    certificate with the same fields under another key's signature is checked afresh."""
    from fedsilo.privacy import identity

    identity._issued_by.cache_clear()
    now = dt.datetime.now(dt.UTC)
    site = fed.site("a", not_after=now + dt.timedelta(hours=1))
    for _ in range(3):
        assert verify_signed(fed.ca, site.cert, MESSAGE, site.sign(MESSAGE)) == "a"
    info = identity._issued_by.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    later = now + dt.timedelta(hours=1) + 2 * pki.CLOCK_SKEW
    monkeypatch.setattr(identity, "_now", lambda: later)
    with pytest.raises(IdentityError, match=r"expired on"):
        verify_signed(fed.ca, site.cert, MESSAGE, site.sign(MESSAGE))
    monkeypatch.undo()
    mallory_key, _ = pki.new_ca("fed")  # the same CA name, another key
    forged = pki.site_cert(mallory_key, fed.ca, "a", site.key.public_key())
    with pytest.raises(IdentityError, match=r"not signed by the federation CA"):
        verify_signed(fed.ca, der(forged), MESSAGE, site.sign(MESSAGE))
