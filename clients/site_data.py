"""Where a site's training data comes from.

A real site names its own data file in its node config (`data-path`, the `.npz`
site data format). A simulated site (Flower gives it `partition-id` and
`num-partitions`) takes its share of the run's dataset, split by `partition`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError
from fedsilo.simulations.partition import partition_indices
from fedsilo.task.data import SHAPES, Dataset, load_dataset, load_labels, load_npz


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
        data = load_dataset(cfg.dataset, "train", cfg.data_dir, index=parts[pid])
        return SiteData(f"site-{pid}", data, True)
    raise ConfigError(
        "This site has no data: set `data-path` in its node config "
        "(fedsilo client start --data PATH)."
    )
