"""Provisioning: the kits' layout, key types and modes, SANs, and the refusals."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsilo.cli import main
from fedsilo.errors import ConfigError
from fedsilo.privacy import pki
from fedsilo.privacy.certify import certify_sites
from fedsilo.privacy.identity import verify_signed
from fedsilo.privacy.provision import (
    add_site,
    provision,
    read_federation_file,
    read_server_kit,
    read_site_kit,
    renew_server,
)


@pytest.fixture
def fed(tmp_path: Path) -> Path:
    out = tmp_path / "fed"
    provision(out, hosts=["fl.example.org", "10.0.0.5", "::1"], sites=["a", "b"])
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_layout_modes_and_key_types(fed: Path) -> None:
    for d, names in (
        (fed / "server", {"ca.crt", "server.crt", "server.key", "server.toml", "sites"}),
        (fed / "sites" / "a", {"ca.crt", "site.crt", "site.key", "site.pub", "site.toml"}),
    ):
        assert {p.name for p in d.iterdir()} == names
    for secret in (fed / "ca/ca.key", fed / "server/server.key", fed / "sites/a/site.key"):
        assert mode(secret) == 0o600
    assert mode(fed / "sites/a/site.pub") == 0o644
    key = serialization.load_ssh_private_key((fed / "sites/a/site.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    # The server kit authorises exactly the sites' public keys.
    assert (fed / "server/sites/a.pub").read_bytes() == (fed / "sites/a/site.pub").read_bytes()
    assert sorted(read_server_kit(fed / "server").sites) == ["a", "b"]
    kit = read_site_kit(fed / "sites" / "a")
    assert (kit.name, kit.server) == ("a", "fl.example.org:9092")
    provision(fed.parent / "v6", hosts=["::1"], sites=["a"])
    assert read_site_kit(fed.parent / "v6" / "sites" / "a").server == "[::1]:9092"
    assert kit.policy.max_epsilon == 10.0 and kit.policy.delta == 1e-5


def test_server_certificate_sans_and_chain(fed: Path) -> None:
    cert = pki.load_cert(fed / "server/server.crt")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # Every --server-host, plus loopback: the server's own Flower components dial it.
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    ca = pki.load_cert(fed / "ca/ca.crt")
    cert.verify_directly_issued_by(ca)  # raises if not
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # An independent TLS stack accepts the pair: Python's ssl loads cert, key and CA.
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(fed / "server/server.crt", fed / "server/server.key")
    ssl.create_default_context(cafile=str(fed / "ca/ca.crt"))


def test_add_site_keeps_every_existing_key(fed: Path) -> None:
    before = {p: p.read_bytes() for p in fed.rglob("*") if p.is_file()}
    add_site(fed, "c")
    for path, data in before.items():
        assert path.read_bytes() == data, path
    assert (fed / "server/sites/c.pub").read_bytes() == (fed / "sites/c/site.pub").read_bytes()
    assert read_site_kit(fed / "sites/c").server == "fl.example.org:9092"


def test_never_overwrites_without_force(fed: Path) -> None:
    ca = (fed / "ca/ca.crt").read_bytes()
    with pytest.raises(ConfigError, match=r"already holds a federation"):
        provision(fed, hosts=["x"], sites=["z"])
    with pytest.raises(ConfigError, match=r"already exists"):
        add_site(fed, "a")
    assert (fed / "ca/ca.crt").read_bytes() == ca
    old = (fed / "sites/a/site.pub").read_bytes()
    add_site(fed, "a", force=True)
    assert (fed / "sites/a/site.pub").read_bytes() != old
    assert (fed / "ca/ca.crt").read_bytes() == ca  # a site re-key never touches the CA


def test_force_replaces_the_ca_and_drops_old_authorisations(fed: Path) -> None:
    ca = (fed / "ca/ca.crt").read_bytes()
    provision(fed, hosts=["fl.example.org"], sites=["z"], force=True)
    assert (fed / "ca/ca.crt").read_bytes() != ca
    assert sorted(read_server_kit(fed / "server").sites) == ["z"]


def test_add_site_without_federation_never_creates_a_ca(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"never created implicitly"):
        add_site(tmp_path / "none", "a")
    assert not (tmp_path / "none" / "ca").exists()


def test_expired_server_certificate(fed: Path) -> None:
    ca_key = pki.load_ca_key(fed / "ca/ca.key")
    ca = pki.load_cert(fed / "ca/ca.crt")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    _, cert = pki.server_cert(ca_key, ca, ["fl.example.org"], not_after=past)
    (fed / "server/server.crt").write_bytes(pki.pem_cert(cert))
    with pytest.raises(ConfigError, match=r"server certificate expired on .* renew-server"):
        read_server_kit(fed / "server")
    renew_server(fed)
    read_server_kit(fed / "server")  # valid again, same CA
    assert (fed / "server/ca.crt").read_bytes() == (fed / "ca/ca.crt").read_bytes()


def test_server_address_not_covered_by_sans(fed: Path) -> None:
    cert = pki.load_cert(fed / "server/server.crt")
    pki.check_host_covered(cert, "FL.example.org", fed / "server/server.crt")
    pki.check_host_covered(cert, "10.0.0.5", fed / "server/server.crt")
    with pytest.raises(ConfigError, match=r"'10.0.0.6' is not covered .*--server-host 10.0.0.6"):
        pki.check_host_covered(cert, "10.0.0.6", fed / "server/server.crt")
    with pytest.raises(ConfigError, match=r"not covered"):
        pki.check_host_covered(cert, "evil.example.org", fed / "server/server.crt")
    # A kit whose config names a host the certificate lacks is refused at start.
    toml = (fed / "server/server.toml").read_text().replace('"::1"', '"::1", "other.org"')
    (fed / "server/server.toml").write_text(toml)
    with pytest.raises(ConfigError, match=r"'other.org' is not covered"):
        read_server_kit(fed / "server")


def test_wrong_key_types(fed: Path) -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    (fed / "server/sites/b.pub").write_bytes(
        ed.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    with pytest.raises(ConfigError, match=r"b.pub: wrong key type Ed25519.*ECDSA"):
        read_server_kit(fed / "server")
    pki.write_secret(
        fed / "sites/a/site.key",
        ed.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    with pytest.raises(ConfigError, match=r"site.key: wrong key type Ed25519"):
        read_site_kit(fed / "sites/a")
    (fed / "sites/a/site.key").write_text("not a key")
    with pytest.raises(ConfigError, match=r"not an unencrypted OpenSSH private key"):
        read_site_kit(fed / "sites/a")


def test_site_key_readable_by_others_is_refused(fed: Path) -> None:
    (fed / "sites/a/site.key").chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by others .*chmod 600"):
        read_site_kit(fed / "sites/a")


def test_certificate_from_another_federation(fed: Path, tmp_path: Path) -> None:
    provision(tmp_path / "other", hosts=["fl.example.org"], sites=["a"])
    (fed / "server/ca.crt").write_bytes((tmp_path / "other/ca/ca.crt").read_bytes())
    with pytest.raises(ConfigError, match=r"not issued by the federation CA"):
        read_server_kit(fed / "server")


@pytest.mark.parametrize(
    "sites,match",
    [
        (["Bad Name"], "Site name 'Bad Name'"),
        (["../x"], "Site name"),
        (["a\n"], r"Site name 'a\\n'"),  # `$` matches before a final newline: fullmatch
    ],
)
def test_bad_site_names(tmp_path: Path, sites: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        provision(tmp_path / "f", hosts=["h"], sites=sites)
    assert not (tmp_path / "f").exists()


def test_bad_host(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"neither an IP address nor a DNS name"):
        provision(tmp_path / "f", hosts=["http://x"], sites=["a"])
    assert not (tmp_path / "f").exists()


def test_federation_file(tmp_path: Path) -> None:
    f = tmp_path / "federation.toml"
    f.write_text('[federation]\nserver-hosts = ["h", "10.1.2.3"]\nsites = ["a", "b"]\n')
    assert read_federation_file(f) == (["h", "10.1.2.3"], ["a", "b"], 9092)
    f.write_text('[federation]\nserver-hosts = ["h"]\nsites = ["a"]\nsitez = 1\n')
    with pytest.raises(ConfigError, match=r"unknown key"):
        read_federation_file(f)


# ---------------------------------------------------------------- site certificates


def check_site_cert(fed: Path, name: str) -> x509.Certificate:
    """site.crt is the CA's certificate of site.key, for `name`: checked with plain
    `cryptography`, not with the code under test."""
    kit = fed / "sites" / name
    cert = x509.load_pem_x509_certificate((kit / "site.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((fed / "ca/ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if not
    assert (kit / "ca.crt").read_bytes() == (fed / "ca/ca.crt").read_bytes()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
    key = serialization.load_ssh_private_key((kit / "site.key").read_bytes(), None)
    pub = serialization.load_ssh_public_key((kit / "site.pub").read_bytes())
    assert cert.public_key() == key.public_key() == pub
    ext = cert.extensions
    assert not ext.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc < now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc
    assert mode(kit / "site.crt") == 0o644
    return cert


def test_every_site_kit_holds_its_certificate(fed: Path) -> None:
    for name in ("a", "b"):
        check_site_cert(fed, name)
    add_site(fed, "c")
    check_site_cert(fed, "c")
    old = (fed / "sites/c/site.crt").read_bytes()
    add_site(fed, "c", force=True)  # a new key gets a new certificate
    assert (fed / "sites/c/site.crt").read_bytes() != old
    check_site_cert(fed, "c")
    # The kit's identity signs what another site of the federation accepts.
    from fedsilo.privacy.identity import load_identity

    kit = read_site_kit(fed / "sites/a")
    a = load_identity(kit.key, kit.cert, kit.ca)
    assert verify_signed(pki.load_cert(fed / "sites/b/ca.crt"), a.cert, b"m", a.sign(b"m")) == "a"


def test_certify_an_existing_kit_keeps_its_key(fed: Path) -> None:
    """A kit provisioned before site certificates: site.crt is issued for the key it
    has, so the server's allow-list (and every other file) stays as it was."""
    for name in ("a", "b"):
        (fed / "sites" / name / "site.crt").unlink()
    read_site_kit(fed / "sites/a")  # a kit without one still starts (local DP)
    before = {p: p.read_bytes() for p in fed.rglob("*") if p.is_file()}
    assert certify_sites(fed, ["a"]) == [fed / "sites/a/site.crt"]
    check_site_cert(fed, "a")
    assert not (fed / "sites/b/site.crt").exists()
    assert {p: p.read_bytes() for p in fed.rglob("*") if p.is_file() and p.name != "site.crt"} == (
        before
    )
    assert certify_sites(fed) == [fed / "sites/a/site.crt", fed / "sites/b/site.crt"]
    check_site_cert(fed, "b")
    assert read_site_kit(fed / "sites/b").cert == fed / "sites/b/site.crt"


