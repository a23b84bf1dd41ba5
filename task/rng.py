"""A site's private source of DP randomness: Poisson sampling masks and Gaussian noise.

DP-SGD's guarantee rests on noise nobody else can predict: a server that could
regenerate a site's noise could subtract it from the update. So every random draw of
DP training comes from a `SiteRandom` the site owns, never from torch's global
generators (which `torch.manual_seed` anywhere in the process would reset), never from a
CUDA generator and never from anything the server sends.

- `SecureRandom` (deployed sites): a ChaCha20 keystream (RFC 8439,
  fedsilo.task.chacha) under a 256-bit key and 96-bit nonce from `os.urandom`, fresh
  for every object, its 32-bit block counter from 0. Before a draw would run the
  counter past 2^32 blocks (256 GiB of keystream) the object takes a fresh key and
  nonce: the counter never wraps. On the CPU the keystream comes from OpenSSL; for
  noise added to tensors on a GPU it is made on that GPU (one Triton kernel), and
  the Gaussians too: nothing crosses the PCIe bus. Words of the keystream become
  uniforms with 53 random bits and Gaussians by the Box-Muller transform (radius from
  53-bit uniforms in float64, angle from 24-bit ones) (Box and Muller, "A Note on the
  Generation of Random Normal Deviates", 1958), both outputs of each pair used.
  Predicting its output means breaking ChaCha20; torch's Mersenne Twister, by
  contrast, keeps 32 bits of a seed and can be searched offline.
  Caveat, as for every floating-point Gaussian sampler: Mironov ("On Significance of
  the Least Significant Bits for Differential Privacy", CCS 2012) shows that the
  low-order bits of floating-point noise can leak; fedsilo does not implement his
  snapping mechanism.
- `SeededRandom(seed)` (`fedsilo simulate` only): a torch.Generator the object owns,
  reproducible from the run's `--seed`. For experiments, never for real data.

Poisson masks compare 31-bit integers with floor(q * 2^31): the realised rate is at
most q (by under 2^-31), so the accountant's q is never an under-estimate.

Noise layout (the same bits on every backend): a draw of n Gaussians is made in
segments of at most SEGMENT_PAIRS pairs; a segment of k pairs takes the next
ceil(12k / 64) keystream blocks, whose first 8k bytes are k 64-bit words (the radii's
uniforms: their low 53 bits) and next 4k bytes k 32-bit words (the angles: their low
24 bits), and gives k radius x cos values then k radius x sin values. On the CPU each
segment stays in cache from keystream to the tensor it is added to (the whole draw
never exists), which makes a 17 M-parameter step's noise 8x faster than drawing it
whole: 61 ms against 494 ms on one core (bench/dp_throughput.py).
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from fedsilo.task.chacha import (
    BLOCK_BYTES,
    COUNTER_BLOCKS,
    KEY_BYTES,
    NONCE_BYTES,
    openssl_keystream,
    torch_keystream,
)

MASK_BITS = 31
# A CPU segment: 768 KiB of keystream, ~2 MiB with its temporaries. Smaller ones pay
# torch's per-op cost more often (17 M Gaussians: 2^14 pairs 74 ms, 2^16 61 ms).
SEGMENT_PAIRS = 1 << 16
DEVICE_SEGMENTS = 64  # segments a GPU makes at once (4 M pairs: ~200 MB of temporaries)
_ANGLE = 2.0 * math.pi / 2**24


class SiteRandom(ABC):
    """Where a site's DP randomness comes from. Draws are CPU tensors unless said."""

    @abstractmethod
    def bernoulli_mask(self, n: int, p: float) -> torch.Tensor:
        """n independent booleans, each True with probability (at most, by 2^-31) p."""

    @abstractmethod
    def gaussian(self, shape: tuple[int, ...] | torch.Size, std: float) -> torch.Tensor:
        """float32 N(0, std^2) samples of `shape`."""

    @abstractmethod
    def uniform(self, n: int) -> torch.Tensor:
        """n float64 uniforms in [0, 1) (distributed DP's rounding and discrete noise)."""

    def gaussians(self, shapes: list[torch.Size], std: float) -> list[torch.Tensor]:
        """One N(0, std^2) tensor per shape (a DP step's noise, one per parameter)."""
        return [self.gaussian(shape, std) for shape in shapes]

    def add_gaussian_(self, tensors: Sequence[torch.Tensor], std: float) -> None:
        """Add fresh N(0, std^2) noise to each tensor in place, on the tensor's device."""
        noises = self.gaussians([t.shape for t in tensors], std)
        for t, noise in zip(tensors, noises, strict=True):
            t.add_(noise.to(t.device, non_blocking=True))


