"""A site's round, local or distributed DP: authorise it, train it, end it, reply. No Flower app.

A run's DP mode picks its round protocol once (fedsilo.clients.client_app): a local-DP
round is `LocalSiteRound` below, one message; a distributed-DP round is
fedsilo.clients.secure_round.SecureSiteRound, five. Both train through
`train_authorised` and reply with the same public report: fedsilo.protocol's
REPLY_METRICS and the ledger head, beside their own payload (the DP model, or the
masked vector). The site's own log line says its total spend, which never leaves it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedsilo import protocol
from fedsilo.clients import failpoint, kept_reply
from fedsilo.clients.dp_train import DistributedResult, RoundResult, train_round
from fedsilo.clients.kept_reply import KeptReply
from fedsilo.clients.site_budget import Authorisation, authorise_round
from fedsilo.clients.site_env import SiteEnvironment
from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError
from fedsilo.flwr_adapter.arrays import tensor_views
from fedsilo.privacy import ledger
from fedsilo.task import codec
from fedsilo.task.features import drop_cache
from fedsilo.task.train import non_finite

log = logging.getLogger("fedsilo.client")


class SiteRound:
    """What every round protocol of a site starts from: the message and the site."""

    def __init__(
        self,
        msg: Message,
        context: Context,
        cfg: RunConfig,
        site: SiteEnvironment,
        server_round: int,
        run: str,
    ) -> None:
        self.msg, self.context, self.cfg, self.site = msg, context, cfg, site
        self.server_round, self.run = server_round, run

    def authorise(self, **checks: Any) -> Authorisation:
        """The site's budget authorises this round (fedsilo.clients.site_budget)."""
        return authorise_round(
            self.site.budget,
            self.cfg,
            self.site.data,
            data_id=self.site.data_id,
            site=self.site.name,
            run=self.run,
            server_round=self.server_round,
            **checks,
        )


class LocalSiteRound(SiteRound):
    """A local-DP round: authorise, train DP-SGD locally, send the model."""

    def answer(self, config: ConfigRecord) -> Message:
        """Train the round; raises PrivacyError (or ConfigError, DataError) to refuse it.

        A round the site already trained and answered (its server crashed and resumed)
        gets the same reply again, at no new spend (fedsilo.clients.kept_reply).
        """
        arrays = self.msg.content.get(protocol.ARRAYS)
        if not isinstance(arrays, ArrayRecord):
            raise ConfigError("The server's train message carries no model arrays.")
        again = self.resend()
        if again is not None:
            return again
        try:  # the model as the server sent it (model-codec): what the update is from
            # read in place (no copy of the model kept through training); never written:
            # training loads it into a model of its own, the codec reads it
            global_state = codec.decode_model(tensor_views(arrays))
        except codec.CodecError as exc:  # refused before anything is spent
            raise ConfigError(f"The server's model does not decode: {exc}.") from None
        failpoint.reach("train", self.server_round)  # tests only: nothing spent yet
        auth = self.authorise()
        result = train_authorised(self.cfg, self.site, auth, global_state, self.server_round)
        if not isinstance(result, RoundResult):
            raise ConfigError("a local-DP round trained without its model")
        if self.site.tamper is not None:  # a simulated hostile site attacks (never deployed)
            state = self.site.tamper(global_state, result.state_dict, self.server_round)
            result = dataclasses.replace(result, state_dict=state)
        why = _unsendable(result)
        if why:
            log.error("train: site %s round %d: %s", self.site.name, self.server_round, why)
            return Message(Error(protocol.SITE_FAILURE_CODE, why), reply_to=self.msg)
        # Post-processing of the DP release (fedsilo.task.codec): no privacy cost.
        wire = codec.encode(
            self.cfg.update_codec,
            result.state_dict,
            global_state,
            self.site.rounding(self.server_round).uniform,
        )
        payload = {protocol.ARRAYS: ArrayRecord(wire)}
        reply = spent_reply(self.msg, self.cfg, self.site, auth, self.server_round, result, payload)
        metrics = reply.content[protocol.METRICS]
        assert isinstance(metrics, MetricRecord)
        kept_reply.keep(
            self.site.budget.ledger,
            KeptReply(
                run=self.run,
                round=self.server_round,
                arrays=wire,  # what was sent: a resent reply is the same one
                metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
                ledger_head=auth.head,
            ),
        )
        return reply

    def resend(self) -> Message | None:
        """The kept reply to this round, when the ledger shows the site spent it."""
        kept = kept_reply.kept(
            self.site.budget.ledger, run=self.run, server_round=self.server_round
        )
        if kept is None:
            return None
        spends = ledger.read(self.site.budget.ledger).spends
        if not any((s.run, s.round) == (self.run, self.server_round) for s in spends):
            return None
        log.warning(
            "train: site %s resends its reply to round %d of run %s (a resumed server asked "
            "again): no new spend",
            self.site.name,
            self.server_round,
            self.run,
        )
        content = RecordDict(
            {
                protocol.ARRAYS: ArrayRecord(kept.arrays),
                protocol.METRICS: MetricRecord(kept.metrics),  # type: ignore[arg-type]
                protocol.SITE: ConfigRecord({protocol.LEDGER_HEAD: kept.ledger_head}),
            }
        )
        return Message(content=content, reply_to=self.msg)


def _unsendable(result: RoundResult) -> str:
    """Why the site must not send this round's result ("" when it may)."""
    bad = non_finite(result.state_dict)
    if bad or not math.isfinite(result.epsilon):
        return (
            f"the update is not finite (NaN or infinity in {', '.join(bad[:3])}); the site "
            "sends nothing. Check the scale of its data (features of order 1) and lr."
        )
    return ""


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
