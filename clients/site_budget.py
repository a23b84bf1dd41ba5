"""A site's budget: its policy and ledger, and the write-ahead check of each round. No Flower.

`authorise_round` is the only way a round gets to train. Under the ledger's lock it:
1. checks the run against the site's policy (target epsilon and delta, clip norm);
2. at a run's first round plans the run's noise (local DP: calibrated here;
   distributed DP: the run's one noise multiplier, refused unless it keeps the site's
   own sample rate within target-epsilon) and checks that the whole planned run fits
   what remains of the site's budget; at a later round re-reads that plan from the
   ledger and refuses any change to it (rounds, sample rate, steps, clip norm, delta,
   distributed DP's noise multiplier: a restarted site process enforces it too); only
   a policy with allow-more-rounds lets a resumed run add rounds, at the same noise,
   and only as many as fit the whole budget;
3. refuses a round number outside 1..rounds and any (run, round) already recorded,
   so a run never exceeds its target epsilon whatever the server sends (unless the
   site allowed more rounds, and then never its budget);
4. checks that the round fits the budget, composing *every* spend on the ledger,
   whatever data it was on (changed or re-ordered data never gets a fresh budget);
5. appends the spend to the ledger, fsync'd, before any training starts.
A crash after that over-counts the spend; nothing can under-count it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedsilo.clients.dp_train import DPPlan, plan_run, site_sample_rate, steps_per_round
from fedsilo.config import RunConfig
from fedsilo.errors import PrivacyError
from fedsilo.privacy import ledger
from fedsilo.privacy.distributed import share_multiplier
from fedsilo.privacy.events import RoundSpend, SampledGaussianEvent
from fedsilo.privacy.fingerprint import fingerprint
from fedsilo.privacy.policy import SitePolicy
from fedsilo.task.data import Dataset

log = logging.getLogger("fedsilo.client")


@dataclass(frozen=True)
class SiteBudget:
    """Where a site's spend is recorded and what it allows."""

    ledger: Path
    policy: SitePolicy


@dataclass(frozen=True)
class Authorisation:
    """A round the site has recorded in its ledger and may now train."""

    plan: DPPlan
    event: SampledGaussianEvent
    run_prior: list[SampledGaussianEvent]  # this run's earlier rounds
    site_epsilon: float  # all the site's spend after this round, at the policy's delta
    head: str  # the ledger's head sha256 after the append
    dataset: str  # the fingerprint of the data the spend is recorded against


def authorise_round(
    budget: SiteBudget,
    cfg: RunConfig,
    data: Dataset,
    *,
    site: str,
    run: str,
    server_round: int,
    before_spend: Callable[[DPPlan], None] | None = None,
    sites: int = 0,
    data_id: str = "",
) -> Authorisation:
    """Check the round against the site's policy and budget, then record its spend.

    `data_id`: the fingerprint of `data` when the caller holds it; "" = hash `data` here.

    Raises:
        PrivacyError: the run breaks the policy, or the ledger cannot be trusted.
        BudgetExceededError: the round does not fit what remains of the budget.
    """
    policy = budget.policy
    check_run(policy, cfg)
    distributed = cfg.distributed
    if distributed and sites < cfg.dp_min_sites:
        raise PrivacyError(
            f"{sites} site(s) take part in this round; the run's noise shares assume at "
            f"least {cfg.dp_min_sites}, so this site's share would not be enough."
        )
    dataset = data_id or fingerprint(data)
    with ledger.transaction(budget.ledger) as txn:
        spends = txn.contents.spends
        everything = [s.event for s in spends]
        mine = [s for s in spends if s.run == run]
        if mine:  # the plan is fixed at the run's first round, even across restarts
            plan = _recorded_plan(mine[0], cfg, len(data))
            plan = _more_rounds(policy, everything, plan, mine, cfg.rounds)
        else:
            plan = plan_run(cfg, len(data), prior=[])
            if cfg.batch_size > len(data):  # once a run: its plan is made at its first round
                log.warning(
                    "plan: batch-size %d is above this site's %d examples: every step uses "
                    "all of them (sampling rate 1)",
                    cfg.batch_size,
                    len(data),
                )
            _check_run_fits(policy, everything, plan)
        _check_round(plan, mine, server_round)
        policy.check_request({"noise-multiplier": plan.noise_multiplier})
        event = SampledGaussianEvent(
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps_per_round,
        )
        site_epsilon = policy.check_round(everything, event)
        share = share_multiplier(plan.noise_multiplier, max(cfg.dp_min_sites, 1))
        if before_spend is not None:  # the caller's last word on the plan, before the spend
            before_spend(plan)
        head = txn.append(
            RoundSpend(
                event=event,
                clip_norm=cfg.max_grad_norm,
                delta=cfg.target_delta,
                dataset=dataset,
                run=run,
                round=server_round,
                time=ledger.now(),
                site=site,
                run_rounds=plan.rounds,
                mode=cfg.dp,
                noise_share=share if distributed else 0.0,
                min_sites=cfg.dp_min_sites if distributed else 0,
                sites=sites if distributed else 0,
            )
        )
    return Authorisation(plan, event, [s.event for s in mine], site_epsilon, head, dataset)


