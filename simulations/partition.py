"""Split a dataset's example indices across simulated sites.

- `iid`: a seeded shuffle cut into near-equal parts.
- `dirichlet:ALPHA`: per class, site shares drawn from Dir(ALPHA) (Hsu, Qi, Brown,
  "Measuring the Effects of Non-Identical Data Distribution", 2019); redrawn until
  every site holds at least MIN_PER_SITE examples.
- `shards:K`: sort by label, cut into sites x K shards, deal K shards to each site
  (McMahan et al., "Communication-Efficient Learning of Deep Networks from
  Decentralized Data", AISTATS 2017).
"""

from __future__ import annotations

import numpy as np

from fedsilo.config import Partition
from fedsilo.errors import ConfigError

MIN_PER_SITE = 10
MAX_DIRICHLET_DRAWS = 1000


def partition_indices(
    labels: np.ndarray, num_sites: int, spec: Partition, *, seed: int
) -> list[np.ndarray]:
    """Index arrays, one per site, that together cover every example exactly once."""
    n = int(labels.shape[0])
    if num_sites < 1:
        raise ConfigError(f"`sites` must be >= 1. Found {num_sites}.")
    if num_sites * MIN_PER_SITE > n:
        raise ConfigError(
            f"{num_sites} sites need at least {num_sites * MIN_PER_SITE} examples "
            f"({MIN_PER_SITE} each) but the training set has {n}. Use fewer sites."
        )
    rng = np.random.default_rng(seed)
    if spec.kind == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_sites)]
    if spec.kind == "dirichlet":
        return _dirichlet(labels, num_sites, spec.alpha, rng)
    if spec.kind == "shards":
        return _shards(labels, num_sites, spec.shards, rng)
    raise ConfigError(f"Unknown partition kind {spec.kind!r}.")


def _dirichlet(
    labels: np.ndarray, num_sites: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for idx in by_class:
            idx = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].append(chunk)
        sites = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(s) for s in sites) >= MIN_PER_SITE:
            return sites
    raise ConfigError(
        f"dirichlet:{alpha:g} left some of {num_sites} sites with fewer than {MIN_PER_SITE} "
        f"examples in {MAX_DIRICHLET_DRAWS} draws. Use a larger alpha or fewer sites."
    )


def _shards(
    labels: np.ndarray, num_sites: int, per_site: int, rng: np.random.Generator
) -> list[np.ndarray]:
    order = np.argsort(labels, kind="stable")
    total = num_sites * per_site
    if total > len(labels):
        raise ConfigError(
            f"shards:{per_site} with {num_sites} sites needs {total} shards but there are "
            f"only {len(labels)} examples. Use fewer shards or sites."
        )
    shards = np.array_split(order, total)
    deal = rng.permutation(total).reshape(num_sites, per_site)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in deal]
