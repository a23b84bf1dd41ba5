"""Where virtual sites run: the engine's flags, their record for --resume, and reports.

The cluster itself is exercised in test_ray_cluster.py; everything here is checked
without Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError
from fedsilo.simulations.cluster import node_problems, placement_line, placement_summary
from fedsilo.simulations.engine import (
    EngineConfig,
    check_local_capacity,
    check_reachable,
    parse_address,
)


@pytest.mark.parametrize(
    "engine,device,needle",
    [
        (EngineConfig(site_cpus=0), "auto", "`--site-cpus` must be a finite number > 0"),
        (EngineConfig(site_cpus=-1), "auto", "`--site-cpus` must be a finite number > 0"),
        (EngineConfig(site_cpus=float("nan")), "auto", "`--site-cpus` must be"),
        (EngineConfig(site_cpus=float("inf")), "auto", "`--site-cpus` must be"),
        (EngineConfig(site_gpus=-0.5), "auto", "`--site-gpus` must be a finite number >= 0"),
        (EngineConfig(site_gpus=float("inf")), "auto", "`--site-gpus` must be"),
        (EngineConfig(site_gpus=float("nan")), "auto", "`--site-gpus` must be"),
        (EngineConfig(site_gpus=0.25), "cpu", "`--site-gpus` 0.25 gives each site a GPU, but"),
        (EngineConfig(ray_address="head"), "auto", "`--ray-address` must be HOST:PORT"),
        (EngineConfig(ray_address="head:0"), "auto", "`--ray-address` must be HOST:PORT"),
        (EngineConfig(ray_address="head:99999"), "auto", "`--ray-address` must be HOST:PORT"),
        (EngineConfig(ray_address=":6379"), "auto", "`--ray-address` must be HOST:PORT"),
        (EngineConfig(ray_address="ray://head:10001"), "auto", "`--ray-address` must be"),
    ],
)
def test_bad_engine_flags_name_the_flag_and_the_fix(
    engine: EngineConfig, device: str, needle: str
) -> None:
    with pytest.raises(ConfigError) as err:
        engine.validate(device=device)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_good_engine_flags_and_what_they_give_the_sites() -> None:
    for engine in (
        EngineConfig(),
        EngineConfig(site_cpus=0.25, site_gpus=0.25),
        EngineConfig(ray_address="10.0.0.5:6379", site_cpus=2),
        EngineConfig(ray_address="[::1]:6379"),
        EngineConfig(ray_address="auto"),
    ):
        engine.validate(device="auto")
    EngineConfig(site_gpus=1).validate(device="cuda")
    assert parse_address("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert parse_address("[::1]:6379") == ("::1", 6379)
    assert parse_address("auto") is None
    # torch threads: the whole CPUs a site holds, at least one (today's default: 1).
    assert [EngineConfig(site_cpus=c).threads for c in (0.25, 1, 1.5, 4)] == [1, 1, 1, 4]
    assert EngineConfig(site_cpus=3).worker_env() == {
        "OMP_NUM_THREADS": "3",
        "MKL_NUM_THREADS": "3",
    }
    assert EngineConfig(site_gpus=0.25).client_resources() == {"num_cpus": 1.0, "num_gpus": 0.25}
    assert EngineConfig().site_device is None  # the run's --device
    assert EngineConfig(site_gpus=0.5).site_device == "cuda"


def test_this_machine_must_hold_one_site() -> None:
    check_local_capacity(EngineConfig(site_cpus=2, site_gpus=0.5), cpus=2, gpus=1)
    with pytest.raises(ConfigError, match=r"`--site-cpus` 3 is more than this machine's 2"):
        check_local_capacity(EngineConfig(site_cpus=3), cpus=2, gpus=0)
    with pytest.raises(ConfigError, match=r"`--site-gpus` 0.25 .* \(no GPU torch can use\)"):
        check_local_capacity(EngineConfig(site_gpus=0.25), cpus=2, gpus=0)
    with pytest.raises(ConfigError, match=r"`--site-gpus` 2 .* \(1 GPU\(s\) torch can use\)"):
        check_local_capacity(EngineConfig(site_gpus=2), cpus=2, gpus=1)


def test_a_closed_port_is_refused_without_ray() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match="No Ray cluster answers at `--ray-address` 127"):
        check_reachable(f"127.0.0.1:{port}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        check_reachable(f"127.0.0.1:{s.getsockname()[1]}")
    check_reachable("auto")  # Ray finds (or not) a cluster on this machine itself


def simulation_run(tmp_path: Path, record: dict[str, object]) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = RunConfig(run_id="abc", run_dir=str(run_dir))
    (run_dir / "config.json").write_text(json.dumps(cfg.to_flwr()))
    (run_dir / "simulation.json").write_text(json.dumps(record))
    return run_dir


def resume(*argv: str) -> tuple[RunConfig, int, EngineConfig]:
    from fedsilo.cli import build_parser
    from fedsilo.simulations.command import resume_from_args

    cfg, sim = resume_from_args(build_parser().parse_args(["simulate", *argv]))
    return cfg, sim.sites, sim.engine


def test_a_resumed_run_keeps_its_site_resources_and_may_change_cluster(tmp_path: Path) -> None:
    run_dir = simulation_run(tmp_path, {"sites": 5, "site-cpus": 2.0, "site-gpus": 0.25})
    cfg, sites, engine = resume("--resume", str(run_dir), "--ray-address", "10.0.0.9:6379")
    assert (cfg.run_id, sites) == ("abc", 5)
    assert engine == EngineConfig(ray_address="10.0.0.9:6379", site_cpus=2.0, site_gpus=0.25)
    assert resume("--resume", str(run_dir))[2].ray_address == ""  # a private Ray instance
    for flag in ("--site-cpus", "--site-gpus"):
        with pytest.raises(ConfigError, match=rf"{flag} 0.5 \(recorded: "):
            resume("--resume", str(run_dir), flag, "0.5")


def test_a_run_recorded_before_site_resources_resumes_with_one_cpu_each(tmp_path: Path) -> None:
    run_dir = simulation_run(tmp_path, {"sites": 3})
    assert resume("--resume", str(run_dir))[1:] == (3, EngineConfig())


def test_placement_summary_counts_sites_per_node() -> None:
    addresses = {"a" * 56: "10.0.0.5", "b" * 56: "10.0.0.6"}
    where = {0: {"a" * 56}, 1: {"b" * 56}, 2: {"a" * 56, "b" * 56}}
    entry = placement_summary(EngineConfig(ray_address="10.0.0.5:6379"), where, addresses)
    assert entry == {
        "address": "10.0.0.5:6379",
        "site_cpus": 1.0,
        "site_gpus": 0.0,
        "nodes": 2,
        "sites_per_node": {"10.0.0.5/aaaaaaaa": 2, "10.0.0.6/bbbbbbbb": 2},
        "site_nodes": {
            "site-0": ["10.0.0.5/aaaaaaaa"],
            "site-1": ["10.0.0.6/bbbbbbbb"],
            "site-2": ["10.0.0.5/aaaaaaaa", "10.0.0.6/bbbbbbbb"],
        },
    }
    assert placement_line(entry) == (
        "sites ran on 2 Ray nodes of 10.0.0.5:6379 (10.0.0.5/aaaaaaaa: 2, 10.0.0.6/bbbbbbbb: 2)"
    )
    assert placement_summary(EngineConfig(), {}, {})["address"] == "local"


GOOD = {
    "marker": "ok",
    "no_access": [],
    "modules": {"fedsilo": {"version": "0.1.0"}, "flwr": {"version": "1.39.0"}},
}


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"marker": "FileNotFoundError"}, "cannot read /r/m (FileNotFoundError)"),
        ({"marker": "another run's marker"}, "put RUN_DIR on a filesystem every node mounts"),
        ({"no_access": ["/r/ledgers"]}, "cannot read and write /r/ledgers: run Ray on every"),
        ({"no_access": ["/r/ledgers/a", "/r/ledgers/b"]}, "/r/ledgers/a and 1 more: run Ray"),
        (
            {
                "modules": {
                    "fedsilo": {"error": "ModuleNotFoundError: x"},
                    "flwr": {"version": "1.39.0"},
                }
            },
            "cannot import fedsilo (ModuleNotFoundError: x): install fedsilo 0.1.0 on every node",
        ),
        (
            {"modules": {"fedsilo": {"version": "0.0.9"}, "flwr": {"version": "1.39.0"}}},
            "has fedsilo 0.0.9 and this machine 0.1.0",
        ),
        (
            {"modules": {**GOOD["modules"], "mytask": {"error": "ModuleNotFoundError: mytask"}}},
            "cannot import mytask, the task's package",
        ),
    ],
)
def test_what_keeps_a_node_from_running_sites_is_said_with_the_fix(
    change: dict[str, object], needle: str
) -> None:
    expect = {"fedsilo": "0.1.0", "flwr": "1.39.0"}
    where = {"marker": Path("/r/m"), "ledgers": Path("/r/ledgers"), "expect": expect}
    assert node_problems(GOOD, **where) == []  # type: ignore[arg-type]
    problems = node_problems({**GOOD, **change}, **where)  # type: ignore[arg-type]
    assert len(problems) == 1 and needle in problems[0], problems


def test_a_site_holding_a_gpu_trains_on_cuda(tmp_path: Path) -> None:
    from fedsilo.privacy.policy import SitePolicy
    from fedsilo.simulations.ledgers import write_site_policies
    from fedsilo.simulations.sites import SimulatedSites

    cfg = RunConfig(run_dir=str(tmp_path / "run"), device="auto")
    write_site_policies(cfg.run_dir, [SitePolicy(max_epsilon=8.0)] * 2)
    node = {"partition-id": 1, "num-partitions": 2}
    assert SimulatedSites(cfg.run_dir)(cfg, node).device == "auto"
    assert SimulatedSites(cfg.run_dir, device="cuda")(cfg, node).device == "cuda"
