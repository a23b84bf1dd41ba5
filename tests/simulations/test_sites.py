"""Virtual sites: the task's training pool is decoded once per run."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsilo.config import RunConfig
from fedsilo.privacy.fingerprint import fingerprint
from fedsilo.privacy.policy import SitePolicy
from fedsilo.simulations.identities import write_simulated_site_identities
from fedsilo.simulations.ledgers import write_site_policies
from fedsilo.simulations.sites import SimulatedSites, simulated_cache_dir
from fedsilo.task import builtin
from fedsilo.task import data as task_data
from tests.task.test_data import write_idx


def idx_dataset(root: Path, n: int = 200) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(exist_ok=True)
    write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), gz=True)
    write_idx(root / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, n), gz=True)


def test_the_pool_is_decoded_once_per_run_whatever_copies_the_engine_makes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flower's engine unpickles a fresh ClientApp (and resolver) for every message: the
    decoded pool must survive that, in the run's cache folder (1,000 sites decoding
    Fashion-MNIST once each took 0.9 s a site-round)."""
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
    first = SimulatedSites(cfg.run_dir)(cfg, node).data
    copy = pickle.loads(pickle.dumps(SimulatedSites(cfg.run_dir)))  # the next message's
    again = copy(cfg, node).data
    other = copy(cfg, {"partition-id": 2, "num-partitions": 4}).data
    assert calls == ["load"]  # one decode serves every site and round of the run
    assert len(first) == len(other) == 50
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    assert first.source == again.source
    assert fingerprint(first) == fingerprint(again)  # the ledger sees the same dataset
    assert fingerprint(first) != fingerprint(other)
    # A damaged cache file is decoded again, not trusted.
    (pool_file,) = simulated_cache_dir(cfg.run_dir).glob("pool-*.pt")
    pool_file.write_bytes(b"not a tensor file")
    assert torch.equal(SimulatedSites(cfg.run_dir)(cfg, node).data.x, first.x)
    assert calls == ["load", "load"]
    # A new run reads the files again: a replaced dataset is seen.
    idx_dataset(tmp_path / "fm", n=300)
    new_run = dataclasses.replace(cfg, run_dir=str(tmp_path / "run2"))
    write_site_policies(new_run.run_dir, [SitePolicy(max_epsilon=8.0)] * 4)
    assert len(SimulatedSites(new_run.run_dir)(new_run, node).data) == 75
    assert calls == ["load", "load", "load"]


def test_a_sites_rows_and_their_hash_are_made_once_per_process_within_a_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A virtual site's rows are gathered and hashed once per actor process, not every
    round (a fifth of a distributed-DP site-round); the hash its ledger gets is the
    rows' own; label-flipped rows are kept apart; the memo keeps to SITE_DATA_BYTES."""
    from fedsilo.simulations import attacks, sites

    idx_dataset(tmp_path / "fm")
    cfg = RunConfig(
        dataset="fashion-mnist", data_dir=str(tmp_path / "fm"), run_dir=str(tmp_path / "run")
    )
    write_site_policies(cfg.run_dir, [SitePolicy(max_epsilon=8.0)] * 4)
    monkeypatch.setattr(sites, "_SITE_DATA", type(sites._SITE_DATA)())
    monkeypatch.setattr(sites, "_SITE_BYTES", [0])
    hashed: list[int] = []
    monkeypatch.setattr(sites, "fingerprint", lambda d: hashed.append(len(d)) or fingerprint(d))
    resolve = SimulatedSites(cfg.run_dir)
    node = {"partition-id": 1, "num-partitions": 4}
    assert resolve(cfg, node).data_id == ""  # the pool's decoder: no file mapped yet
    first, again = resolve(cfg, node), resolve(cfg, node)
    assert again.data is first.data and hashed == [50]
    assert first.data_id == fingerprint(first.data)
    hostile = SimulatedSites(cfg.run_dir, hostile=attacks.Hostile.parse("1:label-flip"))
    flipped = hostile(cfg, {"partition-id": 3, "num-partitions": 4})
    honest = resolve(cfg, {"partition-id": 3, "num-partitions": 4})
    assert not torch.equal(flipped.data.y, honest.data.y)
    assert flipped.data_id == fingerprint(flipped.data) != honest.data_id
    one_site = first.data.x.nbytes + first.data.y.nbytes
    monkeypatch.setattr(sites, "SITE_DATA_BYTES", 2 * one_site)
    for pid in range(4):
        resolve(cfg, {"partition-id": pid, "num-partitions": 4})
    assert len(sites._SITE_DATA) == 2 and sites._SITE_BYTES[0] == 2 * one_site


def test_virtual_sites_have_identities_only_when_the_run_made_them(tmp_path: Path) -> None:
    """`fedsilo simulate --dp distributed` writes RUN_DIR/identities; local DP does not,
    and its sites have none."""
    idx_dataset(tmp_path / "fm")
    cfg = RunConfig(
        dataset="fashion-mnist", data_dir=str(tmp_path / "fm"), run_dir=str(tmp_path / "run")
    )
    write_site_policies(cfg.run_dir, [SitePolicy(max_epsilon=8.0)] * 3)
    node = {"partition-id": 1, "num-partitions": 3}
    assert SimulatedSites(cfg.run_dir)(cfg, node).identity is None
    write_simulated_site_identities(cfg.run_dir, 3)
    sites = [SimulatedSites(cfg.run_dir)(cfg, {**node, "partition-id": p}) for p in range(3)]
    identities = [s.identity for s in sites]
    assert [i.name if i else None for i in identities] == ["site-0", "site-1", "site-2"]
    assert len({i.cert for i in identities if i}) == 3
    one, two = identities[1], identities[2]
    assert one is not None and two is not None
    assert one.verify(two.cert, b"keys", two.sign(b"keys")) == "site-2"
