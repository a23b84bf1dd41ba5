"""A site's last local-DP reply, kept to resend when a resumed server asks again. No Flower.

A local-DP reply is a DP release: the site's noised model after the round its ledger
recorded. Sending the same bytes again is post-processing and costs no budget, so a
site keeps its last reply (with the run and round it answers) beside its ledger,
readable by the site alone (0600), and resends it when a server that crashed in that
round resumes and asks for it again, instead of refusing a round it already spent.
The round is then not lost: the run's rounds stay whole.

Distributed DP never resends: its reply is the site's input masked for one set of
neighbours, and masking the same input again for another set would let the server
subtract the two and remove the masks (fedsilo.clients.secure_round refuses instead).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

SUFFIX = ".last-reply.pt"


@dataclass(frozen=True)
class KeptReply:
    """What a site sent for one round of one run."""

    run: str
    round: int
    arrays: dict[str, torch.Tensor]
    metrics: dict[str, int | float]
    ledger_head: str


def reply_path(ledger: Path) -> Path:
    """Where the site beside `ledger` keeps its last reply."""
    return ledger.with_name(ledger.name + SUFFIX)


def keep(ledger: Path, reply: KeptReply) -> None:
    """Keep `reply` as the site's last one (written whole, then renamed; mode 0600)."""
    path = reply_path(ledger)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        torch.save(
            {
                "run": reply.run,
                "round": reply.round,
                "arrays": reply.arrays,
                "metrics": reply.metrics,
                "ledger_head": reply.ledger_head,
            },
            f,
        )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def kept(ledger: Path, *, run: str, server_round: int) -> KeptReply | None:
    """The reply the site kept for `server_round` of `run`, if that is its last one.

    A file that cannot be read (cut off, or not one of these) is no kept reply: the
    site then refuses the round as one it already trained, as it would without it.
    """
    try:
        # Mapped: a site-round that is not a resend reads only the run and round.
        raw = torch.load(reply_path(ledger), weights_only=True, mmap=True)
        reply = KeptReply(
            run=str(raw["run"]),
            round=int(raw["round"]),
            arrays=dict(raw["arrays"]),
            metrics=dict(raw["metrics"]),
            ledger_head=str(raw["ledger_head"]),
        )
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError):
        return None
    return reply if (reply.run, reply.round) == (run, server_round) else None
