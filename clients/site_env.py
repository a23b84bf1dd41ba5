"""A site's environment: its data, ledger, policy and randomness, resolved once. No Flower.

The ClientApp never guesses where these come from: it is built with a `SiteResolver`
by whoever runs it, and the resolver alone turns the node config into a
`SiteEnvironment`.

- `deployed_site` is the resolver of the ClientApp the manifest names, the one
  `flower-supernode` runs. It reads the node config `fedsilo client start` passes
  (`data-path`, `site-name`, `ledger-path`, `policy-*`, `keep-feature-cache`,
  `task`, `device`, and `site-key`/`site-cert`/`ca-cert` when the kit holds a site
  certificate), trains only the task its operator named (the server's run
  config cannot make a site import anything else), loads the site's identity for
  secure aggregation (fedsilo.privacy.identity), and
  draws DP randomness from a cryptographically secure source seeded from the OS
  (fedsilo.task.rng.SecureRandom). A node config without those keys is refused,
  whatever else it holds: a SuperNode started with a `partition-id` never falls into
  the simulated path, and nothing the server sends (run seed included) reaches the
  site's random source.
- `fedsilo.simulations.sites.SimulatedSites` is the resolver of `fedsilo simulate`
  only: it builds its ClientApp in-process and hands it to the simulation engine.
  Its sites take a share of a public dataset, keep their ledgers (and, with
  `--dp distributed`, throwaway identities) in the run directory and draw
  reproducible randomness from `--seed` (experiments, not deployments).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsilo.clients.dp_train import feature_cache_dir
from fedsilo.clients.site_budget import SiteBudget
from fedsilo.clients.site_data import load_site_file
from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError, PrivacyError
from fedsilo.privacy import ledger
from fedsilo.privacy.identity import SiteIdentity, load_identity
from fedsilo.privacy.policy import LEDGER_KEY, SitePolicy
from fedsilo.task.api import Task
from fedsilo.task.builtin import BUILTIN as BUILTIN_MODULE
from fedsilo.task.builtin import task_for
from fedsilo.task.data import Dataset
from fedsilo.task.rng import SecureRandom, SeededRandom, SiteRandom

DATA_KEY = "data-path"
TASK_KEY = "task"  # the task this site trains: `builtin` or PACKAGE.MODULE:OBJECT
DEVICE_KEY = "device"  # auto, cpu or cuda: the site's choice, not the server's
BUILTIN = "builtin"
BUILTIN_PREFIX = f"{BUILTIN_MODULE}:"
NAME_KEY = "site-name"
KEEP_CACHE_KEY = "keep-feature-cache"
# The site's identity in secure aggregation: its kit's site.key, site.crt and ca.crt.
SITE_KEY_KEY = "site-key"
SITE_CERT_KEY = "site-cert"
CA_CERT_KEY = "ca-cert"
IDENTITY_KEYS = (SITE_KEY_KEY, SITE_CERT_KEY, CA_CERT_KEY)  # load_identity's order


# (the round's global model, the site's trained model, the round) -> the model it sends
Tamper = Callable[
    [Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], int], dict[str, torch.Tensor]
]


@dataclass(frozen=True)
class SiteEnvironment:
    """What differs between sites, and between simulation and deployment."""

    name: str
    task: Task
    data: Dataset
    budget: SiteBudget
    cache_dir: Path  # features of the site's own data between rounds (private, like the data)
    keep_cache: bool  # False: the ClientApp deletes cache_dir after the run's last round
    device: str = "auto"  # where the site trains: auto (cuda when present), cpu or cuda
    # None: every round draws from a fresh SecureRandom (deployment). An int: a simulated
    # site's own stream, reproducible from the run's --seed (experiments only).
    simulation_seed: int | None = None
    # The key and certificate that prove this site's secure-aggregation keys to the
    # others; None for a site whose kit has no site.crt (it can still train with local DP).
    identity: SiteIdentity | None = None
    # A hostile virtual site's attack on the model it trained (`simulate --hostile-sites`,
    # fedsilo.simulations.attacks); None for every honest and every deployed site.
    tamper: Tamper | None = None
    # The data's fingerprint (fedsilo.privacy.fingerprint) when whoever resolved the site
    # already holds it (a simulation's actor keeps each virtual site's rows and their
    # hash); "" = the round hashes `data` itself.
    data_id: str = ""

    @property
    def simulated(self) -> bool:
        return self.simulation_seed is not None

    def random(self, server_round: int) -> SiteRandom:
        """The source of this round's Poisson sampling and Gaussian noise."""
        if self.simulation_seed is None:
            return SecureRandom()
        return SeededRandom(self.simulation_seed * 10_007 + server_round)

    def rounding(self, server_round: int) -> SiteRandom:
        """The source of this round's update-codec rounding (fedsilo.task.codec): a
        stream apart from training's, so a simulated site's rounding never replays its
        sampling draws."""
        if self.simulation_seed is None:
            return SecureRandom()
        tag = f"codec:{self.simulation_seed}:{server_round}".encode()
        return SeededRandom(int.from_bytes(hashlib.sha256(tag).digest()[:8], "big") >> 1)


