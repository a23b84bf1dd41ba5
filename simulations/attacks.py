"""Hostile virtual sites: `fedsilo simulate --hostile-sites K:KIND`, to measure a rule first.

The last K virtual sites of a simulation attack (site-(n-K) .. site-(n-1)); the others
are honest. Each hostile site trains with DP-SGD as every site does (its ledger
records a real spend), then attacks:

- `sign-flip:F`: sends the global model plus -F times its update;
- `noise:S`: adds Gaussian noise of standard deviation S to every parameter it sends;
- `label-flip`: trains on its data with every label y replaced by (y + 1) mod classes;
- `free-ride`: sends the global model back unchanged (it learns without contributing).

Only `fedsilo simulate` makes hostile sites: the attack is a property of a virtual
site (fedsilo.simulations.sites.SimulatedSites), never of the run config a deployed
site receives, so no server can make a real site attack. The run records which sites
were hostile and how (simulation.json for `--resume`, and summary.json's `hostile`),
so no result counts them as honest. Attack simulation is for local DP, where the
server sees each site's model and a robust rule (fedsilo.server.robust) can act.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedsilo.clients.site_env import Tamper
from fedsilo.errors import ConfigError
from fedsilo.task.data import Dataset

KINDS = "sign-flip:F, noise:S, label-flip or free-ride"
HOSTILE_KEY = "hostile"  # simulation.json's record of them


@dataclass(frozen=True)
class Hostile:
    """K hostile virtual sites and their attack."""

    count: int
    kind: str  # "sign-flip" | "noise" | "label-flip" | "free-ride"
    strength: float = 0.0  # sign-flip: F; noise: S

    @staticmethod
    def parse(text: str) -> Hostile:
        """Parse `K:sign-flip:F`, `K:noise:S`, `K:label-flip` or `K:free-ride`."""
        count, _, attack = text.strip().partition(":")
        kind, _, arg = attack.partition(":")
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(
                f"`--hostile-sites` must be K:KIND with K >= 1 hostile sites. Found {text!r}; "
                "use e.g. 2:sign-flip:10."
            )
        if kind in ("label-flip", "free-ride") and not arg:
            return Hostile(int(count), kind)
        if kind in ("sign-flip", "noise"):
            try:
                strength = float(arg)
            except ValueError:
                strength = float("nan")
            if strength > 0 and strength != float("inf"):
                return Hostile(int(count), kind, strength)
            what = "F, the factor" if kind == "sign-flip" else "S, the standard deviation"
            raise ConfigError(
                f"`--hostile-sites` {kind} needs {what}, a finite number > 0. Found {text!r}; "
                f"use e.g. {count}:{kind}:{10 if kind == 'sign-flip' else 1}."
            )
        raise ConfigError(f"Unknown attack in `--hostile-sites` {text!r}. Use K:{KINDS}.")

    @property
    def attack(self) -> str:
        """The attack as given (without K)."""
        return f"{self.kind}:{self.strength:g}" if self.strength else self.kind

    def __str__(self) -> str:
        return f"{self.count}:{self.attack}"

    def partitions(self, sites: int) -> range:
        """The hostile sites' partitions: the last `count` of `sites`."""
        return range(sites - self.count, sites)

    def check(self, sites: int, *, distributed: bool) -> None:
        """Refuse hostile sites a run cannot have."""
        if distributed:
            raise ConfigError(
                "`--hostile-sites` simulates attacks on local-DP runs, where the server sees "
                "each site's model and a robust --aggregation rule can act on it. With --dp "
                "distributed the server sees only the secure sum; drop --hostile-sites or use "
                "--dp local."
            )
        if self.count >= sites:
            raise ConfigError(
                f"`--hostile-sites` {self} makes {self.count} of the {sites} sites hostile; "
                "keep at least one honest site (raise --sites or lower K)."
            )

    def by_site(self, sites: int) -> dict[str, str]:
        """Each hostile site's name and attack (summary.json's `hostile`)."""
        return {f"site-{pid}": self.attack for pid in self.partitions(sites)}


def tamper(hostile: Hostile, seed: int) -> Tamper:
    """What a hostile site does to the model it trained in a round, before it sends it."""

    def attack(
        global_state: Mapping[str, torch.Tensor],
        trained: Mapping[str, torch.Tensor],
        server_round: int,
    ) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + server_round)
        out = {}
        for key, value in trained.items():
            base = global_state[key].to(value.dtype)
            if not torch.is_floating_point(value) or hostile.kind == "label-flip":
                out[key] = value  # label-flip attacks the data, not the model
            elif hostile.kind == "sign-flip":
                out[key] = base - hostile.strength * (value - base)
            elif hostile.kind == "noise":
                noise = torch.randn(value.shape, generator=gen, dtype=torch.float32)
                out[key] = value + (hostile.strength * noise).to(value.dtype)
            else:  # free-ride
                out[key] = base.clone()
        return out

    return attack


def flip_labels(data: Dataset) -> Dataset:
    """`data` with every label y replaced by (y + 1) mod its classes (label-flip)."""
    flipped = (data.y + 1) % data.num_classes
    return Dataset(data.x, flipped, data.num_classes, f"{data.source} (labels flipped)")
