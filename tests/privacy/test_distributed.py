"""Distributed DP's pieces: rounding, discrete Gaussian shares, the trust assumption."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fedsilo.config import RunConfig
from fedsilo.errors import PrivacyError
from fedsilo.privacy.accountant import calibrate_noise, epsilon
from fedsilo.privacy.distributed import (
    Quantizer,
    check_run_noise,
    check_shares,
    decode_sum,
    discrete_gaussian,
    expected_pooled_batch,
    planned,
    quantize,
    ring_bytes,
    share_multiplier,
    sum_norm_bound,
    tau,
)
from fedsilo.privacy.events import RoundSpend, SampledGaussianEvent
from fedsilo.privacy.policy import SitePolicy
from fedsilo.task.rng import SecureRandom, SeededRandom


@pytest.mark.parametrize("rng", [SeededRandom(3), SecureRandom()], ids=["seeded", "secure"])
def test_discrete_gaussian_shares_are_integers_with_the_asked_spread(rng) -> None:  # type: ignore[no-untyped-def]
    x = discrete_gaussian(200_000, 40.0, rng)
    assert x.dtype == np.int64 and x.size == 200_000
    assert abs(x.mean()) < 0.5  # 40 / sqrt(2e5) = 0.09 standard error
    assert x.std() == pytest.approx(40.0, rel=0.01)
    # Gaussian tails, not Laplace's: 4-sigma exceedances ~ 6.3e-5
    assert np.mean(np.abs(x) > 160) < 2e-4


def test_random_rounding_is_unbiased_and_moves_each_coordinate_by_under_one() -> None:
    v = torch.full((100_000,), 0.3)
    r = quantize(v, 10.0, SeededRandom(0))  # 3.0 exactly, with float error: 2 or 3 or 4
    assert set(np.unique(r)) <= {2, 3, 4} and r.mean() == pytest.approx(3.0, abs=0.01)
    v = torch.tensor([0.25] * 100_000)
    r = quantize(v, 1.0, SeededRandom(1))
    assert set(np.unique(r)) == {0, 1} and r.mean() == pytest.approx(0.25, abs=0.01)


def test_the_decoded_sum_of_contributions_is_the_float_sum_within_the_rounding() -> None:
    q = Quantizer(dim=1000, clip=0.1)
    rng = SeededRandom(2)
    grads = [torch.randn(1000) * 0.01 for _ in range(5)]
    total = np.sum([quantize(g, q.scale, rng) for g in grads], axis=0)
    err = decode_sum(total, q) - torch.stack(grads).sum(0)
    assert float(err.abs().max()) < 5 / q.scale  # each of 5 coordinates rounds by < 1 unit


def test_sensitivity_covers_rounding_and_the_share_sums_to_central_noise() -> None:
    q = Quantizer(dim=10_000, clip=0.1)
    assert q.scale * q.clip == pytest.approx(100 * 100)  # RESOLUTION x sqrt(d)
    assert q.sensitivity == pytest.approx(q.scale * q.clip * 1.01)
    s = q.share_std(2.0, 4)
    assert 4 * s**2 == pytest.approx((2.0 * q.sensitivity) ** 2)  # m shares: central noise
    assert share_multiplier(2.0, 4) == 1.0
    assert tau(s, 4) == 0.0 and check_shares(q, 2.0, 4) == s


def test_a_share_too_small_for_the_gaussian_approximation_is_refused() -> None:
    q = Quantizer(dim=4, clip=1.0)  # Delta = 200 + 2 units
    with pytest.raises(PrivacyError, match="too small"):
        check_shares(q, 0.01, 100)  # s = 0.2 units


def test_an_overflowing_sum_is_refused() -> None:
    q = Quantizer(dim=3, clip=1.0)
    with pytest.raises(PrivacyError, match="out of range"):
        decode_sum(np.array([0, 2**62, 0], dtype=np.int64), q)
    out = decode_sum(np.array([int(q.scale), 0, -int(q.scale)], dtype=np.int64), q)
    assert out.tolist() == pytest.approx([1.0, 0.0, -1.0], abs=1 / q.scale)


def spend(**kw: object) -> RoundSpend:
    values: dict[str, object] = {
        "event": SampledGaussianEvent(noise_multiplier=4.0, sample_rate=0.1, steps=1),
        "clip_norm": 0.1,
        "delta": 1e-5,
        "dataset": "sha256:00",
        "run": "r",
        "round": 1,
        "time": "t",
        "site": "a",
        **kw,
    }
    return RoundSpend(**values)  # type: ignore[arg-type]


def test_a_distributed_spend_records_its_assumption_and_round_trips() -> None:
    s = spend(mode="distributed", noise_share=2.0, min_sites=4, sites=5)
    back = RoundSpend.from_dict(s.to_dict())
    assert back == s and back.own_event.noise_multiplier == 2.0
    assert spend().own_event == spend().event  # local DP: its own noise is all of it
    assert "mode" not in spend().to_dict()  # local lines read and hash as before
    with pytest.raises(ValueError, match="2 <= min_sites <= sites"):
        spend(mode="distributed", noise_share=2.0, min_sites=1, sites=5)
    with pytest.raises(ValueError, match="2 <= min_sites <= sites"):
        spend(mode="distributed", noise_share=2.0, min_sites=4, sites=3)
    with pytest.raises(ValueError, match="noise_share <= noise_multiplier"):
        spend(mode="distributed", noise_share=5.0, min_sites=4, sites=5)


def test_policy_allows_distributed_dp_only_when_asked_and_at_its_assumption() -> None:
    with pytest.raises(PrivacyError, match="does not allow"):
        SitePolicy(max_epsilon=3.0).check_request({"dp-min-sites": 10})
    with pytest.raises(PrivacyError, match="requires at least 5"):
        SitePolicy(max_epsilon=3.0, distributed_min_sites=5).check_request({"dp-min-sites": 4})
    SitePolicy(max_epsilon=3.0, distributed_min_sites=5).check_request({"dp-min-sites": 5})
    with pytest.raises(PrivacyError, match="integer >= 2"):
        SitePolicy(max_epsilon=3.0, distributed_min_sites=1)
    node = SitePolicy.from_node_config({"policy-max-epsilon": 3, "policy-distributed-min-sites": 6})
    assert node.distributed_min_sites == 6
    assert SitePolicy.from_node_config({"policy-max-epsilon": 3}).distributed_min_sites == 0
    assert SitePolicy.from_dict(node.to_dict()) == node
    assert "distributed_min_sites" not in SitePolicy(max_epsilon=3.0).to_dict()
    assert math.isclose(node.max_epsilon, 3.0)


def honest_sum_norms(
    *, sites: int, n: int, batch: int, sigma: float, min_sites: int, q: Quantizer, trials: int
) -> np.ndarray:
    """Norms of decoded honest sums: each site Poisson-samples n examples at batch / n, each
    sampled example's clipped gradient is the same unit direction x C (the largest sum),
    then it rounds and adds its discrete Gaussian share, as noisy_integer_sum does."""
    rng, counts = SeededRandom(11), np.random.default_rng(12)
    direction = np.zeros(q.dim)
    direction[0] = 1.0
    total = np.zeros((trials, q.dim), dtype=np.int64)
    for _ in range(sites):
        sums = counts.binomial(n, batch / n, size=trials)[:, None] * q.clip * direction
        rounded = quantize(torch.from_numpy(sums.reshape(-1)), q.scale, rng)
        noise = discrete_gaussian(trials * q.dim, q.share_std(sigma, min_sites), rng)
        total += (rounded + noise).reshape(trials, q.dim)
    return np.linalg.norm(total / q.scale, axis=1)


def test_the_norm_bound_holds_for_simulated_honest_sums_and_is_not_loose() -> None:
    # Prepare: 4 sites of 10,000 examples, batch 100 (400 expected in the pooled batch).
    q = Quantizer(dim=64, clip=1.0)
    run = {"clip": 1.0, "batch_size": 100, "sites": 4, "noise_multiplier": 1.0, "min_sites": 3}
    # Execute
    norms = honest_sum_norms(sites=4, n=10_000, batch=100, sigma=1.0, min_sites=3, q=q, trials=4000)
    bound = sum_norm_bound(**run, quantizer=q)  # type: ignore[arg-type]
    loose = sum_norm_bound(**run, quantizer=q, failure=0.05)  # type: ignore[arg-type]
    # Assert: never exceeded at 1e-9, at most 5% of sums above the 5% bound, and the
    # bound within 1.5x of what honest sites reach (it counts only what they can send).
    assert norms.max() <= bound <= 1.5 * norms.max()
    assert np.mean(norms > loose) <= 0.05
    assert expected_pooled_batch(batch_size=100, sites=4) == 400.0


def test_a_sum_far_above_what_honest_sites_send_is_beyond_the_bound() -> None:
    q = Quantizer(dim=10_000, clip=1.0)
    bound = sum_norm_bound(
        clip=1.0, batch_size=100, sites=4, noise_multiplier=2.0, min_sites=2, quantizer=q
    )
    assert 400 < bound < 1e5  # a site sending 1e5 is caught


def test_more_noise_or_sites_widen_the_bound() -> None:
    q = Quantizer(dim=1000, clip=0.5)
    base = {"clip": 0.5, "batch_size": 64, "sites": 3, "noise_multiplier": 1.0, "min_sites": 3}
    b0 = sum_norm_bound(**base, quantizer=q)  # type: ignore[arg-type]
    for change in ({"noise_multiplier": 2.0}, {"sites": 6}, {"batch_size": 128}):
        assert sum_norm_bound(**(base | change), quantizer=q) > b0  # type: ignore[arg-type]


def distributed_cfg(**kw: object) -> RunConfig:
    values: dict[str, object] = {
        "rounds": 20,
        "batch_size": 10,
        "target_epsilon": 3.0,
        "dp": "distributed",
        "dp_min_sites": 3,
        "min_sites": 3,
        "dp_max_sample_rate": 0.1,
        **kw,
    }
    return RunConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_a_run_is_planned_once_for_its_largest_sample_rate(accountant: str) -> None:
    cfg = distributed_cfg(accountant=accountant)
    run = planned(cfg)
    sigma = calibrate_noise(
        target_epsilon=3.0, delta=1e-5, sample_rate=0.1, steps=20, accountant=accountant
    )
    assert run.noise_multiplier == sigma and run == planned(run)  # once; kept on resume
    at_max = SampledGaussianEvent(noise_multiplier=sigma, sample_rate=0.1, steps=20)
    assert epsilon([at_max], delta=1e-5, accountant=accountant) <= 3.0
    # Every site at or below the largest rate is within the target; smaller rates spend less.
    assert check_run_noise(run, sample_rate=0.01) < check_run_noise(run, sample_rate=0.1) <= 3.0
    local = RunConfig()
    assert planned(local) is local


def test_a_run_without_its_noise_or_with_too_little_is_refused() -> None:
    run = planned(distributed_cfg())
    for sigma, needle in ((0.0, "never planned"), (math.nan, "never planned")):
        with pytest.raises(PrivacyError, match=needle):
            check_run_noise(dataclasses.replace(run, noise_multiplier=sigma), sample_rate=0.1)
    small = dataclasses.replace(run, noise_multiplier=run.noise_multiplier * 0.9)
    with pytest.raises(PrivacyError, match=r"above the run's target-epsilon 3"):
        check_run_noise(small, sample_rate=0.1)
    with pytest.raises(PrivacyError, match="above the run's target-epsilon"):
        planned(small)  # a recorded plan that no longer fits is not kept
    # A larger rate than planned (a site the server left out of the plan) is refused too.
    with pytest.raises(PrivacyError, match=r"sample rate 0\.2"):
        check_run_noise(run, sample_rate=0.2)


def test_the_ring_holds_twice_the_honest_sums_bound_and_widens_with_the_sites() -> None:
    """Scatnet's 39,700 weights at batch 256 and sigma 1: 4 bytes a weight for 10 sites
    (half the 64-bit ring), 5 for 1,000; always twice the bound on any coordinate."""
    quantizer = Quantizer(dim=39_700, clip=1.0)
    run = {"clip": 1.0, "batch_size": 256, "noise_multiplier": 1.0, "min_sites": 3}
    bounds = {n: sum_norm_bound(sites=n, quantizer=quantizer, **run) for n in (3, 10, 1000)}
    widths = {n: ring_bytes(bound, quantizer) for n, bound in bounds.items()}
    assert widths == {3: 4, 10: 4, 1000: 5}
    for n, k in widths.items():
        bound = bounds[n] * quantizer.scale  # in integer units
        assert 2.0 ** (8 * k - 1) >= 2 * bound > 2.0 ** (8 * (k - 1) - 1)
