"""Models by name. All are Opacus-compatible: no BatchNorm; tanh or no activations.

Tanh ("tempered sigmoid") activations keep activations bounded, which suits
DP-SGD's clipping (Papernot et al., "Tempered Sigmoid Activations for Deep
Learning with Differential Privacy", AAAI 2021).

`scatnet`, the default for 1x28x28 images, is Tramer and Boneh's ScatterNet +
linear model ("Differentially Private Learning Needs Better Features (or Much More
Data)", ICLR 2021): a fixed scattering transform and GroupNorm without parameters
(`front`: data independent, so it costs no privacy), then one Linear layer
(`head`, the only thing trained). Trainers and evaluators compute the
front once per dataset (`split_front`) and train and evaluate the head on the
features.
"""

from __future__ import annotations

import torch
from torch import nn

from fedsilo.errors import ConfigError
from fedsilo.task.scattering import Scattering2D


class MLP(nn.Module):
    """Two-layer tanh MLP for flat inputs (digits: 64 -> 64 -> 10)."""

    def __init__(self, in_features: int = 64, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


class CNN(nn.Module):
    """The 26k-parameter tanh CNN for 28x28 images of Papernot et al. (2021), Table 1."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 8, stride=2, padding=3),
            nn.Tanh(),
            nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, stride=2),
            nn.Tanh(),
            nn.MaxPool2d(2, 1),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


class ScatterFeatures(nn.Module):
    """ScatterNet's fixed part: scattering (J=2, L=8: 81 x 7 x 7), GroupNorm, flattened.

    GroupNorm without affine parameters normalises each example on its own, so it
    is as fixed and data-independent as the scattering; 27 groups is Tramer and
    Boneh's choice for linear ScatterNet models (their `ScatterLinear`).
    """

    def __init__(self, groups: int = 27) -> None:
        super().__init__()
        self.scattering = Scattering2D((28, 28), J=2, L=8)
        channels = self.scattering.out_channels
        self.norm = nn.GroupNorm(groups, channels, affine=False)
        self.out_features = channels * 7 * 7
        self.cache_key = f"{self.scattering.cache_key}-groupnorm{groups}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.scattering(x)).flatten(1)  # type: ignore[no-any-return]


class ScatterNet(nn.Module):
    """ScatterNet + linear: fixed `front` (ScatterFeatures), one trained Linear `head`."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.front = ScatterFeatures()
        self.head = nn.Linear(self.front.out_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.front(x))  # type: ignore[no-any-return]


def split_front(model: nn.Module) -> tuple[ScatterFeatures | None, nn.Module]:
    """(fixed front, trained head) of a model; (None, model) when all of it trains."""
    if isinstance(model, ScatterNet):
        return model.front, model.head
    return None, model


def resolve_model_name(model: str, dataset_shape: tuple[int, ...]) -> str:
    """`auto` picks mlp for flat inputs and scatnet for 1x28x28 images."""
    if model != "auto":
        return model
    return "scatnet" if dataset_shape == (1, 28, 28) else "mlp"


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, *, seed: int
) -> nn.Module:
    """Build a model with weights drawn from `seed` (the same on server and sites).

    Weights are drawn on the CPU from the CPU default generator, seeded inside a fork
    of its state and restored after: no global generator, CPU or CUDA, is left changed
    (`torch.manual_seed` would also seed every CUDA generator, and leave it seeded).
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        if name == "mlp":
            in_features = 1
            for d in input_shape:
                in_features *= d
            return MLP(in_features=in_features, num_classes=num_classes)
        if name == "cnn":
            if input_shape != (1, 28, 28):
                raise ConfigError(
                    f"model `cnn` needs 1x28x28 inputs, got {input_shape}; use --model mlp."
                )
            return CNN(num_classes=num_classes)
        if name == "scatnet":
            if input_shape != (1, 28, 28):
                raise ConfigError(
                    f"model `scatnet` needs 1x28x28 inputs, got {input_shape}; use --model mlp."
                )
            return ScatterNet(num_classes=num_classes)
        raise ConfigError(f"Unknown model {name!r}. Use mlp, cnn, scatnet or auto.")
