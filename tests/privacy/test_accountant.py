"""Accountants against Google's dp-accounting, and calibration properties."""

from __future__ import annotations

from typing import Any

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.errors import PrivacyError
from fedsilo.privacy.accountant import RDP_ORDERS, calibrate_noise, epsilon
from fedsilo.privacy.events import SampledGaussianEvent as Event


def google_rdp(q: float, sigma: float, steps: int, delta: float) -> float:
    acc = rdp.RdpAccountant(RDP_ORDERS)
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    )
    return float(acc.get_epsilon(delta))


def google_pld(q: float, sigma: float, steps: int, delta: float) -> float:
    acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    )
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize("q,sigma,steps", [(0.01, 4.0, 10_000), (0.1, 1.0, 100), (0.05, 1.5, 480)])
def test_matches_dp_accounting(q: float, sigma: float, steps: int) -> None:
    ev = [Event(noise_multiplier=sigma, sample_rate=q, steps=steps)]
    assert epsilon(ev, delta=1e-5, accountant="rdp") == pytest.approx(
        google_rdp(q, sigma, steps, 1e-5), rel=0.01
    )
    # Our PRV figure is an upper bound with eps_error 0.01: within 2% above PLD's estimate.
    ours, theirs = epsilon(ev, delta=1e-5, accountant="prv"), google_pld(q, sigma, steps, 1e-5)
    assert theirs * 0.99 <= ours <= theirs * 1.03 + 0.01


def test_published_values() -> None:
    # q=0.01, sigma=4, 10k steps, delta=1e-5: RDP ~1.04, PRV/PLD ~0.95.
    ev = [Event(noise_multiplier=4.0, sample_rate=0.01, steps=10_000)]
    assert epsilon(ev, delta=1e-5, accountant="rdp") == pytest.approx(1.04, abs=0.02)
    assert epsilon(ev, delta=1e-5, accountant="prv") == pytest.approx(0.95, abs=0.03)


def test_two_rounds_exceed_one_and_compose_like_one_long_run() -> None:
    one = [Event(noise_multiplier=1.1, sample_rate=0.1, steps=10)]
    two = one * 2
    for acc in ("prv", "rdp"):
        e1, e2 = epsilon(one, delta=1e-5, accountant=acc), epsilon(two, delta=1e-5, accountant=acc)
        assert e2 > e1 > 0
        assert e2 == pytest.approx(
            google_rdp(0.1, 1.1, 20, 1e-5) if acc == "rdp" else google_pld(0.1, 1.1, 20, 1e-5),
            rel=0.03,
        )


def test_no_events_no_spend() -> None:
    assert epsilon([], delta=1e-5) == 0.0


@settings(max_examples=15, deadline=None)
@given(
    target=st.floats(0.5, 10),
    q=st.floats(0.005, 0.3),
    steps=st.integers(1, 600),
    acc=st.sampled_from(["prv", "rdp"]),
)
def test_calibration_never_overshoots(target: float, q: float, steps: int, acc: str) -> None:
    sigma = calibrate_noise(
        target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, accountant=acc
    )
    got = epsilon(
        [Event(noise_multiplier=sigma, sample_rate=q, steps=steps)], delta=1e-5, accountant=acc
    )
    assert got <= target


# Properties. Epsilon is monotone in each parameter of the sampled Gaussian
# mechanism (Mironov et al. 2019; PRV inherits it from the privacy curves).
sigmas, rates, step_counts = st.floats(0.5, 20), st.floats(0.001, 0.5), st.integers(1, 2000)


@settings(max_examples=8, deadline=None)
@given(
    sigma=sigmas,
    q=rates,
    steps=step_counts,
    more=st.integers(1, 2000),
    acc=st.sampled_from(["prv", "rdp", "rdp"]),
)
def test_epsilon_non_decreasing_in_steps(
    sigma: float, q: float, steps: int, more: int, acc: str
) -> None:
    a = epsilon(
        [Event(noise_multiplier=sigma, sample_rate=q, steps=steps)], delta=1e-5, accountant=acc
    )
    b = epsilon(
        [Event(noise_multiplier=sigma, sample_rate=q, steps=steps + more)],
        delta=1e-5,
        accountant=acc,
    )
    assert b >= a * (1 - 1e-6)


