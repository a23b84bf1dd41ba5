"""fedsilo.simulations.flwr_run: the apps `flwr run .` runs, and where they refuse."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError
from fedsilo.simulations import flwr_run
from tests.clients.test_client_app import _task_identity, refusal_of, train_message  # noqa: F401


def test_the_run_directory_is_one_per_flower_run_under_flwr_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    cfg = RunConfig(rounds=1)
    assert flwr_run.flwr_run_dir(cfg, 42) == tmp_path / "home" / "fedsilo-runs" / "42"
    mine = RunConfig(rounds=1, run_dir=str(tmp_path / "mine"))
    assert flwr_run.flwr_run_dir(mine, 42) == tmp_path / "mine"
    with pytest.raises(ConfigError, match="`run-dir` must be an absolute path"):
        flwr_run.flwr_run_dir(RunConfig(rounds=1, run_dir="runs/x"), 42)


def test_the_clientapp_refuses_outside_the_simulation_engine(tmp_path: Path) -> None:
    """Sent to a deployed SuperNode (a `flwr-clientapp` process, no Ray actor), it would
    train on public data with noise seeded by the run config: it refuses instead."""
    cfg = RunConfig(rounds=1, run_dir=str(tmp_path / "run"))
    ctx = Context(1, 7, {"partition-id": 0, "num-partitions": 2}, RecordDict(), cfg.to_flwr())
    reason = refusal_of(flwr_run.train_virtual_site(train_message(cfg, 1), ctx))["refused"]
    assert "serves `flwr run .` simulations only" in reason
    assert "fedsilo client start" in reason
    assert not (tmp_path / "run").exists()  # no ledger, no name recorded


def test_the_serverapp_refuses_a_deployed_superlink(tmp_path: Path) -> None:
    """A grid that is not the simulation engine's: one line naming the command to use."""

    class DeployedGrid:
        def get_node_ids(self) -> list[int]:
            raise AssertionError("refused before asking for sites")

    cfg = RunConfig(rounds=1, run_dir=str(tmp_path / "run"))
    ctx = Context(1, 0, {}, RecordDict(), cfg.to_flwr())
    with pytest.raises(ConfigError, match="fedsilo server start"):
        flwr_run._serve(DeployedGrid(), ctx)  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()


def test_virtual_sites_record_their_node_ids_side_by_side(tmp_path: Path) -> None:
    from fedsilo.server.run_dir import add_site_name, read_site_names

    for node, name in ((11, "site-0"), (12, "site-1"), (11, "site-0")):
        add_site_name(tmp_path, node, name)
    assert read_site_names(tmp_path) == {11: "site-0", 12: "site-1"}
