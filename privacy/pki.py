"""The federation's keys and certificates: pure functions over `cryptography` objects.

- A federation CA (ECDSA P-384, self-signed, `BasicConstraints(ca=True)`).
- The server's TLS key and certificate, signed by the CA, with a SAN for every
  server host: an IP SAN for an address, a DNS SAN for a name (RFC 6125: clients
  match the name they dial against the SANs, never the CN).
- One ECDSA P-384 key pair per site, in OpenSSH format, for Flower SuperNode
  authentication (the SuperLink allow-lists the public key).
- A site certificate for that same key, signed by the CA (CN = the site's name,
  clientAuth): other sites check it before they trust the site's secure-aggregation
  keys (fedsilo.privacy.identity).

Nothing here touches the file system except `write_secret`/`write_public`; the
kit layout lives in `fedsilo.privacy.provision`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsilo.errors import ConfigError

CURVE = ec.SECP384R1()  # what Flower's SuperNode auth accepts (any NIST curve); TLS-wide support
CA_DAYS = 5 * 365  # the CA outlives several server certificates
SERVER_DAYS = 825  # the CA/Browser Forum's long-standing cap for a TLS leaf
SITE_DAYS = 825  # like the server's: `fedsilo provision certify-site` renews it, same key
CLOCK_SKEW = dt.timedelta(minutes=5)  # not-before slack for sites whose clocks run behind
SITE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # a kit's folder and a certificate's CN


class PKIError(ConfigError):
    """Bad, expired or mismatched key material."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def validate_site_name(name: str) -> str:
    if not SITE_NAME.fullmatch(name):  # match() with `$` let a trailing newline through
        raise ConfigError(
            f"Site name {name!r} must be 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit."
        )
    return name


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE)


def new_ca(
    name: str, *, days: int = CA_DAYS
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA for one federation."""
    key = new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} federation CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """A KeyUsage extension with only the `allowed` uses set."""
    uses = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment"]
    uses += ["key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"]
    return x509.KeyUsage(**{use: allowed.get(use, False) for use in uses})


def san_for(host: str) -> x509.GeneralName:
    """An IP SAN for an IP address, a DNS SAN for a name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c.isspace() or c in "/:@" for c in host):
        raise PKIError(f"Server host {host!r} is neither an IP address nor a DNS name.")
    return x509.DNSName(dns_name(host))


def host_name(host: str) -> str:
    """An IP address as given, a DNS name as its A-labels (what kits and certificates hold)."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        return dns_name(host)


def dns_name(host: str) -> str:
    """`host` as certificates and resolvers spell it: internationalised labels as A-labels."""
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        raise PKIError(
            f"Server host {host!r} is not a valid DNS name (IDNA: a label is empty or longer "
            "than 63 characters, or holds characters DNS cannot carry)."
        ) from None


# The server's own Flower components (SuperExec, the ServerApp process, the `flwr`
# CLI) reach the SuperLink over loopback with TLS verified against the federation CA,
# so the server certificate always covers these too, whatever --server-host says.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: list[str],
    *,
    days: int = SERVER_DAYS,
    not_after: dt.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The server's TLS key and a certificate with a SAN for every host and loopback."""
    if not hosts:
        raise PKIError("The server needs at least one host name or address (--server-host).")
    names = list(dict.fromkeys([*hosts, *LOOPBACK_HOSTS]))  # ordered, no duplicates
    key = new_key()
    now = _now()
    end = not_after or now + dt.timedelta(days=days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(now - CLOCK_SKEW, end - dt.timedelta(days=1)))
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([san_for(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def site_keypair() -> tuple[bytes, bytes]:
    """A site's SuperNode auth key pair: (OpenSSH private key, OpenSSH public key)."""
    key = new_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


def site_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    name: str,
    public_key: ec.EllipticCurvePublicKey,
    *,
    days: int = SITE_DAYS,
    not_after: dt.datetime | None = None,
) -> x509.Certificate:
    """The CA's certificate that `public_key` is site `name`'s identity key.

    A leaf (`BasicConstraints(ca=False)`, critical) for signatures only
    (`KeyUsage(digital_signature)`, clientAuth): unlike the server's certificate
    (serverAuth) it passes `fedsilo.privacy.identity`'s site check. It never outlives
    the CA.
    """
    now = _now()
    end = min(not_after or now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(now - CLOCK_SKEW, end - dt.timedelta(days=1)))
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )


def site_public_key(private: bytes) -> ec.EllipticCurvePublicKey:
    """The public half of an OpenSSH EC private key (what `site_keypair` returns first)."""
    key = serialization.load_ssh_private_key(private, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"A site key must be an ECDSA key, found {_kind(key)}.")
    return key.public_key()


# ---------------------------------------------------------------- reading and checking


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def read_file(path: Path, what: str) -> bytes:
    """The bytes of a kit file, or PKIError saying why it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{path}: {what} does not exist.") from None
    except IsADirectoryError:
        raise PKIError(f"{path}: {what} is a directory, not a file. Restore the kit.") from None
    except OSError as exc:
        raise PKIError(f"{path}: {what} cannot be read ({exc.strerror}).") from None


def load_cert(path: Path) -> x509.Certificate:
    raw = read_file(path, "certificate file")
    try:
        return x509.load_pem_x509_certificate(raw)
    except ValueError:
        raise PKIError(f"{path}: not a PEM certificate.") from None


def load_ca_key(path: Path) -> ec.EllipticCurvePrivateKey:
    raw = read_file(path, "the CA key")
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError):
        raise PKIError(f"{path}: not an unencrypted PEM private key.") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{path}: the CA key must be an ECDSA key, found {type(key).__name__}.")
    return key


def check_valid(cert: x509.Certificate, path: Path, *, what: str) -> None:
    """Raise PKIError when `cert` is expired or not yet valid."""
    now = _now()
    if now > cert.not_valid_after_utc:
        raise PKIError(
            f"{path}: the {what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC. "
            "Sites would refuse the connection; re-issue it with `fedsilo provision "
            "renew-server` (or provision a new federation if the CA itself expired)."
        )
    if now < cert.not_valid_before_utc:
        raise PKIError(
            f"{path}: the {what} is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this machine's clock."
        )


def check_signed_by(cert: x509.Certificate, ca: x509.Certificate, path: Path) -> None:
    """Raise PKIError unless `ca` signed `cert`."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PKIError(
            f"{path}: this certificate was not issued by the federation CA beside it; "
            "the kit mixes material from two federations. Provision the kit again."
        ) from None


