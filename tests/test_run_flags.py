"""One way to build a run config (fedsilo.run_flags): layers, the commands' shared
defaults, and `--resume`, which takes the recorded config and refuses any change to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsilo.cli import build_parser
from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError
from fedsilo.run_flags import Layer, build
from fedsilo.server import command as server_command
from fedsilo.simulations import command as simulate_command


def stopped_simulation(tmp_path: Path, sites: int = 2, **recorded: object) -> Path:
    """A simulation run directory as a crash leaves it: config.json and simulation.json."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = RunConfig(run_id="abc", run_dir=str(run_dir), **recorded)  # type: ignore[arg-type]
    (run_dir / "config.json").write_text(json.dumps(cfg.to_flwr()))
    (run_dir / "simulation.json").write_text(json.dumps({"sites": sites}))
    return run_dir


def simulate(*argv: str) -> object:
    return build_parser().parse_args(["simulate", *argv])


def test_resume_refuses_every_flag_that_changes_the_recorded_run(tmp_path: Path) -> None:
    """The issue-23 case: these four flags equal the built-in defaults, and were ignored."""
    run = stopped_simulation(tmp_path, rounds=6, target_epsilon=4.0, local_epochs=1)
    flags = ("--rounds", "3", "--target-epsilon", "8", "--local-epochs", "2")
    with pytest.raises(ConfigError, match=r"--sites 3 \(recorded: 2\)"):
        simulate_command.resume_from_args(simulate("--resume", str(run), *flags, "--sites", "3"))
    with pytest.raises(ConfigError) as info:
        simulate_command.resume_from_args(simulate("--resume", str(run), *flags))
    message = " ".join(str(info.value).split())
    for said in ("--rounds 3 (recorded: 6)", "--target-epsilon 8.0 (recorded: 4.0)"):
        assert said in message
    assert "--local-epochs 2 (recorded: 1)" in message and "rounds cannot grow" in message
    # Repeating what was recorded is no change; the result is the recorded run.
    same = ("--rounds", "6", "--target-epsilon", "4", "--sites", "2", "--out", str(run))
    cfg, sites, _ = simulate_command.resume_from_args(simulate("--resume", str(run), *same))
    assert (cfg.rounds, cfg.target_epsilon, cfg.run_id, cfg.resume, sites) == (
        6,
        4.0,
        "abc",
        True,
        2,
    )
    with pytest.raises(ConfigError, match=r"--out .*other \(recorded: "):
        simulate_command.resume_from_args(
            simulate("--resume", str(run), "--out", str(tmp_path / "other"))
        )


def test_a_changed_flag_on_resume_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedsilo.cli import main

    run = stopped_simulation(tmp_path, rounds=6)
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    assert main(["simulate", "--resume", str(run), "--rounds", "9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert "--rounds 9 (recorded: 6)" in " ".join(err.split())


def test_server_start_resume_uses_the_same_rule(tmp_path: Path) -> None:
    run = stopped_simulation(tmp_path, rounds=4)
    server = ["server", "start", "--kit", "kit", "--resume", str(run)]
    with pytest.raises(ConfigError, match=r"--target-epsilon 2.0 \(recorded: 8.0\)"):
        server_command.config_from_args(
            build_parser().parse_args([*server, "--target-epsilon", "2"]), 3
        )
    cfg = server_command.config_from_args(build_parser().parse_args([*server, "--rounds", "4"]), 3)
    assert (cfg.run_id, cfg.rounds, cfg.resume) == ("abc", 4, True)


@pytest.mark.parametrize(
    "flags,expected",
    [
        ((), (4, 4)),  # every site's noise share, and rounds need them all
        (("--min-sites", "3"), (3, 3)),
        (("--dp-min-sites", "2"), (2, 2)),
        (("--dp-min-sites", "2", "--min-sites", "3"), (2, 3)),
    ],
)
def test_both_commands_default_dp_min_sites_and_min_sites_alike(
    tmp_path: Path, flags: tuple[str, ...], expected: tuple[int, int]
) -> None:
    dp = ("--dp", "distributed", "--dp-max-sample-rate", "0.2", *flags)
    sim = simulate_command.config_from_args(
        simulate(*dp, "--sites", "4", "--out", str(tmp_path / "a"))
    )
    srv = server_command.config_from_args(
        build_parser().parse_args(["server", "start", "--kit", "k", *dp, "--out", "b"]), 4
    )
    assert (sim.dp_min_sites, sim.min_sites) == expected
    assert (srv.dp_min_sites, srv.min_sites) == expected
    # Local DP: the commands' own default min-sites (simulate 1, server every site).
    assert simulate_command.config_from_args(simulate("--out", str(tmp_path / "c"))).min_sites == 1


def test_layers_apply_in_order_and_name_their_source(tmp_path: Path) -> None:
    file = Layer({"rounds": 5, "lr": 0.5}, "run.toml")
    flags = Layer({"rounds": 7}, "the command line")
    cfg = build(file, flags, sites=3, min_sites=3)
    assert (cfg.rounds, cfg.lr, cfg.min_sites) == (7, 0.5, 3)  # flags over the file
    assert cfg.run_id and Path(cfg.run_dir).is_absolute()
    with pytest.raises(ConfigError, match=r"Unknown key `round` in run\.toml"):
        build(Layer({"round": 5}, "run.toml"), flags, sites=3, min_sites=3)
    with pytest.raises(ConfigError, match=r"`run-id` is fedsilo.s to set.*run\.toml"):
        build(Layer({"run-id": "x"}, "run.toml"), sites=3, min_sites=3)
    with pytest.raises(ConfigError, match="needs --dp-max-sample-rate"):
        build(Layer({"dp": "distributed"}, "the command line"), sites=3, min_sites=3)
