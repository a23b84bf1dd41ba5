"""The server's side of a local-DP round: send the global model, FedAvg the DP updates.

Each site trains its own DP-SGD round and sends its model; the reply book validates
the replies (fedsilo.server.replies) and SiteReports' wrapped FedAvg averages them at
bounded weights (fedsilo.server.strategy). The
distributed-DP round (fedsilo.server.secure_round.SecureRounds) has the same face:
`run_round`, the optimizer state `velocity` the run directory keeps for --resume, and
`stage_seconds`, the last round's time per protocol stage that metrics.jsonl records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedsilo.server.strategy import SiteReports

Exchange = Callable[[Grid, Iterable[Message]], list[Message]]


@dataclass
class LocalRounds:
    """Local-DP rounds of one run."""

    strategy: SiteReports
    exchange: Exchange
    velocity: torch.Tensor | None = field(default=None, repr=False)  # FedAvg keeps none
    stage_seconds: dict[str, float] = field(default_factory=dict)  # one exchange: none
    why_not: str = ""  # a local round that released nothing: its sites' failures say why

    def run_round(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> ArrayRecord | None:
        """One round; the new global model, or None when no site sent a usable update."""
        sent = self.strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        new_arrays, _ = self.strategy.aggregate_train(server_round, self.exchange(grid, sent))
        return new_arrays
