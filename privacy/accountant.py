"""Epsilon from privacy events, and noise calibration for a planned schedule.

Accountants are Opacus's: PRV (Gopi, Lee, Wutschitz, "Numerical Composition of
Differential Privacy", NeurIPS 2021; we report its upper bound) and RDP
(Mironov, Talwar, Zhang, "Renyi Differential Privacy of the Sampled Gaussian
Mechanism", 2019). Epsilon is recomputed from the full event list every time.

Both functions here are pure (same events and parameters, same float), and a
simulation asks them the same questions for many sites: a thousand virtual sites of
one size share one noise plan and one history per round. Each process therefore
keeps a bounded memo of their answers (`functools.lru_cache`, keyed by the canonical
history). It holds no state that can change a result, only time: every site still
composes its own ledger's events, and a site with a different history gets its own
answer.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as privacy_analysis
from opacus.accountants.analysis.prv.domain import Domain

from fedsilo.config import ACCOUNTANTS
from fedsilo.errors import PrivacyError
from fedsilo.privacy.events import SampledGaussianEvent

# Calibration searches sigma in [SIGMA_MIN, SIGMA_MAX] (below 0.3 DP-SGD protects
# next to nothing, so a huge budget gets more noise than it needs); a schedule that needs
# more noise than SIGMA_MAX to fit the budget is refused.
SIGMA_MIN, SIGMA_MAX = 0.3, 200.0
# RDP orders: Opacus's defaults extended at both ends (tighter bounds at small and
# large epsilon).
RDP_ORDERS = (
    [1 + x / 20.0 for x in range(1, 100)]
    + list(range(6, 64))
    + [80, 96, 128, 192, 256, 384, 512, 1024]
)

History = tuple[tuple[float, float, int], ...]  # (sigma, q, steps), merged and sorted

# Integer orders only: what the calibration bracket uses (see calibrate_noise).
BRACKET_ORDERS = [a for a in RDP_ORDERS if float(a).is_integer()]


def epsilon(
    events: Sequence[SampledGaussianEvent], *, delta: float, accountant: str = "prv"
) -> float:
    """Epsilon at `delta` of the composition of `events` (0 when there are none)."""
    history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events if e.steps > 0]
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"Unknown accountant {accountant!r}; use prv or rdp.")
    if not history:
        return 0.0
    return _composed_epsilon(_merge(history), delta, accountant)


# Memo sizes: a calibration evaluates ~20 histories, and a simulation's sites share
# a handful of plans; the bound keeps a long-lived process's memory flat.
EPSILON_MEMO = 4096
CALIBRATION_MEMO = 256


@functools.lru_cache(maxsize=EPSILON_MEMO)
def _composed_epsilon(history: History, delta: float, accountant: str) -> float:
    """Epsilon of a canonical (merged, sorted) history: pure, so memoised per process."""
    # The PRV grid overflows harmlessly in far tails; RDP warns when the best order is
    # at the edge of the grid, which RDP_ORDERS makes wide enough for our regimes.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if accountant == "prv":
            prv = _PRV()
            prv.history = list(history)
            return float(prv.get_epsilon(delta=delta))
        return _rdp_epsilon(history, delta, _ORDERS)


# RDP composes by addition: each (sigma, q)'s curve at one step, memoised, times its
# steps, summed in the history's order as Opacus's RDPAccountant does: the same float,
# bit for bit (tests/privacy/test_accountant.py). A site's history grows by a step a
# round, so the memo of whole histories (_composed_epsilon) never hits across rounds.
_ORDERS = tuple(RDP_ORDERS)
_OPACUS_ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)  # what PRV's domain bound uses


def _rdp_epsilon(
    history: Sequence[tuple[float, float, int]], delta: float, orders: tuple[float, ...]
) -> float:
    """Opacus's RDPAccountant(history).get_epsilon(delta, alphas=orders), from the memo."""
    rdp = sum([_rdp_curve(sigma, q, orders) * steps for sigma, q, steps in history])
    eps, _ = privacy_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=EPSILON_MEMO)
