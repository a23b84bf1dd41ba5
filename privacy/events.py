"""Privacy events: frozen records whose meaning never changes.

Modelled on Google dp_accounting's `dp_event.py`: an event says which mechanism
ran with which parameters; epsilon is always recomputed from events, never stored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from fedsilo.config import DP_MODES


@dataclass(frozen=True)
class SampledGaussianEvent:
    """`steps` compositions of the Poisson-subsampled Gaussian mechanism (DP-SGD).

    Each step samples every example independently with probability `sample_rate`,
    clips per-example gradients and adds N(0, (noise_multiplier * C)^2) noise.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        """Only a meaningful mechanism is ever composed (an accountant fed NaN hangs)."""
        sigma, q, steps = self.noise_multiplier, self.sample_rate, self.steps
        if not (_is_number(sigma) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"noise_multiplier must be a finite number > 0, not {sigma!r}")
        if not (_is_number(q) and 0 < q <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], not {q!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, not {steps!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> SampledGaussianEvent:
        return SampledGaussianEvent(
            noise_multiplier=_number(d, "noise_multiplier"),
            sample_rate=_number(d, "sample_rate"),
            steps=_integer(d, "steps"),
        )


@dataclass(frozen=True)
class RoundSpend:
    """One local training round's privacy spend at a site: a ledger's spend entry.

    `event` is what the accountants compose; the rest says on what and when: the
    per-example clip norm, the delta the run was calibrated at, the fingerprint of
    the training data it was spent on, the Flower run id, the server round, the UTC
    time the spend was recorded (before training), and the run's planned rounds
    (`run_rounds`, fixed at its first round; 0 on lines written before fedsilo
    recorded it). Every spend counts against the site's one budget, whatever data
    it was on.

    A distributed-DP spend (`mode` "distributed", fedsilo.privacy.distributed) also
    records the trust assumption its `event` rests on: the sum the server saw holds the
    noise shares of at least `min_sites` sites that do not collude with it. `sites` is
    how many sites took part when the spend was recorded (those that shared keys with
    this one), so `sites - min_sites` of them may drop out or collude before the
    guarantee degrades. The site's own share is noise multiplier `noise_share`;
    `own_event` is the spend if no other share protected it (a server that learns every
    other site's noise).
    """

    event: SampledGaussianEvent
    clip_norm: float
    delta: float
    dataset: str
    run: str
    round: int
    time: str
    site: str
    run_rounds: int = 0
    mode: str = "local"
    noise_share: float = 0.0  # distributed: the site's own share, as a noise multiplier
    min_sites: int = 0  # distributed: the honest sites the guarantee assumes
    sites: int = 0  # distributed: the sites taking part when the spend was recorded

    @property
    def distributed(self) -> bool:
        """A distributed-DP spend (its noise is a share of the secure sum's)."""
        return self.mode == "distributed"

    @property
    def own_event(self) -> SampledGaussianEvent:
        """The spend against a server that knows every noise share but the site's own."""
        if not self.distributed:
            return self.event
        return SampledGaussianEvent(
            noise_multiplier=self.noise_share,
            sample_rate=self.event.sample_rate,
            steps=self.event.steps,
        )

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be a finite number > 0, not {self.clip_norm!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), not {self.delta!r}")
        if self.round < 1 or self.run_rounds < 0:
            raise ValueError(f"round must be >= 1, not {self.round!r}")
        if self.mode not in DP_MODES:
            raise ValueError(f"mode must be local or distributed, not {self.mode!r}")
        if self.distributed and not (
            0 < self.noise_share <= self.event.noise_multiplier
            and self.min_sites >= 2
            and self.sites >= self.min_sites
        ):
            raise ValueError(
                "a distributed spend needs 0 < noise_share <= noise_multiplier and "
                f"2 <= min_sites <= sites, not {self.noise_share!r}, {self.min_sites!r}, "
                f"{self.sites!r}"
            )

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
            **({"run_rounds": self.run_rounds} if self.run_rounds else {}),
            **(
                {
                    "mode": self.mode,
                    "noise_share": self.noise_share,
                    "min_sites": self.min_sites,
                    "sites": self.sites,
                }
                if self.distributed
                else {}
            ),
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RoundSpend:
        return RoundSpend(
            event=SampledGaussianEvent.from_dict(d),
            clip_norm=_number(d, "clip_norm"),
            delta=_number(d, "delta"),
            dataset=str(d["dataset"]),
            run=str(d["run"]),
            round=_integer(d, "round"),
            time=str(d["time"]),
            site=str(d["site"]),
            run_rounds=_integer(d, "run_rounds") if "run_rounds" in d else 0,
            mode=str(d.get("mode", "local")),
            noise_share=_number(d, "noise_share") if "noise_share" in d else 0.0,
            min_sites=_integer(d, "min_sites") if "min_sites" in d else 0,
            sites=_integer(d, "sites") if "sites" in d else 0,
        )


def _number(d: dict[str, Any], key: str) -> float:
    value = d[key]
    if not _is_number(value):
        raise ValueError(f"{key} must be a number, not {_short(value)}")
    try:
        return float(value)
    except OverflowError:  # an integer of hundreds of digits: no float holds it
        raise ValueError(f"{key} must be a finite number, not {_short(value)}") from None


def _integer(d: dict[str, Any], key: str) -> int:
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2**63:
        raise ValueError(f"{key} must be an integer of at most 63 bits, not {_short(value)}")
    return value


def _short(value: object) -> str:
    """`value` for a message: an integer of many digits by its size, anything else cut."""
    if isinstance(value, int) and abs(value) >= 2**63:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
