"""Hostile virtual sites: what each attack sends, which sites attack, what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedsilo.errors import ConfigError
from fedsilo.simulations.attacks import Hostile, flip_labels, tamper
from fedsilo.simulations.runner import recorded_simulation
from fedsilo.task.data import Dataset

GLOBAL = {"w": torch.tensor([1.0, 1.0]), "steps": torch.tensor(3)}
TRAINED = {"w": torch.tensor([2.0, 0.5]), "steps": torch.tensor(4)}


def test_sign_flip_sends_minus_f_times_the_update() -> None:
    out = tamper(Hostile.parse("1:sign-flip:10"), seed=0)(GLOBAL, TRAINED, 1)
    assert out["w"].tolist() == [1 - 10 * 1.0, 1 - 10 * -0.5]
    assert out["steps"].item() == 4  # counters as trained


def test_free_ride_sends_the_global_model_back() -> None:
    out = tamper(Hostile.parse("2:free-ride"), seed=0)(GLOBAL, TRAINED, 1)
    assert torch.equal(out["w"], GLOBAL["w"])


def test_noise_adds_gaussian_noise_of_the_given_scale_fresh_each_round() -> None:
    attack = tamper(Hostile.parse("1:noise:5"), seed=0)
    big = {"w": torch.zeros(20_000)}
    first, second = attack(big, big, 1)["w"], attack(big, big, 2)["w"]
    assert 4.8 < first.std().item() < 5.2 and abs(first.mean().item()) < 0.2
    assert not torch.equal(first, second)


def test_label_flip_changes_the_labels_not_the_model() -> None:
    data = Dataset(torch.zeros(4, 2), torch.tensor([0, 1, 2, 9]), 10, "digits")
    flipped = flip_labels(data)
    assert flipped.y.tolist() == [1, 2, 3, 0] and torch.equal(flipped.x, data.x)
    assert flipped.source != data.source  # its fingerprint is of other data
    out = tamper(Hostile.parse("1:label-flip"), seed=0)(GLOBAL, TRAINED, 1)
    assert torch.equal(out["w"], TRAINED["w"])


def test_the_last_k_sites_attack_and_the_record_names_them(tmp_path: Path) -> None:
    hostile = Hostile.parse("2:sign-flip:10")
    assert list(hostile.partitions(10)) == [8, 9]
    assert hostile.by_site(10) == {"site-8": "sign-flip:10", "site-9": "sign-flip:10"}
    assert str(hostile) == "2:sign-flip:10"
    (tmp_path / "simulation.json").write_text(json.dumps({"sites": 10}))
    assert recorded_simulation(tmp_path).hostile is None
    (tmp_path / "simulation.json").write_text(json.dumps({"sites": 10, "hostile": str(hostile)}))
    assert recorded_simulation(tmp_path).hostile == hostile


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("sign-flip:10", "K:KIND with K >= 1"),
        ("0:free-ride", "K:KIND with K >= 1"),
        ("1:sign-flip", "needs F, the factor"),
        ("1:noise:-2", "needs S, the standard deviation"),
        ("1:noise:inf", "needs S"),
        ("1:free-ride:3", "Unknown attack"),
        ("1:backdoor", "Unknown attack"),
    ],
)
def test_a_malformed_attack_is_named_with_an_example(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Hostile.parse(text)


def test_a_run_keeps_an_honest_site_and_distributed_dp_has_no_attack_simulation() -> None:
    with pytest.raises(ConfigError, match="keep at least one honest site"):
        Hostile.parse("3:free-ride").check(3, distributed=False)
    with pytest.raises(ConfigError, match="sees only the secure sum"):
        Hostile.parse("1:free-ride").check(3, distributed=True)
    Hostile.parse("2:free-ride").check(3, distributed=False)


def test_only_simulated_sites_can_be_hostile() -> None:
    """The deployed resolver builds every SiteEnvironment without an attack, and the run
    config has no key that could give it one: no server can make a real site attack."""
    import dataclasses

    from fedsilo.clients.site_env import SiteEnvironment
    from fedsilo.config import RunConfig

    assert "hostile" not in " ".join(RunConfig().to_flwr())
    tamper_field = next(f for f in dataclasses.fields(SiteEnvironment) if f.name == "tamper")
    assert tamper_field.default is None
    source = Path(__file__).resolve().parents[2] / "clients" / "site_env.py"
    deployed = source.read_text().split("def deployed_site", 1)[1].split("\ndef ", 1)[0]
    assert "tamper" not in deployed
