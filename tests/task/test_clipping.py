"""fedsilo's per-sample clipping against Opacus's per-sample gradients (independent)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from fedsilo.errors import ConfigError
from fedsilo.task.models import CNN, MLP
from fedsilo.task.rng import SeededRandom
from fedsilo.task.train import DPTrainer


def opacus_per_sample(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    gsm = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    return [p.grad_sample for p in gsm.parameters()]  # type: ignore[attr-defined]


class Wide(nn.Module):
    """Conv with several input channels and no bias, Linear on a sequence: the other paths."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=1, padding=1, bias=False)
        self.seq = nn.Linear(6, 5)
        self.out = nn.Linear(4 * 6 * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.seq(torch.tanh(self.conv(x))))  # B x 4 x 6 x 5
        return self.out(h.flatten(1))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("model", "shape"), [(MLP(), (64,)), (CNN(), (1, 28, 28)), (Wide(), (3, 6, 6))]
)
def test_clipped_sum_equals_opacus_per_sample_gradients(
    model: nn.Module, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    x, y, clip = torch.randn(6, *shape) * 3, torch.randint(0, 10, (6,)), 0.5
    trainer = DPTrainer(
        copy.deepcopy(model),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=6,
        lr=1.0,
        rng=SeededRandom(0),
    )
    sums, _, norms = trainer.clipped_grad_sums(x, y)

    per_sample = opacus_per_sample(model, x, y)
    expected_norms = torch.cat([g.reshape(6, -1) for g in per_sample], 1).norm(dim=1)
    assert torch.allclose(norms, expected_norms, rtol=1e-4)
    factors = (clip / (expected_norms + 1e-6)).clamp(max=1.0)
    for got, g in zip(sums.values(), per_sample, strict=True):
        assert torch.allclose(got, torch.einsum("b,b...->...", factors, g), atol=1e-5)


def test_step_equals_opacus_dp_optimizer_without_noise() -> None:
    torch.manual_seed(1)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    ours, theirs = CNN(), CNN()
    theirs.load_state_dict(ours.state_dict())
    DPTrainer(
        ours,
        noise_multiplier=0.0,
        max_grad_norm=0.3,
        expected_batch_size=10,
        lr=0.5,
        momentum=0.9,
        rng=SeededRandom(0),
    ).step(x, y)
    gsm = GradSampleModule(theirs, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(
        torch.optim.SGD(theirs.parameters(), lr=0.5, momentum=0.9),
        noise_multiplier=0.0,
        max_grad_norm=0.3,
        expected_batch_size=10,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.functional.cross_entropy(gsm(x), y).backward()
    opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_layers_without_a_clipping_rule_are_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ConfigError, match="cannot clip per sample"):
        DPTrainer(
            model,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=2,
            lr=1.0,
            rng=SeededRandom(0),
        )
