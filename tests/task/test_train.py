"""DP-SGD mechanics, checked against quantities worked out independently."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedsilo.errors import ConfigError
from fedsilo.task.builtin import builtin_task
from fedsilo.task.data import Dataset
from fedsilo.task.models import CNN, MLP, ScatterNet
from fedsilo.task.rng import SeededRandom
from fedsilo.task.train import DPTrainer, check_private_state, evaluate


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def make_trainer(
    model: nn.Module, *, sigma: float, clip: float, batch: int, lr: float = 1.0, seed: int = 0
) -> DPTrainer:
    return DPTrainer(
        model,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=batch,
        lr=lr,
        rng=SeededRandom(seed),
    )


def test_no_noise_no_clipping_equals_plain_sgd() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    dp_model = MLP()
    plain = copy.deepcopy(dp_model)
    make_trainer(dp_model, sigma=0.0, clip=1e6, batch=16, lr=0.1).step(x, y)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    nn.functional.cross_entropy(plain(x), y).backward()
    opt.step()
    assert torch.allclose(flat_params(dp_model), flat_params(plain), atol=1e-6)


def test_each_example_contributes_at_most_the_clip_norm() -> None:
    # One example, huge loss: its gradient norm >> C, so the (noise-free) update
    # is exactly lr * C / B in norm; with B examples the update is at most lr * C.
    torch.manual_seed(1)
    clip, batch = 0.5, 8
    model = MLP()
    before = flat_params(model)
    x = torch.randn(1, 64) * 50
    make_trainer(model, sigma=0.0, clip=clip, batch=batch).step(x, torch.tensor([3]))
    step_norm = float((flat_params(model) - before).norm())
    assert step_norm == pytest.approx(clip / batch, rel=1e-3)

    model = MLP()
    before = flat_params(model)
    xs, ys = torch.randn(batch, 64) * 50, torch.randint(0, 10, (batch,))
    make_trainer(model, sigma=0.0, clip=clip, batch=batch).step(xs, ys)
    assert float((flat_params(model) - before).norm()) <= clip * (1 + 1e-4)


def test_per_sample_norms_clipped_in_cnn() -> None:
    torch.manual_seed(2)
    model = CNN()
    trainer = make_trainer(model, sigma=0.0, clip=0.1, batch=4)
    x, y = torch.randn(4, 1, 28, 28) * 10, torch.randint(0, 10, (4,))
    sums, _, raw_norms = trainer.clipped_grad_sums(x, y)
    assert bool((raw_norms > 0.1).all())  # every example is clipped
    # Each example contributes exactly C in norm, so the sum is at most B * C.
    total = torch.cat([g.flatten() for g in sums.values()]).norm()
    assert float(total) <= 4 * 0.1 * (1 + 1e-4)
    # One example alone: its clipped gradient has norm C exactly.
    sums, _, _ = trainer.clipped_grad_sums(x[:1], y[:1])
    one = torch.cat([g.flatten() for g in sums.values()]).norm()
    assert float(one) == pytest.approx(0.1, rel=1e-4)


def test_noise_std_matches_sigma_times_clip_over_batch() -> None:
    # An empty Poisson batch: the update is pure noise, lr * N(0, (sigma C)^2) / B.
    sigma, clip, batch = 2.0, 0.7, 10
    model = nn.Linear(100, 100)
    before = flat_params(model)
    trainer = make_trainer(model, sigma=sigma, clip=clip, batch=batch, seed=3)
    trainer.step(torch.zeros(0, 100), torch.zeros(0, dtype=torch.long))
    delta = flat_params(model) - before
    expected = sigma * clip / batch
    assert float(delta.std()) == pytest.approx(expected, rel=0.05)
    assert abs(float(delta.mean())) < 4 * expected / delta.numel() ** 0.5


def test_empty_batches_in_training_are_counted_and_noised() -> None:
    # A tiny site: 3 examples, expected batch 1: many empty Poisson batches.
    data = Dataset(torch.randn(3, 64), torch.tensor([0, 1, 2]), 10, "tiny")
    model = MLP()
    before = flat_params(model)
    stats = make_trainer(model, sigma=1.0, clip=1.0, batch=1, seed=4).train_epochs(data, 5)
    assert stats.steps == 15 and stats.empty_batches > 0
    assert not torch.equal(flat_params(model), before)


def test_the_trained_state_dict_loads_into_the_plain_task_model() -> None:
    """No Opacus wrapper (its `_module.` prefix): a site's update has the model's own keys."""
    model = builtin_task("digits").build(seed=0)
    trainer = make_trainer(model, sigma=1.0, clip=1.0, batch=4)
    state = trainer.model.state_dict()
    assert not any(k.startswith("_module.") for k in state)
    fresh = builtin_task("digits").build(seed=1)
    fresh.load_state_dict(state)  # strict: exactly the task model's keys
    assert torch.equal(flat_params(fresh), flat_params(model))


def test_same_seed_same_weights_and_training() -> None:
    cnn = builtin_task("fashion-mnist", "cnn")
    a, b = cnn.build(seed=5), cnn.build(seed=5)
    assert torch.equal(flat_params(a), flat_params(b))
    data = Dataset(torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,)), 10, "r")
    for m in (a, b):
        make_trainer(m, sigma=1.0, clip=1.0, batch=8, seed=9).train_epochs(data, 1)
    assert torch.equal(flat_params(a), flat_params(b))


def test_evaluate_accuracy_of_a_perfect_model() -> None:
    x = torch.eye(10)
    model = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(10) * 10)
    loss, acc = evaluate(model, Dataset(x, torch.arange(10), 10, "eye"))
    assert acc == 1.0 and loss < 0.01


@pytest.mark.parametrize(
    "layer,needle",
    [
        (nn.BatchNorm1d(8, affine=False), "normalises over the batch"),
        (nn.BatchNorm1d(8, track_running_stats=False), "normalises over the batch"),
        (nn.InstanceNorm1d(8, track_running_stats=True), "keeps running statistics"),
    ],
)
def test_models_with_private_statistics_are_refused(layer: nn.Module, needle: str) -> None:
    model = nn.Sequential(nn.Linear(4, 8), layer, nn.Linear(8, 2))
    with pytest.raises(ConfigError, match=needle) as err:
        DPTrainer(
            model,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
            lr=0.1,
            rng=SeededRandom(0),
        )
    assert f"Layer 1 ({type(layer).__name__})" in str(err.value)


class Counter(nn.Module):
    """A layer whose saved buffer would carry data-dependent state in the state dict."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.register_buffer("seen", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)  # type: ignore[no-any-return]