@settings(max_examples=8, deadline=None)
@given(
    sigma=sigmas,
    q=rates,
    factor=st.floats(1.0, 2.0),
    steps=step_counts,
    acc=st.sampled_from(["prv", "rdp", "rdp"]),
)
def test_epsilon_non_decreasing_in_sample_rate(
    sigma: float, q: float, factor: float, steps: int, acc: str
) -> None:
    a = epsilon(
        [Event(noise_multiplier=sigma, sample_rate=q, steps=steps)], delta=1e-5, accountant=acc
    )
    b = epsilon(
        [Event(noise_multiplier=sigma, sample_rate=q * factor, steps=steps)],
        delta=1e-5,
        accountant=acc,
    )
    assert b >= a * (1 - 1e-6)


@settings(max_examples=8, deadline=None)
@given(
    sigma=sigmas,
    q=rates,
    factor=st.floats(1.0, 3.0),
    steps=step_counts,
    acc=st.sampled_from(["prv", "rdp", "rdp"]),
)
def test_epsilon_non_increasing_in_noise(
    sigma: float, q: float, factor: float, steps: int, acc: str
) -> None:
    a = epsilon(
        [Event(noise_multiplier=sigma, sample_rate=q, steps=steps)], delta=1e-5, accountant=acc
    )
    b = epsilon(
        [Event(noise_multiplier=sigma * factor, sample_rate=q, steps=steps)],
        delta=1e-5,
        accountant=acc,
    )
    assert b <= a * (1 + 1e-6)


@settings(max_examples=5, deadline=None)
@given(
    target=st.floats(2, 10),
    q=st.floats(0.01, 0.3),
    steps=st.integers(1, 300),
    prior_sigma=st.floats(1.0, 5.0),
    prior_steps=st.integers(1, 200),
)
def test_calibration_with_prior_spend_never_overshoots(
    target: float, q: float, steps: int, prior_sigma: float, prior_steps: int
) -> None:
    prior = [Event(noise_multiplier=prior_sigma, sample_rate=q, steps=prior_steps)]
    try:
        sigma = calibrate_noise(
            target_epsilon=target,
            delta=1e-5,
            sample_rate=q,
            steps=steps,
            accountant="rdp",
            prior=prior,
        )
    except PrivacyError:  # the prior alone is (nearly) the whole budget: refused, never overshot
        assert epsilon(prior, delta=1e-5, accountant="rdp") > target * 0.5
        return
    plan = Event(noise_multiplier=sigma, sample_rate=q, steps=steps)
    assert epsilon([*prior, plan], delta=1e-5, accountant="rdp") <= target


def test_rdp_matches_dp_accounting_for_mixed_events() -> None:
    # A ledger composes rounds with different sigma (different runs): heterogeneous events.
    events = [
        Event(noise_multiplier=1.2, sample_rate=0.05, steps=300),
        Event(noise_multiplier=2.0, sample_rate=0.1, steps=200),
    ]
    acc = rdp.RdpAccountant(RDP_ORDERS)
    for e in events:
        acc.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)
                ),
                e.steps,
            )
        )
    assert epsilon(events, delta=1e-5, accountant="rdp") == pytest.approx(
        acc.get_epsilon(1e-5), rel=0.01
    )
    pld_acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    for e in events:
        pld_acc.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)
                ),
                e.steps,
            )
        )
    theirs = float(pld_acc.get_epsilon(1e-5))
    ours = epsilon(events, delta=1e-5, accountant="prv")
    assert theirs * 0.99 <= ours <= theirs * 1.03 + 0.01


def test_answers_are_memoised_per_history_whatever_its_order_and_refusals_are_not() -> None:
    """A thousand virtual sites ask the same questions: the second asking is free, a
    reordered history is the same question, and the answer is the uncached one."""
    from fedsilo.privacy import accountant

    a = Event(noise_multiplier=1.1, sample_rate=0.05, steps=40)
    b = Event(noise_multiplier=0.9, sample_rate=0.02, steps=10)
    accountant._composed_epsilon.cache_clear()
    first = epsilon([a, b, a], delta=1e-5)
    uncached = accountant._composed_epsilon.__wrapped__(
        ((0.9, 0.02, 10), (1.1, 0.05, 80)), 1e-5, "prv"
    )
    assert first == uncached
    assert epsilon([b, a, a], delta=1e-5) == first  # a reordered history: one entry
    info = accountant._composed_epsilon.cache_info()
    assert (info.misses, info.hits) == (1, 1)

    def plan(prior: list[Event]) -> float:
        return calibrate_noise(
            target_epsilon=3.0, delta=1e-5, sample_rate=0.1, steps=50, prior=prior
        )

    sigma = plan([a, b])
    assert plan([b, a]) == sigma
    assert accountant._calibrate.cache_info().hits >= 1
    assert (
        epsilon([a, b, Event(noise_multiplier=sigma, sample_rate=0.1, steps=50)], delta=1e-5) <= 3.0
    )
    for _ in range(2):  # raised again each time, never remembered as an answer
        with pytest.raises(PrivacyError):
            calibrate_noise(target_epsilon=0.01, delta=1e-5, sample_rate=1.0, steps=10**4)


