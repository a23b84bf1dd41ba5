"""Provisioning: lay out a federation's keys, certificates and configs as kits.

    DIR/ca/ca.key ca.crt          the federation CA (keep ca.key offline; 0600)
    DIR/server/                   copy to the server machine
      ca.crt server.crt server.key(0600) server.toml
      sites/NAME.pub              the authorised sites' SuperNode public keys
    DIR/sites/NAME/               copy to site NAME
      ca.crt site.key(0600) site.pub site.toml
      site.crt                    the CA's certificate of site.key: the site's identity
                                  in secure aggregation (fedsilo.privacy.identity)

Existing material is never overwritten without `force`; the CA is never
regenerated unless the caller asks for a new federation with `force`.
Kits made before site certificates existed get theirs, same key, from
`fedsilo.privacy.certify`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedsilo.config import check_port
from fedsilo.errors import ConfigError, PrivacyError
from fedsilo.privacy import identity, pki
from fedsilo.privacy.pki import validate_site_name
from fedsilo.privacy.policy import SitePolicy

FLEET_PORT = 9092  # Flower's Fleet API (gRPC-rere) default: what sites dial


# A new site kit's [policy]: the demo run (epsilon 8) fits, a careless 100 does not.
DEFAULT_SITE_POLICY = SitePolicy(max_epsilon=10.0)


@dataclass(frozen=True)
class ServerKit:
    """A server kit directory, read and checked."""

    path: Path
    hosts: list[str]
    fleet_port: int
    sites: dict[str, Path]  # site name -> public key file

    @property
    def ca(self) -> Path:
        return self.path / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.path / "server.crt"

    @property
    def key(self) -> Path:
        return self.path / "server.key"


@dataclass(frozen=True)
class SiteKit:
    """A site kit directory, read and checked."""

    path: Path
    name: str
    server: str  # host:port of the Fleet API
    policy: SitePolicy = DEFAULT_SITE_POLICY

    @property
    def ca(self) -> Path:
        return self.path / "ca.crt"

    @property
    def key(self) -> Path:
        return self.path / "site.key"

    @property
    def cert(self) -> Path:
        """The CA's certificate of `key`; kits provisioned before it existed lack it."""
        return self.path / "site.crt"

    @property
    def ledger(self) -> Path:
        return self.path / "ledger.jsonl"


