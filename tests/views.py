"""A spy on a module's `tensor_views` (fedsilo.flwr_adapter.arrays): the records it read."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from flwr.app import ArrayRecord


def spy_on_views(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> list[ArrayRecord]:
    """Make `module.tensor_views` record each record it reads; the list it appends to."""
    read: list[ArrayRecord] = []
    real = module.tensor_views

    def spy(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        read.append(arrays)
        return real(arrays)  # type: ignore[no-any-return]

    monkeypatch.setattr(module, "tensor_views", spy)
    return read
