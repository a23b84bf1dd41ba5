"""A site's own privacy policy, declared once, and the checks that enforce it. No Flower.

The policy comes from the site's configuration, never from the server's run config:
a deployed site reads it from its node config (`policy-KEY` for each field below,
which `fedsilo client start` passes from the [policy] table of its kit's site.toml);
a simulated site reads the policy record that `fedsilo simulate` wrote at the head of
its ledger. The budget is enforced with the PRV accountant (an upper bound, Gopi et
al. 2021) at the policy's delta.

Each field is declared once, in FIELDS: its name, site.toml key, type, default, rule,
help and the run value it limits. The dataclass's validation, the ledger codec, the
node-config and site.toml readers, the kit writer (fedsilo.privacy.provision), the
site's refusals and the audit's per-spend checks (fedsilo.privacy.audit) all derive
from it; docs/contributing.md walks through adding one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fedsilo.errors import BudgetExceededError, PrivacyError
from fedsilo.privacy.accountant import epsilon
from fedsilo.privacy.events import SampledGaussianEvent

LEDGER_KEY = "ledger-path"
NODE_PREFIX = "policy-"  # the node-config key of field KEY is policy-KEY
DEFAULT_DELTA = 1e-5  # the run default; well below 1 / examples for the sites we serve
BUDGET_ACCOUNTANT = "prv"  # tight upper bound; RDP would refuse runs that are within budget
# PRV's discretisation grows with epsilon: one composed event at noise 0.3, sample rate
# 0.5 and 10,000 steps (hash-valid values any ledger could hold) was killed for memory on
# a 24 GB machine. Above this RDP bound PRV is not attempted: the budget is long spent.
PRV_CEILING = 100.0
# Relative slack for comparing a recomputed epsilon with the budget: the same
# computation on another machine may differ in the last bits.
EPS_RTOL = 1e-9


@dataclass(frozen=True)
class Limit:
    """The run value a policy field bounds, and how it reads in refusals and audits.

    `run_key` is the run-config key; a run (or a recorded spend) is checked by
    `SitePolicy.breaches` on a mapping from such keys to values. `bound` "max": the
    run's value may be at most the field's; "min": at least. `zero` is what a field
    value of 0 means: no limit, or (`never`, a "min" limit) the run is refused outright.
    """

    run_key: str
    bound: Literal["max", "min"]
    label: str  # the run value in messages: "clip norm"
    noun: str = "limit"  # "max" limits: the policy value in a refusal ("budget")
    fix: str = ""  # what the run can do instead
    zero: Literal["none", "never"] = "none"
    never: str = ""  # zero="never": what the policy refuses ("distributed DP")


@dataclass(frozen=True)
class Spec:
    """What a SitePolicy field declares beside its name, type and default."""

    key: str  # site.toml [policy] key; the node config's policy-KEY
    rule: str  # a valid value, for errors: "a finite number > 0"
    valid: Callable[[float], bool]
    help: str  # the site.toml comment above the key, and docs
    limit: Limit | None = None  # None: the budget, checked by the accountant
    why: str = ""  # added to an invalid-value error
    # Written to ledger policy lines only when set: lines written before the field
    # existed keep their bytes and their readers.
    added_later: bool = False


def _spec(**kwargs: Any) -> dict[str, Spec]:
    return {"policy": Spec(**kwargs)}


def _finite_at_least_zero(v: float) -> bool:
    return v >= 0 and math.isfinite(v)


@dataclass(frozen=True)
class SitePolicy:
    """What a site allows on its data, across all runs: one declaration per field."""

    max_epsilon: float = field(
        metadata=_spec(
            key="max-epsilon",
            rule="a finite number > 0",
            valid=lambda v: v > 0 and math.isfinite(v),
            help="this site's whole budget: all its runs compose",
            limit=Limit("target-epsilon", "max", "target-epsilon", noun="budget"),
            why="A zero or infinite budget cannot protect the site's data.",
        )
    )
    delta: float = field(
        default=DEFAULT_DELTA,
        metadata=_spec(
            key="delta",
            rule="in (0, 1)",
            valid=lambda v: 0 < v < 1,
            help="largest delta accepted",
            limit=Limit("target-delta", "max", "delta", noun="policy delta"),
            why="Use a value below 1 / (examples at the site), e.g. 1e-5.",
        ),
    )
    min_noise_multiplier: float = field(
        default=0.0,
        metadata=_spec(
            key="min-noise-multiplier",
            rule="a finite number >= 0 (0 = no limit)",
            valid=_finite_at_least_zero,
            help="0 = no floor",
            limit=Limit(
                "noise-multiplier",
                "min",
                "noise multiplier",
                fix="Raise the run's budget use: fewer rounds or epochs, or a lower "
                "target-epsilon.",
            ),
        ),
    )
    max_clip_norm: float = field(
        default=0.0,
        metadata=_spec(
            key="max-clip-norm",
            rule="a finite number >= 0 (0 = no limit)",
            valid=_finite_at_least_zero,
            help="0 = no cap",
            limit=Limit("max-grad-norm", "max", "clip norm"),
        ),
    )
    distributed_min_sites: int = field(
        default=0,
        metadata=_spec(
            key="distributed-min-sites",
            rule="0 (no distributed DP) or an integer >= 2",
            valid=lambda v: v == 0 or v >= 2,
            help="Distributed DP (--dp distributed): this site adds only a share of the "
            "noise and trusts secure aggregation and at least this many honest sites to "
            "add the rest. 0 = never (all its own noise)",
            limit=Limit(
                "dp-min-sites",
                "min",
                "distributed DP assuming {} honest sites",
                fix="Raise dp-min-sites.",
                zero="never",
                never="distributed DP (each site adds only a share of the noise)",
            ),
            added_later=True,
        ),
    )
    allow_more_rounds: int = field(
        default=0,
        metadata=_spec(
            key="allow-more-rounds",
            rule="0 (never) or 1 (within the budget)",
            valid=lambda v: v in (0, 1),
            help="1 = a run this site trains may be resumed with more rounds than it "
            "planned, at the same noise, when they fit this budget (the run then spends "
            "more than its target epsilon). 0 = never: a run's rounds are fixed at its start",
            added_later=True,
        ),
    )

    def __post_init__(self) -> None:
        for f in FIELDS:
            value = getattr(self, f.name)
            whole = f.kind is int
            if (
                isinstance(value, bool)
                or not isinstance(value, int if whole else int | float)
                or not f.spec.valid(value)
            ):
                raise PrivacyError(
                    f"`{f.node_key}` must be {f.spec.rule}. Found {value!r} in the site "
                    f"policy. {f.spec.why}".strip()
                )

    def to_dict(self) -> dict[str, float]:
        """The ledger's policy record (attribute names as keys)."""
        return {
            f.name: getattr(self, f.name)
            for f in FIELDS
            if not (f.spec.added_later and getattr(self, f.name) == f.default)
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> SitePolicy:
        """A ledger's policy record; fields it lacks take their defaults."""
        values: dict[str, Any] = {
            f.name: f.kind(d[f.name]) for f in FIELDS if f.name in d or f.required
        }
        return SitePolicy(**values)

    def node_config(self) -> dict[str, float]:
        """The node-config keys `fedsilo client start` passes to the site's SuperNode."""
        return {f.node_key: getattr(self, f.name) for f in FIELDS}

    @staticmethod
    def from_node_config(node_config: Mapping[str, object]) -> SitePolicy:
        """The policy in a deployed site's node config (keys policy-KEY; values may be text).

        Raises:
            PrivacyError: no `policy-max-epsilon` (a site without a budget never trains),
                or a value that is not a number or out of range.
        """
        if FIELDS[0].node_key not in node_config:
            raise PrivacyError(
                f"This site has no privacy budget: set `{FIELDS[0].node_key}` (and "
                "`ledger-path`) in its node config; `fedsilo client start` passes them "
                "from the [policy] table of the site kit's site.toml. "
                "It refuses to train without one."
            )
        values: dict[str, Any] = {}
        for f in FIELDS:
            if f.node_key in node_config:
                try:
                    values[f.name] = _typed(f, float(str(node_config[f.node_key])))
                except ValueError:
                    raise PrivacyError(
                        f"`{f.node_key}` must be a number. Found {node_config[f.node_key]!r} "
                        "in the node config."
                    ) from None
        return SitePolicy(**values)

    @staticmethod
    def from_table(table: Mapping[str, Any]) -> SitePolicy:
        """The [policy] table of a kit's site.toml (keys as declared; numbers only); errors
        name the key, for the caller to say where the table is.

        Raises:
            PrivacyError: an unknown key, a value that is not a number (or not whole for
                a whole-number field), no max-epsilon, or a value out of range.
        """
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in BY_KEY:
                raise PrivacyError(f"unknown key `{key}`; known: {', '.join(BY_KEY)}.")
            f = BY_KEY[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PrivacyError(f"`{key}` must be a number. Found {value!r}.")
            if f.kind is int and not float(value).is_integer():
                raise PrivacyError(f"`{key}` must be a whole number. Found {value!r}.")
            values[f.name] = f.kind(value)
        if FIELDS[0].name not in values:
            raise PrivacyError(f"needs `{FIELDS[0].key}`; a site never trains without a budget.")
        return SitePolicy(**values)

    def to_table(self) -> str:
        """The [policy] table of a site.toml holding this policy, each key with its help."""
        lines = ["[policy]"]
        for f in FIELDS:
            lines += [f"# {f.spec.help}", f"{f.key} = {getattr(self, f.name)!r}"]
        return "\n".join(lines) + "\n"

    def breaches(self, run: Mapping[str, float]) -> list[str]:
        """What in `run` (run-config key -> value) this policy does not allow, as an
        auditor reads it. Keys `run` lacks are not checked; the budget is the
        accountant's (`check_round`), not this."""
        return [problem for _, problem in self._breaches(run)]

    def check_request(self, run: Mapping[str, float]) -> None:
        """Refuse a run (run-config key -> value) that asks for more than this policy allows.

        Raises:
            PrivacyError: naming the run-config key, the value asked, the limit and the fix.
        """
        for refusal, _ in self._breaches(run):
            raise PrivacyError(refusal)

    def _breaches(self, run: Mapping[str, float]) -> list[tuple[str, str]]:
        """(the site's refusal, the auditor's finding) for each limit `run` breaks."""
        out = []
        for f in FIELDS:
            lim, allowed = f.spec.limit, getattr(self, f.name)
            if lim is None or lim.run_key not in run:
                continue
            value = run[lim.run_key]
            said = lim.label.format(value) if "{}" in lim.label else f"{lim.label} {value:.4g}"
            if lim.zero == "never" and not allowed:
                out.append(
                    (
                        f"the run asks for {lim.never}, which this site's policy does not "
                        f"allow: the site allows it by setting `{f.node_key}` (site.toml "
                        f"[policy] `{f.key}`); otherwise run with --dp local.",
                        f"{said}; the policy allows it at never",
                    )
                )
            elif lim.bound == "max" and allowed and value > allowed:
                out.append(
                    (
                        f"the run asks for {lim.run_key} {value:g}, more than this site's "
                        f"{lim.noun} of {allowed:g}. Lower {lim.run_key} to at most "
                        f"{allowed:g}. {lim.fix}".strip(),
                        f"{said} above the policy's {allowed:g}",
                    )
                )
            elif lim.bound == "min" and value < allowed:
                out.append(
                    (
                        f"the run's {said} is below this site's minimum: it requires at "
                        f"least {allowed:g}. {lim.fix}".strip(),
                        f"{said} below the policy's minimum {allowed:g}",
                    )
                )
        return out

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


@dataclass(frozen=True)
class PolicyField:
    """A SitePolicy field as declared: name, type, default and its Spec."""

    name: str
    kind: type[float] | type[int]
    default: float
    required: bool
    spec: Spec

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def node_key(self) -> str:
        return NODE_PREFIX + self.spec.key


FIELDS: tuple[PolicyField, ...] = tuple(
    PolicyField(
        name=f.name,
        kind=int if f.type == "int" else float,
        default=0.0 if f.default is dataclasses.MISSING else f.default,
        required=f.default is dataclasses.MISSING,
        spec=f.metadata["policy"],
    )
    for f in dataclasses.fields(SitePolicy)
)
BY_KEY = {f.key: f for f in FIELDS}
NODE_KEYS = tuple(f.node_key for f in FIELDS)


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


def _typed(f: PolicyField, value: float) -> float:
    """A node-config number as the field's type; a non-whole one for a whole-number field
    is left as it is, for the field's rule to refuse."""
    return int(value) if f.kind is int and value.is_integer() else value