def _rdp_curve(sigma: float, q: float, orders: tuple[float, ...]) -> np.ndarray:
    """One step's RDP of the sampled Gaussian at each of `orders` (read only)."""
    curve: np.ndarray = privacy_analysis.compute_rdp(
        q=q, noise_multiplier=sigma, steps=1, orders=list(orders)
    )
    curve.setflags(write=False)
    return curve


WARM_PAIRS = 64  # the most (sigma, q) pairs `warm` computes at once: its time stays bounded


def warm(events: Sequence[SampledGaussianEvent]) -> None:
    """Compute and memoise the one-step RDP curves of `events`' (sigma, q) pairs.

    Nothing else: the memo holds values of a pure function, so no answer changes, only
    how long one takes. A deployed site starts a fresh ClientApp process for every
    message (fedsilo.flwr_adapter.site_runtime), whose empty memo made each round
    compute these curves again for its budget check (~0.2 s a pair, most of a
    digits round's site time); the site's zygote calls this between rounds
    (fedsilo.clients.client_app.zygote_warm), and every child it forks inherits the memo.
    """
    pairs = dict.fromkeys((e.noise_multiplier, e.sample_rate) for e in events if e.steps > 0)
    for sigma, q in list(pairs)[-WARM_PAIRS:]:  # the latest: the next round's plan
        for orders in (_ORDERS, _OPACUS_ORDERS):  # the RDP accountant's; PRV's domain's
            _rdp_curve(sigma, q, orders)


