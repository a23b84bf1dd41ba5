"""Robust aggregation: each rule's exact arithmetic, then each rule against hostile sites.

The attacks are the ones `simulate --hostile-sites` plays: one or two sites of ten
sending their update times -10 (sign flip) or a huge one. FedAvg is steered; each
robust rule keeps the global model near the honest sites' mean and says which sites
it acted on.
"""

from __future__ import annotations

import pytest
import torch

from fedsilo.config import Aggregation
from fedsilo.errors import ConfigError
from fedsilo.server.robust import aggregate

GLOBAL = {"w": torch.zeros(3), "steps": torch.tensor(7)}


def models(*rows: list[float]) -> dict[str, dict[str, torch.Tensor]]:
    return {
        f"site-{i}": {"w": torch.tensor(row), "steps": torch.tensor(i)}
        for i, row in enumerate(rows)
    }


def ones(sites: dict[str, object]) -> dict[str, int]:
    return dict.fromkeys(sites, 1)


# ---------------------------------------------------------------- the arithmetic
def test_median_is_coordinatewise_and_averages_the_middle_pair() -> None:
    odd = models([1, 10, -1], [2, 20, -2], [9, 30, -3])
    state, flagged = aggregate(Aggregation.parse("median"), GLOBAL, odd, ones(odd))
    assert state["w"].tolist() == [2, 20, -2] and flagged == {}
    even = models([1, 0, 0], [2, 0, 0], [4, 0, 0], [100, 0, 0])
    state, _ = aggregate(Aggregation.parse("median"), GLOBAL, even, ones(even))
    assert state["w"].tolist() == [3, 0, 0]


def test_trimmed_mean_cuts_f_at_each_end_of_each_coordinate() -> None:
    five = models([1, 5, 0], [2, 4, 0], [3, 3, 0], [4, 2, 0], [100, -100, 0])
    state, _ = aggregate(Aggregation.parse("trimmed-mean:1"), GLOBAL, five, ones(five))
    assert state["w"].tolist() == [3, 3, 0]  # (2+3+4)/3 and (4+3+2)/3


def test_the_rules_work_on_updates_from_the_global_model() -> None:
    base = {"w": torch.full((3,), 10.0)}
    near = {f"s{i}": {"w": torch.full((3,), 10.0 + i)} for i in range(3)}
    state, flagged = aggregate(Aggregation.parse("norm-bound:0.5"), base, near, ones(near))
    # Updates of norm 0, sqrt(3), 2 sqrt(3), each scaled to at most 0.5.
    expected = 10 + (0 + 0.5 / 3**0.5 + 0.5 / 3**0.5) / 3
    assert torch.allclose(state["w"], torch.full((3,), expected))
    assert (
        set(flagged) == {"s1", "s2"} and "scaled its update from norm 3.46 to 0.5" in flagged["s2"]
    )


def test_norm_bound_and_krum_average_at_the_fedavg_weights() -> None:
    two = models([1, 0, 0], [4, 0, 0])
    state, flagged = aggregate(
        Aggregation.parse("norm-bound:100"), GLOBAL, two, {"site-0": 2, "site-1": 1}
    )
    assert state["w"].tolist() == [2, 0, 0] and flagged == {}