def test_saved_buffers_are_refused_but_fixed_ones_are_not() -> None:
    with pytest.raises(ConfigError, match="saves buffer `seen`"):
        check_private_state(Counter())
    # scatnet's fixed filters are non-persistent: allowed, and never in the state dict.
    scat = ScatterNet()
    check_private_state(scat)
    assert sorted(scat.state_dict()) == ["head.bias", "head.weight"]
    assert all(k in dict(scat.named_parameters()) for k in scat.state_dict())


def mixed(model: nn.Module, precision: str, clip: float = 1.0) -> DPTrainer:
    return DPTrainer(
        model,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=8,
        lr=1.0,
        rng=SeededRandom(0),
        precision=precision,
    )


@pytest.mark.parametrize("build", [MLP, CNN], ids=["mlp", "cnn"])
def test_bf16_never_lets_a_clipped_gradient_exceed_the_clip_norm(build: object) -> None:
    # Each example alone: its clipped gradient is the sum. bf16 keeps 8 bits: a norm
    # or clip factor computed in it would be off by up to ~0.4%, which this bound sees.
    torch.manual_seed(3)
    model = build()  # type: ignore[operator]
    shape = (64,) if isinstance(model, MLP) else (1, 28, 28)
    trainer = mixed(model, "bf16", clip=0.7)
    worst = 0.0
    for i in range(40):
        x = torch.randn(1, *shape) * (1 + 10 * (i % 4))  # most gradients far above C
        sums, _, norms = trainer.clipped_grad_sums(x, torch.tensor([i % 10]))
        assert all(s.dtype == torch.float32 for s in sums.values())
        total = float(torch.sqrt(sum((s.double() ** 2).sum() for s in sums.values())))
        if float(norms[0]) > 0.7:
            assert total == pytest.approx(0.7, rel=1e-5)
        worst = max(worst, total)
    assert worst <= 0.7 * (1 + 1e-5)


def test_bf16_gives_the_fp32_update_to_bf16_accuracy_and_keeps_float32_weights() -> None:
    torch.manual_seed(4)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    base = MLP()
    sums = {}
    for precision in ("fp32", "bf16"):
        model = copy.deepcopy(base)
        out, _, _ = mixed(model, precision).clipped_grad_sums(x, y)
        sums[precision] = torch.cat([g.flatten() for g in out.values()])
        trainer = mixed(model, precision)
        trainer.noise_multiplier = 1.0  # noise is added to float32 gradients
        trainer.step(x, y)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    err = float((sums["bf16"] - sums["fp32"]).norm() / sums["fp32"].norm())
    assert 0 < err < 0.03  # bf16 did run (not fp32 under another name), and well


def test_fp16_overflow_redoes_the_step_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsilo.task import train

    torch.manual_seed(5)
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    base = MLP()
    expected, _, _ = mixed(copy.deepcopy(base), "fp32").clipped_grad_sums(x, y)
    trainer = mixed(copy.deepcopy(base), "fp32")
    trainer.precision = "fp16"  # past the CPU refusal: fp16 arithmetic is emulated here
    monkeypatch.setattr(train, "FP16_LOSS_SCALE", 2.0**100)  # every gradient overflows
    got, loss, _ = trainer.clipped_grad_sums(x, y)
    for a, b in zip(got.values(), expected.values(), strict=True):
        assert torch.equal(a, b)  # float32 all through: the same bits
    assert loss == pytest.approx(float(nn.functional.cross_entropy(base(x), y)) * 16, rel=1e-6)


def test_precision_is_checked_where_the_site_trains() -> None:
    with pytest.raises(ConfigError, match="one of fp32, bf16, fp16"):
        mixed(MLP(), "fp8")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        mixed(MLP(), "fp16")
