"""Certify the keys of existing site kits: DIR/sites/NAME/site.crt, same key.

Kits provisioned before site certificates existed hold a key (site.key, site.pub)
that the server already authorises but no certificate for it, and so cannot take
part in secure aggregation, where each site proves its keys to the others
(fedsilo.privacy.identity). `certify_sites` issues that certificate from the
federation CA without touching the key; it also renews an expiring one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fedsilo.errors import ConfigError
from fedsilo.privacy import pki
from fedsilo.privacy.provision import load_ca


def certify_sites(out: Path, names: Sequence[str] = ()) -> list[Path]:
    """Issue DIR/sites/NAME/site.crt for each of `names` (default: every site kit in DIR).

    The certificate is of the kit's existing key (site.pub), so the site keeps its
    SuperNode authorisation; an existing site.crt is replaced (a renewal). Returns
    the certificates written.
    """
    ca_key, ca_cert = load_ca(out, "certify a site")
    names = list(names) or sorted(p.parent.name for p in (out / "sites").glob("*/site.pub"))
    if not names:
        raise ConfigError(f"{out / 'sites'} holds no site kit to certify.")
    public: dict[str, ec.EllipticCurvePublicKey] = {}
    for name in names:  # check every kit before writing any certificate
        d = out / "sites" / pki.validate_site_name(name)
        public[name] = pki.load_site_public_key(d / "site.pub")
        private = d / "site.key"
        if private.exists() and pki.load_site_private_key(private).public_key() != public[name]:
            raise ConfigError(
                f"{d}: site.pub is not the public half of site.key. Nothing was certified; "
                f"re-key the site with `fedsilo provision add-site --force --out {out} {name}`."
            )
    written = []
    for name, key in public.items():
        path = out / "sites" / name / "site.crt"
        pki.write_public(path, pki.pem_cert(pki.site_cert(ca_key, ca_cert, name, key)))
        written.append(path)
    return written
