"""The identities of a simulation's virtual sites: RUN_DIR/identities, under a CA of the run's own.

With `--dp distributed` a site proves its secure-aggregation keys to the others with a
key and a certificate from the federation CA (fedsilo.privacy.identity). A deployed
site gets them from `fedsilo provision`; here `fedsilo simulate` plays every
operator, as it does for the sites' ledgers (fedsilo.simulations.ledgers): before the
engine starts it writes

    RUN_DIR/identities/ca.key ca.crt        the run's throwaway CA (0600 key)
    RUN_DIR/identities/site-N.key site-N.crt
    RUN_DIR/federation-ca.crt               the CA the ServerApp checks signatures with

and virtual site N loads its identity from there (fedsilo.simulations.sites). A
resumed run keeps them. Local-DP runs, which may simulate thousands of sites, make none.
"""

from __future__ import annotations

from pathlib import Path

from fedsilo.privacy import pki
from fedsilo.privacy.identity import (
    SIMULATED_CA,
    SiteIdentity,
    simulated_identity,
    write_simulated_identities,
)
from fedsilo.server.run_dir import FEDERATION_CA

IDENTITY_DIR = "identities"


def simulated_identities(run_dir: str | Path) -> Path:
    """RUN_DIR/identities: the virtual sites' keys and certificates, and their CA."""
    return Path(run_dir) / IDENTITY_DIR


def write_simulated_site_identities(run_dir: str | Path, sites: int) -> Path:
    """Give virtual sites 0..sites-1 an identity (kept where they have one), and leave
    the CA's certificate where the ServerApp reads it. Returns RUN_DIR/identities."""
    directory = simulated_identities(run_dir)
    write_simulated_identities(directory, [f"site-{pid}" for pid in range(sites)])
    pki.write_public(
        Path(run_dir) / FEDERATION_CA, (directory / f"{SIMULATED_CA}.crt").read_bytes()
    )
    return directory


def simulated_site_identity(run_dir: str | Path, partition_id: int) -> SiteIdentity | None:
    """Virtual site `partition_id`'s identity; None when the run made none (local DP)."""
    directory = simulated_identities(run_dir)
    if not directory.is_dir():
        return None
    return simulated_identity(directory, f"site-{partition_id}")
