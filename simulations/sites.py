"""The virtual sites of one `fedsilo simulate` run: the simulated side of a SiteResolver.

Only `fedsilo simulate` builds a `SimulatedSites` (simulations/runner.py) and hands
the ClientApp it makes to Flower's simulation engine; a deployed SuperNode runs the
manifest's ClientApp, whose resolver (fedsilo.clients.site_env.deployed_site) never
reads `partition-id`. Here one user plays every site's operator:

- data: site N takes partition N of the run's task's public training data
  (`partition`, `seed`). The engine hands each message a fresh copy of the ClientApp,
  so nothing a site loaded survives to its next round: the first to need the pool
  decodes it (about a second for Fashion-MNIST) into the run's cache folder, and
  every later site-round maps that file and reads only its own rows. The engine's
  actor processes do outlive a site-round: each keeps the mapped pool, the run's
  partition of it and its sites' rows with their fingerprint (`_mapped`, `_partition`,
  `_site_data`, keyed by the file's identity), so a site-round no longer re-reads the
  file's index, re-shuffles every example (20% of a 1,000-site round's actor time,
  py-spy), or gathers and hashes its rows again;
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

import functools
import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedsilo.clients.dp_train import feature_cache_dir
from fedsilo.clients.site_budget import SiteBudget
from fedsilo.clients.site_env import SiteEnvironment
from fedsilo.config import Partition, RunConfig
from fedsilo.errors import ConfigError, PrivacyError
from fedsilo.privacy import ledger
from fedsilo.privacy.fingerprint import fingerprint
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
        pool, stamp = self._pool(task, cfg.data_dir)
        parts = _partition(stamp, pool.y.numpy(), num, cfg.partition, cfg.seed)
        seed = cfg.seed * SEED_STRIDE + pid
        attack = None
        flipped = False
        if self.hostile is not None and pid in self.hostile.partitions(num):
            attack = tamper(self.hostile, seed)
            flipped = self.hostile.kind == "label-flip"

        def rows() -> Dataset:
            data = pool.subset(parts[pid])
            return flip_labels(data) if flipped else data

        key = (stamp, num, cfg.partition, cfg.seed, pid, flipped)
        data, data_id = _site_data(key, rows) if stamp is not None else (rows(), "")
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
            data_id=data_id,
        )

    def pool(self, task: Task, data_dir: str) -> Dataset:
        """The task's public training data, decoded once per run into its cache folder."""
        return self._pool(task, data_dir)[0]

    def _pool(self, task: Task, data_dir: str) -> tuple[Dataset, Stamp | None]:
        """The pool, and the stamp of the file it is mapped from (None: not from one)."""
        key = hashlib.sha256(f"{task.name}\0{data_dir}".encode()).hexdigest()[:32]
        path = simulated_cache_dir(self.run_dir) / f"pool-{key}.pt"
        stamp = _stamp(path)
        cached = None if stamp is None else _mapped(stamp)
        if cached is not None and {"x", "y"} <= set(cached):
            data = Dataset(cached["x"], cached["y"], task.num_classes, f"{task.name} (train)")
            return data, stamp
        pool = task.public("train", data_dir)
        write_cached(path, {"x": pool.x, "y": pool.y})
        return pool, None


Stamp = tuple[str, int, int, int]  # a file's path, inode, size and modification time


def _stamp(path: Path) -> Stamp | None:
    """What identifies `path`'s current contents: a rewritten file gets a new stamp."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return str(path), st.st_ino, st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _mapped(stamp: Stamp) -> dict[str, torch.Tensor] | None:
    """The pool file of `stamp`, memory-mapped once per process."""
    return read_cached(Path(stamp[0]), mmap=True)


_PARTITIONS: dict[tuple[Stamp, int, str, int], list[np.ndarray]] = {}


def _partition(
    stamp: Stamp | None, labels: np.ndarray, sites: int, partition: str, seed: int
) -> list[np.ndarray]:
    """The run's partition of the pool of `stamp` (whose labels are `labels`), computed
    once per process (the file's stamp is the key, not the labels); a pool mapped from
    no file (`stamp` None) is partitioned afresh."""
    if stamp is None:
        return partition_indices(labels, sites, Partition.parse(partition), seed=seed)
    key = (stamp, sites, partition, seed)
    parts = _PARTITIONS.get(key)
    if parts is None:
        if len(_PARTITIONS) >= 4:  # another run's: a process serves one run at a time
            _PARTITIONS.clear()
        parts = partition_indices(labels, sites, Partition.parse(partition), seed=seed)
        _PARTITIONS[key] = parts
    return parts


# What one actor process keeps of its virtual sites' rows (LRU): a run's sites hold
# the pool once between them (Fashion-MNIST: 188 MB), and a site-round then neither
# gathers its rows from the mapped pool nor hashes them again (12 + 22 ms of a 6,000-
# example site's round, py-spy: a fifth of a distributed-DP site-round's actor time).
SITE_DATA_BYTES = 256 * 2**20
_SITE_DATA: OrderedDict[tuple[object, ...], tuple[Dataset, str]] = OrderedDict()
_SITE_BYTES = [0]  # the bytes _SITE_DATA holds


def _site_data(key: tuple[object, ...], rows: Callable[[], Dataset]) -> tuple[Dataset, str]:
    """A virtual site's rows (`rows()`, made once per process while they fit in
    SITE_DATA_BYTES) and their fingerprint. `key` starts with the pool file's stamp, so
    a rewritten pool is never answered from here."""
    hit = _SITE_DATA.get(key)
    if hit is not None:
        _SITE_DATA.move_to_end(key)
        return hit
    data = rows()
    made = data, fingerprint(data)
    _SITE_DATA[key] = made
    _SITE_BYTES[0] += _nbytes(data)
    while len(_SITE_DATA) > 1 and _SITE_BYTES[0] > SITE_DATA_BYTES:
        _SITE_BYTES[0] -= _nbytes(_SITE_DATA.popitem(last=False)[1][0])
    return made


def _nbytes(data: Dataset) -> int:
    return data.x.nbytes + data.y.nbytes


def simulated_cache_dir(run_dir: str | Path) -> Path:
    """The folder every virtual site of a run caches decoded data and features in."""
    return feature_cache_dir(simulated_ledger(run_dir, 0))
