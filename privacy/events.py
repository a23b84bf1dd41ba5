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


@dataclass(frozen=True)
class RoundSpend:
    """One local training round's privacy spend at a site: a ledger's spend entry.

    `event` is what the accountants compose; the rest says on what and when: the
    per-example clip norm, the delta the run was calibrated at, the fingerprint of
    the training data (spend is accounted per dataset), the Flower run id, the
    server round and the UTC time the spend was recorded (before training).
    """

    event: SampledGaussianEvent
    clip_norm: float
    delta: float
    dataset: str
    run: str
    round: int
    time: str
    site: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "spend",
            "site": self.site,
            **self.event.to_dict(),
            "clip_norm": self.clip_norm,
            "delta": self.delta,
            "dataset": self.dataset,
            "run": self.run,
            "round": self.round,
            "time": self.time,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RoundSpend:
        return RoundSpend(
            event=SampledGaussianEvent.from_dict(d),
            clip_norm=float(d["clip_norm"]),
            delta=float(d["delta"]),
            dataset=str(d["dataset"]),
            run=str(d["run"]),
            round=int(d["round"]),
            time=str(d["time"]),
            site=str(d["site"]),
        )
