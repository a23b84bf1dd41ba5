"""Partitions cover every example once, with the promised skew."""

from __future__ import annotations

import numpy as np
import pytest

from fedsilo.config import Partition
from fedsilo.errors import ConfigError
from fedsilo.simulations.partition import partition_indices

LABELS = np.repeat(np.arange(10), 100)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "dirichlet:100", "shards:2"])
def test_covers_each_example_exactly_once(spec: str) -> None:
    parts = partition_indices(LABELS, 7, Partition.parse(spec), seed=0)
    joined = np.concatenate(parts)
    assert len(parts) == 7 and sorted(joined.tolist()) == list(range(len(LABELS)))


def test_iid_sizes_balanced_and_seeded() -> None:
    a = partition_indices(LABELS, 3, Partition.parse("iid"), seed=1)
    b = partition_indices(LABELS, 3, Partition.parse("iid"), seed=1)
    assert [len(p) for p in a] == [334, 333, 333]
    assert all((x == y).all() for x, y in zip(a, b, strict=True))


def test_small_alpha_skews_labels_more_than_large() -> None:
    def mean_classes(alpha: float) -> float:
        parts = partition_indices(LABELS, 10, Partition.parse(f"dirichlet:{alpha}"), seed=0)
        return float(np.mean([len(set(LABELS[p].tolist())) for p in parts]))

    assert mean_classes(0.1) < mean_classes(100.0) == 10.0


def test_shards_give_few_labels_per_site() -> None:
    parts = partition_indices(LABELS, 10, Partition.parse("shards:2"), seed=0)
    assert max(len(set(LABELS[p].tolist())) for p in parts) <= 2


@pytest.mark.parametrize("text", ["dirichlet:0", "dirichlet:-1", "dirichlet:x", "shards:0", "zipf"])
def test_bad_specs(text: str) -> None:
    with pytest.raises(ConfigError):
        Partition.parse(text)


def test_more_sites_than_examples() -> None:
    with pytest.raises(ConfigError, match="Use fewer sites"):
        partition_indices(LABELS[:50], 6, Partition.parse("iid"), seed=0)
