"""`flwr run .` in a fresh clone, as a Flower user types it: fedsilo's DP simulation on
Flower's own local SuperLink (started by `flwr`, detached), virtual sites with their
own policies and ledgers, an audit that passes, and `flwr ls` that lists the run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsilo.processes import free_port
from tests.e2e.federation import leftovers

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]  # the repository: its pyproject.toml is the app
FLWR = str(Path(sys.executable).parent / "flwr")
# The one setting the README names: Flower would install the app's dependencies per run.
NO_INSTALL = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


@pytest.fixture
def flwr_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A private FLWR_HOME and free ports for the local SuperLink `flwr` starts; that
    SuperLink (and its simulation) stopped by PID afterwards."""
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        **NO_INSTALL,
        "FLWR_HOME": str(home),
        # The virtual environment active, as a user has it: `flwr` starts `flower-superlink`.
        "PATH": f"{Path(FLWR).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    yield env
    for pid, _ in leftovers(home):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leftovers(home, grace_s=10)


def flwr(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLWR, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_flwr_run_dot_simulates_and_the_sites_ledgers_audit(
    tmp_path: Path, flwr_env: dict[str, str]
) -> None:
    res = flwr(
        flwr_env,
        *("run", ".", "--stream", "--run-config", "rounds=2 target-epsilon=3"),
        *("--federation-config", "num-supernodes=3"),
    )
    said = res.stdout + res.stderr
    assert res.returncode == 0, said[-4000:]
    runs = list((Path(flwr_env["FLWR_HOME"]) / "fedsilo-runs").iterdir())
    assert len(runs) == 1, runs
    run_dir = runs[0]
    assert f"run directory {run_dir}" in " ".join(said.split())  # the log says where
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed_rounds"] == 2 and not summary.get("stopped"), summary
    assert sorted(s["site"] for s in summary["sites"]) == ["site-0", "site-1", "site-2"]
    assert all(0 < s["epsilon"] <= 3.0 for s in summary["sites"]), summary["sites"]
    assert len(list((run_dir / "ledgers").glob("site-*.jsonl"))) == 3
    audit = subprocess.run(
        [sys.executable, "-m", "fedsilo", "audit", str(run_dir), "--json"],
        capture_output=True, text=True, timeout=120, env=flwr_env,
    )  # fmt: skip
    assert audit.returncode == 0, audit.stdout + audit.stderr  # every site ok or exhausted
    rows = json.loads(audit.stdout)["sites"]
    assert sorted(r["site"] for r in rows) == ["site-0", "site-1", "site-2"]
    assert all(r["events"] == 2 and 0 < r["epsilon"] <= 3.0 for r in rows), rows
    # Flower's own view of the same run, through the local SuperLink.
    listed = flwr(flwr_env, "ls", "--format", "json", timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert run_dir.name in listed.stdout and "finished" in listed.stdout.lower(), listed.stdout