def address(host: str, port: int) -> str:
    """HOST:PORT as gRPC dials it (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_sites(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ConfigError("`--sites` names no site; use e.g. --sites a,b,c.")
    for n in names:
        validate_site_name(n)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"Site name(s) {', '.join(dup)} given twice in --sites.")
    return names


def read_federation_file(path: Path) -> tuple[list[str], list[str], int]:
    """`--federation FILE.toml`: ([federation] server-hosts, sites, fleet-port)."""
    raw = read_toml(path)
    fed = raw.get("federation")
    if not isinstance(fed, dict):
        raise ConfigError(f"{path}: needs a [federation] table with server-hosts and sites.")
    unknown = set(fed) - {"server-hosts", "sites", "fleet-port"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(sorted(unknown))} in [federation]; "
            "known: server-hosts, sites, fleet-port."
        )
    hosts, sites = fed.get("server-hosts"), fed.get("sites")
    if not (isinstance(hosts, list) and hosts and all(isinstance(h, str) for h in hosts)):
        raise ConfigError(f"{path}: `server-hosts` must be a non-empty list of strings.")
    if not (isinstance(sites, list) and sites and all(isinstance(s, str) for s in sites)):
        raise ConfigError(f"{path}: `sites` must be a non-empty list of strings.")
    port = fed.get("fleet-port", FLEET_PORT)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"{path}: `fleet-port` must be a port number. Found {port!r}.")
    return hosts, parse_sites(",".join(sites)), port


def provision(
    out: Path,
    *,
    hosts: Sequence[str],
    sites: Sequence[str],
    fleet_port: int = FLEET_PORT,
    force: bool = False,
) -> list[Path]:
    """Create a federation: CA, server kit, one kit per site. Returns the files written."""
    if not hosts:
        raise ConfigError("Give at least one --server-host (the name or address sites dial).")
    check_port(fleet_port, flag="--fleet-port")  # before a kit no server could start from
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for the federation's kits.")
    hosts = [pki.host_name(h) for h in hosts]  # internationalised names as A-labels
    for s in sites:
        validate_site_name(s)
    if (out / "ca" / "ca.key").exists() and not force:
        raise ConfigError(
            f"{out} already holds a federation (ca/ca.key). Nothing was changed. "
            "Add sites with `fedsilo provision add-site`; pass --force only to replace "
            "the whole federation (every site must then get its new kit)."
        )
    for h in hosts:
        pki.san_for(h)  # reject bad hosts before writing anything
    if force:  # a new CA: keys authorised under the old one must not linger
        for stale in (out / "server" / "sites").glob("*.pub"):
            stale.unlink()
    ca_key, ca_cert = pki.new_ca(out.resolve().name)
    written = [
        _write(out / "ca" / "ca.key", pki.pem_key(ca_key), secret=True),
        _write(out / "ca" / "ca.crt", pki.pem_cert(ca_cert)),
    ]
    written += _write_server(out, ca_key, ca_cert, list(hosts), fleet_port)
    for s in sites:
        written += _write_site(out, s, ca_key, ca_cert, address(hosts[0], fleet_port))
    return written


def add_site(out: Path, name: str, *, force: bool = False) -> list[Path]:
    """Add one site to an existing federation, leaving every other key untouched."""
    validate_site_name(name)
    ca_key, ca_cert = load_ca(out, "add a site")
    site_dir = out / "sites" / name
    if site_dir.exists() and not force:
        raise ConfigError(
            f"Site {name!r} already exists in {out} ({site_dir}). Nothing was changed; "
            "pass --force to issue it a new key (its old key stops working)."
        )
    kit = read_server_kit(out / "server", check=False)
    return _write_site(out, name, ca_key, ca_cert, address(kit.hosts[0], kit.fleet_port))


def load_ca(out: Path, what: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The federation's CA key and certificate, or ConfigError saying how to get them."""
    ca_cert_path = out / "ca" / "ca.crt"
    if not ca_cert_path.exists():
        raise ConfigError(
            f"{out} holds no federation (missing ca/ca.crt). Create one first with "
            "`fedsilo provision --out DIR --server-host HOST --sites ...`; the CA is never "
            "created implicitly."
        )
    ca_cert = pki.load_cert(ca_cert_path)
    pki.check_valid(ca_cert, ca_cert_path, what="federation CA certificate")
    if not (out / "ca" / "ca.key").exists():
        raise ConfigError(
            f"{out / 'ca' / 'ca.key'} is missing: to {what}, the CA must sign a "
            "certificate. Run this where the CA key is kept (offline), then copy the kit."
        )
    ca_key = pki.load_ca_key(out / "ca" / "ca.key")
    if ca_key.public_key() != ca_cert.public_key():
        raise ConfigError(f"{out / 'ca'}: ca.key is not the key of ca.crt. Restore the CA.")
    return ca_key, ca_cert


def renew_server(out: Path, *, hosts: Sequence[str] = ()) -> list[Path]:
    """Re-issue the server certificate from the federation CA (new key, same CA)."""
    ca_key, ca_cert = load_ca(out, "renew the server certificate")
    kit = read_server_kit(out / "server", check=False)
    return _write_server(out, ca_key, ca_cert, list(hosts) or kit.hosts, kit.fleet_port)


def _write_server(
    out: Path,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: list[str],
    fleet_port: int,
) -> list[Path]:
    key, cert = pki.server_cert(ca_key, ca_cert, hosts)
    d = out / "server"
    (d / "sites").mkdir(parents=True, exist_ok=True)
    toml = (
        "# fedsilo server kit: `fedsilo server start --kit THIS_DIR`\n"
        "[server]\n"
        f"hosts = [{', '.join(_q(h) for h in hosts)}]  # the certificate's SANs\n"
        f"fleet-port = {fleet_port}  # what sites dial (Flower Fleet API, gRPC over TLS)\n"
    )
    return [
        _write(d / "ca.crt", pki.pem_cert(ca_cert)),
        _write(d / "server.key", pki.pem_key(key), secret=True),
        _write(d / "server.crt", pki.pem_cert(cert)),
        _write(d / "server.toml", toml.encode()),
    ]


def _write_site(
    out: Path,
    name: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    server: str,
) -> list[Path]:
    private, public = pki.site_keypair()
    cert = pki.site_cert(ca_key, ca_cert, name, pki.site_public_key(private))
    d = out / "sites" / name
    toml = (
        f"# fedsilo site kit: `fedsilo client start --kit THIS_DIR --data YOUR.npz`\n"
        "[site]\n"
        f"name = {_q(name)}\n"
        f"server = {_q(server)}  # host:port of the federation server (Fleet API)\n"
        "\n"
        "# This site's privacy policy: runs that ask for more are refused. Edit to taste.\n"
        + DEFAULT_SITE_POLICY.to_table()
    )
    return [
        _write(d / "ca.crt", pki.pem_cert(ca_cert)),
        _write(d / "site.key", private, secret=True),
        _write(d / "site.pub", public),
        _write(d / "site.crt", pki.pem_cert(cert)),
        _write(d / "site.toml", toml.encode()),
        _write(out / "server" / "sites" / f"{name}.pub", public),
    ]