def test_certify_refuses_a_kit_whose_keys_disagree(fed: Path) -> None:
    (fed / "sites/b/site.crt").unlink()
    (fed / "sites/b/site.pub").write_bytes((fed / "sites/a/site.pub").read_bytes())
    with pytest.raises(ConfigError, match=r"sites/b: site.pub is not the public half.*add-site"):
        certify_sites(fed, ["a", "b"])
    assert not (fed / "sites/b/site.crt").exists()  # nothing written, not even a's
    with pytest.raises(ConfigError, match=r"Site name"):
        certify_sites(fed, ["../x"])


def test_certifying_needs_the_ca_key(fed: Path) -> None:
    (fed / "ca/ca.key").rename(fed / "offline.key")
    for act in (lambda: certify_sites(fed), lambda: add_site(fed, "c")):
        with pytest.raises(ConfigError, match=r"ca.key is missing: .* where the CA key is kept"):
            act()
    assert not (fed / "sites/c").exists()


def test_certify_site_command(fed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (fed / "sites/a/site.crt").unlink()
    assert main(["provision", "certify-site", "--out", str(fed), "a"]) == 0
    assert "site a: certificate" in capsys.readouterr().out
    check_site_cert(fed, "a")
    assert main(["provision", "certify-site", "--out", str(fed / "nothing")]) == 2
    assert "holds no federation" in capsys.readouterr().err


def test_a_kit_with_a_bad_certificate_is_refused_at_start(fed: Path, tmp_path: Path) -> None:
    # Another site's certificate: it certifies another key (and name).
    (fed / "sites/a/site.crt").write_bytes((fed / "sites/b/site.crt").read_bytes())
    with pytest.raises(ConfigError, match=r"site.crt certifies another key .*certify-site"):
        read_site_kit(fed / "sites/a")
    # Another federation's.
    provision(tmp_path / "other", hosts=["h"], sites=["a"])
    (fed / "sites/a/site.crt").write_bytes((tmp_path / "other/sites/a/site.crt").read_bytes())
    with pytest.raises(ConfigError, match=r"not issued by the federation CA"):
        read_site_kit(fed / "sites/a")
    # Expired: certify-site renews it, same key.
    kit = fed / "sites/a"
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    cert = pki.site_cert(
        pki.load_ca_key(fed / "ca/ca.key"),
        pki.load_cert(fed / "ca/ca.crt"),
        "a",
        pki.load_site_public_key(kit / "site.pub"),
        not_after=past,
    )
    (kit / "site.crt").write_bytes(pki.pem_cert(cert))
    with pytest.raises(ConfigError, match=r"site.crt: the certificate expired on .*certify-site"):
        read_site_kit(kit)
    certify_sites(fed, ["a"])
    read_site_kit(kit)
    # A kit whose site.toml names another site than its certificate.
    toml = (kit / "site.toml").read_text().replace('name = "a"', 'name = "z"')
    (kit / "site.toml").write_text(toml)
    with pytest.raises(ConfigError, match=r"certifies site 'a', but .*site.toml names 'z'"):
        read_site_kit(kit)
