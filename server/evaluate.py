"""Central evaluation of each global model on the server's own held-out data."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from fedsilo.config import RunConfig
from fedsilo.task.api import Task
from fedsilo.task.builtin import task_for
from fedsilo.task.data import Dataset
from fedsilo.task.features import featurize
from fedsilo.task.train import loss_and_accuracy, predict, resolve_device


@dataclass(frozen=True)
class Evaluation:
    """The central metrics of one global model."""

    loss: float
    accuracy: float
    extra: dict[str, float] = field(default_factory=dict)  # the task's own metrics


Evaluator = Callable[[Mapping[str, torch.Tensor]], Evaluation]


def load_eval_data(cfg: RunConfig, eval_data: str = "") -> Dataset:
    """The server's test set: a file in the task's site format, or its public test split."""
    task = task_for(cfg)
    if eval_data:
        return task.site_data(eval_data)
    return task.public("test", cfg.data_dir)


def global_model(cfg: RunConfig) -> torch.nn.Module:
    """The initial global model, identical wherever it is built from the same config."""
    return task_for(cfg).build(seed=cfg.seed)


def make_evaluator(cfg: RunConfig, data: Dataset) -> Evaluator:
    """A function from a global state_dict to its Evaluation on `data`.

    A task's fixed front (scatnet's scattering) runs over `data` once, here; each
    round then evaluates only the model on those features.
    """
    task = task_for(cfg)
    model = task.build(seed=cfg.seed)
    device = resolve_device(cfg.device)
    front = task.build_front()
    if front is not None:
        data = featurize(front, data, device=device)

    def run(state: Mapping[str, torch.Tensor]) -> Evaluation:
        # The model takes the round's tensors as its own (assign: no copy of a model
        # that may be 270 MB); evaluation runs it in eval mode under no_grad and changes
        # none of them, so the caller checkpoints exactly what was evaluated. Then it
        # lets them go (shape-only placeholders): a model's worth of memory the server
        # would otherwise hold between rounds and while it aggregates the next one.
        model.load_state_dict(dict(state), assign=True)
        try:
            return evaluate_task(task, model, data, device=device)
        finally:
            placeholders = {k: torch.empty_like(t, device="meta") for k, t in state.items()}
            model.load_state_dict(placeholders, assign=True)

    return run


def evaluate_task(
    task: Task, model: torch.nn.Module, data: Dataset, *, device: torch.device | None = None
) -> Evaluation:
    """Loss, accuracy and the task's extra metrics of `model` on `data`."""
    logits = predict(model, data, device=device)
    loss, accuracy = loss_and_accuracy(logits, data.y, task.loss)
    with torch.no_grad():
        extra = {str(k): float(v) for k, v in (task.metrics or _none)(logits, data.y).items()}
    return Evaluation(loss, accuracy, extra)


def _none(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {}
