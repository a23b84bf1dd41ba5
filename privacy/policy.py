"""A site's own privacy policy, and the checks that enforce it. No Flower.

The policy comes from the site's configuration, never from the server's run
config: a deployed site reads it from its node config (the keys below, which
`fedsilo client start` passes); a simulated site reads the policy record that
`fedsilo simulate` wrote at the head of its ledger. The budget is enforced with the
PRV accountant (an upper bound, Gopi et al. 2021) at the policy's delta.

Node-config keys (a deployed site):
  ledger-path                  the site's ledger file (JSON Lines), created when missing
  policy-max-epsilon           the most epsilon the site will ever spend, all its runs composed
  policy-delta                 the delta the budget is stated at (default 1e-5)
  policy-min-noise-multiplier  refuse runs whose noise multiplier is lower (0 = no limit)
  policy-max-clip-norm         refuse runs whose clip norm is larger (0 = no limit)
  policy-distributed-min-sites allow distributed DP (--dp distributed) only when the run
                               assumes at least this many honest sites' noise shares
                               (0, the default = never: every round adds all its own noise)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fedsilo.errors import BudgetExceededError, PrivacyError
from fedsilo.privacy.accountant import epsilon
from fedsilo.privacy.events import SampledGaussianEvent

LEDGER_KEY = "ledger-path"
POLICY_KEYS = (
    "policy-max-epsilon",
    "policy-delta",
    "policy-min-noise-multiplier",
    "policy-max-clip-norm",
    "policy-distributed-min-sites",
)
_FIELDS = (  # POLICY_KEYS' order
    "max_epsilon",
    "delta",
    "min_noise_multiplier",
    "max_clip_norm",
    "distributed_min_sites",
)
DEFAULT_DELTA = 1e-5  # the run default; well below 1 / examples for the sites we serve
BUDGET_ACCOUNTANT = "prv"  # tight upper bound; RDP would refuse runs that are within budget
# PRV's discretisation grows with epsilon: one composed event at noise 0.3, sample rate
# 0.5 and 10,000 steps (hash-valid values any ledger could hold) was killed for memory on
# a 24 GB machine. Above this RDP bound PRV is not attempted: the budget is long spent.
PRV_CEILING = 100.0
# Relative slack for comparing a recomputed epsilon with the budget: the same
# computation on another machine may differ in the last bits.
EPS_RTOL = 1e-9


def budget_epsilon(events: Sequence[SampledGaussianEvent], *, delta: float) -> float:
    """Epsilon of `events` at `delta`: the smaller of the PRV and RDP upper bounds.

    Both are valid upper bounds (Gopi et al. 2021; Mironov 2017), so their minimum is
    too. RDP is computed first, cheaply; PRV only when RDP is at most PRV_CEILING, and
    RDP stands when PRV cannot be computed.
    """
    if not events:
        return 0.0
    rdp = epsilon(events, delta=delta, accountant="rdp")
    if not rdp <= PRV_CEILING:
        return rdp
    try:
        prv = epsilon(events, delta=delta, accountant=BUDGET_ACCOUNTANT)
    except (MemoryError, ValueError, ArithmeticError, RuntimeError):
        return rdp
    return prv if math.isfinite(prv) and prv < rdp else rdp


@dataclass(frozen=True)
class SitePolicy:
    """What a site allows on its data, across all runs."""

    max_epsilon: float
    delta: float = DEFAULT_DELTA
    min_noise_multiplier: float = 0.0  # 0 = no lower limit
    max_clip_norm: float = 0.0  # 0 = no upper limit
    distributed_min_sites: int = 0  # 0 = distributed DP refused

    def __post_init__(self) -> None:
        where = "the site policy"
        if not (self.max_epsilon > 0 and math.isfinite(self.max_epsilon)):
            raise PrivacyError(
                f"`policy-max-epsilon` must be a finite number > 0. Found {self.max_epsilon!r} "
                f"in {where}. A zero or infinite budget cannot protect the site's data."
            )
        if not 0 < self.delta < 1:
            raise PrivacyError(
                f"`policy-delta` must be in (0, 1). Found {self.delta!r} in {where}. "
                "Use a value below 1 / (examples at the site), e.g. 1e-5."
            )
        for key, value in (
            ("policy-min-noise-multiplier", self.min_noise_multiplier),
            ("policy-max-clip-norm", self.max_clip_norm),
        ):
            if not (value >= 0 and math.isfinite(value)):
                raise PrivacyError(
                    f"`{key}` must be a finite number >= 0 (0 = no limit). Found {value!r} "
                    f"in {where}."
                )
        m = self.distributed_min_sites
        if isinstance(m, bool) or not isinstance(m, int) or m == 1 or m < 0:
            raise PrivacyError(
                f"`policy-distributed-min-sites` must be 0 (no distributed DP) or an integer "
                f">= 2. Found {m!r} in {where}."
            )

    def to_dict(self) -> dict[str, float]:
        d = asdict(self)
        if not self.distributed_min_sites:  # policy lines written before the key existed
            del d["distributed_min_sites"]
        return d

    def node_config(self) -> dict[str, float]:
        """The node-config keys `fedsilo client start` passes to the site's SuperNode."""
        return dict(zip(POLICY_KEYS, (getattr(self, f) for f in _FIELDS), strict=True))

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> SitePolicy:
        return SitePolicy(
            max_epsilon=float(d["max_epsilon"]),
            delta=float(d["delta"]),
            min_noise_multiplier=float(d.get("min_noise_multiplier", 0.0)),
            max_clip_norm=float(d.get("max_clip_norm", 0.0)),
            distributed_min_sites=int(d.get("distributed_min_sites", 0)),
        )

    @staticmethod
    def from_node_config(node_config: Mapping[str, object]) -> SitePolicy:
        """The policy in a deployed site's node config.

        Raises:
            PrivacyError: no `policy-max-epsilon` (a site without a budget never trains),
                or a value that is not a number or out of range.
        """
        if "policy-max-epsilon" not in node_config:
            raise PrivacyError(
                "This site has no privacy budget: set `policy-max-epsilon` (and "
                "`ledger-path`) in its node config; `fedsilo client start` passes them "
                "from the [policy] table of the site kit's site.toml. "
                "It refuses to train without one."
            )
        values: dict[str, float] = {}
        for key in POLICY_KEYS:
            if key in node_config:
                try:
                    values[key] = float(str(node_config[key]))
                except ValueError:
                    raise PrivacyError(
                        f"`{key}` must be a number. Found {node_config[key]!r} in the node config."
                    ) from None
        return SitePolicy(
            max_epsilon=values["policy-max-epsilon"],
            delta=values.get("policy-delta", DEFAULT_DELTA),
            min_noise_multiplier=values.get("policy-min-noise-multiplier", 0.0),
            max_clip_norm=values.get("policy-max-clip-norm", 0.0),
            distributed_min_sites=_whole(values.get("policy-distributed-min-sites", 0.0)),
        )

    def check_request(
        self, *, target_epsilon: float, target_delta: float, max_grad_norm: float
    ) -> None:
        """Refuse a run that asks for more than this policy allows.

        Raises:
            PrivacyError: naming the run-config key, the value asked and the limit.
        """
        if target_epsilon > self.max_epsilon:
            raise PrivacyError(
                f"the run asks for target-epsilon {target_epsilon:g}, more than this site's "
                f"budget of {self.max_epsilon:g}. Lower target-epsilon to at most "
                f"{self.max_epsilon:g}."
            )
        if target_delta > self.delta:
            raise PrivacyError(
                f"the run asks for target-delta {target_delta:g}, more than this site's "
                f"policy delta {self.delta:g}. Lower target-delta to at most {self.delta:g}."
            )
        if self.max_clip_norm and max_grad_norm > self.max_clip_norm:
            raise PrivacyError(
                f"the run asks for max-grad-norm {max_grad_norm:g}, more than this site's "
                f"limit of {self.max_clip_norm:g}. Lower max-grad-norm."
            )

    def check_distributed(self, min_sites: int) -> None:
        """Refuse distributed DP unless the policy allows it at the run's assumption."""
        if not self.distributed_min_sites:
            raise PrivacyError(
                "the run asks for distributed DP (each site adds only a share of the noise), "
                "which this site's policy does not allow; it adds all its own noise. Run with "
                "--dp local, or the site sets policy-distributed-min-sites (site.toml [policy])."
            )
        if min_sites < self.distributed_min_sites:
            raise PrivacyError(
                f"the run's distributed DP assumes {min_sites} honest sites' noise shares; "
                f"this site requires at least {self.distributed_min_sites}. Raise dp-min-sites."
            )

    def check_noise(self, noise_multiplier: float) -> None:
        """Refuse a noise multiplier below the policy's minimum."""
        if noise_multiplier < self.min_noise_multiplier:
            raise PrivacyError(
                f"the run's noise multiplier {noise_multiplier:.4g} is below this site's "
                f"minimum of {self.min_noise_multiplier:g}. Raise the run's budget use: "
                "fewer rounds or epochs, or a lower target-epsilon."
            )

    def spent(self, events: Sequence[SampledGaussianEvent]) -> float:
        """Epsilon of `events` at the policy's delta, by the budget accountant."""
        return budget_epsilon(events, delta=self.delta)

    def over_budget(self, spent: float) -> bool:
        return spent > self.max_epsilon * (1 + EPS_RTOL)

    def check_round(
        self,
        prior: Sequence[SampledGaussianEvent],
        event: SampledGaussianEvent,
        *,
        what: str = "this round",
        fix: str = "training on would break its privacy promise.",
    ) -> float:
        """Epsilon after `prior` plus `event`; refuse when it exceeds the budget.

        Args:
            what: what `event` is, for the message ("this round", "this run's 3 rounds").
            fix: the end of the refusal message: what the requester can do.

        Raises:
            BudgetExceededError: the spend does not fit what remains.
        """
        after = self.spent([*prior, event])
        if self.over_budget(after):
            before = self.spent(prior)
            raise BudgetExceededError(
                f"{what} would bring the site's epsilon from {before:.3f} to {after:.3f}, "
                f"over its budget of {self.max_epsilon:g} at delta {self.delta:g} "
                f"({max(0.0, self.max_epsilon - before):.3f} remains). The site refuses: {fix}"
            )
        return after


def _whole(value: float) -> int:
    """A node-config number that must be a whole number (else left to __post_init__)."""
    return int(value) if float(value).is_integer() else value  # type: ignore[return-value]
