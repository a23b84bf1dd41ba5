"""Where a site's training data comes from.

A real site names its own data file in its node config (`data-path`, the `.npz`
site data format). A simulated site (Flower gives it `partition-id` and
`num-partitions`) takes its share of the run's dataset, split by `partition`.

A simulated site's share of an IDX dataset is decoded once per run: later rounds
read it from the site's cache (beside its ledger in RUN_DIR, deleted when the
simulation ends), keyed by the files' identity and the rows taken, instead of
gunzipping the whole dataset again (0.3 s a site-round for Fashion-MNIST).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from fedsilo.clients.dp_train import feature_cache_dir
from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError
from fedsilo.simulations.ledgers import simulated_ledger
from fedsilo.simulations.partition import partition_indices
from fedsilo.task.data import (
    SHAPES,
    Dataset,
    dataset_files,
    load_dataset,
    load_labels,
    load_npz,
)
from fedsilo.task.features import read_cached, write_cached


@dataclass(frozen=True)
class SiteData:
    """A site's training data and identity."""

    name: str
    data: Dataset
    simulated: bool  # True: a share of a public dataset inside `fedsilo simulate`


def task_shape(cfg: RunConfig) -> tuple[tuple[int, ...], int]:
    """Input shape and class count of the run's task."""
    if cfg.dataset not in SHAPES:
        raise ConfigError(
            f"`dataset` {cfg.dataset!r} names no task shape; use digits, fashion-mnist or mnist."
        )
    return SHAPES[cfg.dataset]


def load_site_data(cfg: RunConfig, node_config: Mapping[str, object]) -> SiteData:
    """Load this site's training data from its node config."""
    shape, classes = task_shape(cfg)
    if "data-path" in node_config:
        path = str(node_config["data-path"])
        name = str(node_config.get("site-name", path))
        return SiteData(name, load_npz(path, num_classes=classes, input_shape=shape), False)
    if "partition-id" in node_config:
        pid = int(str(node_config["partition-id"]))
        num = int(str(node_config["num-partitions"]))
        labels = load_labels(cfg.dataset, "train", cfg.data_dir)
        parts = partition_indices(labels, num, cfg.partition_spec, seed=cfg.seed)
        return SiteData(f"site-{pid}", _simulated_share(cfg, pid, parts[pid]), True)
    raise ConfigError(
        "This site has no data: set `data-path` in its node config "
        "(fedsilo client start --data PATH)."
    )


def _simulated_share(cfg: RunConfig, pid: int, index: np.ndarray) -> Dataset:
    """Rows `index` of the run's training set, decoded once per run and site."""
    files = dataset_files(cfg.dataset, "train", cfg.data_dir)
    if not files or not cfg.run_dir:
        return load_dataset(cfg.dataset, "train", cfg.data_dir, index=index)
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
    h.update(np.ascontiguousarray(index, dtype=np.int64).tobytes())
    path = feature_cache_dir(simulated_ledger(cfg.run_dir, pid)) / f"data-{h.hexdigest()[:32]}.pt"
    cached = read_cached(path)
    if cached is not None and {"x", "y"} <= cached.keys() and len(cached["y"]) == len(index):
        return Dataset(cached["x"], cached["y"], SHAPES[cfg.dataset][1], str(files[0].parent))
    data = load_dataset(cfg.dataset, "train", cfg.data_dir, index=index)
    write_cached(path, {"x": data.x, "y": data.y})
    return data
