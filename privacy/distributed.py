"""Distributed DP: each site adds a share of the noise; only the secure sum is released. No Flower.

The mechanism (Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for
Federated Learning with Secure Aggregation", ICML 2021), one DP-SGD step per round:
1. each site Poisson-samples its data at rate q, sums the per-example gradients clipped
   to C (exactly as local DP-SGD does) and flattens the sum into one vector;
2. scales it by gamma = RESOLUTION * sqrt(d) / C and rounds each coordinate at random,
   up or down, to an integer (unbiased); adjacent datasets then differ by at most
   Delta = gamma * C + sqrt(d) in L2 (the rounding moves each coordinate by under 1, and
   coupling both roundings on the same uniforms bounds the difference of the rounded
   vectors; the Renyi divergence of the mixtures is at most the largest coupled one);
3. adds discrete Gaussian noise N_Z(0, s^2) per coordinate, s = sigma * Delta / sqrt(m),
   where m (`dp-min-sites`) is the number of sites whose shares the guarantee assumes;
4. the vectors are summed by secure aggregation (fedsilo.privacy.secagg) in the ring of
   `ring_bytes` bytes, the narrowest whose range holds twice the sum's largest
   coordinate except with probability NORM_FAILURE (from the run's values and the
   round's site count, never from what sites report); the server sees only the sum,
   divides by gamma, and takes one SGD step.

If at least m sites' shares are in the sum and none of those sites colludes with the
server, the sum carries noise of variance m * s^2 = (sigma * Delta)^2 on an integer
vector of sensitivity Delta: the Poisson-subsampled Gaussian mechanism at noise
multiplier sigma, which the site's accountant composes (PRV or RDP, as for local DP).

One sigma per run (`planned`): the sum's noise is the sum of the shares, so every site
must add a share of the same sigma; if each calibrated its own from its own sampling
rate, the sum would carry the root mean square of their multipliers, and the site with
the largest rate (the smallest site) would spend more than it records. The run's sigma
is therefore calibrated once, when the run is planned, for the largest rate any site
uses (`dp-max-sample-rate`: batch-size / the smallest site's examples); a site whose own
rate is larger samples at that rate instead, and every site checks that the run's sigma
keeps its own rate within target-epsilon before it spends (`check_run_noise`).
The sum of m discrete Gaussians is not exactly a discrete Gaussian; Kairouz et al.
(Theorem 1) bound the difference by tau = 10 * sum_{k=1}^{m-1} exp(-2 pi^2 s^2 k/(k+1)),
which enters their concentrated-DP bound as tau * d; fedsilo requires tau * d <= TAU_MAX
(at the scales here it is far below 1e-100) and treats the sum as Gaussian, as their
experiments do. If fewer shares are in the sum (dropouts beyond the site's assumption,
or sites colluding with the server), the guarantee degrades; against a server that
knows every other site's noise, only the site's own share protects it: noise multiplier
sigma / sqrt(m). Each spend records both (fedsilo.privacy.events.RoundSpend), and
`fedsilo audit` reports both epsilons.

Sampling: a SiteRandom's uniforms (ChaCha20 at deployed sites). The discrete Gaussian
is Canonne, Kamath and Steinke's rejection sampler from a discrete Laplace ("The
Discrete Gaussian for Differential Privacy", NeurIPS 2020, Algorithm 3), vectorised in
float64 like TensorFlow Privacy's; not the exact-arithmetic version.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError, PrivacyError
from fedsilo.privacy.accountant import calibrate_noise, epsilon
from fedsilo.privacy.events import SampledGaussianEvent
from fedsilo.privacy.policy import EPS_RTOL
from fedsilo.privacy.secagg import ring_bytes_for
from fedsilo.task.rng import SiteRandom

RESOLUTION = 100.0  # gamma * C / sqrt(d): rounding inflates the sensitivity by 1%
TAU_MAX = 1e-12
MIN_SHARE_STD = 10.0  # a share below this (in integer units) would make tau matter
# The secure sum is signed 64-bit: every site's vector, summed, must stay well inside.
SUM_BOUND = 2.0**61
# The chance that an honest sum's norm exceeds `sum_norm_bound`: a round it happens in is
# dropped (its model step lost, never its privacy), once in a billion rounds.
NORM_FAILURE = 1e-9


@dataclass(frozen=True)
class Quantizer:
    """Scale and sensitivity of one model's integer vectors."""

    dim: int
    clip: float

    @property
    def scale(self) -> float:  # gamma
        return RESOLUTION * math.sqrt(self.dim) / self.clip

    @property
    def sensitivity(self) -> float:  # Delta, in integer units
        return self.scale * self.clip + math.sqrt(self.dim)

    def share_std(self, noise_multiplier: float, min_sites: int) -> float:
        """s: one site's discrete Gaussian std, in integer units."""
        return noise_multiplier * self.sensitivity / math.sqrt(min_sites)


def share_multiplier(noise_multiplier: float, min_sites: int) -> float:
    """The noise multiplier of one site's own share: what protects it if no other share does."""
    return noise_multiplier / math.sqrt(min_sites)


