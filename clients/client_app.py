"""The fedsilo ClientApp: one site's side of a round. Translates messages only.

It loads the site's data from its node config, has the site's budget authorise
the round (fedsilo.clients.site_budget: policy check, then the spend is written to
the site's ledger before training), trains the received global model with DP-SGD
(fedsilo.clients.dp_train) and replies with the update, the example count,
training metrics and the site's epsilon. A site that refuses replies with a
fedsilo refusal (fedsilo.privacy.refusal) saying why. The same ClientApp runs in
`fedsilo simulate` and under `flower-supernode` in deployment.
"""

from __future__ import annotations

import logging

from fedsilo.clients.dp_train import feature_cache_dir, site_generator, train_round
from fedsilo.clients.site_budget import authorise_round, site_budget
from fedsilo.clients.site_data import load_site_data
from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError, PrivacyError
from fedsilo.privacy.refusal import REFUSAL_CODE, refusal_reason
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

log = logging.getLogger("fedsilo.client")
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model locally under DP and reply with the update (or refuse)."""
    cfg = RunConfig.from_flwr(context.run_config)
    site = load_site_data(cfg, context.node_config)
    server_round = int(str(msg.content["config"]["server-round"]))
    arrays = msg.content["arrays"]
    if not isinstance(arrays, ArrayRecord):
        raise ConfigError("The server's train message carries no model arrays.")
    # The ledger, not context.state, holds the spend: it survives SuperNode restarts
    # and separate runs on the same data.
    try:
        budget = site_budget(context.node_config, cfg, site.name)
        auth = authorise_round(
            budget,
            cfg,
            site.data,
            site=site.name,
            run=str(context.run_id),
            server_round=server_round,
        )
    except PrivacyError as exc:
        log.warning("train: site %s refuses round %d: %s", site.name, server_round, exc)
        return Message(Error(REFUSAL_CODE, refusal_reason(site.name, str(exc))), reply_to=msg)

    gen = site_generator(
        cfg,
        site_index=int(str(context.node_config.get("partition-id", 0))),
        server_round=server_round,
        simulated=site.simulated,
    )
    result = train_round(
        cfg,
        site.data,
        arrays.to_torch_state_dict(),
        auth.plan,
        auth.run_prior,
        gen,
        cache_dir=feature_cache_dir(budget.ledger),
        data_id=auth.dataset,  # hashed once per round, for the ledger and the cache
    )
    if result.event != auth.event:  # the ledger must hold exactly what was spent
        raise RuntimeError(f"trained {result.event}, but the ledger recorded {auth.event}")
    log.info(
        "train: site %s round %d epsilon %.3f (site total %.3f of %g)",
        site.name,
        server_round,
        result.epsilon,
        auth.site_epsilon,
        budget.policy.max_epsilon,
    )
    metrics = MetricRecord(
        {
            "num-examples": result.examples,
            "train-loss": result.train_loss,
            "epsilon": result.epsilon,
            "delta": cfg.target_delta,
            "target-epsilon": cfg.target_epsilon,
            "noise-multiplier": auth.plan.noise_multiplier,
            "steps": result.event.steps,
            "site-epsilon": auth.site_epsilon,
            "site-budget": budget.policy.max_epsilon,
            "site-delta": budget.policy.delta,
        }
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(result.state_dict),
            "metrics": metrics,
            "site": ConfigRecord({"name": site.name, "ledger-head": auth.head}),
        }
    )
    return Message(content=content, reply_to=msg)
