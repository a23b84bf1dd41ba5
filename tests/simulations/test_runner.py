"""What `fedsilo simulate` writes into RUN_DIR before Flower's engine starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from fedsilo.config import RunConfig
from fedsilo.errors import FedsiloError
from fedsilo.server.run_dir import RunDir
from fedsilo.simulations.runner import run_simulation


class EngineStarted(FedsiloError):
    """Stands in for Flower's engine: the test stops where the engine would start."""


@pytest.mark.parametrize("dp", ["local", "distributed"])
def test_only_distributed_runs_give_their_sites_identities(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dp: str
) -> None:
    """Secure aggregation needs each virtual site's certified key; a local-DP run (up to
    thousands of sites) makes none."""
    from fedsilo.flwr_adapter import engine

    def started(**_: object) -> None:
        raise EngineStarted("engine")

    monkeypatch.setattr(engine, "run_simulation", started)
    cfg = RunConfig(run_dir=str(tmp_path / "run"), dp=dp, min_sites=3, dp_min_sites=3)
    (tmp_path / "run").mkdir()
    with pytest.raises(EngineStarted):
        run_simulation(cfg, sites=3)
    identities = tmp_path / "run" / "identities"
    if dp == "local":
        assert not identities.exists()
        assert not (tmp_path / "run" / "federation-ca.crt").exists()
        return
    # The ServerApp checks the sites' signatures against the run's CA.
    ca = RunDir(cfg.run_dir).federation_ca()
    assert ca.public_bytes(Encoding.PEM) == (identities / "ca.crt").read_bytes()
    names = sorted(p.name for p in identities.iterdir())
    assert names == sorted(
        ["ca.crt", "ca.key"] + [f"site-{i}.{x}" for i in range(3) for x in ("crt", "key")]
    )
    # A resumed run keeps them: the same files, not a new CA.
    before = {p.name: p.read_bytes() for p in identities.iterdir()}
    resumed = RunConfig(run_dir=cfg.run_dir, dp=dp, min_sites=3, dp_min_sites=3, resume=True)
    with pytest.raises(EngineStarted):
        run_simulation(resumed, sites=3)
    assert {p.name: p.read_bytes() for p in identities.iterdir()} == before


def test_simulation_json_carries_its_schema_and_a_newer_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from fedsilo.errors import DataError
    from fedsilo.flwr_adapter import engine
    from fedsilo.simulations.runner import SIMULATION_FILE, recorded_simulation

    def started(**_: object) -> None:
        raise EngineStarted("engine")

    monkeypatch.setattr(engine, "run_simulation", started)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(EngineStarted):
        run_simulation(RunConfig(run_dir=str(run_dir)), sites=2)
    record = json.loads((run_dir / SIMULATION_FILE).read_text())
    assert record["schema"] == 1 and recorded_simulation(run_dir).sites == 2
    (run_dir / SIMULATION_FILE).write_text(json.dumps({**record, "schema": 2}))
    with pytest.raises(DataError, match=r"simulation\.json has schema version 2.*newer fedsilo"):
        recorded_simulation(run_dir)