def tau(share_std: float, min_sites: int) -> float:
    """Kairouz et al.'s tau: how far the sum of m discrete Gaussians is from one."""
    return 10.0 * sum(
        math.exp(-2.0 * math.pi**2 * share_std**2 * k / (k + 1)) for k in range(1, min_sites)
    )


def check_shares(quantizer: Quantizer, noise_multiplier: float, min_sites: int) -> float:
    """The share std, after checking the Gaussian approximation holds (PrivacyError if not)."""
    s = quantizer.share_std(noise_multiplier, min_sites)
    if s < MIN_SHARE_STD or tau(s, min_sites) * quantizer.dim > TAU_MAX:
        raise PrivacyError(
            f"distributed DP's noise share ({s:.3g} integer units) is too small for the "
            "discrete Gaussian sum to be treated as Gaussian; use a smaller target-epsilon "
            "or a smaller dp-min-sites."
        )
    return s


def planned(cfg: RunConfig) -> RunConfig:
    """`cfg` with its run's noise multiplier, calibrated once when the run is planned.

    Distributed DP only (a local-DP config comes back unchanged): sigma is the smallest
    noise multiplier whose `rounds` steps at `dp-max-sample-rate` stay within
    target-epsilon at target-delta under the run's accountant. A config that already
    carries one (a resumed run's recorded plan) keeps it, once it is checked as the sites
    will check it.

    Raises:
        PrivacyError: no sigma up to the calibration's maximum fits the target, or the
            recorded one no longer does.
    """
    if not cfg.distributed:
        return cfg
    if cfg.noise_multiplier:
        check_run_noise(cfg, sample_rate=cfg.dp_max_sample_rate)
        return cfg
    sigma = calibrate_noise(
        target_epsilon=cfg.target_epsilon,
        delta=cfg.target_delta,
        sample_rate=cfg.dp_max_sample_rate,
        steps=cfg.rounds,
        accountant=cfg.accountant,
    )
    return dataclasses.replace(cfg, noise_multiplier=sigma)


def check_run_noise(cfg: RunConfig, *, sample_rate: float) -> float:
    """The run's planned epsilon at a site sampling at `sample_rate`, once the run's noise
    multiplier is shown to keep it within target-epsilon.

    Computed from the run config alone with the run's accountant, as `planned` calibrated
    it: `rounds` steps of the Poisson-subsampled Gaussian at the run's sigma. Only float
    tolerance (EPS_RTOL) is allowed over the target.

    Raises:
        PrivacyError: the run config carries no noise multiplier (the run was never
            planned), or one too small for this sample rate (a server asking for less
            noise than the target needs).
    """
    sigma = cfg.noise_multiplier
    if not (sigma > 0 and math.isfinite(sigma)):
        raise PrivacyError(
            f"the distributed-DP run config carries noise-multiplier {sigma!r}: the run was "
            "never planned, so the secure sum's noise is unknown and no epsilon could be "
            "kept. Start it with `fedsilo server start` or `fedsilo simulate`, which "
            "calibrate it."
        )
    planned_eps = epsilon(
        [SampledGaussianEvent(noise_multiplier=sigma, sample_rate=sample_rate, steps=cfg.rounds)],
        delta=cfg.target_delta,
        accountant=cfg.accountant,
    )
    if planned_eps > cfg.target_epsilon * (1 + EPS_RTOL):
        raise PrivacyError(
            f"the run's noise multiplier {sigma:.6g} over {cfg.rounds} round(s) at this "
            f"site's sample rate {sample_rate:.6g} gives epsilon {planned_eps:.4g} "
            f"({cfg.accountant}, delta {cfg.target_delta:g}), above the run's target-epsilon "
            f"{cfg.target_epsilon:g}: the site would spend more than the run promises. The "
            "server must calibrate the noise for dp-max-sample-rate (`fedsilo server start` "
            "does)."
        )
    return planned_eps


def expected_pooled_batch(*, batch_size: int, sites: int) -> float:
    """The expected pooled Poisson batch of `sites` sites: each samples at most
    batch-size in expectation (its rate is at most batch / its examples)."""
    return float(sites * batch_size)


