"""The CLI: bad input exits non-zero with one line and no traceback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest


def fedsilo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedsilo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


InProcess = Callable[..., tuple[int, str, str]]


@pytest.fixture
def in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> InProcess:
    """`fedsilo ARGS...` as `cli.main` (what the console script calls) in this process,
    from tmp_path: (exit code, stdout, stderr). ~0.1 s a call instead of ~5 s of
    interpreter start and imports; the real `python -m fedsilo` runs in fedsilo() here
    and in the e2e tests."""
    from fedsilo.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")  # main() sets it: restored after

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--target-epsilon", "-1"], "`target-epsilon` must be a finite number > 0"),
        (["--dataset", "cifar10"], "`dataset` must be one of"),
        (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fm"], "does not exist"),
        (["--partition", "dirichlet:0"], "alpha must be a number > 0"),
        (["--partition", "dirichlet:-2"], "alpha must be a number > 0"),
        (["--sites", "500"], "Use fewer sites"),
        (["--rounds", "0"], "`rounds` must be an integer >= 1"),
        (["--sites", "0"], "`--sites` must be >= 1"),
        (["--device", "tpu"], "`device` must be one of"),
        (["--site-max-epsilon", "8,x"], "`--site-max-epsilon` must be one number > 0"),
        (["--local-epochs", "100000000"], "fedsilo plans at most 100,000"),
        (["--dataset", "fashion-mnist", "--data-dir", "IDX32"], "holds 32x32 images"),
        (["--task", "badref"], "`task` must be PACKAGE.MODULE:OBJECT"),
        (["--task", "nope_pkg.mod:task"], "no module named 'nope_pkg' is installed"),
        (["--task", "fedsilo.task.builtin:nothing"], "has no attribute 'nothing'"),
        (["--task", "fedsilo.task.builtin:BUILTIN"], "is a str, not a fedsilo.task.Task"),
        (["--task", "breast_cancer.task:task", "--dataset", "mnist"], "drop `dataset`"),
        (["--site-cpus", "0"], "`--site-cpus` must be a finite number > 0"),
        (["--site-gpus", "0.25", "--device", "cpu"], "but `--device` is cpu"),
        (["--site-cpus", "4096"], "`--site-cpus` 4096 is more than this machine's"),
        (["--ray-address", "head-without-port"], "`--ray-address` must be HOST:PORT"),
        (["--dp", "distributed", "--dp-min-sites", "1"], "`dp-min-sites` must be an integer >= 2"),
        (
            ["--dp", "distributed", "--min-sites", "2", "--dp-min-sites", "3"],
            "`min-sites` must be >= dp-min-sites (3)",
        ),
        (["--dp-min-sites", "2"], "`dp-min-sites` must be 0 with --dp local"),
        (["--dp-max-sample-rate", "0.1"], "`dp-max-sample-rate` must be 0 with --dp local"),
        (
            ["--dp", "distributed", "--dp-max-sample-rate", "1.5"],
            "`dp-max-sample-rate` must be in (0, 1] with --dp distributed",
        ),
        (
            ["--dp", "distributed", "--sites", "64"],
            "`dp-min-sites` must be at most 63",
        ),
        (
            # 1 round at epsilon 0.01 and rate 1: no multiplier up to 200 fits, before any site
            ["--dp", "distributed", "--target-epsilon", "0.01", "--dp-max-sample-rate", "1"],
            "No noise level up to sigma=200",
        ),
        (
            ["--dp", "distributed", "--dp-min-sites", "4"],
            "`--dp-min-sites` is 4 but the simulation has 3",
        ),
        # Issue 26: each once gave a traceback.
        (["--dp", "distributed", "--dp-min-sites", "-1"], "`dp-min-sites` must be an integer >= 2"),
        (["--seed", "-1"], "`seed` must be an integer in 0..9223372036854775807. Found -1"),
        (["--seed", str(2**64)], "`seed` must be an integer in 0.."),
        # Robust aggregation and attack simulation (issue 26).
        (["--aggregation", "bulyan:1"], "Unknown `aggregation` 'bulyan:1'"),
        (
            ["--aggregation", "krum:1", "--sites", "4"],
            "`--min-sites` is 5 but the simulation has 4",
        ),
        (["--aggregation", "krum:1", "--min-sites", "3"], "`min-sites` must be >= 5 with aggr"),
        (
            ["--aggregation", "median", "--dp", "distributed"],
            "`aggregation` must be fedavg with --dp distributed",
        ),
        (["--hostile-sites", "3:free-ride"], "keep at least one honest site"),
        (["--hostile-sites", "1:sign-flip"], "needs F, the factor"),
        (["--hostile-sites", "1:free-ride", "--dp", "distributed"], "sees only the secure sum"),
    ],
)
def test_bad_config_one_line_no_traceback(
    tmp_path: Path, in_process: InProcess, args: list[str], needle: str
) -> None:
    if "IDX32" in args:  # IDX files of 32x32 images where fashion-mnist's 28x28 belong
        from tests.task.test_data import write_idx

        (tmp_path / "idx32").mkdir()
        for split, n in (("train", 60), ("t10k", 10)):
            write_idx(tmp_path / f"idx32/{split}-images-idx3-ubyte", np.zeros((n, 32, 32)))
            write_idx(tmp_path / f"idx32/{split}-labels-idx1-ubyte", np.zeros(n))
        args = [str(tmp_path / "idx32") if a == "IDX32" else a for a in args]
    code, out, err = in_process("simulate", "--out", str(tmp_path / "run"), *args)
    assert code != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert needle in err.replace("\n", " ")
    assert out == ""
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran


@pytest.mark.parametrize(
    "marker", ["config.json", "metrics.jsonl", "summary.json", "progress.json", "ledgers"]
)
def test_simulate_never_writes_into_a_directory_that_holds_a_run(
    tmp_path: Path, in_process: InProcess, marker: str
) -> None:
    # Prepare: a run directory as a finished (or stopped) run leaves it.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    files = {
        "config.json": '{"run-id": "old"}',
        "metrics.jsonl": '{"round": 1}\n',
        "summary.json": "{}",
        "progress.json": "{}",
        "ledgers/site-0.jsonl": "{}\n",
        "checkpoints/round-001.pt": "x",
    }
    for name, text in files.items():
        if name.split("/")[0] in (marker, "checkpoints"):
            (run / name).parent.mkdir(exist_ok=True)
            (run / name).write_text(text)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # Execute
    code, out, err = in_process("simulate", "--rounds", "1", "--out", str(run))
    # Assert: refused in one line, nothing there changed or added.
    assert code == 2 and out == "" and err.startswith("error:") and len(err.splitlines()) == 1
    assert f"already holds a run ({marker})" in err and "--resume" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("out", ["afile", "afile/run", "/proc/fedsilo-cannot-be-made"])
def test_simulate_out_that_cannot_be_a_directory_is_one_line(
    tmp_path: Path, in_process: InProcess, out: str
) -> None:
    if out.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc (no directory can be made there, even by root)")
    (tmp_path / "afile").write_text("kept\n")
    code, _, err = in_process("simulate", "--rounds", "1", "--out", out)
    assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
    assert ("is a file" if "afile" in out else "Cannot use") in err
    assert (tmp_path / "afile").read_text() == "kept\n"


class Exited(Exception):
    """os._exit in a test: the code it was called with."""


@pytest.mark.parametrize(
    ("raised", "code"), [(SystemExit(15), 143), (KeyboardInterrupt(), 130)], ids=["term", "int"]
)
def test_a_stopped_simulation_says_how_to_resume_and_exits_at_once(
    tmp_path: Path,
    in_process: InProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    raised: BaseException,
    code: int,
) -> None:
    """SIGTERM reaches the engine as Ray's handler's SystemExit(15), Ctrl-C as
    KeyboardInterrupt; either once dumped a C stack or hung on Flower's ServerApp thread."""
    import signal

    from fedsilo.simulations import command

    def stop(cfg: object, **_: object) -> None:
        (Path(cfg.run_dir) / "config.json").write_text("{}")  # type: ignore[attr-defined]
        raise raised

    def exit_now(status: int) -> None:
        raise Exited(status)

    left: list[str] = []
    monkeypatch.setattr(command, "run_simulation", stop)
    monkeypatch.setattr(command, "disconnect", lambda: left.append("ray"))
    monkeypatch.setattr(command.os, "_exit", exit_now)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(Exited) as exited:
            in_process("simulate", "--rounds", "1", "--out", "run")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        import logging

        logging.disable(logging.NOTSET)
    err = capsys.readouterr().err
    assert exited.value.args == (code,) and left == ["ray"]
    assert f"stopped; resume with: fedsilo simulate --resume {tmp_path / 'run'}" in err
    assert "Traceback" not in err


