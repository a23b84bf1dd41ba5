"""The task interface: what a user writes to federate their own PyTorch model.

A `Task` is a classification problem fedsilo can train with DP-SGD:

    from fedsilo.task import Dataset, Task, make_dataset

    def read_site(path):                       # a site's own file, named in its node config
        x, y = ...                             # N x 30 float features, N integer labels
        return make_dataset(x, y, num_classes=2, source=str(path))

    task = Task(
        name="breast-cancer",
        input_shape=(30,),
        num_classes=2,
        model=lambda: torch.nn.Sequential(torch.nn.Linear(30, 16), torch.nn.Tanh(),
                                          torch.nn.Linear(16, 2)),
        read_site_data=read_site,
        public_data=lambda split, data_dir: ...,   # optional: simulations and default eval
    )

and names it by import path, Flower's `module:attr` convention:
`fedsilo simulate --task mypkg.task:task`, `fedsilo server start --task mypkg.task:task`,
`fedsilo client start --task mypkg.task:task`. No code travels with a run: the server
and every site import the task from the package they installed, and a deployed site
trains only the task its operator named (fedsilo.clients.site_env).

fedsilo owns everything privacy depends on: the model is built from the run's seed,
checked for state DP-SGD would not privatise (BatchNorm, running statistics, saved
buffers) and for layers whose per-example gradients nothing can compute; every
dataset a task returns is checked (shape, labels, NaN, emptiness); sampling, clipping,
noise and accounting are fedsilo's, whatever the task. The built-in tasks
(fedsilo.task.builtin) are `Task`s too, and take the same path.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedsilo.errors import ConfigError, DataError, FedsiloError
from fedsilo.task.data import Dataset, make_dataset

log = logging.getLogger("fedsilo.task")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricsFn = Callable[[torch.Tensor, torch.Tensor], Mapping[str, float]]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The default loss: cross-entropy of each example (a vector, not its mean)."""
    return nn.functional.cross_entropy(logits, labels, reduction="none")


