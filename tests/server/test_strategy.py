"""SiteReports: refusals are logged with the site's reason, the others are aggregated."""

from __future__ import annotations

import logging

import pytest
import torch
from fedsilo.privacy.refusal import REFUSAL_CODE, refusal_reason
from fedsilo.server.server_app import build_summary
from fedsilo.server.strategy import Refusal, SiteReports
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def instruction() -> Message:
    return Message(
        content=RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train"
    )


def update(site: str, value: float) -> Message:
    metrics = MetricRecord(
        {
            "num-examples": 10,
            "epsilon": 1.0,
            "delta": 1e-5,
            "target-epsilon": 8.0,
            "site-epsilon": 2.5,
        }
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": torch.full((2,), value)}),
            "metrics": metrics,
            "site": ConfigRecord({"name": site, "ledger-head": "f" * 64}),
        }
    )
    return Message(content=content, reply_to=instruction())


def test_refusal_is_logged_and_the_others_aggregate(caplog: pytest.LogCaptureFixture) -> None:
    strategy = SiteReports(FedAvg())
    refusal = Message(
        Error(REFUSAL_CODE, refusal_reason("site-b", "over its budget of 4")),
        reply_to=instruction(),
    )
    with caplog.at_level(logging.WARNING, logger="fedsilo.server"):
        arrays, _ = strategy.aggregate_train(
            3, [update("site-a", 2.0), refusal, update("site-c", 4.0)]
        )
    assert arrays is not None
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((2,), 3.0))
    assert strategy.last_round_sites == ["site-a", "site-c"]
    assert strategy.refusals == [Refusal("site-b", 3, "over its budget of 4")]
    assert strategy.failures == []
    assert "site site-b refused: over its budget of 4" in caplog.text
    summary = build_summary([], strategy, "run", 3)
    assert summary["refusals"] == [{"site": "site-b", "round": 3, "reason": "over its budget of 4"}]
    assert summary["sites"][0]["site_epsilon"] == 2.5
    assert summary["sites"][0]["ledger_head"] == "f" * 64


def test_other_errors_stay_failures() -> None:
    strategy = SiteReports(FedAvg())
    crash = Message(Error(2, "<class 'ValueError'>:<'boom'>"), reply_to=instruction())
    arrays, _ = strategy.aggregate_train(1, [crash])
    assert arrays is None and strategy.refusals == [] and len(strategy.failures) == 1
