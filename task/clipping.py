"""Per-sample gradient norms and clipped gradient sums for Linear and Conv2d layers.

Pure math, no state. For a layer with input activations `a` and the gradient of the
summed loss with respect to its output `g`, example i's weight gradient is
`g_i^T a_i` (Linear) or `g_i^T unfold(a_i)` (Conv2d). DP-SGD needs only two things
from these: each example's squared norm, and the sum over examples of the clipped
gradients `sum_i c_i G_i`. Neither needs the whole batch of per-sample gradients
in memory for a Linear layer on flat inputs:

- "ghost" norm: ||g_i a_i^T||_F^2 = ||g_i||^2 ||a_i||^2 (Goodfellow, "Efficient
  Per-Example Gradient Computations", 2015; Li et al., "Large Language Models Can Be
  Strong Differentially Private Learners", ICLR 2022, Sec. 4);
- book-keeping: sum_i c_i g_i a_i^T = (c * g)^T a, one matrix product (Bu et al.,
  "Differentially Private Optimization on Large Model at Small Cost", ICML 2023).

Convolutions (and Linear layers on sequences) materialise per-sample gradients with
one batched matrix product over the unfolded input, as Opacus's hooks do; for the
small CNNs here that is cheaper than the T^2 ghost norm.

Every other layer with parameters that Opacus can compute per-sample gradients for
(LayerNorm, GroupNorm, InstanceNorm, Embedding, Conv1d/Conv3d, RMSNorm, ...) goes
through Opacus's own grad sampler for its type (`opacus_layer_grads`), from the same
recorded input and output gradient, so one model can mix both; a layer neither
supports is refused before training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from opacus.grad_sample import GradSampleModule
from torch import nn

from fedsilo.errors import ConfigError

# Layers whose parameters this module knows how to clip. Others are refused, never
# trained without clipping.
SUPPORTED = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class LayerGrads:
    """One layer's per-sample gradient information for a batch of B examples."""

    sq_norms: torch.Tensor  # B: squared norm of each example's gradient (weight and bias)
    # Either materialised per-sample gradients (B x weight shape, B x bias shape) ...
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    # ... or the factors for book-keeping: grad = g^T a (Linear on flat inputs) ...
    g: torch.Tensor | None = None
    a: torch.Tensor | None = None
    # ... or, from an Opacus grad sampler, per-sample gradients by parameter name.
    others: dict[str, torch.Tensor] | None = None


def layer_grads(layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> LayerGrads:
    """Per-sample squared norms (and what `clipped_sum` needs) for one layer.

    Args:
        layer: an nn.Linear or nn.Conv2d.
        a: the layer's input for the batch (B x ...).
        g: the gradient of the *summed* loss with respect to the layer's output.
    """
    has_bias = getattr(layer, "bias", None) is not None
    if isinstance(layer, nn.Linear) and a.dim() == 2:
        g_sq = g.pow(2).sum(1)
        sq = g_sq * a.pow(2).sum(1)
        if has_bias:
            sq = sq + g_sq
        return LayerGrads(sq_norms=sq, weight=None, bias=None, g=g, a=a)
    if isinstance(layer, nn.Linear):
        gs, as_ = g.flatten(1, -2), a.flatten(1, -2)  # B x T x out, B x T x in
        w = torch.bmm(gs.transpose(1, 2), as_)
        b = gs.sum(1) if has_bias else None
    elif isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise ConfigError(
                f"Per-sample clipping supports Conv2d with groups=1 and zero padding, got {layer}."
            )
        w = _conv_per_sample_weight(layer, a, g)
        b = g.sum((2, 3)) if has_bias else None
    else:
        raise ConfigError(f"No per-sample clipping rule for {type(layer).__name__}.")
    sq = _sq(w)
    if b is not None:
        sq = sq + _sq(b)
    return LayerGrads(sq_norms=sq, weight=w, bias=b)


def clipped_sum(
    grads: LayerGrads, factors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sum_i factors_i * (example i's weight gradient, bias gradient)."""
    if grads.g is not None and grads.a is not None:
        scaled = grads.g * factors[:, None]
        return scaled.t() @ grads.a, scaled.sum(0)
    if grads.weight is None:
        raise ValueError("LayerGrads carries neither per-sample gradients nor factors.")
    b = grads.weight.shape[0]
    w = (factors @ grads.weight.reshape(b, -1)).view(grads.weight.shape[1:])
    bias = None if grads.bias is None else factors @ grads.bias.reshape(b, -1)
    return w, bias


def opacus_samplers() -> dict[type, Any]:
    """Opacus's per-sample gradient functions by layer type (opacus.grad_sample)."""
    return dict(GradSampleModule.GRAD_SAMPLERS)


def opacus_layer_grads(
    layer: nn.Module, inputs: list[torch.Tensor], g: torch.Tensor, sampler: Any
) -> LayerGrads:
    """Per-sample gradients of `layer`'s own trainable parameters by Opacus's `sampler`.

    `g` is the gradient of the *summed* loss with respect to the layer's output, which is
    what Opacus's samplers take as `backprops` (its hooks scale a mean loss back to this).
    """
    per_param = sampler(layer, inputs, g)
    others = {
        name: per_param[p]
        for name, p in layer.named_parameters(recurse=False)
        if p.requires_grad and p in per_param
    }
    if not others:
        raise ConfigError(f"Opacus computed no per-sample gradient for {type(layer).__name__}.")
    sq = torch.stack([_sq(v) for v in others.values()]).sum(0)
    return LayerGrads(sq_norms=sq, weight=None, bias=None, others=others)


def clipped_param_sums(grads: LayerGrads, factors: torch.Tensor) -> dict[str, torch.Tensor]:
    """sum_i factors_i * (example i's gradient), for each parameter name of the layer."""
    if grads.others is not None:
        return {k: torch.einsum("b,b...->...", factors, v) for k, v in grads.others.items()}
    w, b = clipped_sum(grads, factors)
    return {"weight": w} if b is None else {"weight": w, "bias": b}


def clip_factors(sq_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """min(1, C / ||G_i||), Opacus's formula (its 1e-6 guards a zero norm)."""
    return (max_grad_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)


def _conv_per_sample_weight(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """B x out x in x kh x kw: each example's weight gradient of a Conv2d.

    A single-channel input (a CNN's first layer) is expanded ~(kh*kw/stride^2)-fold by
    `unfold`; a strided view contracted by einsum is about 2x faster there on CPU.
    Wider inputs use unfold + bmm, which is faster for them (bench/dp_throughput.py).
    """
    (sh, sw), (kh, kw) = layer.stride, layer.kernel_size
    pad = layer.padding
    if layer.in_channels == 1 and layer.dilation == (1, 1) and not isinstance(pad, str):
        ph, pw = int(pad[0]), int(pad[1])
        padded = nn.functional.pad(a, (pw, pw, ph, ph))
        view = padded.unfold(2, kh, sh).unfold(3, kw, sw)  # B x in x H' x W' x kh x kw
        view = view[:, :, : g.shape[2], : g.shape[3]]
        return torch.einsum("bchwij,bohw->bocij", view, g)
    u = nn.functional.unfold(
        a,
        layer.kernel_size,
        dilation=layer.dilation,
        padding=layer.padding,  # type: ignore[arg-type]
        stride=layer.stride,
    )  # B x (in * kh * kw) x T
    w = torch.bmm(g.flatten(2), u.transpose(1, 2))
    return w.view(a.shape[0], *layer.weight.shape)


def _sq(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(t.shape[0], -1)
    return torch.einsum("bi,bi->b", flat, flat)
