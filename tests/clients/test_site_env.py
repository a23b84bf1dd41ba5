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


def test_a_site_trains_only_the_task_its_operator_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server names the task in its run config, but a site imports nothing its
    operator did not name: the check comes before any import."""
    import importlib

    from fedsilo.errors import ConfigError

    provision(tmp_path / "fed", hosts=["localhost"], sites=["a"])
    kit = read_site_kit(tmp_path / "fed/sites/a")
    data = tmp_path / "a.npz"
    np.savez(data, x=np.random.default_rng(0).random((30, 64), np.float32), y=np.arange(30) % 10)
    imported: list[str] = []
    real_import = importlib.import_module
    monkeypatch.setattr(
        importlib, "import_module", lambda name: imported.append(name) or real_import(name)
    )
    builtin_site = node_config(kit, ClientOptions(server="localhost:9092", data=data))
    with pytest.raises(ConfigError, match="trains fedsilo's built-in tasks, but the run asks"):
        deployed_site(RunConfig(task="os:system"), builtin_site)
    assert imported == []
    # The built-in tasks by their import path are built-in tasks.
    assert deployed_site(RunConfig(task="fedsilo.task.builtin:digits"), builtin_site).task.name == (
        "digits"
    )
    imported.clear()
    own = node_config(kit, ClientOptions(server="localhost:9092", data=data, task="my.pkg:task"))
    with pytest.raises(ConfigError, match=r"trains task my.pkg:task, but the run asks for task"):
        deployed_site(RunConfig(task="other.pkg:task"), own)
    with pytest.raises(ConfigError, match="asks for a built-in task"):
        deployed_site(RunConfig(), own)
    assert imported == []


def test_the_site_not_the_server_chooses_its_device(tmp_path: Path) -> None:
    provision(tmp_path / "fed", hosts=["localhost"], sites=["a"])
    kit = read_site_kit(tmp_path / "fed/sites/a")
    data = tmp_path / "a.npz"
    np.savez(data, x=np.zeros((30, 64), np.float32), y=np.arange(30) % 10)
    opts = ClientOptions(server="localhost:9092", data=data, device="cpu")
    assert deployed_site(RunConfig(device="cuda"), node_config(kit, opts)).device == "cpu"
