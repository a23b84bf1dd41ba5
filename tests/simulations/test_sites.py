"""Virtual sites: the task's training pool is decoded once per engine worker and run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedsilo.config import RunConfig
from fedsilo.privacy.fingerprint import fingerprint
from fedsilo.privacy.policy import SitePolicy
from fedsilo.simulations.ledgers import write_site_policies
from fedsilo.simulations.sites import SimulatedSites
from fedsilo.task import builtin
from fedsilo.task import data as task_data
from tests.task.test_data import write_idx


def idx_dataset(root: Path, n: int = 200) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(exist_ok=True)
    write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), gz=True)
    write_idx(root / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, n), gz=True)


def test_the_pool_is_decoded_once_per_worker_and_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    idx_dataset(tmp_path / "fm")
    cfg = RunConfig(
        dataset="fashion-mnist", data_dir=str(tmp_path / "fm"), run_dir=str(tmp_path / "run")
    )
    node = {"partition-id": 1, "num-partitions": 4}
    calls: list[str] = []
    real = builtin.load_dataset

    def counting(*args: object, **kwargs: object) -> task_data.Dataset:
        calls.append("load")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtin, "load_dataset", counting)
    write_site_policies(cfg.run_dir, [SitePolicy(max_epsilon=8.0)] * 4)
    load_site_data = SimulatedSites(cfg.run_dir)
    first = load_site_data(cfg, node).data
    again = load_site_data(cfg, node).data
    other = load_site_data(cfg, {"partition-id": 2, "num-partitions": 4}).data
    assert calls == ["load"]  # one decode serves every site and round of this worker
    assert len(first) == len(other) == 50
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    assert fingerprint(first) == fingerprint(again)  # the ledger sees the same dataset
    assert fingerprint(first) != fingerprint(other)
    # A new run (a new SimulatedSites) reads the files again: a replaced dataset is seen.
    idx_dataset(tmp_path / "fm", n=300)
    assert len(SimulatedSites(cfg.run_dir)(cfg, node).data) == 75
    assert calls == ["load", "load"]
