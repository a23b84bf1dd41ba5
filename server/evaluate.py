"""Central evaluation of each global model on the server's own held-out data."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from fedsilo.config import RunConfig
from fedsilo.task.data import SHAPES, Dataset, load_dataset, load_npz
from fedsilo.task.features import featurize
from fedsilo.task.models import build_model, resolve_model_name, split_front
from fedsilo.task.train import evaluate, resolve_device


def load_eval_data(cfg: RunConfig, eval_data: str = "") -> Dataset:
    """The server's test set: a file in the site data format, or the dataset's test split."""
    shape, classes = SHAPES[cfg.dataset]
    if eval_data:
        return load_npz(eval_data, num_classes=classes, input_shape=shape)
    return load_dataset(cfg.dataset, "test", cfg.data_dir)


def global_model(cfg: RunConfig) -> torch.nn.Module:
    """The initial global model, identical wherever it is built from the same config."""
    shape, classes = SHAPES[cfg.dataset]
    return build_model(resolve_model_name(cfg.model, shape), shape, classes, seed=cfg.seed)


def make_evaluator(
    cfg: RunConfig, data: Dataset
) -> Callable[[Mapping[str, torch.Tensor]], tuple[float, float]]:
    """A function from a global state_dict to (loss, accuracy) on `data`.

    A model's fixed front (scatnet's scattering) runs over `data` once, here; each
    round then evaluates only the head on those features.
    """
    model = global_model(cfg)
    device = resolve_device(cfg.device)
    front, head = split_front(model)
    if front is not None:
        data = featurize(front, data, device=device)

    def run(state: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        model.load_state_dict(dict(state))
        return evaluate(head, data, device=device)

    return run
