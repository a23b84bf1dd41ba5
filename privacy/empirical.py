"""Empirical lower bounds on epsilon from one training run. Pure math, no Flower, no torch.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS
2023, arXiv:2305.08846). An auditor inserts m canaries, each included in the
training data independently with probability 1/2, trains once, scores every canary,
and guesses "included" for the k+ highest scores and "excluded" for the k- lowest
(abstaining on the rest): r = k+ + k- guesses, v of them correct. Their main theorem:
if training is (epsilon, delta)-DP, then

    P[W >= v] <= P[Binomial(r, q) >= v]
                 + 2 m delta * max_{1<=i<=v} P[v > Binomial(r, q) >= v - i] / i

with q = e^epsilon / (1 + e^epsilon), the accuracy of epsilon-DP randomised
response. So an observed v whose probability is below 1 - confidence under
(epsilon, delta) refutes that guarantee; the largest epsilon refuted is the
empirical lower bound. A correct DP implementation keeps it below the claimed
epsilon (with probability >= confidence); one that forgets its noise does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[>= v of r guesses correct] under an (epsilon, delta)-DP algorithm, m canaries."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    worst, below = 0.0, 0.0  # below = P[v > Binomial(r, q) >= v - i]
    for i in range(1, v + 1):
        below += float(stats.binom.pmf(v - i, r, q))
        worst = max(worst, below / i)
    return min(1.0, tail + 2 * m * delta * worst)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that v correct guesses of r refute at `confidence` (0 if none)."""
    alpha = 1.0 - confidence
    if p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m=m, r=r, v=v, epsilon=high, delta=delta) < alpha:
        low, high = high, 2 * high
        if high > 1e3:
            return math.inf
    for _ in range(50):  # bisection: p_value increases with epsilon
        mid = (low + high) / 2
        if p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) < alpha:
            low = mid
        else:
            high = mid
    return low


def guess(
    scores: Sequence[float], included: Sequence[bool], *, k_pos: int, k_neg: int
) -> tuple[int, int]:
    """(r, v): guess "included" for the k_pos highest scores and "excluded" for the k_neg lowest."""
    if k_pos + k_neg > len(scores) or len(scores) != len(included):
        raise ValueError("need k_pos + k_neg <= canaries, one score per canary")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    right = sum(not included[i] for i in order[:k_neg])
    right += sum(included[i] for i in order[len(order) - k_pos :])
    return k_pos + k_neg, right
