"""The virtual sites of one `fedsilo simulate` run: the simulated side of a SiteResolver.

Only `fedsilo simulate` builds a `SimulatedSites` (simulations/runner.py) and hands
the ClientApp it makes to Flower's simulation engine; a deployed SuperNode runs the
manifest's ClientApp, whose resolver (fedsilo.clients.site_env.deployed_site) never
reads `partition-id`. Here one user plays every site's operator:

- data: site N takes partition N of the run's public dataset (`partition`, `seed`);
  its share of an IDX dataset is decoded once per run and read from the run's cache
  in later rounds (0.25 s -> 8 ms a site-round for Fashion-MNIST), keyed by the
  files' identity and the rows taken;
- ledger and policy: RUN_DIR/ledgers/site-N.jsonl, whose policy `fedsilo simulate`
  wrote before the engine started (fedsilo.simulations.ledgers);
- randomness: reproducible from `--seed`, so the same seed gives the same metrics.
  That is for experiments: a deployed site's noise is never derived from the run
  config.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsilo.clients.dp_train import feature_cache_dir
from fedsilo.clients.site_budget import SiteBudget
from fedsilo.clients.site_data import task_shape
from fedsilo.clients.site_env import SiteEnvironment
from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError, PrivacyError
from fedsilo.privacy import ledger
from fedsilo.simulations.ledgers import simulated_ledger
from fedsilo.simulations.partition import partition_indices
from fedsilo.task.data import Dataset, dataset_files, load_dataset, load_labels
from fedsilo.task.features import read_cached, write_cached

# Mixes the run seed with the partition so that sites draw independent streams.
SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class SimulatedSites:
    """Resolve virtual site `partition-id` of the simulation writing to `run_dir`."""

    run_dir: str

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
        labels = load_labels(cfg.dataset, "train", cfg.data_dir)
        parts = partition_indices(labels, num, cfg.partition_spec, seed=cfg.seed)
        return SiteEnvironment(
            name=f"site-{pid}",
            data=self.share(cfg, pid, parts[pid]),
            budget=SiteBudget(path, policy),
            cache_dir=feature_cache_dir(path),
            keep_cache=True,  # shared by the run's sites; the runner deletes it at the end
            simulation_seed=cfg.seed * SEED_STRIDE + pid,
        )

    def share(self, cfg: RunConfig, pid: int, index: np.ndarray) -> Dataset:
        """Rows `index` of the run's training set, decoded once per run and site."""
        files = dataset_files(cfg.dataset, "train", cfg.data_dir)
        if not files:
            return load_dataset(cfg.dataset, "train", cfg.data_dir, index=index)
        h = hashlib.sha256()
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
        h.update(np.ascontiguousarray(index, dtype=np.int64).tobytes())
        cache = feature_cache_dir(simulated_ledger(self.run_dir, pid))
        path = cache / f"data-{h.hexdigest()[:32]}.pt"
        cached = read_cached(path)
        if cached is not None and {"x", "y"} <= cached.keys() and len(cached["y"]) == len(index):
            return Dataset(cached["x"], cached["y"], task_shape(cfg)[1], str(files[0].parent))
        data = load_dataset(cfg.dataset, "train", cfg.data_dir, index=index)
        write_cached(path, {"x": data.x, "y": data.y})
        return data


def simulated_cache_dir(run_dir: str | Path) -> Path:
    """The folder every virtual site of a run caches decoded data and features in."""
    return feature_cache_dir(simulated_ledger(run_dir, 0))