@dataclass(frozen=True)
class Task:
    """A classification task: model, data readers, fixed front, loss and extra metrics.

    Attributes:
        name: shown in tables and summaries, and part of the feature-cache key.
        input_shape: the shape of one example as the data readers return it (before
            `front`); every dataset is checked against it.
        num_classes: labels are integers in [0, num_classes).
        model: builds the trained model (fedsilo seeds the weights from the run's seed,
            identically on the server and every site). It maps a batch of examples (of
            `front`'s output when there is a front) to num_classes logits.
        read_site_data: reads one site's own data from the path its operator gave
            (`fedsilo client start --data PATH`); the server reads `--eval-data` with it.
        public_data: `(split, data_dir)` -> the "train" pool a simulation partitions
            among virtual sites, or the "test" split the server evaluates on when it is
            given no --eval-data. None: the task has no public data (deployment only,
            with --eval-data).
        front: builds an optional fixed feature front (scatnet's scattering): no
            parameters and no saved buffers, the same function of each example on every
            site. It runs once per dataset; only `model` trains, on its output.
        loss: per-example loss (a vector of N values) from logits and labels; DP-SGD
            clips each example's gradient of it. Default: cross-entropy.
        metrics: optional extra metrics of the central evaluation, from all logits and
            labels of the server's data (e.g. AUC); accuracy and loss are always reported.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    model: Callable[[], nn.Module]
    read_site_data: Callable[[Path], Dataset]
    public_data: Callable[[str, str], Dataset] | None = None
    front: Callable[[], nn.Module] | None = None
    loss: LossFn = cross_entropy
    metrics: MetricsFn | None = None
    site_format: str = "a .npz file with arrays `x` and `y`"  # for messages and --help

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError("A Task needs a non-empty `name`.")
        if not (isinstance(self.num_classes, int) and self.num_classes >= 2):
            raise ConfigError(
                f"Task {self.name}: `num_classes` must be an integer >= 2, "
                f"found {self.num_classes!r}."
            )
        shape = tuple(self.input_shape)
        if not shape or not all(isinstance(d, int) and d >= 1 for d in shape):
            raise ConfigError(
                f"Task {self.name}: `input_shape` must be a tuple of positive integers "
                f"(one example's shape), found {self.input_shape!r}."
            )
        object.__setattr__(self, "input_shape", shape)
        for attr in ("model", "read_site_data"):
            if not callable(getattr(self, attr)):
                raise ConfigError(f"Task {self.name}: `{attr}` must be callable.")

    # ------------------------------------------------------------------ data
    def site_data(self, path: str | Path) -> Dataset:
        """A site's own data file, read by the task and checked.

        Raises:
            DataError: one line naming the file and the problem.
        """
        path = Path(path)
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty; a site needs {self.site_format}.")

        def read() -> object:
            try:
                return self.read_site_data(path)
            except FileNotFoundError:
                raise DataError(
                    f"{path}: site data file does not exist; a site needs {self.site_format}."
                ) from None

        return self.check(_call(read, f"{path}: cannot read site data"), str(path))

    def public(self, split: str, data_dir: str = "") -> Dataset:
        """The task's public `train` or `test` split, checked.

        Raises:
            ConfigError: the task has no public data.
            DataError: the data is missing or malformed.
        """
        if self.public_data is None:
            need = (
                "simulations need public data to partition"
                if split == "train"
                else "pass --eval-data FILE (the server's held-out data in the site format)"
            )
            raise ConfigError(f"Task {self.name} has no public data: {need}.")
        reader = self.public_data
        data = _call(lambda: reader(split, data_dir), f"task {self.name}: cannot load {split}")
        return self.check(data, f"{self.name} ({split})")

    def check(self, data: object, source: str) -> Dataset:
        """`data` as a checked Dataset of this task's shape, or a DataError naming `source`."""
        if not isinstance(data, Dataset):
            raise DataError(
                f"{source}: the task's reader returned {type(data).__name__}, not a "
                "fedsilo.task.Dataset; build one with fedsilo.task.make_dataset(x, y, ...)."
            )
        x = data.x
        if tuple(x.shape[1:]) != self.input_shape:
            if x.ndim >= 2 and math.prod(x.shape[1:]) == math.prod(self.input_shape):
                x = x.reshape((x.shape[0], *self.input_shape))
            else:
                raise DataError(
                    f"{source}: examples have shape {_shape(x.shape[1:])}; task {self.name} "
                    f"needs {_shape(self.input_shape)}."
                )
        return make_dataset(x, data.y, self.num_classes, source)

    # ------------------------------------------------------------------ models
    def build(self, *, seed: int) -> nn.Module:
        """The trained model, weights drawn from `seed` (the same on the server and sites).

        Weights are drawn on the CPU from the CPU default generator, seeded inside a fork
        of its state and restored after: no global generator, CPU or CUDA, is left changed
        (`torch.manual_seed` would also seed every CUDA generator, and leave it seeded).
        """
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            model = _call(self.model, f"task {self.name}: its model factory failed", ConfigError)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"Task {self.name}: `model()` returned {type(model).__name__}, not a "
                "torch.nn.Module."
            )
        return model

    def build_front(self) -> nn.Module | None:
        """The fixed front, checked to be parameter-free; None when the task has none.

        Raises:
            ConfigError: the front has parameters or buffers saved in its state dict.
        """
        if self.front is None:
            return None
        front = _call(self.front, f"task {self.name}: its front factory failed", ConfigError)
        if not isinstance(front, nn.Module):
            raise ConfigError(f"Task {self.name}: `front()` must return a torch.nn.Module.")
        named = [n for n, _ in front.named_parameters()] + list(front.state_dict())
        if named:
            raise ConfigError(
                f"Task {self.name}: the front has parameters or saved buffers ({named[0]}); "
                "a front must be fixed and parameter-free (it is never trained or sent). "
                "Register fixed weights with register_buffer(..., persistent=False), or "
                "move the layer into `model`."
            )
        return front

    def front_key(self, front: nn.Module) -> str:
        """A name for this front's function: task, module structure and fixed buffers."""
        h = hashlib.sha256(f"{self.name}|{front!r}".encode())
        for name, buf in front.named_buffers():
            h.update(name.encode())
            h.update(buf.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def forward_check(self, *, seed: int = 0) -> nn.Module:
        """Build front and model and run two zero examples through them, with the loss.

        Catches a model that does not fit the task (input shape, class count) or a
        loss that is not per-example before any site trains. Returns the model checked.

        Raises:
            ConfigError: naming the mismatch.
        """
        model = self.build(seed=seed)
        front = self.build_front()
        x = torch.zeros((2, *self.input_shape))
        y = torch.zeros(2, dtype=torch.long)
        with torch.no_grad():
            if front is not None:
                what = f"task {self.name}: its front fails on a batch"
                x = _tensor(_call(lambda: front(x), what, ConfigError), what)
            logits = _call(
                lambda: model(x),
                f"task {self.name}: its model fails on a batch of shape "
                f"{_shape((2, *x.shape[1:]))}",
                ConfigError,
            )
            if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (
                2,
                self.num_classes,
            ):
                found = tuple(logits.shape) if isinstance(logits, torch.Tensor) else logits
                raise ConfigError(
                    f"Task {self.name}: the model maps 2 examples to {found!r}; it must "
                    f"return logits of shape (2, {self.num_classes}) (num_classes)."
                )
            losses = _call(
                lambda: self.loss(logits, y), f"task {self.name}: its loss failed", ConfigError
            )
            if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (2,):
                found = tuple(losses.shape) if isinstance(losses, torch.Tensor) else losses
                raise ConfigError(
                    f"Task {self.name}: the loss of 2 examples has shape {found!r}; it must "
                    "return one loss per example (reduction='none'), which DP-SGD clips "
                    "one by one."
                )
        return model


def load_task(ref: str) -> Task:
    """Import the Task named `PACKAGE.MODULE:OBJECT` (Flower's module:attr convention).

    Raises:
        ConfigError: malformed reference, module not importable, no such object, or
            not a Task.
    """
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr or not attr.isidentifier():
        raise ConfigError(
            f"`task` must be PACKAGE.MODULE:OBJECT (e.g. breast_cancer.task:task). Found {ref!r}."
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(
                f"Task {ref}: no module named {exc.name!r} is installed here. Install the "
                "task's package on the server and every site (pip install ...)."
            ) from None
        raise ConfigError(f"Task {ref}: importing {module_name} failed: {exc}.") from None
    except FedsiloError:
        raise
    except (Exception, SystemExit) as exc:  # a module that exits on import is no task
        log.debug("load_task: importing %s failed", module_name, exc_info=True)
        raise ConfigError(
            f"Task {ref}: importing {module_name} failed ({_failure(exc)}). Fix the module: "
            "importing it must define the task and nothing else."
        ) from None
    found = getattr(module, attr, None)
    if found is None:
        raise ConfigError(f"Task {ref}: module {module_name} has no attribute {attr!r}.")
    if not isinstance(found, Task):
        raise ConfigError(
            f"Task {ref}: {attr} is a {type(found).__name__}, not a fedsilo.task.Task."
        )
    return found


def _call(fn: Callable[[], object], what: str, error: type[FedsiloError] = DataError) -> object:
    """Run task code; a user-code failure becomes a one-line error (traceback at debug)."""
    try:
        return fn()
    except FedsiloError:
        raise
    except (Exception, SystemExit) as e:  # any failure of the task's own code is the task's
        log.debug("%s", what, exc_info=True)
        raise error(f"{what}: {_failure(e)}") from None


def _failure(e: BaseException) -> str:
    """One line for an exception raised by task code: its type and first message line."""
    if isinstance(e, SystemExit):
        return f"it called sys.exit({e.code!r})"
    detail = str(e).splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {detail}" if detail else type(e).__name__


def _tensor(value: object, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"{what}: it returned {type(value).__name__}, not a tensor.")
    return value


def _shape(shape: Iterable[int]) -> str:
    dims = tuple(shape)
    return "x".join(str(d) for d in dims) if dims else "scalar"
