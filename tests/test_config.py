"""Run config: parsed once, strictly."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError

MANIFEST = Path(__file__).resolve().parent.parent / "pyproject.toml"


def manifest_config() -> dict[str, object]:
    return dict(tomllib.loads(MANIFEST.read_text())["tool"]["flwr"]["app"]["config"])


def test_manifest_defaults_equal_dataclass_defaults() -> None:
    assert RunConfig.from_flwr(manifest_config()) == RunConfig()


def test_roundtrip() -> None:
    cfg = RunConfig(rounds=5, target_epsilon=3.0, partition="dirichlet:0.5")
    assert RunConfig.from_flwr(cfg.to_flwr()) == cfg


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("target-epsilon", -1.0, "`target-epsilon` must be a finite number > 0. Found -1.0"),
        ("target-epsilon", 0, "cannot be turned off"),
        ("target-delta", 1.0, "`target-delta` must be in (0, 1)"),
        ("rounds", 0, "`rounds` must be an integer >= 1"),
        ("dataset", "cifar", "`dataset` must be one of"),
        ("partition", "dirichlet:0", "alpha must be a number > 0"),
        ("max-grad-norm", 0.0, "`max-grad-norm`"),
        ("rounds", "three", "must be of type int"),
        ("update-codec", "fp8", "`update-codec` must be one of float32, bf16, int8"),
        ("model-codec", "fp4", "`model-codec` must be one of float32, bf16, int8"),
    ],
)
def test_invalid_values(key: str, value: object, needle: str) -> None:
    raw = manifest_config() | {key: value}
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flwr(raw, source="run.toml")
    assert needle in str(err.value) and "run.toml" in str(err.value)


def test_unknown_and_missing_keys_are_errors() -> None:
    with pytest.raises(ConfigError, match="Unknown key `epsilon`"):
        RunConfig.from_flwr(manifest_config() | {"epsilon": 1.0})
    raw = manifest_config()
    del raw["target-epsilon"]
    with pytest.raises(ConfigError, match=r"Missing key.*target-epsilon"):
        RunConfig.from_flwr(raw)


DISTRIBUTED = {"dp": "distributed", "dp-min-sites": 3, "min-sites": 3, "dp-max-sample-rate": 0.1}


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"dp": "local", "noise-multiplier": 1.2}, "`noise-multiplier` must be 0 with --dp local"),
        ({"dp": "local", "dp-max-sample-rate": 0.1}, "`dp-max-sample-rate` must be 0 with --dp"),
        ({"dp-max-sample-rate": 0.0}, "`dp-max-sample-rate` must be in (0, 1] with --dp distri"),
        ({"dp-max-sample-rate": 1.5}, "batch-size / the smallest site's examples"),
        ({"noise-multiplier": -1.0}, "`noise-multiplier` must be a finite number >= 0"),
        ({"dp-min-sites": 64, "min-sites": 64}, "`dp-min-sites` must be at most 63"),
        ({"dp-min-sites": 64, "min-sites": 64}, "a neighbourhood of only 63 sites"),
    ],
)
def test_distributed_dp_values(change: dict[str, object], needle: str) -> None:
    local = change.get("dp") == "local"
    raw = manifest_config() | ({} if local else DISTRIBUTED) | change
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flwr(raw, source="run.toml")
    assert needle in str(err.value) and "run.toml" in str(err.value)


def test_a_distributed_run_config_round_trips_with_its_plan() -> None:
    raw = manifest_config() | DISTRIBUTED | {"noise-multiplier": 1.25, "dp-min-sites": 63}
    cfg = RunConfig.from_flwr(raw | {"min-sites": 63})
    assert (cfg.dp_max_sample_rate, cfg.noise_multiplier) == (0.1, 1.25)
    assert RunConfig.from_flwr(cfg.to_flwr()) == cfg
    unplanned = RunConfig.from_flwr(raw | {"min-sites": 63, "noise-multiplier": 0.0})
    assert unplanned.noise_multiplier == 0.0  # valid, but the server and the sites refuse it


@pytest.mark.parametrize(
    ("key", "value", "needles"),
    [
        (
            "aggregation",
            "median",
            [
                "`aggregation` must be fedavg with --dp distributed",
                "sees only the secure sum",
                "max-grad-norm",  # what bounds a hostile site there
            ],
        ),
        (
            "update-codec",
            "int8",
            ["`update-codec` must be float32 with --dp distributed", "secure sum's ring"],
        ),
        (
            "model-codec",
            "bf16",
            ["`model-codec` must be float32 with --dp distributed", "secure sum alone"],
        ),
    ],
)
def test_local_dp_only_choices_are_refused_with_distributed_dp_saying_why(
    key: str, value: str, needles: list[str]
) -> None:
    """A robust rule or an update codec acts on a site's model, which --dp distributed
    never sends; both are fine with --dp local."""
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flwr(manifest_config() | DISTRIBUTED | {key: value}, source="run.toml")
    assert all(n in str(err.value) for n in [*needles, "--dp local", "run.toml"])
    ok = RunConfig.from_flwr(manifest_config() | {key: value, "min-sites": 3})
    assert ok.to_flwr()[key] == value


@pytest.mark.parametrize(
    ("rule", "min_sites", "needle"),
    [
        ("krum:1", 4, "`min-sites` must be >= 5 with aggregation krum:1"),
        ("trimmed-mean:2", 4, "`min-sites` must be >= 5 with aggregation trimmed-mean:2"),
        ("krum:x", 5, "`aggregation` krum:F needs F"),
    ],
)
def test_a_robust_rule_needs_enough_sites_in_every_round(
    rule: str, min_sites: int, needle: str
) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flwr(manifest_config() | {"aggregation": rule, "min-sites": min_sites})
    assert needle in str(err.value)
    ok = RunConfig.from_flwr(manifest_config() | {"aggregation": "krum:1", "min-sites": 5})
    assert str(ok.aggregation_rule) == "krum:1"
