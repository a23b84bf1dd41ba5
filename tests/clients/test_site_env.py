"""A deployed site's environment comes from the node config its launcher passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedsilo.clients.launcher import ClientOptions, node_config
from fedsilo.clients.site_env import deployed_site
from fedsilo.config import RunConfig
from fedsilo.privacy.provision import provision, read_site_kit
from fedsilo.task.rng import SecureRandom


@pytest.mark.parametrize("keep", [False, True])
def test_launcher_node_config_resolves_to_a_deployed_site(tmp_path: Path, keep: bool) -> None:
    provision(tmp_path / "fed", hosts=["localhost"], sites=["a"])
    kit = read_site_kit(tmp_path / "fed/sites/a")
    data = tmp_path / "a.npz"
    np.savez(data, x=np.random.default_rng(0).random((30, 64), np.float32), y=np.arange(30) % 10)
    opts = ClientOptions(server="localhost:9092", data=data, keep_feature_cache=keep)
    site = deployed_site(RunConfig(), node_config(kit, opts))
    assert site.name == "a" and len(site.data) == 30
    assert site.budget.ledger == kit.ledger.resolve()
    assert site.budget.policy == kit.policy
    assert site.cache_dir == kit.ledger.resolve().parent / "feature-cache"
    assert site.keep_cache is keep
    assert not site.simulated and isinstance(site.random(1), SecureRandom)
