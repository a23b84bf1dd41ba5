"""A site's budget: its policy and ledger, and the write-ahead check of each round. No Flower.

`authorise_round` is the only way a round gets to train. Under the ledger's lock
it checks the run against the site's policy, plans the run's noise at its first
round (and checks the whole run fits what remains of the budget on this dataset)
or re-reads that plan from the ledger, checks that the round's spend fits,
and appends the spend to the ledger, fsync'd, before any training starts. A crash
after that over-counts the spend; nothing can under-count it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedsilo.clients.dp_train import DPPlan, plan_run
from fedsilo.config import RunConfig
from fedsilo.errors import PrivacyError
from fedsilo.privacy import ledger
from fedsilo.privacy.events import RoundSpend, SampledGaussianEvent
from fedsilo.privacy.policy import LEDGER_KEY, SitePolicy
from fedsilo.simulations.ledgers import simulated_ledger
from fedsilo.task.data import Dataset
from fedsilo.task.features import data_key
from fedsilo.task.train import sample_rate, steps_per_epoch


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
    run_prior: list[SampledGaussianEvent]  # this run's earlier rounds on this dataset
    site_epsilon: float  # all spend on this dataset after this round, at the policy's delta
    head: str  # the ledger's head sha256 after the append
    dataset: str  # the fingerprint of the data the spend is recorded against


def site_budget(node_config: Mapping[str, object], cfg: RunConfig, site: str) -> SiteBudget:
    """The site's policy and ledger, from its own configuration.

    A deployed site (`data-path` in its node config) needs `ledger-path` and
    `policy-max-epsilon` there; its policy becomes the ledger's policy in force. A
    simulated site reads the policy `fedsilo simulate` wrote to RUN_DIR/ledgers.

    Raises:
        PrivacyError: the site has no ledger or no policy (it never trains without).
    """
    if "data-path" in node_config or "partition-id" not in node_config:
        policy = SitePolicy.from_node_config(node_config)
        if LEDGER_KEY not in node_config or not str(node_config[LEDGER_KEY]):
            raise PrivacyError(
                "This site has no privacy ledger: set `ledger-path` in its node config "
                "(fedsilo client start --ledger site.jsonl). It refuses to train without one."
            )
        path = Path(str(node_config[LEDGER_KEY])).expanduser()
        ledger.ensure_policy(path, site, policy)
        return SiteBudget(path, policy)
    if not cfg.run_dir:
        raise PrivacyError("A simulated site needs the run's `run-dir` to find its ledger.")
    path = simulated_ledger(cfg.run_dir, int(str(node_config["partition-id"])))
    found = ledger.read(path).policy
    if found is None:
        raise PrivacyError(
            f"Simulated site {site} has no policy in {path}. Start simulations with "
            "`fedsilo simulate`, which writes each site's policy there."
        )
    return SiteBudget(path, found)


def fingerprint(data: Dataset) -> str:
    """SHA-256 over the training tensors (dtype, shape, bytes of x then y).

    The same examples give the same fingerprint whatever file they came from, so
    spend on them accumulates; any change to the data starts a new account.
    """
    return "sha256:" + data_key(data)


def authorise_round(
    budget: SiteBudget,
    cfg: RunConfig,
    data: Dataset,
    *,
    site: str,
    run: str,
    server_round: int,
) -> Authorisation:
    """Check the round against the site's policy and budget, then record its spend.

    Raises:
        PrivacyError: the run breaks the policy, or the ledger cannot be trusted.
        BudgetExceededError: the round does not fit what remains of the budget.
    """
    policy = budget.policy
    policy.check_request(
        target_epsilon=cfg.target_epsilon,
        target_delta=cfg.target_delta,
        max_grad_norm=cfg.max_grad_norm,
    )
    dataset = fingerprint(data)
    with ledger.transaction(budget.ledger) as txn:
        spends = [s for s in txn.contents.spends if s.dataset == dataset]
        mine = [s for s in spends if s.run == run]
        if mine:  # the plan is fixed at the run's first round, even across restarts
            plan = DPPlan(
                noise_multiplier=mine[0].event.noise_multiplier,
                sample_rate=sample_rate(len(data), cfg.batch_size),
                steps_per_round=cfg.local_epochs * steps_per_epoch(len(data), cfg.batch_size),
                rounds=cfg.rounds,
            )
        else:
            plan = plan_run(cfg, len(data), prior=[])
            _check_run_fits(policy, [s.event for s in spends], plan)
        policy.check_noise(plan.noise_multiplier)
        event = SampledGaussianEvent(
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps_per_round,
        )
        site_epsilon = policy.check_round([s.event for s in spends], event)
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
            )
        )
    return Authorisation(plan, event, [s.event for s in mine], site_epsilon, head, dataset)


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