def sum_norm_bound(
    *,
    clip: float,
    batch_size: int,
    sites: int,
    noise_multiplier: float,
    min_sites: int,
    quantizer: Quantizer,
    failure: float = NORM_FAILURE,
) -> float:
    """The largest L2 norm an honest decoded sum of `sites` sites has, except with
    probability `failure`, in float gradient units (after decode_sum).

    From run-level values only, never from what sites report. Three parts, each given
    failure / 2 or none (a union bound):
    - the clipped gradients: at most `clip` x the pooled Poisson count, a sum of
      independent Bernoullis with mean mu <= sites x batch-size (so variance <= mu).
      Bernstein's inequality (Boucheron, Lugosi, Massart, "Concentration Inequalities",
      2013, Corollary 2.11) gives P(count >= mu + t) <= exp(-t^2 / (2 (mu + t / 3))),
      so with L = ln(2 / failure) the count stays below mu + L/3 + sqrt(L^2/9 + 2 L mu);
    - the rounding: each site's randomized rounding moves each coordinate by under one
      integer unit, so the sum moves by under sites x sqrt(d) / scale (always);
    - the noise: each of the `sites` shares is N_Z(0, s^2) per coordinate with
      s = sigma Delta / sqrt(M), which is s^2-subgaussian (Canonne, Kamath, Steinke 2020,
      Section 2: its moment generating function is at most the Gaussian's); their sum
      is subgaussian with std = sigma Delta sqrt(sites / M), and for such a vector
      P(|x| > std (sqrt(d) + sqrt(2u))) <= exp(-u) (Hsu, Kakade, Zhang, "A tail
      inequality for quadratic forms of subgaussian random vectors", 2012, Theorem 1,
      with d + 2 sqrt(d u) + 2u <= (sqrt(d) + sqrt(2u))^2); u = ln(2 / failure).
    All three are divided by the scale (gamma), as decode_sum divides the sum.
    """
    if not 0 < failure < 1 or sites < 1 or min_sites < 1:
        raise ConfigError(
            f"sum_norm_bound needs 0 < failure < 1 and sites, min_sites >= 1; got {failure!r}, "
            f"{sites!r}, {min_sites!r}"
        )
    log_term = math.log(2.0 / failure)
    mean = expected_pooled_batch(batch_size=batch_size, sites=sites)
    count = mean + log_term / 3.0 + math.sqrt(log_term**2 / 9.0 + 2.0 * log_term * mean)
    d = quantizer.dim
    rounding = sites * math.sqrt(d) / quantizer.scale
    std = noise_multiplier * quantizer.sensitivity * math.sqrt(sites / min_sites) / quantizer.scale
    noise = std * (math.sqrt(d) + math.sqrt(2.0 * log_term))
    return clip * count + rounding + noise


def ring_bytes(bound: float, quantizer: Quantizer) -> int:
    """The bytes of the ring a round sums its vectors in, given its `sum_norm_bound`.

    No coordinate of a vector exceeds its L2 norm, so the bound in integer units (times
    the scale) bounds every coordinate of the honest integer sum, except with
    probability NORM_FAILURE; the ring holds twice that (secagg.ring_bytes_for). The
    width changes what crosses the wire, not what the server learns: each masked vector
    is uniform in any ring, and the sum modulo the ring is a function of the sum.
    For 10 sites at batch 256 and sigma 1 with scatnet's 39,700 weights: 4 bytes a
    weight, half the 64-bit ring's (tests/privacy/test_distributed.py).

    Raises:
        ConfigError: not even the 64-bit ring holds it.
    """
    return ring_bytes_for(bound * quantizer.scale)


def quantize(vector: torch.Tensor, scale: float, rng: SiteRandom) -> np.ndarray:
    """Scale a float vector by `scale` and round each coordinate randomly (unbiased)."""
    scaled = vector.detach().to(torch.float64).cpu().numpy() * scale
    floor = np.floor(scaled)
    up = _uniform(rng, scaled.size) < (scaled - floor)
    return (floor + up).astype(np.int64)


def discrete_gaussian(size: int, std: float, rng: SiteRandom) -> np.ndarray:
    """`size` samples of N_Z(0, std^2), from `rng` (Canonne et al., Algorithm 3)."""
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    sigma2 = std * std
    t = math.floor(std) + 1
    out = np.empty(0, dtype=np.int64)
    while out.size < size:
        n = max(64, int(1.5 * (size - out.size)) + 16)
        u = _uniform(rng, 3 * n)
        # Discrete Laplace(t) as the difference of two geometrics: G = floor(-t ln U).
        g1 = np.floor(-t * np.log1p(-u[:n]))
        g2 = np.floor(-t * np.log1p(-u[n : 2 * n]))
        y = g1 - g2
        accept = u[2 * n :] < np.exp(-((np.abs(y) - sigma2 / t) ** 2) / (2.0 * sigma2))
        out = np.concatenate([out, y[accept].astype(np.int64)])
    return out[:size]


def noisy_integer_sum(
    grad_sum: torch.Tensor, quantizer: Quantizer, share_std: float, rng: SiteRandom
) -> np.ndarray:
    """The site's contribution: its clipped gradient sum, quantized, plus its noise share."""
    if grad_sum.numel() != quantizer.dim:
        raise ConfigError(f"the gradient has {grad_sum.numel()} values, the model {quantizer.dim}")
    noise = discrete_gaussian(quantizer.dim, share_std, rng)
    return np.asarray(quantize(grad_sum, quantizer.scale, rng) + noise, dtype=np.int64)


def decode_sum(total: np.ndarray, quantizer: Quantizer) -> torch.Tensor:
    """The securely aggregated integer sum as a float gradient sum (float32).

    Raises:
        PrivacyError: the sum is too large to be trusted (64-bit overflow possible).
    """
    if total.size and float(np.max(np.abs(total.astype(np.float64)))) > SUM_BOUND:
        raise PrivacyError("the aggregated sum is out of range (overflow); the round is dropped")
    return torch.from_numpy(total.astype(np.float64) / quantizer.scale).to(torch.float32)


def _uniform(rng: SiteRandom, n: int) -> np.ndarray:
    return rng.uniform(n).numpy()
