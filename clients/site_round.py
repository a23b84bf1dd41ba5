"""A round a site has authorised, local or distributed DP: train it, end it, reply. No Flower app.

Both round kinds (fedsilo.clients.client_app, fedsilo.clients.secure_round) train
through `train_authorised` and reply with the same public report: fedsilo.protocol's
REPLY_METRICS and the ledger head, beside their own payload (the DP model, or the
masked vector). The site's own log line says its total spend, which never leaves it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedsilo import protocol
from fedsilo.clients.dp_train import DistributedResult, RoundResult, train_round
from fedsilo.clients.site_budget import Authorisation
from fedsilo.clients.site_env import SiteEnvironment
from fedsilo.config import RunConfig
from fedsilo.task.features import drop_cache

log = logging.getLogger("fedsilo.client")


def train_authorised(
    cfg: RunConfig,
    site: SiteEnvironment,
    auth: Authorisation,
    global_state: Mapping[str, torch.Tensor],
    server_round: int,
) -> RoundResult | DistributedResult:
    """Train the round `auth` recorded, on the site's own data, device and random source."""
    result = train_round(
        cfg,
        site.task,
        site.data,
        global_state,
        auth.plan,
        auth.run_prior,
        site.random(server_round),
        device=site.device,
        cache_dir=site.cache_dir,
        data_id=auth.dataset,  # hashed once per round, for the ledger and the cache
    )
    end_of_round(cfg, site, server_round)
    if result.event != auth.event:  # the ledger must hold exactly what was spent
        raise RuntimeError(f"trained {result.event}, but the ledger recorded {auth.event}")
    return result


def end_of_round(cfg: RunConfig, site: SiteEnvironment, server_round: int) -> None:
    """After the run's last round: features of private data do not outlive the run."""
    if server_round == cfg.rounds and not site.keep_cache:
        drop_cache(site.cache_dir)


def spent_reply(
    msg: Message,
    cfg: RunConfig,
    site: SiteEnvironment,
    auth: Authorisation,
    server_round: int,
    result: RoundResult | DistributedResult,
    payload: Mapping[str, ArrayRecord | ConfigRecord],
) -> Message:
    """The reply to a trained round: `payload`, the public metrics and the ledger head."""
    log.info(  # the site's own log: its total spend stays here, never in the reply
        "train: site %s round %d (%s DP): run epsilon %.3f of target %g; site total %.3f of %g",
        site.name,
        server_round,
        cfg.dp,
        result.epsilon,
        cfg.target_epsilon,
        auth.site_epsilon,
        site.budget.policy.max_epsilon,
    )
    metrics = MetricRecord(
        {
            protocol.NUM_EXAMPLES: result.examples,
            protocol.EPSILON: result.epsilon,
            protocol.DELTA: cfg.target_delta,
            protocol.TARGET_EPSILON: cfg.target_epsilon,
            protocol.NOISE_MULTIPLIER: auth.plan.noise_multiplier,
            protocol.STEPS: auth.event.steps,
        }
    )
    content = RecordDict(
        {
            **payload,
            protocol.METRICS: metrics,
            protocol.SITE: ConfigRecord({protocol.LEDGER_HEAD: auth.head}),
        }
    )
    return Message(content=content, reply_to=msg)
