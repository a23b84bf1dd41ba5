"""Central evaluation: the same numbers as evaluating the whole model on the raw data."""

from __future__ import annotations

import gc
import weakref

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


def test_each_round_is_evaluated_on_its_own_tensors_which_stay_as_they_were() -> None:
    """The evaluator's model takes each round's tensors as its own (no copy of the model):
    a round evaluates as a fresh model would, whatever round came before, and the tensors
    (the checkpoint the server writes next) are left exactly as they were."""
    torch.manual_seed(1)
    data = Dataset(torch.rand(60, 1, 28, 28), torch.randint(0, 10, (60,)), 10, "synthetic")
    cfg = RunConfig(dataset="fashion-mnist", model="cnn", seed=4)
    base = global_model(cfg).state_dict()
    rounds = [{k: v + 0.05 * torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    kept = [{k: v.clone() for k, v in state.items()} for state in rounds]
    alone = make_evaluator(cfg, data)(rounds[1])
    run = make_evaluator(cfg, data)
    # Execute: round 0, then round 1, on one evaluator
    first, second = run(rounds[0]), run(rounds[1])
    # Assert
    assert (second.loss, second.accuracy) == (alone.loss, alone.accuracy)
    assert (first.loss, first.accuracy) != (second.loss, second.accuracy)
    for state, copy in zip(rounds, kept, strict=True):
        assert all(torch.equal(state[k], copy[k]) for k in copy)


def test_the_evaluator_holds_no_rounds_tensors_once_it_has_evaluated_them() -> None:
    """Between rounds (and while the next round is aggregated) the evaluator keeps none
    of the last round's tensors alive, on the CPU or the device it moved them to."""
    torch.manual_seed(2)
    data = Dataset(torch.rand(40, 1, 28, 28), torch.randint(0, 10, (40,)), 10, "synthetic")
    cfg = RunConfig(dataset="fashion-mnist", model="cnn", seed=4)
    run = make_evaluator(cfg, data)
    # Tensors over numpy buffers, as a deployed round's model arrives
    # (ArrayRecord.to_torch_state_dict): a buffer lives while any tensor uses its memory.
    buffers = {k: (v + 0.01).numpy() for k, v in global_model(cfg).state_dict().items()}
    state = {k: torch.from_numpy(b) for k, b in buffers.items()}
    alive = [weakref.ref(b) for b in buffers.values()]
    del buffers
    # Execute
    first = run(state)
    del state
    gc.collect()
    # Assert: every tensor of the round is gone, and the evaluator still evaluates
    assert not [ref for ref in alive if ref() is not None]
    again = run({k: v + 0.01 for k, v in global_model(cfg).state_dict().items()})
    assert (again.loss, again.accuracy) == (first.loss, first.accuracy)
