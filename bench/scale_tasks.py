"""A task big enough to split among 10,000 simulated sites, for bench.scale.

`blobs`: 10 Gaussian blobs in 20 dimensions, 150,000 training examples (15 a site at
10,000 sites; fedsilo needs at least 10) and 10,000 test examples, drawn from a fixed
seed; a 20 -> 32 -> 10 tanh MLP. Synthetic on purpose: the bench measures what a site
costs the engine, not what a model learns. `--task bench.scale_tasks:blobs` (the bench
puts the repository on PYTHONPATH).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from fedsilo.task.api import Task
from fedsilo.task.data import Dataset, load_npz, make_dataset

FEATURES, CLASSES = 20, 10
SIZES = {"train": 150_000, "test": 10_000}


def _blobs(split: str, data_dir: str) -> Dataset:
    rng = np.random.default_rng(2026)
    centres = rng.normal(0.0, 1.0, (CLASSES, FEATURES))
    rng = np.random.default_rng({"train": 1, "test": 2}[split])
    y = rng.integers(0, CLASSES, SIZES[split])
    x = centres[y] + rng.normal(0.0, 1.0, (SIZES[split], FEATURES))
    return make_dataset(x.astype(np.float32), y, num_classes=CLASSES, source=f"blobs {split}")


def _read_site(path: Path) -> Dataset:
    return load_npz(path, num_classes=CLASSES, input_shape=(FEATURES,))


blobs = Task(
    name="blobs",
    input_shape=(FEATURES,),
    num_classes=CLASSES,
    model=lambda: nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, CLASSES)),
    read_site_data=_read_site,
    public_data=_blobs,
)
