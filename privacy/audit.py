"""Audit of site ledgers: verify the chain, recompute epsilon, check the policy. No I/O to the user.

For each ledger: the hash chain and line digests are verified (fedsilo.privacy.ledger);
epsilon is recomputed from *every* spend entry by PRV and by RDP at the ledger's
delta (the delta of its policy in force): exactly the composition the site enforces
its budget on, whatever data each spend was on; each spend is checked against the
policy that was in force when it was recorded. Status, worst first:

  tampered   the chain or a line digest is broken, or a ledger head the server
             recorded in summary.json is not in the ledger
  violated   spend beyond the budget (PRV), a spend breaking the policy in force
             (noise below the minimum, clip norm above the maximum, delta above
             the policy's), an entry whose values are no meaningful spend (noise 0,
             a sample rate above 1, NaN, steps < 1: its epsilon cannot be
             computed), or no policy at all
  exhausted  within budget, but one more round like the last would not fit
  ok         within budget, with room for another such round

Distributed-DP spends (fedsilo.privacy.distributed) are composed, like the others, at
the noise the whole secure sum carries under the spend's trust assumption (at least
`min_sites` honest sites' shares in it); a spend made while the policy in force did not
allow that assumption is a violation. For a ledger holding any, the audit also reports
`epsilon_own_noise`: every spend composed as if only the site's own noise share had
protected it (a server colluding with all the other sites), the smallest assumption
any spend made (`assumed_sites`), and the fewest sites that could have dropped out or
colluded in any of its rounds before the assumption broke (`tolerated`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsilo.errors import ConfigError
from fedsilo.privacy import ledger
from fedsilo.privacy.accountant import epsilon
from fedsilo.privacy.events import RoundSpend
from fedsilo.privacy.ledger import LedgerContents, PolicyEntry
from fedsilo.privacy.policy import DEFAULT_DELTA, SitePolicy, budget_epsilon

STATUSES = ("ok", "exhausted", "violated", "tampered")
RUN_FILES = ("metrics.jsonl",)  # a run directory's own JSON Lines, never a ledger
PASSING = ("ok", "exhausted")


@dataclass(frozen=True)
class SiteAudit:
    """One ledger's audit: the row `fedsilo audit` prints."""

    site: str
    ledger: str
    events: int
    steps: int
    epsilon: float  # the budget accountant's: min(PRV, RDP), what the site enforces
    epsilon_rdp: float
    delta: float
    budget: float | None
    status: str
    problems: list[str] = field(default_factory=list)
    distributed_events: int = 0
    epsilon_own_noise: float | None = None  # None: no distributed spend, same as epsilon
    assumed_sites: int | None = None
    tolerated: int | None = None  # sites that could drop out or collude, fewest of any spend

    @property
    def remaining(self) -> float | None:
        return None if self.budget is None else max(0.0, self.budget - self.epsilon)

    def to_dict(self) -> dict[str, Any]:
        keys = ("site", "ledger", "events", "steps", "epsilon", "epsilon_rdp", "delta")
        return {
            **{k: getattr(self, k) for k in keys},
            "budget": self.budget,
            "status": self.status,
            "problems": list(self.problems),
            "distributed_events": self.distributed_events,
            "epsilon_own_noise": self.epsilon_own_noise,
            "assumed_sites": self.assumed_sites,
            "tolerated": self.tolerated,
        }


def find_ledgers(paths: Iterable[str | Path]) -> list[tuple[Path, dict[str, str]]]:
    """The ledger files under `paths`, each with the heads a run's summary.json recorded.

    A path is a ledger file, a directory of `*.jsonl` ledgers, a run directory of
    `fedsilo simulate` (its `ledgers/` folder, checked against its `summary.json`), or a
    deployed run directory: its sites keep their own ledgers, so the ledger files given
    beside it are checked against its `summary.json`.

    Raises:
        ConfigError: a path does not exist or holds no ledger, or a deployed run
            directory is given without any site ledger.
    """
    found: list[tuple[Path, dict[str, str]]] = []
    deployed: dict[str, str] = {}  # heads of deployed runs, for the ledger files given
    deployed_dirs: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            found.append((p, {}))
            continue
        if not p.is_dir():
            raise ConfigError(f"{p} does not exist. Give ledger files, directories or run dirs.")
        is_run = (p / "summary.json").is_file() or (p / "metrics.jsonl").is_file()
        if is_run and not (p / "ledgers").is_dir():
            deployed.update(_run_heads(p))
            deployed_dirs.append(p)
            continue
        folder = p / "ledgers" if (p / "ledgers").is_dir() else p
        files = sorted(f for f in folder.glob("*.jsonl") if f.name not in RUN_FILES)
        if not files:
            raise ConfigError(
                f"No ledgers (*.jsonl) in {folder}. Give a site's ledger file, a directory "
                "of them, or a run directory of `fedsilo simulate` (RUN_DIR/ledgers/)."
            )
        heads = _summary_heads(p / "summary.json")
        found.extend((f, heads) for f in files)
    if deployed_dirs and not found:
        raise ConfigError(
            f"{deployed_dirs[0]} is a deployed run: its sites keep their own ledgers, so it "
            "holds none. Give the sites' ledgers beside it to check them against its "
            f"summary: fedsilo audit {deployed_dirs[0]} site-a/ledger.jsonl site-b/ledger.jsonl"
        )
    return [(f, heads or deployed) for f, heads in found]


