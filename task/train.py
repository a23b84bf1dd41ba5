"""DP-SGD training and evaluation: plain PyTorch, no Flower.

`DPTrainer` runs DP-SGD (Abadi et al., "Deep Learning with Differential Privacy",
CCS 2016, Algorithm 1) on tensors held in memory:
- Poisson sampling: each example joins a step's batch independently with
  probability q = expected_batch_size / N, drawn from the site's own random source
  (fedsilo.task.rng: never torch's global generators, never the server's seed);
- the task's per-example loss (cross-entropy by default; fedsilo.task.api);
- per-sample gradients clipped to `max_grad_norm` and summed by
  `fedsilo.task.clipping` (ghost norms and book-keeping for Linear layers,
  unfolded per-sample products for Conv2d), from one backward pass to the layer
  outputs; then N(0, (sigma * C)^2) noise, division by the expected batch size
  and an SGD step: the same update as Opacus's DPOptimizer (tests check it
  against Opacus's per-sample gradients), at about half the cost on CPU;
- an empty Poisson batch still takes a noise-only step, exactly as the
  accountant assumes;
- `precision` bf16 or fp16: the forward and backward passes run under torch.autocast
  (mixed precision); what DP rests on stays float32: each layer's inputs and output
  gradients are cast to float32 before the per-example norms, the clip factors and the
  clipped sums, the noise is float32 and the weights are kept in float32. fp16 scales
  the loss by FP16_LOSS_SCALE (its gradients would underflow) and, should a gradient
  overflow, redoes the step's passes in float32: the result is the same clipped sum
  either way, so the release does not depend on the overflow.

The model is never wrapped (no Opacus GradSampleModule): its state_dict, the update a
site sends, has the task model's own keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedsilo.errors import ConfigError
from fedsilo.task.api import LossFn, Task, cross_entropy
from fedsilo.task.clipping import (
    SUPPORTED,
    clip_factors,
    clipped_param_sums,
    layer_grads,
    opacus_layer_grads,
    opacus_samplers,
)
from fedsilo.task.data import Dataset
from fedsilo.task.rng import SiteRandom

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FP16_LOSS_SCALE = 2.0**12  # fp16's smallest normal is 6e-5: small gradients need lifting


@dataclass(frozen=True)
class TrainStats:
    """What one local training call did."""

    steps: int
    examples_seen: int
    empty_batches: int
    mean_loss: float


class DPTrainer:
    """DP-SGD over an in-memory dataset, one object per site and round."""

    def __init__(
        self,
        model: nn.Module,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        lr: float,
        momentum: float = 0.0,
        rng: SiteRandom,
        device: torch.device | None = None,
        loss: LossFn = cross_entropy,
        precision: str = "fp32",
    ) -> None:
        check_private_state(model)
        if precision not in PRECISIONS:
            raise ConfigError(
                f"`precision` must be one of {', '.join(PRECISIONS)}. Found {precision!r}."
            )
        self.precision = precision
        self.device = device or torch.device("cpu")
        if precision == "fp16" and self.device.type == "cpu":
            raise ConfigError(
                "`precision` fp16 needs a GPU: CPUs have no fp16 arithmetic (a DP step ran "
                "~100x slower than fp32 on the test machines). Use bf16 on CPU sites, or fp32."
            )
        self.device = device or torch.device("cpu")
        self.model = model.to(self.device)
        self.samplers = opacus_samplers()
        self.layers = _clippable_layers(self.model, self.samplers)
        # Sampling and noise come from the site's own source (noise on the model's device,
        # fedsilo.task.rng): no CUDA generator is ever used (a server could seed that one).
        self.rng = rng
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)
        self.loss = loss  # per example: DP-SGD clips each example's gradient of it

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One DP-SGD step on the batch (x, y); returns the batch's mean loss (nan if empty)."""
        if x.shape[0] == 0:
            grads: dict[torch.Tensor, torch.Tensor] = {
                p: torch.zeros_like(p) for p in self.model.parameters()
            }
            loss = float("nan")
        else:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            grads, loss_sum, _ = self.clipped_grad_sums(x, y)
            loss = loss_sum / x.shape[0]
        std = self.noise_multiplier * self.max_grad_norm
        with torch.no_grad():
            if std > 0:  # in place, on the gradients' device (fedsilo.task.rng)
                self.rng.add_gaussian_(list(grads.values()), std)
            for p, g in grads.items():
                # Opacus's loss_reduction="mean": divide by the *expected* batch size.
                p.grad = g.div_(self.expected_batch_size)
        self.optimizer.step()
        return loss

    def clipped_grad_sums(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[dict[torch.Tensor, torch.Tensor], float, torch.Tensor]:
        """Sum over the batch of per-sample gradients clipped to `max_grad_norm`.

        Returns the sum per parameter, the summed loss, and each example's gradient
        norm before clipping.
        """
        records: dict[nn.Module, tuple[list[torch.Tensor], torch.Tensor]] = {}

        def record(layer: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if layer in records:
                raise ConfigError(
                    f"{type(layer).__name__} is called twice in one forward pass; "
                    "per-sample clipping needs each layer used once."
                )
            records[layer] = ([i.detach() for i in inputs], out)

        half = PRECISIONS[self.precision]
        scale = FP16_LOSS_SCALE if half is torch.float16 else 1.0
        out_grads, loss = self._backward_to_outputs(x, y, records, record, half, scale)
        if scale != 1.0 and not all(bool(torch.isfinite(g).all()) for g in out_grads):
            records.clear()  # an fp16 overflow: the same step in float32
            scale = 1.0
            out_grads, loss = self._backward_to_outputs(x, y, records, record, None, 1.0)
        with torch.no_grad():
            # DP's math in float32 whatever the passes ran in (a no-op at fp32)
            grads32 = [g.float() / scale if scale != 1.0 else g.float() for g in out_grads]
            inputs = {
                layer: [i.float() if i.is_floating_point() else i for i in records[layer][0]]
                for layer in self.layers
            }
            per_layer = [
                layer_grads(layer, inputs[layer][0], g)
                if isinstance(layer, SUPPORTED)
                else opacus_layer_grads(layer, inputs[layer], g, self.samplers[type(layer)])
                for layer, g in zip(self.layers, grads32, strict=True)
            ]
            sq = torch.stack([lg.sq_norms for lg in per_layer]).sum(0)
            factors = clip_factors(sq, self.max_grad_norm)
            sums: dict[torch.Tensor, torch.Tensor] = {}
            for layer, lg in zip(self.layers, per_layer, strict=True):
                for name, total in clipped_param_sums(lg, factors).items():
                    sums[_param(layer, name)] = total
        return sums, float(loss.detach()) / scale, sq.sqrt()

    def _backward_to_outputs(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        records: dict[nn.Module, tuple[list[torch.Tensor], torch.Tensor]],
        record: Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None],
        half: torch.dtype | None,
        scale: float,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The (scaled) summed loss's gradients to the layers' outputs, and that loss."""
        handles = [layer.register_forward_hook(record) for layer in self.layers]
        try:
            with _autocast(self.device, half):
                losses = self.loss(self.model(x), y)
            if losses.shape != y.shape:
                raise ConfigError(
                    f"The task's loss returned shape {tuple(losses.shape)} for {len(y)} "
                    "examples; it must return one loss per example (reduction='none')."
                )
            loss = losses.float().sum() * scale
        finally:
            for h in handles:
                h.remove()
        outputs = [records[layer][1] for layer in self.layers]
        # Gradients with respect to each layer's output only: no weight gradients are
        # formed for the whole batch, the per-sample math replaces them.
        return torch.autograd.grad(loss, outputs), loss

    def train_epochs(self, data: Dataset, epochs: int) -> TrainStats:
        """`epochs` x round(N / expected_batch_size) Poisson-sampled steps."""
        n = len(data)
        steps = epochs * steps_per_epoch(n, self.expected_batch_size)
        q = sample_rate(n, self.expected_batch_size)
        self.model.train()
        losses, seen, empty = 0.0, 0, 0
        for _ in range(steps):
            mask = self.rng.bernoulli_mask(n, q)
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


@contextlib.contextmanager
def _autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def _param(layer: nn.Module, name: str) -> torch.Tensor:
    p = getattr(layer, name)
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{type(layer).__name__}.{name} is not a tensor")
    return p


# Layers Opacus has no grad sampler for, and what to use instead.
REPLACEMENTS = {
    "MultiheadAttention": "opacus.layers.DPMultiheadAttention",
    "LSTM": "opacus.layers.DPLSTM",
    "GRU": "opacus.layers.DPGRU",
    "RNN": "opacus.layers.DPRNN",
}


def _clippable_layers(model: nn.Module, samplers: Mapping[type, object]) -> list[nn.Module]:
    """The model's trainable layers; refuse any parameter we could not clip per sample.

    Linear and Conv2d layers take fedsilo's fast path (fedsilo.task.clipping); any other
    layer type Opacus has a grad sampler for takes Opacus's.
    """
    layers: list[nn.Module] = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        kind = type(module).__name__
        if not isinstance(module, SUPPORTED) and type(module) not in samplers:
            instead = REPLACEMENTS.get(kind)
            raise ConfigError(
                f"Layer {name or kind} ({kind}) has parameters whose per-example gradients "
                "neither fedsilo nor Opacus can compute, so DP-SGD cannot clip them; "
                + (
                    f"use {instead}."
                    if instead
                    else "use layers Opacus supports (Linear, "
                    "Conv1d/2d/3d, LayerNorm, GroupNorm, InstanceNorm, Embedding, ...)."
                )
            )
        layers.append(module)
    return layers


def check_private_state(model: nn.Module) -> None:
    """Refuse a model holding state that training could fit to private data outside DP.

    DP-SGD privatises gradients only. A BatchNorm layer mixes the examples of a batch
    (so no per-example gradient bounds any one example's influence) and, like an
    InstanceNorm tracking running statistics, keeps running means of the data in its
    buffers, which would leave the site un-noised in the state dict. Any other buffer
    saved in the state dict is refused too. Buffers that are not saved (scatnet's fixed
    filters: `persistent=False`) never leave the site and are allowed.

    Raises:
        ConfigError: naming the first such module and buffer.
    """
    norms = nn.modules.batchnorm._NormBase
    for name, module in model.named_modules():
        where = f"Layer {name or '(model)'} ({type(module).__name__})"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(
                f"{where} normalises over the batch and keeps running statistics of the "
                "training data, which DP-SGD does not privatise; use GroupNorm or LayerNorm."
            )
        if isinstance(module, norms) and module.track_running_stats:
            raise ConfigError(
                f"{where} keeps running statistics of the training data, which DP-SGD does "
                "not privatise; use track_running_stats=False, GroupNorm or LayerNorm."
            )
        for buffer, _ in module.named_buffers(recurse=False):
            if buffer not in module._non_persistent_buffers_set:
                raise ConfigError(
                    f"{where} saves buffer `{buffer}` in its state dict, which DP-SGD does "
                    "not privatise; register fixed buffers with persistent=False, or make "
                    "it a parameter."
                )


def check_trainable(task: Task, *, seed: int = 0) -> None:
    """Refuse, before any site trains, a task DP-SGD cannot train.

    Runs the task's forward check (shapes, per-example loss), then the checks each
    DPTrainer makes: no state outside DP (check_private_state) and per-example
    gradients for every trained layer.

    Raises:
        ConfigError: naming the first problem and its fix.
    """
    model = task.forward_check(seed=seed)
    check_private_state(model)
    _clippable_layers(model, opacus_samplers())


def sample_rate(n: int, expected_batch_size: int) -> float:
    """Poisson sampling rate q = B / N, at most 1."""
    return min(1.0, expected_batch_size / n)


def steps_per_epoch(n: int, expected_batch_size: int) -> int:
    """Steps that see each example once in expectation: round(1 / q), at least 1."""
    return max(1, round(n / expected_batch_size))


@torch.no_grad()
def predict(
    model: nn.Module, data: Dataset, *, batch_size: int = 2048, device: torch.device | None = None
) -> torch.Tensor:
    """The logits of `model` for every example of `data`, on the CPU."""
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    parts = [
        model(data.x[start : start + batch_size].to(device)).float().cpu()
        for start in range(0, len(data), batch_size)
    ]
    return torch.cat(parts)


def evaluate(
    model: nn.Module,
    data: Dataset,
    *,
    loss: LossFn = cross_entropy,
    batch_size: int = 2048,
    device: torch.device | None = None,
) -> tuple[float, float]:
    """Mean loss (the task's, cross-entropy by default) and accuracy of `model` on `data`."""
    return loss_and_accuracy(
        predict(model, data, batch_size=batch_size, device=device), data.y, loss
    )


@torch.no_grad()
def loss_and_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, loss: LossFn = cross_entropy
) -> tuple[float, float]:
    """Mean per-example loss and the fraction of argmax predictions that are right."""
    mean_loss = float(loss(logits, labels).mean())
    correct = int((logits.argmax(dim=1) == labels).sum())
    return mean_loss, correct / len(labels)


def non_finite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of a state dict whose tensors hold NaN or infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when available, else cpu; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "`device` is cuda but this torch has no CUDA device "
            f"(torch {torch.__version__}). Use --device cpu or install a CUDA build (README)."
        )
    return torch.device(name)
