"""Models by name. All are Opacus-compatible: no BatchNorm; tanh or no activations.

Tanh ("tempered sigmoid") activations keep activations bounded, which suits
DP-SGD's clipping (Papernot et al., "Tempered Sigmoid Activations for Deep
Learning with Differential Privacy", AAAI 2021).

`ScatterNet`, the default for 1x28x28 images, is Tramer and Boneh's ScatterNet +
linear model ("Differentially Private Learning Needs Better Features (or Much More
Data)", ICLR 2021): a fixed scattering transform and GroupNorm without parameters
(`ScatterFeatures`: data independent, so it costs no privacy), then one Linear layer
(the only thing trained). The built-in task (fedsilo.task.builtin) declares the
features as its fixed `front` and the Linear layer as its model, so trainers and
evaluators compute the front once per dataset and train the head on the features.
"""

from __future__ import annotations

import torch
from torch import nn

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

    OUT_FEATURES = 81 * 7 * 7  # 1 + J*L + L^2*J*(J-1)/2 channels of 7x7 (28 / 2^J)

    def __init__(self, groups: int = 27) -> None:
        super().__init__()
        self.scattering = Scattering2D((28, 28), J=2, L=8)
        channels = self.scattering.out_channels
        self.norm = nn.GroupNorm(groups, channels, affine=False)
        self.out_features = channels * 7 * 7
        if self.out_features != self.OUT_FEATURES:
            raise AssertionError(f"scattering gives {self.out_features} features")

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