SiteResolver = Callable[[RunConfig, Mapping[str, object]], SiteEnvironment]


# The site's ledger path, for its zygote (fedsilo.clients.client_app.zygote_warm): set by
# `fedsilo client start` (fedsilo.clients.launcher) in its SuperNode's environment.
LEDGER_ENV = "FEDSILO_SITE_LEDGER"


def deployed_site(cfg: RunConfig, node_config: Mapping[str, object]) -> SiteEnvironment:
    """A real site, from the node config `fedsilo client start` gives its SuperNode.

    Raises:
        ConfigError, DataError: a task other than the site's, no data file, one that
            does not fit the run's task, or an identity that does not load.
        PrivacyError: no ledger or no policy (a site never trains without both).
    """
    task = site_task(cfg, str(node_config.get(TASK_KEY) or BUILTIN))
    data = load_site_file(task, node_config.get(DATA_KEY))
    name = str(node_config.get(NAME_KEY) or node_config[DATA_KEY])
    policy = SitePolicy.from_node_config(node_config)
    if not str(node_config.get(LEDGER_KEY, "")):
        raise PrivacyError(
            "This site has no privacy ledger: set `ledger-path` in its node config "
            "(fedsilo client start passes the kit's ledger). It refuses to train without one."
        )
    path = Path(str(node_config[LEDGER_KEY])).expanduser()
    ledger.ensure_policy(path, name, policy)
    keep = str(node_config.get(KEEP_CACHE_KEY, "false")).lower() == "true"
    identity = site_identity(node_config)
    if identity is not None and identity.name != name:
        raise ConfigError(
            f"The site's certificate {node_config[SITE_CERT_KEY]} is for site "
            f"{identity.name!r}, but its node config names it {name!r}; start it with "
            "`fedsilo client start --kit` and that kit's own site.crt."
        )
    return SiteEnvironment(
        name,
        task,
        data,
        SiteBudget(path, policy),
        feature_cache_dir(path),
        keep,
        device=str(node_config.get(DEVICE_KEY) or "auto"),
        identity=identity,
    )


def site_identity(node_config: Mapping[str, object]) -> SiteIdentity | None:
    """The identity whose files the node config names; None when it names none.

    Raises:
        ConfigError: only some of the files named, or files that do not load
            (fedsilo.privacy.identity.load_identity says which and why).
    """
    paths = {key: str(node_config.get(key) or "") for key in IDENTITY_KEYS}
    if not any(paths.values()):
        return None
    missing = [key for key, value in paths.items() if not value]
    if missing:
        raise ConfigError(
            f"The node config names a site identity without `{'`, `'.join(missing)}`: "
            f"it needs all of `{'`, `'.join(IDENTITY_KEYS)}` (the kit's site.key, site.crt, "
            "ca.crt), as `fedsilo client start --kit` passes them."
        )
    key, cert, ca = (Path(paths[k]).expanduser() for k in IDENTITY_KEYS)
    return load_identity(key, cert, ca)


def site_task(cfg: RunConfig, allowed: str) -> Task:
    """The run's task, if it is the one this site's operator named; checked before import.

    A server names the task in its run config; a site imports only what its operator
    allowed (`fedsilo client start --task`), so a server can never make a site import
    another module of its installed packages.

    Raises:
        ConfigError: the run asks for another task.
    """
    asked, allowed = _kind(cfg.task), _kind(allowed)
    if asked != allowed:
        mine = "fedsilo's built-in tasks" if allowed == BUILTIN else f"task {allowed}"
        theirs = "a built-in task" if asked == BUILTIN else f"task {asked}"
        raise ConfigError(
            f"This site trains {mine}, but the run asks for {theirs}; restart the site "
            f"with `fedsilo client start --task {cfg.task or BUILTIN}` if it should."
        )
    return task_for(cfg)


def _kind(ref: str) -> str:
    """`builtin` for any built-in task (by flags or by import path), else the reference."""
    return BUILTIN if not ref or ref == BUILTIN or ref.startswith(BUILTIN_PREFIX) else ref
