"""A deployed site's environment comes from the node config its launcher passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from fedsilo.clients.launcher import ClientOptions, node_config
from fedsilo.clients.site_env import (
    CA_CERT_KEY,
    SITE_CERT_KEY,
    SITE_KEY_KEY,
    deployed_site,
)
from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError
from fedsilo.privacy import pki
from fedsilo.privacy.identity import verify_signed
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


def kit_and_data(tmp_path: Path, sites: list[str]) -> tuple[Path, Path]:
    provision(tmp_path / "fed", hosts=["localhost"], sites=sites)
    data = tmp_path / "a.npz"
    np.savez(data, x=np.zeros((30, 64), np.float32), y=np.arange(30) % 10)
    return tmp_path / "fed", data


def test_a_deployed_site_loads_its_identity_from_its_kit(tmp_path: Path) -> None:
    fed, data = kit_and_data(tmp_path, ["a", "b"])
    kit = read_site_kit(fed / "sites/a")
    config = node_config(kit, ClientOptions(server="localhost:9092", data=data))
    assert (config[SITE_KEY_KEY], config[SITE_CERT_KEY], config[CA_CERT_KEY]) == (
        str((fed / "sites/a/site.key").resolve()),
        str((fed / "sites/a/site.crt").resolve()),
        str((fed / "sites/a/ca.crt").resolve()),
    )
    identity = deployed_site(RunConfig(), config).identity
    assert identity is not None and identity.name == "a"
    assert identity.cert == pki.load_cert(fed / "sites/a/site.crt").public_bytes(Encoding.DER)
    # Site b, holding only its own kit's ca.crt, accepts what a signs.
    b = deployed_site(
        RunConfig(), node_config(read_site_kit(fed / "sites/b"), ClientOptions("x:1", data))
    )
    assert b.identity is not None
    assert verify_signed(b.identity.ca, identity.cert, b"keys", identity.sign(b"keys")) == "a"


def test_a_kit_without_a_certificate_still_trains_with_local_dp(tmp_path: Path) -> None:
    fed, data = kit_and_data(tmp_path, ["a"])
    (fed / "sites/a/site.crt").unlink()
    config = node_config(read_site_kit(fed / "sites/a"), ClientOptions("localhost:9092", data))
    assert not {SITE_KEY_KEY, SITE_CERT_KEY, CA_CERT_KEY} & set(config)
    assert deployed_site(RunConfig(), config).identity is None


def test_identity_paths_that_do_not_load_are_config_errors(tmp_path: Path) -> None:
    fed, data = kit_and_data(tmp_path, ["a", "b"])
    config = node_config(read_site_kit(fed / "sites/a"), ClientOptions("localhost:9092", data))
    partial = {k: v for k, v in config.items() if k != CA_CERT_KEY}
    with pytest.raises(ConfigError, match=r"without `ca-cert`: it needs all of"):
        deployed_site(RunConfig(), partial)
    swapped = {**config, SITE_CERT_KEY: str(fed / "sites/b/site.crt")}
    with pytest.raises(ConfigError, match=r"b/site.crt certifies another key"):
        deployed_site(RunConfig(), swapped)
    # b's own key and certificate, under a's name: the certificate decides the name.
    b_kit = {
        SITE_KEY_KEY: str(fed / "sites/b/site.key"),
        SITE_CERT_KEY: str(fed / "sites/b/site.crt"),
    }
    with pytest.raises(ConfigError, match=r"is for site 'b', but its node config names it 'a'"):
        deployed_site(RunConfig(), {**config, **b_kit})
