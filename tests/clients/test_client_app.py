"""The ClientApp keeps a site's spend across rounds in the SuperNode's context."""

from __future__ import annotations

import pytest
from fedsilo.clients.client_app import train
from fedsilo.config import RunConfig
from fedsilo.privacy.accountant import epsilon
from fedsilo.privacy.events import SampledGaussianEvent
from fedsilo.server.evaluate import global_model
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ServerApp process has set when it creates messages (flwr 1.39)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def train_message(cfg: RunConfig, server_round: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(global_model(cfg).state_dict()),
            "config": ConfigRecord({"server-round": server_round}),
        }
    )
    return Message(content=content, dst_node_id=1, message_type="train")


def test_epsilon_accumulates_across_rounds_with_one_context() -> None:
    cfg = RunConfig(rounds=2, accountant="rdp")
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config=cfg.to_flwr(),
    )
    eps = []
    for rnd in (1, 2):
        reply = train(train_message(cfg, rnd), ctx)
        metrics = reply.content["metrics"]
        assert isinstance(metrics, MetricRecord)
        eps.append(float(metrics["epsilon"]))
        sigma, steps = float(metrics["noise-multiplier"]), int(metrics["steps"])
    assert reply.content["site"]["name"] == "site-0"  # type: ignore[index]
    q = cfg.batch_size / 479
    one = SampledGaussianEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)
    assert eps[0] == pytest.approx(epsilon([one], delta=1e-5, accountant="rdp"), rel=1e-2)
    assert eps[1] == pytest.approx(epsilon([one, one], delta=1e-5, accountant="rdp"), rel=1e-2)
    assert eps[1] > eps[0] and eps[1] <= cfg.target_epsilon
