"""The virtual sites of one `fedsilo simulate` run: the simulated side of a SiteResolver.

Only `fedsilo simulate` builds a `SimulatedSites` (simulations/runner.py) and hands
the ClientApp it makes to Flower's simulation engine; a deployed SuperNode runs the
manifest's ClientApp, whose resolver (fedsilo.clients.site_env.deployed_site) never
reads `partition-id`. Here one user plays every site's operator:

- data: site N takes partition N of the run's task's public training data
  (`partition`, `seed`). The engine hands each message a fresh copy of the ClientApp,
  so nothing loaded survives from one site-round to the next: the first to need the
  pool decodes it (about a second for Fashion-MNIST) into the run's cache folder,
  and every later site-round maps that file and reads only its own rows;
- ledger and policy: RUN_DIR/ledgers/site-N.jsonl, whose policy `fedsilo simulate`
  wrote before the engine started (fedsilo.simulations.ledgers);
- identity (secure aggregation): RUN_DIR/identities/site-N.key and .crt under the
  run's own CA, when `fedsilo simulate --dp distributed` wrote them
  (fedsilo.simulations.identities); none otherwise;
- device: the run's `device`, or cuda when the site's actor holds a GPU
  (`--site-gpus`; Ray then shows it only that GPU);
- hostile sites (`--hostile-sites`, fedsilo.simulations.attacks): the last K
  partitions attack, by their data (label-flip) or the model they send;
- randomness: reproducible from `--seed`, so the same seed gives the same metrics.
  That is for experiments: a deployed site's noise is never derived from the run
  config.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedsilo.clients.dp_train import feature_cache_dir
from fedsilo.clients.site_budget import SiteBudget
from fedsilo.clients.site_env import SiteEnvironment
from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError, PrivacyError
from fedsilo.privacy import ledger
from fedsilo.simulations.attacks import Hostile, flip_labels, tamper
from fedsilo.simulations.identities import simulated_site_identity
from fedsilo.simulations.ledgers import simulated_ledger
from fedsilo.simulations.partition import partition_indices
from fedsilo.task.api import Task
from fedsilo.task.builtin import task_for
from fedsilo.task.data import Dataset
from fedsilo.task.features import read_cached, write_cached

# Mixes the run seed with the partition so that sites draw independent streams.
SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class SimulatedSites:
    """Resolve virtual site `partition-id` of the simulation writing to `run_dir`."""

    run_dir: str
    device: str | None = None  # None: the run's `device`; "cuda" when sites hold a GPU
    hostile: Hostile | None = None  # `--hostile-sites`: the last K sites attack

    def __call__(self, cfg: RunConfig, node_config: Mapping[str, object]) -> SiteEnvironment:
        try:
            pid = int(str(node_config["partition-id"]))
            num = int(str(node_config["num-partitions"]))
        except (KeyError, ValueError):
            raise ConfigError(
                "A simulated site needs Flower's `partition-id` and `num-partitions`; "
                f"got node config {dict(node_config)!r}."
            ) from None
        path = simulated_ledger(self.run_dir, pid)
        policy = ledger.read(path).policy
        if policy is None:
            raise PrivacyError(
                f"Simulated site site-{pid} has no policy in {path}. Start simulations with "
                "`fedsilo simulate`, which writes each site's policy there."
            )
        task = task_for(cfg)
        pool = self.pool(task, cfg.data_dir)
        parts = partition_indices(pool.y.numpy(), num, cfg.partition_spec, seed=cfg.seed)
        data = pool.subset(parts[pid])
        seed = cfg.seed * SEED_STRIDE + pid
        attack = None
        if self.hostile is not None and pid in self.hostile.partitions(num):
            attack = tamper(self.hostile, seed)
            if self.hostile.kind == "label-flip":
                data = flip_labels(data)
        return SiteEnvironment(
            name=f"site-{pid}",
            task=task,
            data=data,
            budget=SiteBudget(path, policy),
            cache_dir=feature_cache_dir(path),
            keep_cache=True,  # shared by the run's sites; the runner deletes it at the end
            device=self.device or cfg.device,
            simulation_seed=seed,
            identity=simulated_site_identity(self.run_dir, pid),
            tamper=attack,
        )

    def pool(self, task: Task, data_dir: str) -> Dataset:
        """The task's public training data, decoded once per run into its cache folder."""
        key = hashlib.sha256(f"{task.name}\0{data_dir}".encode()).hexdigest()[:32]
        path = simulated_cache_dir(self.run_dir) / f"pool-{key}.pt"
        cached = read_cached(path, mmap=True)
        if cached is not None and {"x", "y"} <= set(cached):
            return Dataset(cached["x"], cached["y"], task.num_classes, f"{task.name} (train)")
        pool = task.public("train", data_dir)
        write_cached(path, {"x": pool.x, "y": pool.y})
        return pool


def simulated_cache_dir(run_dir: str | Path) -> Path:
    """The folder every virtual site of a run caches decoded data and features in."""
    return feature_cache_dir(simulated_ledger(run_dir, 0))
