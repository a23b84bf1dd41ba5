"""fedsilo's built-in tasks, written against the same interface as a user's (task/api.py).

- `digits`: scikit-learn's embedded 8x8 digits with the tanh MLP (the `make demo` job);
- `fashion_mnist`, `mnist`: 28x28 images (IDX files) with ScatterNet + linear, the
  best model under DP (Tramer and Boneh, ICLR 2021): a fixed scattering front and
  one trained Linear layer;
- `fashion_mnist_cnn`, `fashion_mnist_mlp`, `mnist_cnn`, `mnist_mlp`: the other models.

Each is importable as `fedsilo.task.builtin:NAME` like any task; `--dataset` and
`--model` pick one (`builtin_task`). A site's own data for a built-in task is a `.npz`
file with `x` and `y` (fedsilo.task.data.load_npz; `fedsilo data split` writes them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError
from fedsilo.task.api import Task, load_task
from fedsilo.task.data import Dataset, load_dataset, load_npz
from fedsilo.task.models import CNN, MLP, ScatterFeatures

BUILTIN = "fedsilo.task.builtin"
CLASSES = 10
IMAGE = (1, 28, 28)
DATASETS = ("digits", "fashion-mnist", "mnist")
MODELS = ("mlp", "cnn", "scatnet")


def _npz_reader(shape: tuple[int, ...]) -> Callable[[Path], Dataset]:
    def read(path: Path) -> Dataset:
        return load_npz(path, num_classes=CLASSES, input_shape=shape)

    return read


def _public(dataset: str) -> Callable[[str, str], Dataset]:
    def read(split: str, data_dir: str) -> Dataset:
        return load_dataset(dataset, split, data_dir)

    return read


def _scatnet_head() -> nn.Module:
    return nn.Linear(ScatterFeatures.OUT_FEATURES, CLASSES)


def _make(dataset: str, model: str) -> Task:
    shape = (64,) if dataset == "digits" else IMAGE
    factories: dict[str, Callable[[], nn.Module]] = {
        "mlp": lambda: MLP(in_features=64 if dataset == "digits" else 28 * 28),
        "cnn": CNN,
        "scatnet": _scatnet_head,
    }
    return Task(
        name=dataset if model == default_model(dataset) else f"{dataset}-{model}",
        input_shape=shape,
        num_classes=CLASSES,
        model=factories[model],
        read_site_data=_npz_reader(shape),
        public_data=_public(dataset),
        front=ScatterFeatures if model == "scatnet" else None,
    )


def default_model(dataset: str) -> str:
    """`auto`: mlp for digits' flat inputs, scatnet for 28x28 images."""
    return "mlp" if dataset == "digits" else "scatnet"


def builtin_task(dataset: str, model: str = "auto") -> Task:
    """The built-in task `--dataset DATASET --model MODEL` names.

    Raises:
        ConfigError: an unknown dataset, or a model that does not fit its inputs.
    """
    if dataset not in DATASETS:
        raise ConfigError(f"Unknown dataset {dataset!r}. Use one of {', '.join(DATASETS)}.")
    name = default_model(dataset) if model == "auto" else model
    if name not in MODELS:
        raise ConfigError(f"Unknown model {model!r}. Use mlp, cnn, scatnet or auto.")
    if dataset == "digits" and name != "mlp":
        raise ConfigError(f"model `{name}` needs 1x28x28 inputs, got 64; use --model mlp.")
    return TASKS[(dataset, name)]


TASKS = {(d, m): _make(d, m) for d in DATASETS for m in MODELS if d != "digits" or m == "mlp"}
digits = TASKS[("digits", "mlp")]
fashion_mnist = TASKS[("fashion-mnist", "scatnet")]
fashion_mnist_cnn = TASKS[("fashion-mnist", "cnn")]
fashion_mnist_mlp = TASKS[("fashion-mnist", "mlp")]
mnist = TASKS[("mnist", "scatnet")]
mnist_cnn = TASKS[("mnist", "cnn")]
mnist_mlp = TASKS[("mnist", "mlp")]


def task_for(cfg: RunConfig) -> Task:
    """The run's task: the Task `task` names, else the built-in (dataset, model)."""
    return load_task(cfg.task) if cfg.task else builtin_task(cfg.dataset, cfg.model)