def test_resume_takes_no_settings_and_only_a_simulation_run(
    tmp_path: Path, in_process: InProcess
) -> None:
    (tmp_path / "deployed").mkdir()
    (tmp_path / "deployed" / "config.json").write_text('{"run-id": "abc", "rounds": 3}')
    # The real process once (exit code and stderr as a shell sees them) ...
    res = fedsilo("simulate", "--resume", "missing", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error:"), res.stderr
    assert "holds no readable config.json" in " ".join(res.stderr.split())
    assert "Traceback" not in res.stderr
    # ... then in this process.
    for args, needle in (
        (["--resume", "deployed", "--rounds", "7"], "a deployed run resumes with `fedsilo server"),
        (["--resume", "deployed"], "a deployed run resumes with `fedsilo server start"),
    ):
        code, _, err = in_process("simulate", *args)
        assert code == 2 and err.startswith("error:"), err
        assert needle in " ".join(err.split()) and "Traceback" not in err


def test_help_teaches(tmp_path: Path) -> None:
    res = fedsilo("simulate", "--help", cwd=tmp_path)
    assert res.returncode == 0
    for flag in (
        "--sites",
        "--task",
        "PACKAGE.MODULE:OBJECT",
        "--json",
        "dirichlet:ALPHA",
        "--ray-address HOST:PORT",
        "--site-gpus N",
    ):
        assert flag in res.stdout


@pytest.mark.parametrize("text", ["0", "1,2", "inf", "nan", "1,2,3,4"])
def test_site_max_epsilon_values_are_checked(text: str) -> None:
    from fedsilo.config import RunConfig
    from fedsilo.errors import ConfigError
    from fedsilo.simulations.command import site_policies

    with pytest.raises(ConfigError, match="`--site-max-epsilon` must be"):
        site_policies(text, 3, RunConfig())
    assert [p.max_epsilon for p in site_policies("4", 2, RunConfig())] == [4.0, 4.0]
    assert [p.max_epsilon for p in site_policies("", 2, RunConfig())] == [8.0, 8.0]
    assert [p.max_epsilon for p in site_policies("1,2,3", 3, RunConfig())] == [1.0, 2.0, 3.0]


def test_simulation_needs_one_policy_per_site(tmp_path: Path) -> None:
    from fedsilo.config import RunConfig
    from fedsilo.errors import ConfigError
    from fedsilo.privacy.policy import SitePolicy
    from fedsilo.simulations.runner import run_simulation

    cfg = RunConfig(run_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="1 site policies for 2 sites"):
        run_simulation(cfg, sites=2, site_policies=[SitePolicy(max_epsilon=8.0)])


def test_refusals_are_summarised_per_site_and_reason() -> None:
    import dataclasses

    from fedsilo.console import end_of_run_lines, refusal_lines
    from fedsilo.server.records import Failure, Refusal, Summary

    summary = Summary(
        refusals=[
            Refusal(site="site-1", round=1, reason="over budget"),
            Refusal(site="site-1", round=2, reason="over budget"),
        ]
    )
    assert refusal_lines(summary) == ["[yellow]site-1 refused round(s) 1, 2[/]: over budget"]
    assert refusal_lines(Summary()) == []
    # A run where every site refused or failed says so, and why it stopped.
    summary = dataclasses.replace(
        summary,
        failures=[Failure(site="site-2", round=1, reason="invalid reply: NaN")],
        stopped="round 1: 0 usable repl(ies), fewer than min-sites=1",
    )
    assert end_of_run_lines(summary)[1:] == [
        "[red]site-2 failed round(s) 1[/]: invalid reply: NaN",
        "[bold red]the run stopped early[/]: round 1: 0 usable repl(ies), fewer than min-sites=1",
    ]


def simulate_args(*args: str) -> object:
    from fedsilo.cli import build_parser

    return build_parser().parse_args(["simulate", *args])


def test_simulate_plans_distributed_dp_from_the_partition(tmp_path: Path) -> None:
    """dp-max-sample-rate is the smallest simulated site's rate, as the sites will partition
    the data; the run's one noise multiplier is calibrated for it before anything runs."""
    from fedsilo.config import Partition
    from fedsilo.privacy.accountant import calibrate_noise
    from fedsilo.simulations.command import config_from_args
    from fedsilo.simulations.partition import partition_indices
    from fedsilo.task.data import load_dataset

    # Prepare: a skewed split of digits; the rates each site will use, worked out here.
    labels = load_dataset("digits", "train").y.numpy()
    parts = partition_indices(labels, 4, Partition.parse("dirichlet:0.5"), seed=0)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 1.5 * sizes[0]  # not IID: the smallest site sets the rate
    expected = min(1.0, 64 / sizes[0])
    # Execute
    flags = ("--dp", "distributed", "--sites", "4", "--partition", "dirichlet:0.5", "--rounds", "5")
    cfg = config_from_args(simulate_args(*flags, "--out", str(tmp_path / "a")))
    given = config_from_args(
        simulate_args(*flags, "--dp-max-sample-rate", "0.5", "--out", str(tmp_path / "b"))
    )
    # Assert
    assert cfg.dp_max_sample_rate == pytest.approx(expected, rel=1e-12)
    sigma = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=expected, steps=5)
    assert cfg.noise_multiplier == sigma
    assert given.dp_max_sample_rate == 0.5 and given.noise_multiplier > sigma  # more sampling
    local = config_from_args(simulate_args("--out", str(tmp_path / "c")))
    assert (local.dp_max_sample_rate, local.noise_multiplier) == (0.0, 0.0)


def test_simulate_resume_keeps_the_recorded_noise_multiplier(tmp_path: Path) -> None:
    import json

    from fedsilo.simulations.command import config_from_args, resume_from_args

    # Prepare: a stopped run whose recorded multiplier is not what calibration gives today.
    cfg = config_from_args(simulate_args("--dp", "distributed", "--out", str(tmp_path)))
    recorded = cfg.to_flwr() | {"noise-multiplier": cfg.noise_multiplier * 1.5}
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    (tmp_path / "simulation.json").write_text(json.dumps({"sites": 3}))
    # Execute
    resumed, sim = resume_from_args(simulate_args("--resume", str(tmp_path)))
    # Assert
    assert resumed.noise_multiplier == cfg.noise_multiplier * 1.5 and sim.sites == 3
    assert resumed.resume and resumed.run_id == cfg.run_id


def test_simulate_names_the_virtual_sites_a_batch_is_above() -> None:
    from fedsilo.simulations.command import batch_warnings

    assert batch_warnings(64, [479, 480]) == []
    (line,) = batch_warnings(64, [100, 50, 60])
    assert "--batch-size 64 is above the data of site-1 (50 examples), site-2 (60" in line
    assert "below 50" in line