class _PRV(PRVAccountant):  # type: ignore[misc]
    """Opacus's PRV accountant, its discretisation domain bounded from the memo.

    The domain (Gopi et al. 2021, remark 5.6; opacus.accountants.analysis.prv.domain.
    compute_safe_domain_size) is an RDP bound of the history and of each single step:
    Opacus computed both from scratch, at 150 orders, every call (55% of a PRV epsilon,
    cProfile). The same sums from the memoised curves give the same domain, so the same
    epsilon, bit for bit (`test_prv_epsilon_is_opacus_prv_bit_for_bit`, which also fails
    if an Opacus upgrade changes the method this overrides).
    """

    def _get_domain(
        self,
        prvs: Sequence[Any],
        num_self_compositions: Sequence[int],
        eps_error: float,
        delta_error: float,
    ) -> Domain:
        total = sum(num_self_compositions)
        steps = [(p.noise_multiplier, p.sample_rate) for p in prvs]
        history = [(s, q, n) for (s, q), n in zip(steps, num_self_compositions, strict=True)]
        bound = _rdp_epsilon(history, delta_error / 4, _OPACUS_ORDERS)
        for s, q in steps:
            bound = max(bound, _rdp_epsilon([(s, q, 1)], delta_error / (8 * total), _OPACUS_ORDERS))
        size = max(bound, eps_error) + 3
        mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
        return Domain.create_aligned(-size, size, mesh)


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    prior: Sequence[SampledGaussianEvent] = (),
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to relative `tolerance`) whose planned `steps`,
    composed with `prior` events, stays within `target_epsilon` at `delta`.

    The result never overshoots: epsilon(prior + plan) <= target_epsilon under the
    chosen accountant. RDP brackets the search first (cheap at every sigma); PRV is
    then only evaluated near the answer, where its grid is small. Memoised per process
    (module docstring); a refusal is raised again each time, never remembered.

    Raises:
        PrivacyError: when no sigma up to SIGMA_MAX fits (the budget is spent or too small).
    """
    return _calibrate(
        target_epsilon,
        delta,
        sample_rate,
        steps,
        accountant,
        tuple(sorted(prior, key=lambda e: (e.noise_multiplier, e.sample_rate, e.steps))),
        tolerance,
    )


@functools.lru_cache(maxsize=CALIBRATION_MEMO)
def _calibrate(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prior: tuple[SampledGaussianEvent, ...],
    tolerance: float,
) -> float:
    """calibrate_noise with a canonical, hashable prior: pure, so memoised per process."""

    def eps_at(sigma: float, acc: str) -> float:
        plan = SampledGaussianEvent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
        return epsilon([*prior, plan], delta=delta, accountant=acc)

    def _rdp_int_epsilon(sigma: float) -> float:
        # The bracket only needs an upper bound on the PRV epsilon: RDP at integer
        # orders is one (fewer orders, looser bound) and 5x cheaper than with the
        # fractional ones, whose series dominate calibration time.
        history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in prior if e.steps > 0]
        rdp = RDPAccountant()
        rdp.history = list(_merge([*history, (sigma, sample_rate, steps)]))
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            return float(rdp.get_epsilon(delta=delta, alphas=BRACKET_ORDERS))

    if (
        _rdp_int_epsilon(SIGMA_MAX) > target_epsilon
        and eps_at(SIGMA_MAX, accountant) > target_epsilon
    ):
        spent = epsilon(prior, delta=delta, accountant=accountant)
        raise PrivacyError(
            f"No noise level up to sigma={SIGMA_MAX:g} keeps {steps} steps at sample rate "
            f"{sample_rate:.4g} within epsilon {target_epsilon:g} (already spent {spent:.3g}). "
            "Raise the budget, or train fewer rounds/epochs."
        )
    if accountant == "rdp":
        return _bisect(
            lambda s: eps_at(s, "rdp") <= target_epsilon, SIGMA_MIN, SIGMA_MAX, tolerance
        )
    hi = _bisect(lambda s: _rdp_int_epsilon(s) <= target_epsilon, SIGMA_MIN, SIGMA_MAX, tolerance)
    # RDP's conversion is looser than PRV, so the PRV answer lies at or below `hi`;
    # widen upwards in the rare case numerical error puts it above.
    memo: dict[float, float] = {}

    def prv(sigma: float) -> float:
        if sigma not in memo:
            memo[sigma] = eps_at(sigma, accountant)
        return memo[sigma]

    while prv(hi) > target_epsilon:
        if hi >= SIGMA_MAX:
            raise PrivacyError(
                f"No noise level up to sigma={SIGMA_MAX:g} fits epsilon "
                f"{target_epsilon:g} under {accountant}."
            )
        hi = min(SIGMA_MAX, hi * 1.25)
    # The PRV answer is typically within 10% of the RDP bracket: step down by 20%
    # until it no longer fits (each PRV evaluation costs 0.1-0.5 s).
    lo = max(SIGMA_MIN, 0.8 * hi)
    while prv(lo) <= target_epsilon:
        if lo <= SIGMA_MIN:
            return lo
        hi, lo = lo, max(SIGMA_MIN, 0.8 * lo)
    return _false_position(prv, target_epsilon, lo, hi, tolerance)


def _false_position(
    eps: Callable[[float], float], target: float, lo: float, hi: float, tolerance: float
) -> float:
    """Smallest sigma in (lo, hi] (to relative tolerance) with eps(sigma) <= target,
    given eps(lo) > target >= eps(hi).

    log epsilon is close to linear in log sigma over a short bracket, so one secant
    step there, plus a probe one tolerance away on the other side, usually closes the
    bracket in two evaluations where bisection takes five to seven. Falls back to
    bisection whenever the secant point hugs an end.
    """
    step = 1 + 0.99 * tolerance
    while hi - lo > tolerance * lo:
        a, b = math.log(eps(lo) / target), math.log(eps(hi) / target)  # a > 0 >= b
        frac = a / (a - b) if a - b > 0 else 0.5
        if not 0.05 < frac < 0.95:
            frac = 0.5
        x = lo * (hi / lo) ** frac
        if eps(x) <= target:
            hi = x
            probe = x / step
            if probe > lo:
                if eps(probe) <= target:
                    hi = probe
                else:
                    lo = probe
        else:
            lo = x
            probe = x * step
            if probe < hi:
                if eps(probe) <= target:
                    hi = probe
                else:
                    lo = probe
    return hi


def _bisect(fits: Callable[[float], bool], lo: float, hi: float, tolerance: float) -> float:
    """Smallest sigma in [lo, hi] (to relative tolerance) with fits(sigma), given fits(hi).

    Log-space bisection: epsilon decreases monotonically in sigma.
    """
    if fits(lo):
        return lo
    while hi - lo > tolerance * lo:
        mid = math.sqrt(lo * hi)
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _merge(history: list[tuple[float, float, int]]) -> History:
    """Combine events with identical (sigma, q), in a canonical order: fewer terms for
    the accountants, and one memo key for the same history however it was recorded."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
    return tuple(sorted((s, q, n) for (s, q), n in merged.items()))
