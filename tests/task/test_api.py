"""The task interface: a user's Task is imported, checked and trained like a built-in one."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedsilo.clients.dp_train import plan_run, train_round
from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError, DataError
from fedsilo.task import Dataset, Task, load_task, make_dataset
from fedsilo.task.builtin import builtin_task, digits, task_for
from fedsilo.task.rng import SeededRandom
from fedsilo.task.train import check_trainable


def tabular(n: int = 40, features: int = 5, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    return make_dataset(x, (x[:, 0] > 0).astype(np.int64), 2, "synthetic")


def small_task(**changes: object) -> Task:
    fields: dict[str, object] = {
        "name": "small",
        "input_shape": (5,),
        "num_classes": 2,
        "model": lambda: nn.Sequential(
            nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)
        ),
        "read_site_data": lambda path: tabular(),
        "public_data": lambda split, data_dir: tabular(60 if split == "train" else 30),
    }
    fields.update(changes)
    return Task(**fields)  # type: ignore[arg-type]


@pytest.fixture
def task_module(tmp_path: Path) -> Iterator[str]:
    """An importable module `usertask_<n>` holding a Task `task` and a non-Task `other`."""
    name = f"usertask_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            from fedsilo.task import Task
            from tests.task.test_api import tabular
            task = Task(name="user", input_shape=(5,), num_classes=2,
                        model=lambda: nn.Linear(5, 2), read_site_data=lambda p: tabular())
            other = 3
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    yield name
    sys.path.remove(str(tmp_path))
    sys.modules.pop(name, None)


def test_a_task_is_found_by_its_import_path(task_module: str) -> None:
    task = load_task(f"{task_module}:task")
    assert task.name == "user" and task.input_shape == (5,)
    assert task_for(RunConfig(task=f"{task_module}:task")) is task
    assert task_for(RunConfig()) is digits  # no task: the built-in dataset and model
    assert load_task("fedsilo.task.builtin:fashion_mnist") is builtin_task("fashion-mnist")


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no_colon", "must be PACKAGE.MODULE:OBJECT"),
        ("mod:", "must be PACKAGE.MODULE:OBJECT"),
        ("not_installed_pkg.task:task", "no module named 'not_installed_pkg' is installed"),
        ("{module}:missing", "has no attribute 'missing'"),
        ("{module}:other", "is a int, not a fedsilo.task.Task"),
    ],
)
def test_bad_task_references_say_what_is_wrong(task_module: str, ref: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_task(ref.format(module=task_module))


def test_a_module_that_fails_to_import_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken_task_mod.py").write_text("raise RuntimeError('no GPU driver')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ConfigError, match=r"importing broken_task_mod failed.*no GPU driver"):
            load_task("broken_task_mod:task")
    finally:
        sys.path.remove(str(tmp_path))


def test_a_module_that_exits_on_import_is_an_error_not_a_clean_exit(tmp_path: Path) -> None:
    (tmp_path / "exiting_task_mod.py").write_text("import sys\nsys.exit(0)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ConfigError, match=r"importing exiting_task_mod failed.*sys.exit\(0\)"):
            load_task("exiting_task_mod:task")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("exiting_task_mod", None)


class BrokenForward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.missing(x)  # type: ignore[no-any-return]


def test_any_failure_of_task_code_is_one_line_naming_the_task(tmp_path: Path) -> None:
    """Not only the usual exception types: AttributeError, ZeroDivisionError, sys.exit."""

    def divide(*_: object) -> Dataset:
        return 1 / 0  # type: ignore[return-value]

    def exits(*_: object) -> Dataset:
        sys.exit(3)

    (tmp_path / "x").write_text("x")
    for reader, needle in (
        (divide, "ZeroDivisionError: division by zero"),
        (exits, r"it called sys.exit\(3\)"),
    ):
        with pytest.raises(DataError, match=rf"x: cannot read site data: {needle}"):
            small_task(read_site_data=reader).site_data(tmp_path / "x")
        with pytest.raises(DataError, match=rf"task small: cannot load test: {needle}"):
            small_task(public_data=reader).public("test")
    with pytest.raises(ConfigError, match=r"model fails on a batch.*AttributeError.*'missing'"):
        check_trainable(small_task(model=BrokenForward))
    with pytest.raises(ConfigError, match=r"model factory failed: ZeroDivisionError"):
        check_trainable(small_task(model=divide))


def test_task_definitions_are_checked() -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        small_task(num_classes=1)
    with pytest.raises(ConfigError, match="input_shape"):
        small_task(input_shape=(0,))
    with pytest.raises(ConfigError, match="`model` must be callable"):
        small_task(model=nn.Linear(5, 2)(torch.zeros(1, 5)))
    with pytest.raises(ConfigError, match="drop `dataset`"):
        RunConfig(task="a.b:task", dataset="fashion-mnist").validate()


def test_everything_a_task_reads_is_checked(tmp_path: Path) -> None:
    good = tabular()
    task = small_task()
    assert task.check(good, "s").x.shape == (40, 5)
    flat = make_dataset(good.x, good.y, 2, "s")
    assert small_task(input_shape=(1, 5)).check(flat, "s").x.shape == (40, 1, 5)  # reshaped
    with pytest.raises(DataError, match=r"s: examples have shape 3; task small needs 5"):
        task.check(make_dataset(np.zeros((4, 3)), np.zeros(4), 2, "s"), "s")
    with pytest.raises(DataError, match=r"labels must be in \[0, 2\), found range \[0, 7\]"):
        task.check(make_dataset(good.x[:2], [0, 7], 10, "s"), "s")
    with pytest.raises(DataError, match="NaN"):
        make_dataset(np.full((2, 5), np.nan), [0, 1], 2, "s")
    with pytest.raises(DataError, match="no examples"):
        make_dataset(np.zeros((0, 5)), np.zeros(0), 2, "s")
    with pytest.raises(DataError, match="labels must be integers"):
        make_dataset(np.zeros((2, 5)), [0.5, 1.0], 2, "s")
    with pytest.raises(DataError, match=r"returned ndarray, not a fedsilo.task.Dataset"):
        small_task(read_site_data=lambda p: np.zeros(3)).site_data(tmp_path / "x")
    # Files: missing, empty, and a reader that fails all give one line naming the file.
    with pytest.raises(DataError, match=r"missing.csv: site data file does not exist"):
        small_task(read_site_data=lambda p: p.read_bytes()).site_data(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty.csv: the file is empty"):
        task.site_data(tmp_path / "empty.csv")

    def failing(path: Path) -> Dataset:
        raise ValueError("bad row 3\nmore detail")

    (tmp_path / "x").write_text("x")
    with pytest.raises(DataError, match=r"x: cannot read site data: ValueError: bad row 3$"):
        small_task(read_site_data=failing).site_data(tmp_path / "x")
    with pytest.raises(ConfigError, match="has no public data: pass --eval-data"):
        small_task(public_data=None).public("test")


def test_a_model_or_loss_that_does_not_fit_the_task_is_refused_before_training() -> None:
    with pytest.raises(ConfigError, match=r"must return logits of shape \(2, 2\)"):
        check_trainable(small_task(model=lambda: nn.Linear(5, 3)))
    with pytest.raises(ConfigError, match="its model fails on a batch of shape 2x5"):
        check_trainable(small_task(model=lambda: nn.Linear(7, 2)))

    def mean_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, y)

    with pytest.raises(ConfigError, match="one loss per example"):
        check_trainable(small_task(loss=mean_loss))
    with pytest.raises(ConfigError, match=r"BatchNorm1d.*use GroupNorm or LayerNorm"):
        check_trainable(small_task(model=lambda: nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 2))))
    with pytest.raises(ConfigError, match="front has parameters"):
        check_trainable(small_task(front=lambda: nn.Linear(5, 5), model=lambda: nn.Linear(5, 2)))


class LSTMHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(5, 4, batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x[:, None])[0][:, -1])  # type: ignore[no-any-return]


def test_a_layer_nothing_can_clip_is_named_with_its_replacement() -> None:
    with pytest.raises(ConfigError, match=r"Layer rnn \(LSTM\).*use opacus.layers.DPLSTM"):
        check_trainable(small_task(model=LSTMHead))


def test_model_weights_come_from_the_run_seed_and_leave_global_rngs_alone() -> None:
    task = small_task()
    state = torch.random.get_rng_state()
    a, b, c = task.build(seed=1), task.build(seed=1), task.build(seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_a_user_task_trains_a_dp_round_with_its_own_loss() -> None:
    """The task's per-example loss is what DP-SGD differentiates: a different loss,
    same seeds and data, gives a different update; the default gives another."""
    cfg = RunConfig(task="x.y:task", rounds=1, local_epochs=2, batch_size=8, target_epsilon=4.0)
    data = tabular(64)

    def smoothed(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, y, reduction="none", label_smoothing=0.3)

    results = []
    for task in (small_task(), small_task(loss=smoothed)):
        global_state = task.build(seed=cfg.seed).state_dict()
        plan = plan_run(cfg, len(data), prior=[])
        res = train_round(cfg, task, data, global_state, plan, [], SeededRandom(5))
        assert 0 < res.epsilon <= 4.0 and res.examples == 64
        assert sorted(res.state_dict) == sorted(global_state)  # LayerNorm trained too
        results.append(res.state_dict)
    assert not torch.equal(results[0]["3.weight"], results[1]["3.weight"])
    initial = small_task().build(seed=0).state_dict()
    assert not torch.equal(results[0]["1.weight"], initial["1.weight"])
