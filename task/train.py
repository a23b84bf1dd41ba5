"""DP-SGD training and evaluation: plain PyTorch plus Opacus, no Flower.

`DPTrainer` runs Opacus DP-SGD on tensors held in memory:
- Poisson sampling: each example joins a step's batch independently with
  probability q = expected_batch_size / N, drawn from an explicit torch.Generator;
- per-sample gradients from Opacus's GradSampleModule, clipped to `max_grad_norm`
  and summed by Opacus's DPOptimizer, which adds N(0, (sigma * C)^2) noise and
  divides by the expected batch size (Abadi et al., "Deep Learning with
  Differential Privacy", CCS 2016, Algorithm 1);
- an empty Poisson batch still takes a noise-only step, exactly as the
  accountant assumes (Opacus would otherwise see a zero-size batch).

The model's own state_dict never carries Opacus's `_module.` prefix: the trainer
keeps the unwrapped module and `strip_module_prefix` repairs foreign checkpoints.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from fedsilo.task.data import Dataset
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

OPACUS_PREFIX = "_module."


@dataclass(frozen=True)
class TrainStats:
    """What one local training call did."""

    steps: int
    examples_seen: int
    empty_batches: int
    mean_loss: float


class DPTrainer:
    """Opacus DP-SGD over an in-memory dataset, one object per site and round."""

    def __init__(
        self,
        model: nn.Module,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        lr: float,
        momentum: float = 0.0,
        generator: torch.Generator,
        device: torch.device | None = None,
    ) -> None:
        self.device = device or torch.device("cpu")
        self.model = model.to(self.device)
        self.gsm = GradSampleModule(self.model, batch_first=True, loss_reduction="mean")
        self.generator = generator
        self.expected_batch_size = expected_batch_size
        base = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)
        noise_gen = generator if self.device.type == "cpu" else None
        self.optimizer = DPOptimizer(
            base,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=noise_gen,
        )
        self.loss_fn = nn.CrossEntropyLoss(reduction="mean")

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One DP-SGD step on the batch (x, y); returns the batch's mean loss (nan if empty)."""
        self.optimizer.zero_grad(set_to_none=True)
        if x.shape[0] == 0:
            self._noise_only_step()
            return float("nan")
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        loss = self.loss_fn(self.gsm(x), y)
        with warnings.catch_warnings():
            # Opacus's hooks on a first layer whose input needs no grad: expected, harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def train_epochs(self, data: Dataset, epochs: int) -> TrainStats:
        """`epochs` x round(N / expected_batch_size) Poisson-sampled steps."""
        n = len(data)
        steps = epochs * steps_per_epoch(n, self.expected_batch_size)
        q = sample_rate(n, self.expected_batch_size)
        self.gsm.train()
        losses, seen, empty = 0.0, 0, 0
        for _ in range(steps):
            mask = torch.rand(n, generator=self.generator) < q
            idx = mask.nonzero(as_tuple=True)[0]
            loss = self.step(data.x[idx], data.y[idx])
            if idx.numel() == 0:
                empty += 1
            else:
                losses += loss * idx.numel()
                seen += idx.numel()
        return TrainStats(
            steps=steps,
            examples_seen=seen,
            empty_batches=empty,
            mean_loss=losses / seen if seen else float("nan"),
        )

    def _noise_only_step(self) -> None:
        """Empty batch: zero-row per-sample grads, as Opacus's own DPDataLoader would
        give; DPOptimizer then clips nothing, adds the noise and steps as usual."""
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        self.optimizer.step()


def sample_rate(n: int, expected_batch_size: int) -> float:
    """Poisson sampling rate q = B / N, at most 1."""
    return min(1.0, expected_batch_size / n)


def steps_per_epoch(n: int, expected_batch_size: int) -> int:
    """Steps that see each example once in expectation: round(1 / q), at least 1."""
    return max(1, round(n / expected_batch_size))


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, *, batch_size: int = 2048, device: torch.device | None = None
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of `model` on `data`."""
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        x = data.x[start : start + batch_size].to(device)
        y = data.y[start : start + batch_size].to(device)
        logits = model(x)
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    return loss_sum / len(data), correct / len(data)


def strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop Opacus's `_module.` wrapper prefix from state-dict keys, if present."""
    return {
        (k[len(OPACUS_PREFIX) :] if k.startswith(OPACUS_PREFIX) else k): v for k, v in state.items()
    }


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when available, else cpu; asking for cuda without one is an error."""
    from fedsilo.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "`device` is cuda but this torch has no CUDA device "
            f"(torch {torch.__version__}). Use --device cpu or install a CUDA build (README)."
        )
    return torch.device(name)
