"""Privacy events: frozen records whose meaning never changes.

Modelled on Google dp_accounting's `dp_event.py`: an event says which mechanism
ran with which parameters; epsilon is always recomputed from events, never stored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SampledGaussianEvent:
    """`steps` compositions of the Poisson-subsampled Gaussian mechanism (DP-SGD).

    Each step samples every example independently with probability `sample_rate`,
    clips per-example gradients and adds N(0, (noise_multiplier * C)^2) noise.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> SampledGaussianEvent:
        return SampledGaussianEvent(
            noise_multiplier=float(d["noise_multiplier"]),
            sample_rate=float(d["sample_rate"]),
            steps=int(d["steps"]),
        )
