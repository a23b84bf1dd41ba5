"""The fedsilo ClientApp: one site's side of a round. Translates messages only.

It loads the site's data from its node config, trains the received global model
with DP-SGD (fedsilo.clients.dp_train) and replies with the update, the example
count, training metrics and the site's cumulative epsilon. The same ClientApp
runs in `fedsilo simulate` and under `flower-supernode` in deployment.
"""

from __future__ import annotations

import json
import logging

from fedsilo.clients.dp_train import DPPlan, plan_run, site_generator, train_round
from fedsilo.clients.site_data import load_site_data
from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError
from fedsilo.privacy.events import SampledGaussianEvent
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

log = logging.getLogger("fedsilo.client")
app = ClientApp()
# context.state lives in the SuperNode for the whole run, across the fresh
# flwr-clientapp process of every round: the DP plan and this site's events.
STATE_KEY = "fedsilo-dp"


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model locally under DP and reply with the update."""
    cfg = RunConfig.from_flwr(context.run_config)
    site = load_site_data(cfg, context.node_config)
    server_round = int(str(msg.content["config"]["server-round"]))
    arrays = msg.content["arrays"]
    if not isinstance(arrays, ArrayRecord):
        raise ConfigError("The server's train message carries no model arrays.")

    state = context.state.config_records.get(STATE_KEY)
    prior = []
    if state is not None:
        prior = [SampledGaussianEvent.from_dict(e) for e in json.loads(str(state["events"]))]
        plan = DPPlan.from_dict(json.loads(str(state["plan"])))
    else:
        plan = plan_run(cfg, len(site.data), prior)

    gen = site_generator(
        cfg,
        site_index=int(str(context.node_config.get("partition-id", 0))),
        server_round=server_round,
        simulated=site.simulated,
    )
    result = train_round(cfg, site.data, arrays.to_torch_state_dict(), plan, prior, gen)

    context.state[STATE_KEY] = ConfigRecord(
        {
            "plan": json.dumps(plan.to_dict()),
            "events": json.dumps([e.to_dict() for e in [*prior, result.event]]),
        }
    )
    log.info("train: site %s round %d epsilon %.3f", site.name, server_round, result.epsilon)
    metrics = MetricRecord(
        {
            "num-examples": result.examples,
            "train-loss": result.train_loss,
            "epsilon": result.epsilon,
            "delta": cfg.target_delta,
            "target-epsilon": cfg.target_epsilon,
            "noise-multiplier": plan.noise_multiplier,
            "steps": result.event.steps,
        }
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(result.state_dict),
            "metrics": metrics,
            "site": ConfigRecord({"name": site.name}),
        }
    )
    return Message(content=content, reply_to=msg)
