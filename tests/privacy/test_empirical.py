"""An empirical privacy audit of the product's DP-SGD, in one training run.

Steinke, Nasr and Jagielski (NeurIPS 2023): m canaries, each in the training data
with probability 1/2; train once with fedsilo's own `DPTrainer`; score each canary
on the final model; turn the best and worst scores into guesses; the fraction right
gives an empirical lower bound on epsilon. The real trainer must stay below the
claimed epsilon, and a trainer whose noise source forgets the noise must exceed it:
this guards the hand-written clipping and noise against regressions.

The canaries are Dirac inputs: canary j is 10 times the unit vector on an input
coordinate of its own (no other example uses it), with a label of its own. Its
gradient is ten times the clip norm, so only correct clipping holds its influence
down; on a linear model only it and the noise move column j of the weights, and its
score is how far its own class's weight in that column rose above the others'.
"""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from torch import nn

from fedsilo.privacy.accountant import calibrate_noise
from fedsilo.privacy.empirical import epsilon_lower_bound, guess, p_value
from fedsilo.task.data import Dataset
from fedsilo.task.rng import SeededRandom, SiteRandom
from fedsilo.task.train import DPTrainer, sample_rate, steps_per_epoch

CANARIES, FEATURES, CLASSES, OTHERS = 1000, 20, 10, 2000
BATCH, STEPS, CLIP, LR = 500, 100, 1.0, 2.0
CLAIMED, DELTA = 2.0, 1e-5
GUESSES = 150  # k+ = k- = 150, fixed before looking at any score


class ForgetsNoise(SeededRandom):
    """A test double: samples as the site would, but adds no noise at all."""

    def gaussian(self, shape: tuple[int, ...] | torch.Size, std: float) -> torch.Tensor:
        return torch.zeros(shape)


def audit(rng: SiteRandom) -> tuple[float, int, int]:
    """(empirical epsilon lower bound, guesses, correct) of one training run."""
    g = torch.Generator().manual_seed(2023)
    included = torch.rand(CANARIES, generator=g) < 0.5
    canary_labels = torch.randint(0, CLASSES, (CANARIES,), generator=g)
    dims = CANARIES + FEATURES
    others = torch.zeros(OTHERS, dims)
    others[:, CANARIES:] = torch.randn(OTHERS, FEATURES, generator=g)
    other_labels = torch.randint(0, CLASSES, (OTHERS,), generator=g)
    members = included.nonzero(as_tuple=True)[0]
    # Norm 10: only correct clipping (to 1) keeps a canary's influence within the claim.
    x = torch.cat([10 * torch.eye(dims)[members], others])
    y = torch.cat([canary_labels[members], other_labels])
    n = len(y)
    q = sample_rate(n, BATCH)
    epochs = max(1, round(STEPS / steps_per_epoch(n, BATCH)))
    steps = epochs * steps_per_epoch(n, BATCH)
    sigma = calibrate_noise(
        target_epsilon=CLAIMED, delta=DELTA, sample_rate=q, steps=steps, accountant="prv"
    )
    model = nn.Linear(dims, CLASSES)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    trainer = DPTrainer(
        model, noise_multiplier=sigma, max_grad_norm=CLIP, expected_batch_size=BATCH, lr=LR, rng=rng
    )
    stats = trainer.train_epochs(Dataset(x, y, CLASSES, "canaries"), epochs)
    assert stats.steps == steps
    w = model.weight.detach()[:, :CANARIES]  # classes x canary columns (all started at 0)
    own = w[canary_labels, torch.arange(CANARIES)]
    scores = (own - (w.sum(0) - own) / (CLASSES - 1)).tolist()
    r, v = guess(scores, included.tolist(), k_pos=GUESSES, k_neg=GUESSES)
    return epsilon_lower_bound(m=CANARIES, r=r, v=v, delta=DELTA), r, v


def test_the_real_trainer_stays_below_its_claim_and_a_noiseless_one_does_not() -> None:
    real, r, v = audit(SeededRandom(7))
    broken, r2, v2 = audit(ForgetsNoise(7))
    print(
        f"claimed {CLAIMED}: real trainer {real:.3f} ({v}/{r}), no noise {broken:.3f} ({v2}/{r2})"
    )
    assert real < CLAIMED
    assert broken > CLAIMED
    assert v2 == r2  # without noise every guess is right


def test_p_value_matches_the_binomial_tail_when_delta_is_zero() -> None:
    for eps in (0.0, 0.5, 2.0):
        q = math.exp(eps) / (1 + math.exp(eps))
        expected = scipy.stats.binom.sf(70 - 1, 100, q)
        assert p_value(m=200, r=100, v=70, epsilon=eps, delta=0.0) == pytest.approx(expected)


def test_lower_bound_is_monotone_and_zero_at_chance() -> None:
    bounds = [epsilon_lower_bound(m=400, r=200, v=v, delta=1e-5) for v in (100, 130, 160, 190)]
    assert bounds[0] == 0.0  # half right is what a coin gets
    assert bounds == sorted(bounds) and bounds[-1] > 2.0
    # At the bound the guarantee is refuted at 95% and no further.
    eps = bounds[2]
    assert p_value(m=400, r=200, v=160, epsilon=eps, delta=1e-5) < 0.05
    assert p_value(m=400, r=200, v=160, epsilon=eps + 1e-3, delta=1e-5) >= 0.05


def test_guess_counts_right_guesses() -> None:
    scores = [0.1, 0.9, 0.5, 0.8, 0.0]
    included = [False, True, False, False, True]
    assert guess(scores, included, k_pos=2, k_neg=1) == (3, 1)  # 0.9 right, 0.8 wrong, 0.0 wrong


def test_a_trainer_that_forgets_to_clip_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsilo.task import train

    monkeypatch.setattr(train, "clip_factors", lambda sq, clip: torch.ones_like(sq))
    broken, _, _ = audit(SeededRandom(7))
    assert broken > CLAIMED