def check_run(policy: SitePolicy, cfg: RunConfig) -> None:
    """Refuse a run the site's policy does not allow (its request, and its DP mode)."""
    # Every numeric run-config key, so a policy field limiting any of them is enforced
    # here without another line; the noise multiplier is checked once the site has
    # planned its own (local DP: not in the run config), dp-min-sites only when used.
    unused = {"noise-multiplier", *(() if cfg.distributed else ("dp-min-sites",))}
    policy.check_request(
        {
            key: value
            for key, value in cfg.to_flwr().items()
            if isinstance(value, int | float) and not isinstance(value, bool) and key not in unused
        }
    )


class RoundRefused(PrivacyError):
    """A round the run's recorded plan does not allow (the server asked for more)."""


def _recorded_plan(first: RoundSpend, cfg: RunConfig, n: int) -> DPPlan:
    """The plan the run's first round recorded; refuse a run config that departs from it."""
    rounds = first.run_rounds or cfg.rounds  # lines written before run_rounds was recorded
    steps = steps_per_round(cfg, n)
    if first.mode != cfg.dp or (first.distributed and first.min_sites != cfg.dp_min_sites):
        raise RoundRefused(
            f"the run's DP mode changed from {first.mode} (dp-min-sites {first.min_sites}) at "
            f"its first round to {cfg.dp} (dp-min-sites {cfg.dp_min_sites}); a run's plan is "
            "fixed at its first round. Start a new run instead."
        )
    asked = (
        ("sample rate", site_sample_rate(cfg, n), first.event.sample_rate),
        ("steps per round", steps, first.event.steps),
        ("max-grad-norm", cfg.max_grad_norm, first.clip_norm),
        ("target-delta", cfg.target_delta, first.delta),
        # distributed DP: the sum's noise is the run's, not the site's (local: 0, unused)
        *(
            [("noise-multiplier", cfg.noise_multiplier, first.event.noise_multiplier)]
            if first.distributed
            else []
        ),
    )
    for what, now, then in asked:
        if not math.isclose(now, then, rel_tol=1e-12):
            raise RoundRefused(
                f"the run's {what} changed from {then:g} at its first round to {now:g}; a "
                "run's plan is fixed at its first round (its noise was calibrated for it). "
                "Start a new run instead."
            )
    return DPPlan(
        noise_multiplier=first.event.noise_multiplier,
        sample_rate=first.event.sample_rate,
        steps_per_round=first.event.steps,
        rounds=rounds,
    )


def _more_rounds(
    policy: SitePolicy,
    everything: list[SampledGaussianEvent],
    plan: DPPlan,
    mine: list[RoundSpend],
    rounds: int,
) -> DPPlan:
    """The run's plan for `rounds`: the recorded one, or one a resumed run extended.

    More rounds than the run last recorded (same noise, same steps a round) only where
    the site's policy allows extending its runs (allow-more-rounds) and every round not
    yet spent fits what remains of its budget. Never fewer: a server that re-plans is
    refused, from the ledger alone.

    Raises:
        RoundRefused: other rounds than recorded, and the policy does not allow more.
        BudgetExceededError: the extra rounds do not fit what remains of the budget.
    """
    latest = max(s.run_rounds or plan.rounds for s in mine)
    if rounds == latest:
        return dataclasses.replace(plan, rounds=rounds)
    if rounds < latest or not policy.allow_more_rounds:
        raise RoundRefused(
            f"the run's rounds changed from {latest} to {rounds}; a run's plan is fixed at "
            "its first round (its noise was calibrated for it), and this site's policy "
            f"{'never lets it shrink' if rounds < latest else 'does not allow more rounds'} "
            "(allow-more-rounds). Start a new run instead."
        )
    rest = SampledGaussianEvent(
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps_per_round * (rounds - len(mine)),
    )
    policy.check_round(
        everything,
        rest,
        what=f"extending this run to {rounds} rounds",
        fix="resume it with fewer rounds.",
    )
    return dataclasses.replace(plan, rounds=rounds)


def rounds_that_fit(
    policy: SitePolicy, prior: list[SampledGaussianEvent], event: SampledGaussianEvent, most: int
) -> int:
    """How many more rounds like `event` (at most `most`) fit the budget after `prior`."""

    def fits(k: int) -> bool:
        more = dataclasses.replace(event, steps=event.steps * k)
        return k == 0 or not policy.over_budget(policy.spent([*prior, more]))

    low, high = 0, most
    if fits(high):
        return high
    while high - low > 1:  # fits(low) and not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def _check_round(plan: DPPlan, mine: list[RoundSpend], server_round: int) -> None:
    """Refuse a round outside the run's plan, or one the site already trained."""
    if not 1 <= server_round <= plan.rounds:
        raise RoundRefused(
            f"round {server_round} is outside this run's planned rounds 1..{plan.rounds}; the "
            "site trains only the rounds its noise was calibrated for."
        )
    if any(s.round == server_round for s in mine):
        raise RoundRefused(
            f"round {server_round} of this run was already trained; the site trains each "
            "round of a run once."
        )


def _check_run_fits(policy: SitePolicy, prior: list[SampledGaussianEvent], plan: DPPlan) -> None:
    """Refuse a run whose whole plan does not fit what remains of the budget.

    A run costs the site what the server planned it to (its target epsilon), or the
    site does not join: stretching a sliver of budget over a run with ever more noise
    would send updates that only damage the global model.
    """
    whole = SampledGaussianEvent(
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps_per_round * plan.rounds,
    )
    policy.check_round(
        prior,
        whole,
        what=f"this run's {plan.rounds} round(s)",
        fix="ask for a smaller target-epsilon or fewer rounds.",
    )
