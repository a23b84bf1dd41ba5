"""The fedsilo ClientApp: one site's side of a round. Translates messages only.

It loads the site's data from its node config, trains the received global model
with DP-SGD (fedsilo.clients.dp_train) and replies with the update, the example
count, training metrics and the site's cumulative epsilon. The same ClientApp
runs in `fedsilo simulate` and under `flower-supernode` in deployment.
"""

from __future__ import annotations

import json
import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsilo.clients.dp_train import plan_run, site_generator, train_round
from fedsilo.clients.site_data import load_site_data
from fedsilo.config import RunConfig
from fedsilo.privacy.events import SampledGaussianEvent

log = logging.getLogger("fedsilo.client")
app = ClientApp()
STATE_KEY = "fedsilo-dp"  # context.state: the run's DP plan and this site's events


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model locally under DP and reply with the update."""
    cfg = RunConfig.from_flwr(context.run_config)
    site = load_site_data(cfg, context.node_config)
    server_round = int(msg.content["config"]["server-round"])  # type: ignore[arg-type]

    state = context.state.config_records.get(STATE_KEY)
    prior = [SampledGaussianEvent.from_dict(e) for e in json.loads(str(state["events"]))] if state else []
    plan = _load_or_make_plan(cfg, len(site.data), prior, state)

    gen = site_generator(cfg, site_index=int(str(context.node_config.get("partition-id", 0))),
                         server_round=server_round, simulated=site.simulated)
    arrays = msg.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    result = train_round(cfg, site.data, arrays.to_torch_state_dict(), plan, prior, gen)

    events = [*prior, result.event]
    context.state[STATE_KEY] = ConfigRecord({
        "noise-multiplier": plan.noise_multiplier, "sample-rate": plan.sample_rate,
        "steps-per-round": plan.steps_per_round, "rounds": plan.rounds,
        "events": json.dumps([e.to_dict() for e in events]),
    })
    log.info("train: site %s round %d epsilon %.3f", site.name, server_round, result.epsilon)
    metrics = MetricRecord({
        "num-examples": result.examples, "train-loss": result.train_loss,
        "epsilon": result.epsilon, "delta": cfg.target_delta,
        "target-epsilon": cfg.target_epsilon, "noise-multiplier": plan.noise_multiplier,
        "steps": result.event.steps,
    })
    content = RecordDict({
        "arrays": ArrayRecord(result.state_dict), "metrics": metrics,
        "site": ConfigRecord({"name": site.name}),
    })
    return Message(content=content, reply_to=msg)


def _load_or_make_plan(cfg: RunConfig, n: int, prior: list[SampledGaussianEvent],
                       state: ConfigRecord | None):  # type: ignore[no-untyped-def]
    from fedsilo.clients.dp_train import DPPlan

    if state is not None:
        return DPPlan(noise_multiplier=float(state["noise-multiplier"]),  # type: ignore[arg-type]
                      sample_rate=float(state["sample-rate"]),  # type: ignore[arg-type]
                      steps_per_round=int(state["steps-per-round"]),  # type: ignore[arg-type]
                      rounds=int(state["rounds"]))  # type: ignore[arg-type]
    return plan_run(cfg, n, prior)
