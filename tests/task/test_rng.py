"""A site's DP randomness is its own: secure, independent of the run config and of torch's
global generators.

There is no GPU on the test machines: the GPU path's keystream and Box-Muller run here
on CPU tensors and must give the CPU path's bits; `test_no_draw_without_the_sites_source`
fails if any DP code path draws from a generator it was not given, the CUDA one
included; the GPU tests run where there is one (`make gpu-check`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch import nn

from fedsilo.task.builtin import builtin_task
from fedsilo.task.chacha import COUNTER_BLOCKS
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

    def add_gaussian_(self, tensors: Sequence[torch.Tensor], std: float) -> None:
        before = [t.clone() for t in tensors]
        super().add_gaussian_(tensors, std)
        self.drawn.extend(t - b for t, b in zip(tensors, before, strict=True))


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


def fixed_keys(monkeypatch: pytest.MonkeyPatch, *keys: bytes) -> None:
    """os.urandom gives each key then its 12-byte nonce (bytes 100..111), in turn."""
    drawn = [part for key in keys for part in (key, bytes(range(100, 112)))]
    monkeypatch.setattr(os, "urandom", lambda n: drawn.pop(0)[:n])


def keystream(key: bytes, first_block: int, nbytes: int) -> bytes:
    """ChaCha20 from `cryptography` directly: counter (little-endian) + nonce."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    nonce = first_block.to_bytes(4, "little") + bytes(range(100, 112))
    return Cipher(algorithms.ChaCha20(key, nonce), None).encryptor().update(bytes(nbytes))


def test_secure_words_are_the_keystream_from_block_0_each_draw_on_fresh_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The counter starts at 0 (a random start would wrap at a random draw) and each
    draw takes whole blocks after the last one's: no word is ever used twice."""
    key = bytes(range(32))
    fixed_keys(monkeypatch, key)
    rng = SecureRandom()
    words = [rng._words(n, torch.int32) for n in (3, 0, 1000, 7)]
    stream = torch.frombuffer(bytearray(keystream(key, 0, 64 * 65)), dtype=torch.int32)
    # 3 words: block 0; 1000 words: blocks 1..63 (62.5 blocks); 7 words: block 64
    assert torch.equal(words[0], stream[:3])
    assert torch.equal(words[2], stream[16 : 16 + 1000])
    assert torch.equal(words[3], stream[64 * 16 : 64 * 16 + 7])
    assert rng._block == 65


def test_the_stream_re_keys_before_its_counter_would_wrap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stream 2^32 blocks (256 GiB) long, without drawing it: put the counter 3
    # blocks from the end, then draw 10 blocks' worth.
    first_key, second_key = bytes(range(32)), bytes(range(1, 33))
    fixed_keys(monkeypatch, first_key, second_key)
    rng = SecureRandom()
    rng._block = COUNTER_BLOCKS - 3
    last = rng._words(16 * 3, torch.int32)  # the last 3 blocks of the first key: allowed
    after = rng._words(16 * 10, torch.int32)  # would wrap: a fresh key from block 0
    assert as_bytes(last) == keystream(first_key, COUNTER_BLOCKS - 3, 64 * 3)
    assert as_bytes(after) == keystream(second_key, 0, 64 * 10)
    assert (rng._key, rng._block) == (second_key, 10)
    # the noise path too: a Gaussian draw that does not fit re-keys first
    fixed_keys(monkeypatch, first_key, second_key)
    rng = SecureRandom()
    rng._block = COUNTER_BLOCKS - 1
    rng.gaussian((100,), 1.0)
    assert (rng._key, rng._block) == (second_key, -(-12 * 50 // 64))


def as_bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


def test_device_and_cpu_paths_draw_the_same_noise_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The GPU path (keystream and Box-Muller in torch ops, here run on the CPU) gives
    the CPU path's bits: same key, same layout, for sizes around a segment's."""
    from fedsilo.task import rng as module

    monkeypatch.setattr(module, "SEGMENT_PAIRS", 64)  # several segments in a small draw
    monkeypatch.setattr(module, "DEVICE_SEGMENTS", 3)
    for n in (1, 7, 128, 129, 64 * 2 * 7 + 5):
        key = bytes((n + i) % 256 for i in range(32))
        fixed_keys(monkeypatch, key, key)
        cpu, dev = SecureRandom(), SecureRandom()
        a = [torch.zeros(n)]
        cpu.add_gaussian_(a, 2.0)
        b = torch.zeros(n)
        dev._add_on_device(module._Sink([b]), (n + 1) // 2, 2.0, torch.device("cpu"))
        assert torch.equal(a[0], b), n
        assert cpu._block == dev._block


def test_noise_lands_in_every_tensor_in_order_whatever_its_layout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedsilo.task import rng as module

    monkeypatch.setattr(module, "SEGMENT_PAIRS", 16)
    key = bytes(range(3, 35))
    fixed_keys(monkeypatch, key, key)
    whole = SecureRandom().gaussian((3 + 40 + 1 + 20,), 1.5)
    parts = [torch.zeros(3), torch.zeros(5, 8).t(), torch.zeros(1), torch.ones(4, 5)]
    assert not parts[1].is_contiguous()
    SecureRandom().add_gaussian_(parts, 1.5)
    flat = torch.cat([parts[0], parts[1].reshape(-1), parts[2], parts[3].reshape(-1) - 1])
    assert torch.allclose(flat, whole, atol=1e-6)  # the 1 + z of the last: float rounding
    assert torch.equal(flat[:44], whole[:44])


def test_secure_gaussians_pass_a_kolmogorov_smirnov_test(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A fixed key makes the test deterministic; the statistic says whether the
    # transform (not the key) is right. Several segments, both halves of each pair.
    from scipy import stats

    fixed_keys(monkeypatch, bytes(range(7, 39)))
    z = SecureRandom().gaussian((600_000,), 3.0).double().numpy() / 3.0
    assert stats.kstest(z, "norm").pvalue > 0.01
    k = 1 << 16  # SEGMENT_PAIRS: the cos half and the sin half of the first segment
    assert stats.kstest(z[:k], "norm").pvalue > 0.01
    assert stats.kstest(z[k : 2 * k], "norm").pvalue > 0.01
    assert abs(float(np.corrcoef(z[:k], z[k : 2 * k])[0, 1])) < 0.02  # a pair's two halves
    fixed_keys(monkeypatch, bytes(range(9, 41)))
    assert stats.kstest(SecureRandom().uniform(200_000).numpy(), "uniform").pvalue > 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")
def test_gpu_noise_is_the_cpu_noise_up_to_the_devices_rounding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = os.urandom(32)
    fixed_keys(monkeypatch, key, key)
    n = 3 * (1 << 17) + 11
    cpu = SecureRandom().gaussian((n,), 1.0)
    gpu = [torch.zeros(n, device="cuda")]
    SecureRandom().add_gaussian_(gpu, 1.0)
    assert torch.allclose(gpu[0].cpu(), cpu, rtol=1e-5, atol=1e-6)
