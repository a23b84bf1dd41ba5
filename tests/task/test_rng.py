"""A site's DP randomness is its own: secure, independent of the run config and of torch's
global generators.

There is no GPU on the test machines. The CUDA path is checked by reading
(`DPTrainer` draws every mask and noise tensor on the CPU from its `SiteRandom`, then
moves it to the device) and by `test_no_draw_without_the_sites_source`, which fails if
any DP code path draws from a generator it was not given, the CUDA one included.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedsilo.task.builtin import builtin_task
from fedsilo.task.models import MLP
from fedsilo.task.rng import SecureRandom, SeededRandom, SiteRandom
from fedsilo.task.train import DPTrainer


def trainer(rng: SiteRandom, *, sigma: float = 1.0) -> DPTrainer:
    model = builtin_task("digits").build(seed=0)
    return DPTrainer(
        model, noise_multiplier=sigma, max_grad_norm=1.0, expected_batch_size=16, lr=1.0, rng=rng
    )


def data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def step_update(rng: SiteRandom) -> torch.Tensor:
    t = trainer(rng)
    before = nn.utils.parameters_to_vector(t.model.parameters()).detach().clone()
    t.step(*data())
    return nn.utils.parameters_to_vector(t.model.parameters()).detach() - before


def test_secure_gaussians_have_the_right_moments_and_tails() -> None:
    z = SecureRandom().gaussian((2_000_000,), 2.5)
    assert z.dtype == torch.float32
    assert abs(float(z.mean())) < 0.01
    assert float(z.std()) == pytest.approx(2.5, rel=2e-3)
    # P(|Z| > 3 sigma) = 0.0027: the tails are there (no 24-bit truncation either).
    tail = float((z.abs() > 7.5).double().mean())
    assert tail == pytest.approx(math.erfc(3 / math.sqrt(2)), rel=0.05)
    assert bool(torch.isfinite(z).all())


def test_secure_masks_and_uniforms() -> None:
    rng = SecureRandom()
    u = rng.uniform(1_000_000)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert float(u.mean()) == pytest.approx(0.5, abs=2e-3)
    mask = rng.bernoulli_mask(1_000_000, 0.03)
    assert mask.dtype == torch.bool
    assert float(mask.double().mean()) == pytest.approx(0.03, rel=0.02)
    assert not bool(rng.bernoulli_mask(10_000, 0.0).any())
    assert bool(rng.bernoulli_mask(10_000, 1.0).all())


def test_identical_sites_draw_different_noise() -> None:
    a, b = SecureRandom(), SecureRandom()
    assert not torch.equal(a.gaussian((1000,), 1.0), b.gaussian((1000,), 1.0))
    assert not torch.equal(step_update(SecureRandom()), step_update(SecureRandom()))


def test_secure_noise_ignores_every_global_seed() -> None:
    # Whatever a server makes the process seed, it cannot replay a site's draws.
    torch.manual_seed(0)
    first = SecureRandom().gaussian((1000,), 1.0)
    torch.manual_seed(0)
    second = SecureRandom().gaussian((1000,), 1.0)
    assert not torch.equal(first, second)


def test_seeded_random_depends_on_its_own_seed_only() -> None:
    torch.manual_seed(0)
    first = step_update(SeededRandom(7))
    torch.manual_seed(12345)  # the global state is not the simulation's source either
    again = step_update(SeededRandom(7))
    other = step_update(SeededRandom(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_dp_training_leaves_global_generators_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a DP code path seeded a global generator")

    for name in ("manual_seed", "seed"):
        monkeypatch.setattr(torch, name, forbidden)
    monkeypatch.setattr(torch.cuda, "manual_seed", forbidden)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", forbidden)
    state = torch.random.get_rng_state()
    builtin_task("fashion-mnist", "cnn").build(seed=3)  # model init uses a forked CPU state
    t = trainer(SecureRandom())
    x, y = data(200)
    from fedsilo.task.data import Dataset

    t.train_epochs(Dataset(x, y, 10, "test"), 2)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_no_draw_without_the_sites_source(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every torch draw in DP training must name a generator (the site's own): a draw
    # from a default generator (CPU or, on a GPU site, CUDA) fails the test.
    for name in ("normal", "rand", "randn", "randint", "bernoulli", "randperm"):
        real = getattr(torch, name)

        def guarded(*args: object, _real: object = real, **kwargs: object) -> object:
            if kwargs.get("generator") is None:
                raise AssertionError("a DP draw used a global generator")
            return _real(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(torch, name, guarded)
    x, y = data()
    from fedsilo.task.data import Dataset

    for rng in (SecureRandom(), SeededRandom(0)):
        trainer(rng).train_epochs(Dataset(x, y, 10, "test"), 1)


class Recording(SecureRandom):
    """A SecureRandom that keeps what it drew."""

    def __init__(self) -> None:
        super().__init__()
        self.drawn: list[torch.Tensor] = []

    def gaussians(self, shapes: list[torch.Size], std: float) -> list[torch.Tensor]:
        zs = super().gaussians(shapes, std)
        self.drawn.extend(zs)
        return zs


def test_the_noise_added_is_the_sites_draw() -> None:
    # With clipping to a tiny norm the update is the site's noise, scaled: nothing else.
    rng = Recording()
    t = trainer(rng, sigma=1.0)
    t.max_grad_norm = 1e-12
    t.noise_multiplier = 1e12  # std = sigma * C = 1
    before = [p.detach().clone() for p in t.model.parameters()]
    t.step(*data())
    lr, batch = 1.0, 16
    for p, b, z in zip(t.model.parameters(), before, rng.drawn, strict=True):
        assert torch.allclose(b - p.detach(), z * lr / batch, atol=1e-5)


def test_mlp_without_buffers_is_accepted() -> None:
    assert not list(MLP().buffers())


def test_secure_words_are_the_chacha20_keystream_continued_across_draws(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the in-place keystream gives is exactly ChaCha20's output under the key and
    nonce from os.urandom, each draw taking up where the last one stopped."""
    import os

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    key_nonce = [bytes(range(32)), bytes(range(100, 116))]
    drawn = list(key_nonce)
    monkeypatch.setattr(os, "urandom", lambda n: drawn.pop(0))
    rng = SecureRandom()
    words = [rng._words(n, torch.int32) for n in (3, 0, 1000, 7)]
    stream = Cipher(algorithms.ChaCha20(*key_nonce), None).encryptor().update(bytes(4 * 1010))
    assert torch.equal(torch.cat(words), torch.frombuffer(bytearray(stream), dtype=torch.int32))
