"""Central evaluation: the same numbers as evaluating the whole model on the raw data."""

from __future__ import annotations

import pytest
import torch

from fedsilo.config import RunConfig
from fedsilo.server.evaluate import global_model, make_evaluator
from fedsilo.task.builtin import builtin_task
from fedsilo.task.data import Dataset
from fedsilo.task.train import evaluate


@pytest.mark.parametrize("model", ["scatnet", "cnn"])
def test_evaluator_matches_the_whole_model(model: str) -> None:
    torch.manual_seed(0)
    data = Dataset(torch.rand(50, 1, 28, 28), torch.randint(0, 10, (50,)), 10, "synthetic")
    cfg = RunConfig(dataset="fashion-mnist", model=model, seed=4)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in global_model(cfg).state_dict().items()}
    whole = global_model(cfg)
    whole.load_state_dict(state)
    got = make_evaluator(cfg, data)(state)
    front = builtin_task("fashion-mnist", model).build_front()
    if front is not None:  # scatnet: the global model is the head on the fixed front
        whole = torch.nn.Sequential(front, whole)
    want_loss, want_acc = evaluate(whole, data)
    assert got.loss == pytest.approx(want_loss, rel=1e-5)
    assert got.accuracy == want_acc and got.extra == {}