def cert_hosts(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses in the certificate's SANs."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = list(san.get_values_for_type(x509.DNSName))
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return names


def check_host_covered(cert: x509.Certificate, host: str, path: Path) -> None:
    """Raise PKIError when a client dialling `host` would reject `cert`."""
    covered = cert_hosts(cert)
    try:
        ip = ipaddress.ip_address(host)
        ok = any(_same_ip(ip, h) for h in covered)
    except ValueError:
        ok = any(_dns_match(host, h) for h in covered)
    if not ok:
        raise PKIError(
            f"Server address {host!r} is not covered by the server certificate {path} "
            f"(its names: {', '.join(covered) or 'none'}). TLS would fail; dial one of those, "
            f"or provision with `--server-host {host}`."
        )


def _same_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, text: str) -> bool:
    try:
        return ipaddress.ip_address(text) == ip
    except ValueError:
        return False


def _dns_match(host: str, pattern: str) -> bool:
    with contextlib.suppress(PKIError):
        host = dns_name(host)
    host, pattern = host.lower().rstrip("."), pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        return "." in host and host.split(".", 1)[1] == pattern[2:]
    return host == pattern


def load_site_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A site's OpenSSH EC private key, or PKIError naming what is wrong."""
    raw = read_file(path, "the site's private key")
    try:
        key = serialization.load_ssh_private_key(raw, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PKIError(
            f"{path}: not an unencrypted OpenSSH private key ({exc}). SuperNode "
            "authentication needs an ECDSA key in OpenSSH format, as `fedsilo provision` writes."
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(
            f"{path}: wrong key type {_kind(key)}; SuperNode authentication needs an "
            "ECDSA (NIST P-256/P-384/P-521) key. Re-provision the site."
        )
    return key


def load_site_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A site's OpenSSH EC public key, or PKIError naming what is wrong."""
    raw = read_file(path, "the site's public key")
    try:
        key = serialization.load_ssh_public_key(raw.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PKIError(f"{path}: not an OpenSSH public key ({exc}).") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PKIError(
            f"{path}: wrong key type {_kind(key)}; SuperNode authentication needs an "
            "ECDSA (NIST P-256/P-384/P-521) key. Re-provision the site."
        )
    return key


def _kind(key: object) -> str:
    return type(key).__name__.lstrip("_").replace("PrivateKey", "").replace("PublicKey", "")


def write_secret(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (mode 0600), from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