def test_krum_keeps_the_n_minus_f_closest_updates() -> None:
    five = models([0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [50, 50, 50])
    state, flagged = aggregate(Aggregation.parse("krum:1"), GLOBAL, five, ones(five))
    assert torch.allclose(state["w"], torch.tensor([0.5, 0.5, 0.0]))
    assert list(flagged) == ["site-4"] and "krum:1 left its update out" in flagged["site-4"]


def test_counters_keep_the_global_value_and_dtypes_and_shapes_are_kept() -> None:
    glob = {"w": torch.zeros(2, 2, dtype=torch.float16), "steps": torch.tensor(7)}
    three = {
        f"s{i}": {"w": torch.full((2, 2), float(i), dtype=torch.float16), "steps": torch.tensor(i)}
        for i in range(3)
    }
    for rule in ("median", "trimmed-mean:1", "norm-bound:1"):
        state, _ = aggregate(Aggregation.parse(rule), glob, three, ones(three))
        assert state["w"].dtype == torch.float16 and state["w"].shape == (2, 2)
        assert state["steps"].item() == 7


def test_too_few_replies_for_the_rule_is_an_error_not_a_model() -> None:
    two = models([1, 0, 0], [2, 0, 0])
    with pytest.raises(ValueError, match="krum:1 needs at least 5 replies, got 2"):
        aggregate(Aggregation.parse("krum:1"), GLOBAL, two, ones(two))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("krum", "needs F"),
        ("krum:0", "needs F"),
        ("trimmed-mean:x", "needs F"),
        ("norm-bound:-1", "finite number > 0"),
        ("norm-bound:inf", "finite number > 0"),
        ("median:2", "Unknown `aggregation`"),
        ("bulyan:1", "Unknown `aggregation`"),
    ],
)
def test_a_malformed_rule_is_named_with_an_example(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Aggregation.parse(text)


def test_rules_print_as_they_parse() -> None:
    for text in ("fedavg", "median", "trimmed-mean:2", "krum:1", "norm-bound:2.5"):
        assert str(Aggregation.parse(text)) == text
    assert [Aggregation.parse(t).min_replies for t in ("median", "trimmed-mean:2", "krum:1")] == [
        1,
        5,
        5,
    ]


# ---------------------------------------------------------------- against attacks
def federation(hostile: int, attack: str, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Ten sites' models one step from the global model: honest updates near (1, ..., 1)
    with DP-like noise; the last `hostile` sites attack."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(10):
        honest = torch.ones(50) + 0.3 * torch.randn(50, generator=gen)
        if i >= 10 - hostile:
            honest = (
                -10 * honest if attack == "sign-flip" else 1000 * torch.randn(50, generator=gen)
            )
        out[f"site-{i}"] = {"w": honest}
    return out


@pytest.mark.parametrize("attack", ["sign-flip", "noise"])
@pytest.mark.parametrize("rule", ["median", "trimmed-mean:2", "krum:2", "norm-bound:10"])
def test_each_rule_resists_two_hostile_sites_of_ten(rule: str, attack: str) -> None:
    sites = federation(2, attack)
    glob = {"w": torch.zeros(50)}
    fedavg = sum(m["w"] for m in sites.values()) / 10
    state, flagged = aggregate(Aggregation.parse(rule), glob, sites, ones(sites))
    # FedAvg is steered far from the honest direction (1, ..., 1); the rule is not.
    honest = torch.ones(50)
    assert (fedavg - honest).norm() > 10
    # norm-bound bounds a hostile site's pull rather than removing it: B/n each.
    limit = 3 + (2 * 10 / 10 if rule.startswith("norm-bound") else 0)
    assert (state["w"] - honest).norm() < limit, (rule, attack, (state["w"] - honest).norm())
    if rule != "median":  # every other rule names the sites it acted on
        assert {"site-8", "site-9"} <= set(flagged), flagged
        assert set(flagged) == {"site-8", "site-9"}, flagged  # and no honest site


def test_with_no_hostile_site_the_rules_stay_near_fedavg() -> None:
    sites = federation(0, "none")
    glob = {"w": torch.zeros(50)}
    fedavg = sum(m["w"] for m in sites.values()) / 10
    for rule in ("median", "trimmed-mean:2", "krum:2", "norm-bound:10"):
        state, flagged = aggregate(Aggregation.parse(rule), glob, sites, ones(sites))
        assert (state["w"] - fedavg).norm() < 1.0, rule
        if rule in ("trimmed-mean:2", "norm-bound:10"):
            assert flagged == {}, (rule, flagged)  # no honest site is flagged as hostile
