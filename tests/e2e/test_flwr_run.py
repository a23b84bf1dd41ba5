"""`flwr run .` in a fresh clone, as a Flower user types it: fedsilo's DP simulation on
Flower's own local SuperLink (started by `flwr`, detached), virtual sites with their
own policies and ledgers, an audit that passes, and `flwr ls` that lists the run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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
# ~40 s alone, ~75 s beside two more: a run that never ends fails here, with its evidence.
RUN_LIMIT_S = 360
ERROR_WORDS = ("Error", "error", "Killing", "OOM", "infeasible", "died")
# Put first on the runtime's PYTHONPATH, so that every Python process `flwr` starts writes
# all its threads' stacks to STACKS_DIR/<pid>.txt on SIGUSR1: a hung run's report shows
# where each process waits. Processes whose command line names neither Flower nor Ray
# (none here) are left alone.
STACKS_HOOK = """\
import faulthandler, os, signal
_cmd = open("/proc/self/cmdline", "rb").read()
if b"flwr" in _cmd or b"flower" in _cmd or b"ray" in _cmd:
    _out = open(os.path.join({folder!r}, "%d.txt" % os.getpid()), "w")
    faulthandler.register(signal.SIGUSR1, file=_out, all_threads=True)
"""


@pytest.fixture
def flwr_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A private FLWR_HOME, Ray temp folder and free ports for the local SuperLink `flwr`
    starts; that SuperLink (and its simulation) stopped by PID afterwards."""
    home = tmp_path / "flwr-home"
    # Short: Ray's socket paths under it must fit in 107 characters. Private: its logs tell
    # what the simulation's Ray did, and no other Ray instance is found through it.
    ray_tmp = Path(tempfile.mkdtemp(prefix="fedsilo-flwr-ray-", dir="/tmp"))
    hooks, stacks = ray_tmp / "hooks", ray_tmp / "stacks"
    hooks.mkdir()
    stacks.mkdir()
    (hooks / "sitecustomize.py").write_text(STACKS_HOOK.format(folder=str(stacks)))
    env = {
        **os.environ,
        **NO_INSTALL,
        "FLWR_HOME": str(home),
        "RAY_TMPDIR": str(ray_tmp),
        # The virtual environment active, as a user has it: `flwr` starts `flower-superlink`.
        "PATH": f"{Path(FLWR).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
    }
    try:
        yield env
    finally:
        for where in (home, ray_tmp):
            for pid, _ in leftovers(where):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        left = dict(leftovers(home, grace_s=10) + leftovers(ray_tmp, grace_s=10))
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not left, left


def flwr(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLWR, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def flwr_run(env: dict[str, str], out: Path, *args: str, timeout: float) -> str:
    """`flwr run ARGS` to its end; what it said (streamed to `out` meanwhile). A run that
    does not end in `timeout` fails the test with what the SuperLink, the run and Ray said."""
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [FLWR, "run", *args], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT
        )
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"`flwr run` did not end in {timeout:g} s.\n{hung_run_report(env, out)}")
    said = out.read_text(errors="replace")
    assert returncode == 0, said[-4000:]
    return said


def hung_run_report(env: dict[str, str], out: Path) -> str:
    """What a run that never ended left: its output, the SuperLink's log, the run
    directory, the live processes (state, kernel wait channel), Ray's logs' errors."""
    home, ray_tmp = Path(env["FLWR_HOME"]), Path(env["RAY_TMPDIR"])
    runs = home / "fedsilo-runs"
    parts = [
        f"--- flwr run said:\n{tail(out, 60)}",
        f"--- the SuperLink's log:\n{tail(home / 'local-superlink' / 'superlink.log', 30)}",
        "--- run directories:\n" + "\n".join(str(p.relative_to(home)) for p in runs.glob("*/*")),
        *(f"--- {m.relative_to(home)}:\n{tail(m, 5)}" for m in runs.glob("*/metrics.jsonl")),
    ]
    rows = []
    for pid, cmd in sorted(dict(leftovers(home) + leftovers(ray_tmp)).items()):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            rows.append(f"{pid} {stat} {Path(f'/proc/{pid}/wchan').read_text()} {cmd[:160]}")
    parts.append("--- live processes (pid, state, wait channel, command):\n" + "\n".join(rows))
    parts.append("--- their Python threads' stacks:\n" + thread_stacks(ray_tmp / "stacks"))
    noted = []
    for log in sorted(ray_tmp.glob("ray/session_*/logs/*")):
        if log.is_file() and log.suffix in (".out", ".err", ".log"):
            lines = log.read_text(errors="replace").splitlines()
            hits = [line for line in lines if any(w in line for w in ERROR_WORDS)]
            noted += [f"{log.name}: {line[:240]}" for line in hits[-8:]]
    parts.append("--- Ray's logs, lines naming errors:\n" + "\n".join(noted[-60:]))
    return "\n".join(parts)


def thread_stacks(folder: Path) -> str:
    """Every thread's stack in each live process that registered STACKS_HOOK's dump."""
    dumped = []
    for path in sorted(folder.glob("*.txt")):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(path.stem), signal.SIGUSR1)
            dumped.append(path)
    time.sleep(1.0)  # each process writes its own dump
    return "\n".join(f"pid {p.stem}:\n{tail(p, 80)}" for p in dumped if p.stat().st_size)


def tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


def test_flwr_run_dot_simulates_and_the_sites_ledgers_audit(
    tmp_path: Path, flwr_env: dict[str, str]
) -> None:
    said = flwr_run(
        flwr_env, tmp_path / "flwr-run.out",
        *(".", "--stream", "--run-config", "rounds=2 target-epsilon=3"),
        *("--federation-config", "num-supernodes=3"),
        timeout=RUN_LIMIT_S,
    )  # fmt: skip
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