def histories(sigma: tuple[float, float], q: tuple[float, float], steps: int, events: int) -> Any:
    """Ledger histories: 1 to `events` (sigma, q, steps) events drawn from these ranges."""
    return st.lists(
        st.tuples(st.floats(*sigma), st.floats(*q), st.integers(1, steps)),
        min_size=1,
        max_size=events,
    )


def canonical(events: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """`events` merged by (sigma, q) and sorted, as fedsilo hands a history to Opacus."""
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in events:
        merged[(s, q)] = merged.get((s, q), 0) + n
    return sorted((s, q, n) for (s, q), n in merged.items())


@settings(max_examples=40, deadline=None)
@given(histories((0.3, 20.0), (1e-4, 1.0), 5_000, 4))
def test_rdp_composed_from_one_step_curves_is_opacus_rdp_bit_for_bit(
    events: list[tuple[float, float, int]],
) -> None:
    """A site's history grows a step a round: its RDP is each (sigma, q)'s memoised one-step
    curve times its steps, which must be exactly what Opacus's RDPAccountant computes."""
    import warnings

    from opacus.accountants import RDPAccountant

    ours = epsilon(
        [Event(noise_multiplier=s, sample_rate=q, steps=n) for s, q, n in events],
        delta=1e-5,
        accountant="rdp",
    )
    theirs = RDPAccountant()
    theirs.history = canonical(events)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ours == float(theirs.get_epsilon(delta=1e-5, alphas=RDP_ORDERS))


@settings(max_examples=12, deadline=None)
@given(histories((0.6, 12.0), (1e-3, 0.5), 2_000, 3))
def test_prv_epsilon_is_opacus_prv_bit_for_bit(events: list[tuple[float, float, int]]) -> None:
    """fedsilo's PRV accountant bounds its discretisation domain from memoised RDP curves;
    the epsilon must be exactly Opacus's PRVAccountant's, and the method it overrides
    must still be the one Opacus calls (an upgrade that renames it fails here)."""
    import warnings

    from opacus.accountants import PRVAccountant

    from fedsilo.privacy import accountant

    assert "_get_domain" in vars(PRVAccountant)
    calls: list[int] = []
    real = accountant._PRV._get_domain

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(self, *args, **kwargs)

    history = tuple(canonical(events))
    theirs = PRVAccountant()
    theirs.history = list(history)
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("ignore")
        mp.setattr(accountant._PRV, "_get_domain", spy)
        try:
            expected: object = float(theirs.get_epsilon(delta=1e-5))
        except Exception as exc:  # the same failure is the same answer
            expected = type(exc)
        try:
            ours: object = accountant._composed_epsilon.__wrapped__(history, 1e-5, "prv")
        except Exception as exc:
            ours = type(exc)
    assert ours == expected
    assert calls == [1]


def test_warm_memoises_the_curves_every_epsilon_of_the_history_needs() -> None:
    """accountant.warm computes each (sigma, q)'s one-step curves (the RDP accountant's
    orders and PRV's domain's); epsilon of the history then computes none again, and its
    value is the same as without the warm-up."""
    from fedsilo.privacy import accountant

    events = [
        Event(noise_multiplier=1.37, sample_rate=0.0417, steps=23),
        Event(noise_multiplier=1.37, sample_rate=0.0417, steps=23),
        Event(noise_multiplier=2.11, sample_rate=0.0833, steps=5),
    ]
    accountant._rdp_curve.cache_clear()
    accountant._composed_epsilon.cache_clear()
    cold = {a: epsilon(events, delta=1e-5, accountant=a) for a in ("prv", "rdp")}
    accountant._rdp_curve.cache_clear()
    accountant._composed_epsilon.cache_clear()
    # Execute
    accountant.warm(events)
    # Assert: 2 pairs x 2 order sets, and nothing more to compute for the epsilons
    assert accountant._rdp_curve.cache_info().currsize == 4
    misses = accountant._rdp_curve.cache_info().misses
    warm = {a: epsilon(events, delta=1e-5, accountant=a) for a in ("prv", "rdp")}
    assert accountant._rdp_curve.cache_info().misses == misses
    assert warm == cold