class SecureRandom(SiteRandom):
    """ChaCha20 keystream keyed from the OS entropy pool (see the module docstring)."""

    def __init__(self) -> None:
        self._rekey()
        self._segment: _Segment | None = None  # the CPU path's buffers, made on first use

    def _rekey(self) -> None:
        self._key = os.urandom(KEY_BYTES)
        self._nonce = os.urandom(NONCE_BYTES)
        self._block = 0  # the next unused block under this key

    def _claim(self, nbytes: int) -> tuple[bytes, bytes, int]:
        """(key, nonce, first block) of the next ceil(nbytes / 64) unused blocks."""
        blocks = -(-nbytes // BLOCK_BYTES)
        if self._block + blocks > COUNTER_BLOCKS:
            self._rekey()  # never wrap the counter: a wrapped one would repeat the stream
        first = self._block
        self._block += blocks
        return self._key, self._nonce, first

    def _words(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """n keystream words of `dtype`, from the next unused block on."""
        size = torch.empty((), dtype=dtype).element_size()
        buf = bytearray(n * size)
        if not buf:
            return torch.empty(0, dtype=dtype)
        openssl_keystream(*self._claim(len(buf)), memoryview(buf))
        return torch.frombuffer(buf, dtype=dtype)

    def bernoulli_mask(self, n: int, p: float) -> torch.Tensor:
        if p >= 1.0:  # q = 1 (a site smaller than the batch): every example, every step
            return torch.ones(n, dtype=torch.bool)
        threshold = math.floor(p * 2**MASK_BITS)  # < 2^31: fits the int32 comparison
        words = torch.bitwise_and(self._words(n, torch.int32), 2**MASK_BITS - 1)
        return torch.lt(words, threshold)

    def uniform(self, n: int) -> torch.Tensor:
        """n float64 uniforms in [0, 1), 53 random bits each."""
        return (self._words(n, torch.int64) & (2**53 - 1)).to(torch.float64) * 2.0**-53

    def gaussian(self, shape: tuple[int, ...] | torch.Size, std: float) -> torch.Tensor:
        z = torch.zeros(math.prod(shape), dtype=torch.float32)
        self.add_gaussian_([z], std)
        return z.view(shape)

    def gaussians(self, shapes: list[torch.Size], std: float) -> list[torch.Tensor]:
        zs = [torch.zeros(shape, dtype=torch.float32) for shape in shapes]
        self.add_gaussian_(zs, std)
        return zs

    def add_gaussian_(self, tensors: Sequence[torch.Tensor], std: float) -> None:
        flats = [_flat(t) for t in tensors]
        n = sum(f.numel() for f in flats)
        pairs = (n + 1) // 2
        sink = _Sink(flats)
        devices = {t.device for t in tensors}
        if devices and devices != {torch.device("cpu")}:
            if len(devices) > 1:
                raise ValueError(f"noise for tensors on several devices at once: {devices}")
            self._add_on_device(sink, pairs, std, devices.pop())
        else:
            if self._segment is None:
                self._segment = _Segment()
            seg = self._segment
            for start in range(0, pairs, SEGMENT_PAIRS):
                k = min(SEGMENT_PAIRS, pairs - start)
                openssl_keystream(*self._claim(12 * k), seg.bytes(k))
                sink.add(seg.gaussians(k, std))
        for f, t in zip(flats, tensors, strict=True):
            if f.data_ptr() != t.data_ptr():  # a non-contiguous tensor: noise added to a copy
                t.copy_(f.view(t.shape))

    def _add_on_device(self, sink: _Sink, pairs: int, std: float, device: torch.device) -> None:
        full, last = divmod(pairs, SEGMENT_PAIRS)
        seg_blocks = 12 * SEGMENT_PAIRS // BLOCK_BYTES
        for start in range(0, full, DEVICE_SEGMENTS):
            count = min(DEVICE_SEGMENTS, full - start)
            # `count` whole segments are `count` x seg_blocks consecutive blocks
            key, nonce, first = self._claim(12 * SEGMENT_PAIRS * count)
            words = torch_keystream(key, nonce, first, count * seg_blocks, device)
            sink.add(_box_muller(words.view(count, 3 * SEGMENT_PAIRS), SEGMENT_PAIRS, std).view(-1))
        if last:
            key, nonce, first = self._claim(12 * last)
            words = torch_keystream(key, nonce, first, -(-12 * last // BLOCK_BYTES), device)
            sink.add(_box_muller(words.view(1, -1)[:, : 3 * last], last, std).view(-1))


def _box_muller(words: torch.Tensor, k: int, std: float) -> torch.Tensor:
    """Segments' Gaussians from their int32 keystream words (segments x 3k): segments x 2k."""
    u = (words[:, : 2 * k].contiguous().view(torch.int64) & (2**53 - 1)).to(torch.float64)
    # the radius needs the precision (its tail comes from the smallest uniforms: 53 bits
    # reach 8.6 sigma), so -2 ln(1 - u) is float64; 1 - u is in (0, 1]
    radius = (u.mul_(-(2.0**-53)).log1p_().mul_(-2.0)).to(torch.float32).sqrt_().mul_(std)
    angle = (words[:, 2 * k : 3 * k] & (2**24 - 1)).to(torch.float32).mul_(_ANGLE)
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)


class _Segment:
    """A CPU segment's buffers, reused: keystream, then Box-Muller, in cache."""

    def __init__(self) -> None:
        k = SEGMENT_PAIRS
        self.buf = bytearray(12 * k)
        self.view = memoryview(self.buf)
        self.u_words = torch.frombuffer(self.buf, dtype=torch.int64, count=k)
        self.a_words = torch.frombuffer(self.buf, dtype=torch.int32, count=k, offset=8 * k)
        self.u = torch.empty(k, dtype=torch.float64)
        self.angle = torch.empty(k, dtype=torch.float32)
        self.z = torch.empty(2 * k, dtype=torch.float32)

    def bytes(self, k: int) -> memoryview:
        return self.view[: 12 * k]

    def gaussians(self, k: int, std: float) -> torch.Tensor:
        """The 2k Gaussians of a k-pair segment whose keystream is in `buf`."""
        if k < SEGMENT_PAIRS:  # the last segment: its angle words start at byte 8k
            a_words = torch.frombuffer(self.buf, dtype=torch.int32, count=k, offset=8 * k)
        else:
            a_words = self.a_words
        u, angle, z = self.u[:k], self.angle[:k], self.z[: 2 * k]
        torch.bitwise_and(self.u_words[:k], 2**53 - 1, out=self.u_words[:k])
        u.copy_(self.u_words[:k])
        u.mul_(-(2.0**-53)).log1p_().mul_(-2.0)  # -2 ln(1 - u), 1 - u in (0, 1]
        radius = z[k:]  # the sin half is written last: hold the radius there meanwhile
        radius.copy_(u)
        radius.sqrt_().mul_(std)
        torch.bitwise_and(a_words, 2**24 - 1, out=a_words)
        angle.copy_(a_words).mul_(_ANGLE)
        torch.cos(angle, out=z[:k])
        z[:k].mul_(radius)
        torch.sin(angle, out=angle)
        radius.mul_(angle)  # z[k:] = radius x sin
        return z


class _Sink:
    """Adds a stream of noise values to a list of flat tensors, in order."""

    def __init__(self, flats: list[torch.Tensor]) -> None:
        self.flats = flats
        self.i = 0  # the tensor being filled
        self.at = 0  # the next position in it

    def add(self, values: torch.Tensor) -> None:
        taken = 0
        while taken < values.numel() and self.i < len(self.flats):
            dest = self.flats[self.i]
            k = min(dest.numel() - self.at, values.numel() - taken)
            dest[self.at : self.at + k].add_(values[taken : taken + k])
            taken += k
            self.at += k
            if self.at == dest.numel():
                self.i, self.at = self.i + 1, 0


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1) if t.is_contiguous() else t.reshape(-1).clone()


class SeededRandom(SiteRandom):
    """A private torch.Generator seeded from `seed`: reproducible, for simulations only."""

    def __init__(self, seed: int) -> None:
        self._gen = torch.Generator().manual_seed(seed)

    def bernoulli_mask(self, n: int, p: float) -> torch.Tensor:
        return torch.rand(n, generator=self._gen) < p

    def gaussian(self, shape: tuple[int, ...] | torch.Size, std: float) -> torch.Tensor:
        return torch.normal(0.0, std, tuple(shape), generator=self._gen)

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, dtype=torch.float64, generator=self._gen)