def audit(path: Path, summary_heads: dict[str, str] | None = None) -> SiteAudit:
    """Audit one ledger file (see the module docstring for the statuses)."""
    contents = ledger.read(path)
    policy = contents.policy
    delta = policy.delta if policy else DEFAULT_DELTA
    problems = list(contents.problems)
    tampered = bool(problems)
    if contents.omitted:
        problems.append(f"... and {contents.omitted} more problem line(s) not listed")
    head = (summary_heads or {}).get(contents.site)
    if head and head not in _line_hashes(path):
        problems.append(
            f"summary.json records ledger head {head[:12]}... for {contents.site}; no line of "
            "the ledger has it (lines removed or rewritten)"
        )
        tampered = True
    violations = [*contents.invalid, *_policy_violations(contents)]
    eps_prv, eps_rdp, failed = _spent(contents, delta)
    violations.extend(failed)
    if policy is not None and policy.over_budget(eps_prv):
        violations.append(
            f"epsilon {eps_prv:.4f} (PRV, delta {delta:g}) exceeds the budget "
            f"{policy.max_epsilon:g}"
        )
    problems.extend(violations)
    if tampered:
        status = "tampered"
    elif violations:
        status = "violated"
    elif policy is not None and _next_round_exceeds(contents, policy):
        status = "exhausted"
    else:
        status = "ok"
    spends = contents.spends
    distributed = [s for s in spends if s.distributed]
    own: float | None = None
    if distributed:
        try:
            own = budget_epsilon([s.own_event for s in spends], delta=delta)
        except (ValueError, ArithmeticError, RuntimeError):
            own = math.inf
    return SiteAudit(
        site=contents.site,
        ledger=str(path),
        events=len(spends),
        steps=sum(s.event.steps for s in spends),
        epsilon=eps_prv,
        epsilon_rdp=eps_rdp,
        delta=delta,
        budget=policy.max_epsilon if policy else None,
        status=status,
        problems=problems,
        distributed_events=len(distributed),
        epsilon_own_noise=own,
        assumed_sites=min((s.min_sites for s in distributed), default=None),
        tolerated=min((s.sites - s.min_sites for s in distributed), default=None),
    )


def epsilon_curve(path: Path) -> list[float]:
    """The site's cumulative epsilon (PRV, at the ledger's delta) after each spend."""
    contents = ledger.read(path)
    delta = contents.policy.delta if contents.policy else DEFAULT_DELTA
    events = contents.events()
    return [budget_epsilon(events[: i + 1], delta=delta) for i in range(len(events))]


def _policy_violations(contents: LedgerContents) -> list[str]:
    problems: list[str] = []
    in_force: SitePolicy | None = None
    for number, entry in enumerate(contents.entries, start=1):
        if isinstance(entry, PolicyEntry):
            in_force = entry.policy
            continue
        where = f"entry {number} (run {entry.run}, round {entry.round})"
        if in_force is None:
            problems.append(f"{where}: spend recorded before any policy")
            continue
        problems.extend(f"{where}: {p}" for p in in_force.breaches(spend_values(entry)))
    if not contents.entries or in_force is None:
        problems.append("no policy recorded: the budget cannot be checked")
    return problems


def spend_values(spend: RoundSpend) -> dict[str, float]:
    """A recorded spend as the run values a policy limits (run-config keys). A limit on
    a run value the ledger does not record is enforced by the site but not audited."""
    values = {
        "target-delta": spend.delta,
        "max-grad-norm": spend.clip_norm,
        "noise-multiplier": spend.event.noise_multiplier,
    }
    if spend.distributed:
        values["dp-min-sites"] = spend.min_sites
    return values


def _spent(contents: LedgerContents, delta: float) -> tuple[float, float, list[str]]:
    """(epsilon as the site enforces it, RDP epsilon, problems) of every spend composed.

    The first is the budget accountant's (fedsilo.privacy.policy.budget_epsilon: PRV,
    or RDP where PRV would be out of reach), the very number the site checks.
    """
    events = contents.events()
    if not events:
        return 0.0, 0.0, []
    try:
        return (
            budget_epsilon(events, delta=delta),
            epsilon(events, delta=delta, accountant="rdp"),
            [],
        )
    except (ValueError, ArithmeticError, RuntimeError) as exc:  # extreme but valid values
        return math.inf, math.inf, [f"epsilon cannot be computed from the spends ({exc})"]


def _next_round_exceeds(contents: LedgerContents, policy: SitePolicy) -> bool:
    spends = contents.spends
    if not spends:
        return False
    return policy.over_budget(policy.spent([*contents.events(), spends[-1].event]))


def _line_hashes(path: Path) -> set[str]:
    return {ledger.line_sha256(line) for line in path.read_bytes().split(b"\n")[:-1]}


def _run_heads(run_dir: Path) -> dict[str, str]:
    """The heads a deployed run recorded: its summary's, or while it has none (a server
    that was stopped and not yet resumed) the latest each site's round lines hold."""
    if (run_dir / "summary.json").is_file():
        return _summary_heads(run_dir / "summary.json")
    heads: dict[str, str] = {}
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return heads
    for line in lines:
        try:
            reports = json.loads(line).get("reports") or {}
            heads.update({str(k): str(v["ledger_head"]) for k, v in reports.items()})
        except (ValueError, AttributeError, TypeError, KeyError, RecursionError):
            break  # a line cut off by the crash ends the record
    return heads


def _summary_heads(path: Path) -> dict[str, str]:
    """Site name -> the last ledger head the server recorded (none when unreadable)."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        return {
            str(s["site"]): str(s["ledger_head"])
            for s in summary.get("sites", [])
            if s.get("ledger_head")
        }
    except (OSError, ValueError, AttributeError, TypeError, KeyError, RecursionError):
        return {}
