"""A site's private source of DP randomness: Poisson sampling masks and Gaussian noise.

DP-SGD's guarantee rests on noise nobody else can predict: a server that could
regenerate a site's noise could subtract it from the update. So every random draw of
DP training comes from a `SiteRandom` the site owns, never from torch's global
generators (which `torch.manual_seed` anywhere in the process would reset) and never
from anything the server sends. Draws are made on the CPU; the trainer moves them to
its device, so the CUDA path uses no CUDA generator at all.

- `SecureRandom` (deployed sites): a ChaCha20 keystream (RFC 8439, via the
  `cryptography` package) under a 256-bit key and 128-bit nonce from `os.urandom`,
  fresh for every object. Words of the keystream become uniforms with 53 random bits
  and Gaussians by the Box-Muller transform (radius from 53-bit uniforms in float64,
  angle from 24-bit ones) (Box and Muller, "A Note on the Generation
  of Random Normal Deviates", 1958), both outputs of each pair used. Predicting its
  output means breaking ChaCha20; torch's Mersenne Twister, by contrast, keeps 32 bits
  of a seed and can be searched offline.
  Caveat, as for every floating-point Gaussian sampler: Mironov ("On Significance of
  the Least Significant Bits for Differential Privacy", CCS 2012) shows that the
  low-order bits of floating-point noise can leak; fedsilo does not implement his
  snapping mechanism.
- `SeededRandom(seed)` (`fedsilo simulate` only): a torch.Generator the object owns,
  reproducible from the run's `--seed`. For experiments, never for real data.

Poisson masks compare 31-bit integers with floor(q * 2^31): the realised rate is at
most q (by under 2^-31), so the accountant's q is never an under-estimate.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32  # ChaCha20's 256-bit key
NONCE_BYTES = 16  # the cryptography package's ChaCha20 nonce: 32-bit counter + 96-bit nonce
MASK_BITS = 31


class SiteRandom(ABC):
    """Where a site's DP randomness comes from. All draws are CPU tensors."""

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


class SecureRandom(SiteRandom):
    """ChaCha20 keystream keyed from the OS entropy pool (see the module docstring)."""

    def __init__(self) -> None:
        cipher = Cipher(algorithms.ChaCha20(os.urandom(KEY_BYTES), os.urandom(NONCE_BYTES)), None)
        self._stream = cipher.encryptor()

    def _words(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        size = torch.empty((), dtype=dtype).element_size()
        buf = bytearray(n * size)  # zeros; encrypted in place: keystream XOR 0 = keystream
        if buf:  # one pass, no copies (5x faster than `update` of a zero bytes object)
            self._stream.update_into(memoryview(buf), buf)
        return torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)

    def bernoulli_mask(self, n: int, p: float) -> torch.Tensor:
        if p >= 1.0:  # q = 1 (a site smaller than the batch): every example, every step
            return torch.ones(n, dtype=torch.bool)
        threshold = math.floor(p * 2**MASK_BITS)  # < 2^31: fits the int32 comparison
        words = torch.bitwise_and(self._words(n, torch.int32), 2**MASK_BITS - 1)
        return torch.lt(words, threshold)

    def uniform(self, n: int) -> torch.Tensor:
        """n float64 uniforms in [0, 1), 53 random bits each."""
        return ((self._words(n, torch.int64) >> 11) & (2**53 - 1)).to(torch.float64) * 2.0**-53

    def gaussian(self, shape: tuple[int, ...] | torch.Size, std: float) -> torch.Tensor:
        n = math.prod(shape)
        pairs = (n + 1) // 2
        # Box-Muller: the radius needs the precision (its tail comes from the smallest
        # uniforms: 53 bits reach 8.6 sigma), so it is computed in float64; the angle is
        # uniform on the circle and 24 bits (float32's mantissa) resolve it fully.
        u = self.uniform(pairs)
        radius = torch.sqrt(-2.0 * torch.log1p(-u)).to(torch.float32)  # 1 - u in (0, 1]
        angle = (self._words(pairs, torch.int32) & (2**24 - 1)).to(torch.float32)
        angle *= 2.0 * math.pi / 2**24
        z = torch.empty(2 * pairs, dtype=torch.float32)
        torch.mul(radius, torch.cos(angle), out=z[:pairs])
        torch.mul(radius, torch.sin(angle), out=z[pairs:])
        return (z[:n] * std).view(shape)

    def gaussians(self, shapes: list[torch.Size], std: float) -> list[torch.Tensor]:
        # One draw for the whole step, split: the keystream's fixed cost is paid once.
        sizes = [math.prod(shape) for shape in shapes]
        flat = self.gaussian((sum(sizes),), std)
        parts = torch.split(flat, sizes)
        return [part.view(shape) for part, shape in zip(parts, shapes, strict=True)]


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
