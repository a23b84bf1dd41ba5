"""One way to build a run config (fedsilo.run_flags): layers, the commands' shared
defaults, and `--resume`, which takes the recorded config and refuses any change to it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedsilo.cli import build_parser
from fedsilo.clients.site_budget import SiteBudget, authorise_round
from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError
from fedsilo.privacy.policy import SitePolicy
from fedsilo.run_flags import Layer, build
from fedsilo.server import command as server_command
from fedsilo.simulations import command as simulate_command
from fedsilo.simulations.ledgers import simulated_ledger, write_site_policies
from fedsilo.task.data import load_dataset


def stopped_simulation(tmp_path: Path, sites: int = 2, **recorded: object) -> Path:
    """A simulation run directory as a crash leaves it: config.json and simulation.json."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
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
    assert "--target-epsilon 8.0 (recorded: 4.0)" in message
    assert "--local-epochs 2 (recorded: 1)" in message
    with pytest.raises(ConfigError, match="fewer than the 6 rounds"):
        simulate_command.resume_from_args(simulate("--resume", str(run), "--rounds", "3"))
    # Repeating what was recorded is no change; the result is the recorded run.
    same = ("--rounds", "6", "--target-epsilon", "4", "--sites", "2", "--out", str(run))
    cfg, sim = simulate_command.resume_from_args(simulate("--resume", str(run), *same))
    assert (cfg.rounds, cfg.target_epsilon, cfg.run_id, cfg.resume, sim.sites) == (
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


def spent_rounds(run: Path, policies: list[SitePolicy], rounds: int) -> None:
    """The virtual sites' ledgers after `rounds` rounds of the recorded run."""
    cfg = RunConfig.from_flwr(json.loads((run / "config.json").read_text()))
    write_site_policies(run, policies)
    data = load_dataset("digits", "train").subset(np.arange(300))
    for pid, policy in enumerate(policies):
        budget = SiteBudget(simulated_ledger(run, pid), policy)
        for r in range(1, rounds + 1):
            authorise_round(budget, cfg, data, site=f"site-{pid}", run="abc", server_round=r)


@pytest.mark.parametrize(
    "policy,most",
    [
        (SitePolicy(max_epsilon=100.0, allow_more_rounds=1), 8),  # fits: applied
        (SitePolicy(max_epsilon=4.0, allow_more_rounds=1), 2),  # spent its budget
        (SitePolicy(max_epsilon=100.0), 2),  # its policy fixes a run's rounds
    ],
)
def test_more_rounds_on_resume_only_where_every_site_allows_them(
    tmp_path: Path, policy: SitePolicy, most: int
) -> None:
    run = stopped_simulation(tmp_path, rounds=2, target_epsilon=4.0, local_epochs=1)
    spent_rounds(run, [SitePolicy(max_epsilon=100.0, allow_more_rounds=1), policy], rounds=1)
    argv = ("--resume", str(run), "--rounds", "8")
    if most == 8:
        cfg, _ = simulate_command.resume_from_args(simulate(*argv))
        assert (cfg.rounds, cfg.run_id) == (8, "abc")
    else:
        with pytest.raises(ConfigError, match=f"site-1 allows this run at most {most} round"):
            simulate_command.resume_from_args(simulate(*argv))


def test_a_changed_flag_on_resume_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedsilo.cli import main

    run = stopped_simulation(tmp_path, rounds=6)
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    assert main(["simulate", "--resume", str(run), "--batch-size", "9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert "--batch-size 9 (recorded: 64)" in " ".join(err.split())


def test_server_start_resume_uses_the_same_rule(tmp_path: Path) -> None:
    run = stopped_simulation(tmp_path, rounds=4)
    server = ["server", "start", "--kit", "kit", "--resume", str(run)]
    with pytest.raises(ConfigError, match=r"--target-epsilon 2.0 \(recorded: 8.0\)"):
        server_command.config_from_args(
            build_parser().parse_args([*server, "--target-epsilon", "2"]), 3
        )
    cfg = server_command.config_from_args(build_parser().parse_args([*server, "--rounds", "4"]), 3)
    assert (cfg.run_id, cfg.rounds, cfg.resume) == ("abc", 4, True)
    more = server_command.config_from_args(build_parser().parse_args([*server, "--rounds", "6"]), 3)
    assert more.rounds == 6  # the sites decide whether they train them
    dp = stopped_simulation(
        tmp_path / "dp",
        dp="distributed",
        dp_min_sites=2,
        min_sites=2,
        dp_max_sample_rate=0.2,
        noise_multiplier=3.0,
        rounds=4,
    )
    with pytest.raises(ConfigError, match="distributed-DP run keeps the 4 rounds"):
        server_command.config_from_args(
            build_parser().parse_args([*server[:-1], str(dp), "--rounds", "6"]), 3
        )


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


def test_min_sites_defaults_to_what_the_aggregation_rule_needs(tmp_path: Path) -> None:
    cfg = simulate_command.config_from_args(
        simulate("--aggregation", "krum:2", "--sites", "10", "--out", str(tmp_path / "a"))
    )
    assert (cfg.aggregation, cfg.min_sites) == ("krum:2", 7)
    given_min = build(
        Layer({"aggregation": "median", "min-sites": 2}, "flags"), sites=3, min_sites=3
    )
    assert given_min.min_sites == 2


def test_a_run_recorded_before_aggregation_existed_resumes_as_fedavg(tmp_path: Path) -> None:
    import json

    from fedsilo.server.run_dir import resume_config

    values = RunConfig(run_id="abc", run_dir=str(tmp_path)).to_flwr()
    del values["aggregation"]
    (tmp_path / "config.json").write_text(json.dumps(values))
    _, recorded = resume_config(tmp_path)
    assert RunConfig.from_flwr(recorded).aggregation == "fedavg"
