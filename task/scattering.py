"""A fixed 2-D scattering transform (Mallat, "Group Invariant Scattering", 2012).

Tramer and Boneh ("Differentially Private Learning Needs Better Features (or Much
More Data)", ICLR 2021) show that under DP-SGD a linear model on scattering
features beats end-to-end CNNs at small epsilon: the features are data-independent
(they cost no privacy) and the linear model has few parameters for the noise to
hit. This is their ScatterNet: J = 2 scales, L = 8 angles, second order, which
maps a 1x28x28 image to 81 channels of 7x7.

The filters and the algorithm follow kymatio 0.3's `Scattering2D`
(https://github.com/kymatio/kymatio, BSD-3-Clause): Morlet wavelets built in space,
periodised, and applied in the Fourier domain on the reflect-padded image;
subsampling is periodisation in Fourier. `tests/task/test_scattering.py` checks
the output against kymatio's on random images. Plain PyTorch, no parameters.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn


def _gabor_2d(m: int, n: int, sigma: float, theta: float, xi: float, slant: float = 1.0) -> Any:
    """A Gabor filter in space, periodised over 5x5 copies (kymatio `gabor_2d`)."""
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]], np.float32)
    rot_inv = np.array([[c, s], [-s, c]], np.float32)
    curv = rot @ np.diag([1.0, slant * slant]) @ rot_inv / (2 * sigma * sigma)
    gab = np.zeros((m, n), np.complex128)
    for ex in (-2, -1, 0, 1, 2):
        for ey in (-2, -1, 0, 1, 2):
            xx, yy = np.mgrid[ex * m : m + ex * m, ey * n : n + ey * n]
            arg = -(
                curv[0, 0] * xx * xx + (curv[0, 1] + curv[1, 0]) * xx * yy + curv[1, 1] * yy * yy
            ) + 1j * (xx * xi * c + yy * xi * s)
            gab += np.exp(arg)
    # kymatio's normalisation, 3.1415 included, so the features match it exactly.
    return gab / (2 * 3.1415 * sigma * sigma / slant)


def _morlet_2d(m: int, n: int, sigma: float, theta: float, xi: float, slant: float) -> Any:
    """Gabor minus a multiple of its envelope: zero mean (kymatio `morlet_2d`)."""
    wave = _gabor_2d(m, n, sigma, theta, xi, slant)
    envelope = _gabor_2d(m, n, sigma, theta, 0.0, slant)
    return wave - (wave.sum() / envelope.sum()) * envelope


def _periodize(filt: np.ndarray, res: int) -> np.ndarray:
    """Crop a Fourier filter to resolution 2^-res (kymatio `periodize_filter_fft`)."""
    m, n = filt.shape
    k = 2**res
    mask = np.ones(filt.shape)
    mask[int(m * 2 ** (-res - 1)) : int(m * 2 ** (-res - 1)) + int(m * (1 - 2**-res)), :] = 0
    mask[:, int(n * 2 ** (-res - 1)) : int(n * 2 ** (-res - 1)) + int(n * (1 - 2**-res))] = 0
    masked = filt * mask
    return masked.reshape(k, m // k, k, n // k).sum(axis=(0, 2))  # type: ignore[no-any-return]


def _subsample(x: torch.Tensor, k: int) -> torch.Tensor:
    """Spatial subsampling by k of the signal whose 2-D FFT is `x` (periodisation)."""
    if k == 1:
        return x
    m, n = x.shape[-2:]
    # Sum the k x k tiles by slicing: a strided reduction over complex values is ~10x slower.
    r = torch.view_as_real(x)
    mk, nk = m // k, n // k
    rows = r[..., :mk, :, :]
    for i in range(1, k):
        rows = rows + r[..., i * mk : (i + 1) * mk, :, :]
    tiles = rows[..., :nk, :]
    for j in range(1, k):
        tiles = tiles + rows[..., j * nk : (j + 1) * nk, :]
    return torch.view_as_complex((tiles / (k * k)).contiguous())


class Scattering2D(nn.Module):
    """Second-order scattering of 1xHxW images: (B, 1, H, W) -> (B, K, H/2^J, W/2^J).

    K = 1 + J*L + L^2 * J(J-1)/2 (81 for J=2, L=8). No trainable parameters; the
    filters are non-persistent buffers, so they never enter a state dict or a
    federated message.
    """

    def __init__(self, shape: tuple[int, int] = (28, 28), *, J: int = 2, L: int = 8) -> None:
        super().__init__()
        self.J, self.L = J, L
        self.shape = shape
        # Names these exact features (a feature cache's key); bump on any change to them.
        self.cache_key = f"scattering-J{J}-L{L}-{shape[0]}x{shape[1]}-v1"
        m, n = ((s + 2**J) // 2**J * 2**J + 2**J for s in shape)
        self.padded = (m, n)
        self.pad = ((m - shape[0]) // 2, (m - shape[0] + 1) // 2)
        self.pad_w = ((n - shape[1]) // 2, (n - shape[1] + 1) // 2)
        phi = np.real(np.fft.fft2(_gabor_2d(m, n, 0.8 * 2 ** (J - 1), 0.0, 0.0)))
        for res in range(J):
            self.register_buffer(f"phi{res}", _tensor(_periodize(phi, res)), persistent=False)
        # psi{j}_{res}: the L wavelets of scale j at resolution res, stacked (L, m', n').
        for j in range(J):
            waves = [
                np.real(
                    np.fft.fft2(
                        _morlet_2d(
                            m,
                            n,
                            0.8 * 2**j,
                            (int(L - L / 2 - 1) - theta) * math.pi / L,
                            3.0 / 4.0 * math.pi / 2**j,
                            4.0 / L,
                        )
                    )
                )
                for theta in range(L)
            ]
            for res in range(min(j + 1, max(J - 1, 1))):
                stacked = np.stack([_periodize(w, res) for w in waves])
                self.register_buffer(f"psi{j}_{res}", _tensor(stacked), persistent=False)

    @property
    def out_channels(self) -> int:
        return 1 + self.J * self.L + self.L * self.L * self.J * (self.J - 1) // 2

    def _buf(self, name: str) -> torch.Tensor:
        b = getattr(self, name)
        if not isinstance(b, torch.Tensor):
            raise TypeError(name)
        return b

    def _low_pass(self, u_hat: torch.Tensor, res: int) -> torch.Tensor:
        """Average with phi, subsample to scale J, back to space, drop the border."""
        s_hat = _subsample(u_hat * self._buf(f"phi{res}"), 2 ** (self.J - res))
        s: torch.Tensor = torch.fft.ifft2(s_hat).real[..., 1:-1, 1:-1]
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != self.shape:
            raise ValueError(f"Scattering2D expects (B, 1, {self.shape}), got {tuple(x.shape)}")
        u0 = nn.functional.pad(x[:, 0], (*self.pad_w, *self.pad), mode="reflect")
        u0_hat = torch.fft.fft2(u0.to(torch.complex64))
        out = [self._low_pass(u0_hat, 0).unsqueeze(1)]
        second: list[torch.Tensor] = []
        for j1 in range(self.J):
            # First order: |x * psi_{j1, theta}| for all L angles at once.
            u1 = torch.fft.ifft2(_subsample(u0_hat.unsqueeze(1) * self._buf(f"psi{j1}_0"), 2**j1))
            u1_hat = torch.fft.fft2(u1.abs().to(torch.complex64))
            out.append(self._low_pass(u1_hat, j1))
            for j2 in range(j1 + 1, self.J):
                # Second order: ||x * psi_{j1,t1}| * psi_{j2,t2}|; for J = 2 this is
                # kymatio's channel order (t1, t2).
                filt = self._buf(f"psi{j2}_{j1}")
                u2_hat = _subsample(u1_hat.unsqueeze(2) * filt, 2 ** (j2 - j1))
                u2 = torch.fft.ifft2(u2_hat).abs().to(torch.complex64)
                s2 = self._low_pass(torch.fft.fft2(u2), j2)
                second.append(s2.flatten(1, 2))
        return torch.cat(out + second, dim=1)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)
