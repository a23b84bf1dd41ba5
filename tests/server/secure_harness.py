"""A distributed-DP federation in one process, for tests: real ClientApps, real ledgers.

`SiteGrid` hands each message to the ClientApp's `train` of a simulated site (its own
Context, kept between messages as a SuperNode keeps it), so every stage runs the real
site and server code: identities, ledgers, DP rounding and noise, masking, unmasking.
`Wire` sits between the server and the grid and records every message; a test that
plays a hostile server rewrites what the server sends (`server_sends`), one that plays
a hostile site rewrites that site's reply (`SiteGrid(hostile=...)`).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsilo import protocol
from fedsilo.clients.client_app import train
from fedsilo.config import RunConfig
from fedsilo.privacy import ledger
from fedsilo.privacy.distributed import planned
from fedsilo.privacy.identity import verify_signed
from fedsilo.privacy.policy import SitePolicy
from fedsilo.privacy.secagg_site import SecAggSite
from fedsilo.server import secure_round as server_side
from fedsilo.server.evaluate import global_model
from fedsilo.server.run_dir import RunDir
from fedsilo.server.secure_round import SecureRounds
from fedsilo.server.strategy import SiteReports
from fedsilo.simulations.identities import write_simulated_site_identities
from fedsilo.simulations.ledgers import simulated_ledger, write_site_policies
from fedsilo.simulations.sites import SimulatedSites

SITES = 4
Drop = Callable[[int, str], bool]  # (node, stage) -> the reply is lost
Hostile = Callable[[int, str, Message], Message]  # a site rewrites its own reply
Sends = Callable[[str, int, dict[str, Any]], dict[str, Any] | None]  # the server's message


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def node(pid: int) -> int:
    return 100 + pid


class SiteGrid:
    """A Grid whose nodes are simulated sites answering in this process."""

    def __init__(
        self,
        cfg: RunConfig,
        drop: Drop | None = None,
        hostile: Hostile | None = None,
        sites: int = SITES,
    ) -> None:
        self.nodes = {
            node(pid): Context(
                run_id=1,
                node_id=node(pid),
                node_config={"partition-id": pid, "num-partitions": sites},
                state=RecordDict(),
                run_config=cfg.to_flwr(),
            )
            for pid in range(sites)
        }
        self.resolve = SimulatedSites(cfg.run_dir)
        self.drop = drop or (lambda n, stage: False)
        self.hostile = hostile
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            dst = msg.metadata.dst_node_id
            stage = str(msg.content[protocol.CONFIG].get(protocol.SECAGG_STAGE, ""))
            reply = train(msg, self.nodes[dst], self.resolve)
            if self.hostile is not None:
                reply = self.hostile(dst, stage, reply)
            if not self.drop(dst, stage):
                self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


class Wire:
    """Every message of the rounds, by stage; `server_sends` may rewrite or drop one."""

    def __init__(self, server_sends: Sends | None = None) -> None:
        self.server_sends = server_sends
        self.sent: dict[str, list[Message]] = {}
        self.replies: dict[str, list[Message]] = {}

    def exchange(self, grid: SiteGrid, messages: Iterable[Message]) -> list[Message]:
        out = []
        stage = ""
        for msg in messages:
            values = dict(msg.content[protocol.CONFIG])
            stage = str(values.get(protocol.SECAGG_STAGE, ""))
            if self.server_sends is not None:
                rewritten = self.server_sends(stage, msg.metadata.dst_node_id, values)
                if rewritten is None:
                    continue
                msg.content[protocol.CONFIG] = ConfigRecord(rewritten)
            out.append(msg)
        self.sent.setdefault(stage, []).extend(out)
        replies = grid.pull_messages(grid.push_messages(out))
        self.replies.setdefault(stage, []).extend(replies)
        return replies

    def refusals(self, stage: str) -> list[str]:
        return [m.error.reason for m in self.replies.get(stage, []) if m.has_error()]


def distributed_cfg(tmp_path: Path, **kw: object) -> RunConfig:
    """A planned distributed-DP run (its noise multiplier calibrated) in `tmp_path`."""
    values: dict[str, object] = {
        "rounds": 2,
        "batch_size": 100,
        "dp": "distributed",
        "dp_min_sites": 3,
        "min_sites": 3,
        "dp_max_sample_rate": 0.25,
        "run_dir": str(tmp_path),
        "run_id": "r1",
        **kw,
    }
    return planned(RunConfig(**values))  # type: ignore[arg-type]


def federation(cfg: RunConfig, *, sites: int = SITES, policies: list[SitePolicy] | None = None):
    """Each simulated site's policy and identity, written where the sites look for them."""
    write_site_policies(
        cfg.run_dir,
        policies or [SitePolicy(max_epsilon=8.0, distributed_min_sites=cfg.dp_min_sites)] * sites,
    )
    write_simulated_site_identities(cfg.run_dir, sites)


def rounds_for(cfg: RunConfig, wire: Wire | None = None, sites: int = SITES) -> SecureRounds:
    strategy = SiteReports(
        FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1),
        names=lambda: {node(p): f"site-{p}" for p in range(sites)},
    )
    wire = wire or Wire()
    return SecureRounds(
        cfg,
        run=cfg.run_id,
        strategy=strategy,
        exchange=wire.exchange,  # type: ignore[arg-type]
        verify=functools.partial(verify_signed, RunDir(cfg.run_dir).federation_ca()),
    )


def start(cfg: RunConfig) -> ArrayRecord:
    return ArrayRecord(global_model(cfg).state_dict())


def spends(cfg: RunConfig, sites: int = SITES) -> list[int]:
    """How many spends each site's ledger holds."""
    return [len(ledger.read(simulated_ledger(cfg.run_dir, p)).spends) for p in range(sites)]


def spy(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[int, np.ndarray], dict[str, object]]:
    """Record each site's true contribution (by node) and what the server unmasks."""
    contributions: dict[int, np.ndarray] = {}
    seen: dict[str, object] = {}
    real_masked, real_unmask = SecAggSite.masked_input, server_side.unmask_sum

    def site_masked(self, vector):  # type: ignore[no-untyped-def]
        contributions[self.node] = np.asarray(vector).view(np.int64).copy()
        return real_masked(self, vector)

    def server_unmask(tag, masked, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen["masked"] = dict(masked)
        seen["total"] = real_unmask(tag, masked, *args, **kwargs)
        return seen["total"]

    monkeypatch.setattr(SecAggSite, "masked_input", site_masked)
    monkeypatch.setattr(server_side, "unmask_sum", server_unmask)
    return contributions, seen


def values_of(msg: Message) -> Mapping[str, Any]:
    """The SECAGG record of a reply, as a dict."""
    return dict(msg.content[protocol.SECAGG])