def read_server_kit(path: Path, *, check: bool = True) -> ServerKit:
    """Read DIR/server; with `check`, verify certificates (validity, CA, SANs) and keys."""
    _kit_dir(path, "--kit takes the server kit directory (DIR/server)")
    raw = read_toml(path / "server.toml", kit=True)
    srv = raw.get("server", {})
    hosts = srv.get("hosts")
    port = srv.get("fleet-port", FLEET_PORT)
    if not (isinstance(hosts, list) and hosts and all(isinstance(h, str) for h in hosts)):
        raise ConfigError(f"{path / 'server.toml'}: [server] hosts must be a non-empty list.")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(
            f"{path / 'server.toml'}: [server] fleet-port must be a port number in 1..65535. "
            f"Found {port!r}. Fix it there and in each site kit's site.toml (`server`)."
        )
    sites = {p.stem: p for p in sorted((path / "sites").glob("*.pub"))}
    kit = ServerKit(path=path, hosts=hosts, fleet_port=port, sites=sites)
    if check:
        ca = pki.load_cert(kit.ca)
        pki.check_valid(ca, kit.ca, what="federation CA certificate")
        cert = pki.load_cert(kit.cert)
        pki.check_valid(cert, kit.cert, what="server certificate")
        pki.check_signed_by(cert, ca, kit.cert)
        for h in hosts:
            pki.check_host_covered(cert, h, kit.cert)
        if not kit.key.is_file():
            raise ConfigError(f"{kit.key}: the server's TLS key is missing.")
        mode = kit.key.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(
                f"{kit.key}: the server's TLS private key is readable by others (mode "
                f"{mode:o}); anyone who reads it can impersonate the server to every site. "
                f"Run `chmod 600 {kit.key}`."
            )
        if not sites:
            raise ConfigError(
                f"{path / 'sites'} holds no site public keys: no site could join. "
                "Add one with `fedsilo provision add-site`."
            )
        for pub in sites.values():
            pki.load_site_public_key(pub)
    return kit


def read_site_kit(path: Path) -> SiteKit:
    """Read DIR/sites/NAME and check its CA certificate and key."""
    _kit_dir(path, "--kit takes the site's kit directory (DIR/sites/NAME)")
    raw = read_toml(path / "site.toml", kit=True)
    site = raw.get("site", {})
    name, server = site.get("name"), site.get("server")
    if not isinstance(name, str) or not isinstance(server, str):
        raise ConfigError(f"{path / 'site.toml'}: [site] needs `name` and `server` strings.")
    policy = _policy(raw.get("policy", {}), path / "site.toml")
    kit = SiteKit(path=path, name=validate_site_name(name), server=server, policy=policy)
    ca = pki.load_cert(kit.ca)
    pki.check_valid(ca, kit.ca, what="federation CA certificate")
    pki.load_site_private_key(kit.key)
    mode = kit.key.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(
            f"{kit.key}: the site's private key is readable by others (mode {mode:o}); "
            f"anyone who reads it can join the federation as {name!r}. Run `chmod 600 {kit.key}`."
        )
    if kit.cert.exists():  # a kit made before site certificates has none (local DP only)
        certified = identity.load_identity(kit.key, kit.cert, kit.ca).name
        if certified != name:
            raise ConfigError(
                f"{kit.cert} certifies site {certified!r}, but {path / 'site.toml'} names "
                f"{name!r}. Restore the kit's site.toml or its site.crt."
            )
    return kit


def _policy(raw: Mapping[str, Any], path: Path) -> SitePolicy:
    """The kit's [policy], checked as the site will enforce it (fedsilo.privacy.policy)."""
    try:
        return SitePolicy.from_table(raw)
    except PrivacyError as exc:  # inf, nan, negative, delta outside (0, 1): refused at start
        raise ConfigError(f"{path}: [policy] {exc}") from None


def _kit_dir(path: Path, what: str) -> None:
    """Refuse a kit path that is a file (a kit is a directory `fedsilo provision` wrote)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file; {what}, as `fedsilo provision` wrote it.")


def read_toml(path: Path, *, kit: bool = False) -> dict[str, Any]:
    """A TOML file (a kit's, or a run config): ConfigError naming it when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        hint = f" Is {path.parent} a kit written by `fedsilo provision`?" if kit else ""
        raise ConfigError(f"{path} does not exist.{hint}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory; give the TOML file in it.") from None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"Cannot read {path}: {why}. Give a readable TOML file.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc}).") from None


def _write(path: Path, data: bytes, *, secret: bool = False) -> Path:
    (pki.write_secret if secret else pki.write_public)(path, data)
    return path


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
