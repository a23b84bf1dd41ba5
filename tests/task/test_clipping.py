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


class Scale(nn.Module):
    """A layer with a parameter no per-sample gradient rule knows."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


@pytest.mark.parametrize(
    "layer,needle",
    [
        (nn.MultiheadAttention(4, 2), "(MultiheadAttention) has parameters whose per-example"),
        (nn.LSTM(4, 4), "use opacus.layers.DPLSTM"),
        (Scale(), "use layers Opacus supports"),
    ],
)
def test_layers_without_a_clipping_rule_are_refused(layer: nn.Module, needle: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), layer)
    with pytest.raises(ConfigError, match="DP-SGD cannot clip them") as err:
        DPTrainer(
            model,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=2,
            lr=1.0,
            rng=SeededRandom(0),
        )
    assert needle in str(err.value) and "Layer 1 " in str(err.value)


class TinyTransformer(nn.Module):
    """A classifier on token sequences mixing both paths: Embedding and LayerNorm through
    Opacus's grad samplers, attention's and the head's Linear layers through fedsilo's."""

    def __init__(self, vocab: int = 20, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        from opacus.layers import DPMultiheadAttention

        self.embed = nn.Embedding(vocab, d)
        self.attn = DPMultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.gnorm = nn.GroupNorm(2, d)  # affine: parameters Opacus clips per sample
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)  # B x T x d
        a, _ = self.attn(h, h, h)
        h = self.norm(h + a).mean(1)  # B x d
        return self.head(torch.tanh(self.gnorm(h)))  # type: ignore[no-any-return]


def test_a_model_mixing_both_paths_matches_opacus() -> None:
    # Prepare
    torch.manual_seed(3)
    model = TinyTransformer()
    x, y, clip = torch.randint(0, 20, (6, 5)), torch.randint(0, 3, (6,)), 0.7
    trainer = DPTrainer(
        copy.deepcopy(model),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=6,
        lr=1.0,
        rng=SeededRandom(0),
    )
    kinds = {type(layer).__name__ for layer in trainer.layers}
    assert {"Embedding", "LayerNorm", "GroupNorm", "Linear"} <= kinds
    # Execute
    sums, _, norms = trainer.clipped_grad_sums(x, y)
    gsm = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    # Assert: per-sample norms and clipped sums equal Opacus's, parameter by parameter.
    theirs = {k.removeprefix("_module."): p.grad_sample for k, p in gsm.named_parameters()}  # type: ignore[attr-defined]
    ours = {name: sums[p] for name, p in trainer.model.named_parameters()}
    assert ours.keys() == theirs.keys()
    expected = torch.cat([g.reshape(6, -1) for g in theirs.values()], 1).norm(dim=1)
    assert torch.allclose(norms, expected, rtol=1e-4)
    factors = (clip / (expected + 1e-6)).clamp(max=1.0)
    for name, got in ours.items():
        want = torch.einsum("b,b...->...", factors, theirs[name])
        assert torch.allclose(got, want, atol=1e-5), name


def cnn_case() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return CNN(), CNN(), torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))


def transformer_case() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(4)
    return (
        TinyTransformer(),
        TinyTransformer(),
        torch.randint(0, 20, (8, 5)),
        torch.randint(0, 3, (8,)),
    )


@pytest.mark.parametrize(
    ("case", "momentum"),
    [("cnn", 0.9), ("transformer", 0.0)],  # the transformer mixes both clipping paths
)
def test_step_equals_opacus_dp_optimizer_without_noise(case: str, momentum: float) -> None:
    ours, theirs, x, y = cnn_case() if case == "cnn" else transformer_case()
    theirs.load_state_dict(ours.state_dict())
    DPTrainer(
        ours,
        noise_multiplier=0.0,
        max_grad_norm=0.3,
        expected_batch_size=10,
        lr=0.5,
        momentum=momentum,
        rng=SeededRandom(0),
    ).step(x, y)
    gsm = GradSampleModule(theirs, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(
        torch.optim.SGD(theirs.parameters(), lr=0.5, momentum=momentum),
        noise_multiplier=0.0,
        max_grad_norm=0.3,
        expected_batch_size=10,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.functional.cross_entropy(gsm(x), y).backward()
    opt.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
