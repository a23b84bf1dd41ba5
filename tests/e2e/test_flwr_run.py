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


def test_flower_operator_commands_on_a_deployed_federation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`flwr ls`, `flwr log` and `flwr stop` with the server's FLWR_HOME (its run
    directory's flwr-home: the kit's CA, the Control API on loopback); a stopped run
    says how to go on, and `--resume` finishes it with every round spent once."""
    from fedsilo.cli import main
    from fedsilo.privacy import ledger
    from tests.e2e.federation import client, end_leftovers, rounds, server, terminate_all, wait_for

    monkeypatch.chdir(tmp_path)
    hosts = ["--server-host", "localhost", "--server-host", "127.0.0.1"]
    assert main(["provision", "--out", "fed", *hosts, "--sites", "a,b"]) == 0
    assert main(["data", "split", "--dataset", "digits", "--sites", "2", "--out", "data"]) == 0
    fleet = free_port()
    address = f"127.0.0.1:{fleet}"
    srv = server(tmp_path, fleet, "--rounds", "3", "--min-sites", "2", "--out", "run")
    # Site b stops in round 1 before it trains (once): the run waits on it until stopped.
    held = tmp_path / "b-held"
    sites = [
        client(tmp_path, "a", 1, address),
        client(tmp_path, "b", 2, address, env={"FEDSILO_FAILPOINT": f"train:1:{held}"}),
    ]
    operator = {**os.environ, "FLWR_HOME": str(tmp_path / "run" / "flwr-home")}
    resumed = None
    try:
        wait_for(held.exists, 300, "site b in round 1", [srv, *sites])
        listed = flwr(operator, "ls", "--format", "json", timeout=120)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        runs = json.loads(listed.stdout)["runs"]
        assert [r["status"] for r in runs] == ["running"], runs
        flower_run = str(runs[0]["run-id"])
        streaming = subprocess.Popen(
            [FLWR, "log", flower_run, "--stream"], cwd=tmp_path, env=operator,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        shown = flwr(operator, "log", flower_run, "--show", timeout=120)
        assert "configure_train" in shown.stdout, shown.stdout + shown.stderr
        stopped = flwr(operator, "stop", flower_run, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert srv.wait(timeout=120) == 130, srv.text()[-3000:]
        try:  # the stream ends with the run
            streamed, _ = streaming.communicate(timeout=60)
        finally:
            streaming.kill()
        assert "configure_train" in streamed, streamed
        said = " ".join(srv.text().split())
        assert f"The run was stopped (`flwr stop {flower_run}`) after round" in said, said
        assert "--resume" in said
        resumed = server(tmp_path, fleet, "--resume", "run")
        assert resumed.wait(timeout=400) == 0, resumed.text()[-3000:]
        assert [r["round"] for r in rounds(tmp_path / "run")] == [1, 2, 3]
        run_id = json.loads((tmp_path / "run" / "config.json").read_text())["run-id"]
        for name in ("a", "b"):
            spends = ledger.read(tmp_path / "fed" / "sites" / name / "ledger.jsonl").spends
            assert sorted(s.round for s in spends if s.run == run_id) == [1, 2, 3]
    finally:
        terminate_all(sites)
        for proc in (srv, resumed):
            if proc is not None and proc.popen.poll() is None:
                proc.terminate()
        left = leftovers(tmp_path, grace_s=10)
        end_leftovers(tmp_path)
        assert not left, f"processes left behind: {left}"
