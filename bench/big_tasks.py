"""Big-model tasks for bench.big_model: the digits task with a wide tanh MLP.

`mlp_17m`: 64 -> 4096 -> 4096 -> 10 (17.1 M parameters, 65 MiB in float32), the model
of issue 25's report; `mlp_67m`: 64 -> 8192 -> 8192 -> 10 (67.7 M, 258 MiB). Each is
`bench.big_tasks:NAME` for `--task` (the bench puts the repository on PYTHONPATH).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from fedsilo.task.api import Task
from fedsilo.task.builtin import digits


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10)
    )


def wide(width: int) -> Task:
    """The digits task with a 64 -> width -> width -> 10 tanh MLP."""
    return dataclasses.replace(digits, name=f"digits-mlp-{width}", model=lambda: _mlp(width))


def parameters(task: Task) -> int:
    return sum(p.numel() for p in task.model().parameters())


mlp_17m = wide(4096)
mlp_67m = wide(8192)
mlp_1m = wide(1024)  # 1.1 M: a quick check of the bench itself
