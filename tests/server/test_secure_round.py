"""Distributed DP over SecAgg+: the server's round driven against real ClientApps in-process.

`SiteGrid` hands each message to the ClientApp's `train` of a simulated site (its own
Context, kept between messages as a SuperNode keeps it), so every stage runs the real
site and server code: ledgers, DP rounding and noise, masking, unmasking.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsilo import protocol
from fedsilo.clients.client_app import train
from fedsilo.config import RunConfig
from fedsilo.privacy import ledger
from fedsilo.privacy.distributed import Quantizer
from fedsilo.privacy.policy import SitePolicy
from fedsilo.privacy.secagg import SecAggSite
from fedsilo.server import secure_round as server_side
from fedsilo.server.evaluate import global_model
from fedsilo.server.secure_round import SecureRounds
from fedsilo.server.strategy import SiteReports
from fedsilo.simulations.ledgers import simulated_ledger, write_site_policies
from fedsilo.simulations.sites import SimulatedSites

SITES = 4
Drop = Callable[[int, str], bool]  # (node, stage) -> the reply is lost


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class SiteGrid:
    """A Grid whose nodes are simulated sites answering in this process."""

    def __init__(self, cfg: RunConfig, drop: Drop | None = None) -> None:
        self.nodes = {
            100 + pid: Context(
                run_id=1,
                node_id=100 + pid,
                node_config={"partition-id": pid, "num-partitions": SITES},
                state=RecordDict(),
                run_config=cfg.to_flwr(),
            )
            for pid in range(SITES)
        }
        self.resolve = SimulatedSites(cfg.run_dir)
        self.drop = drop or (lambda node, stage: False)
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            node = msg.metadata.dst_node_id
            stage = str(msg.content[protocol.CONFIG].get(protocol.SECAGG_STAGE, ""))
            reply = train(msg, self.nodes[node], self.resolve)
            if not self.drop(node, stage):
                self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def distributed_cfg(tmp_path: Path, **kw: object) -> RunConfig:
    values: dict[str, object] = {
        "rounds": 2,
        "batch_size": 100,
        "dp": "distributed",
        "dp_min_sites": 3,
        "min_sites": 3,
        "run_dir": str(tmp_path),
        "run_id": "r1",
        **kw,
    }
    return RunConfig(**values)  # type: ignore[arg-type]


def rounds_for(cfg: RunConfig) -> SecureRounds:
    strategy = SiteReports(
        FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1),
        names=lambda: {100 + p: f"site-{p}" for p in range(SITES)},
    )
    return SecureRounds(
        cfg,
        run=cfg.run_id,
        strategy=strategy,
        exchange=lambda g, m: g.pull_messages(g.push_messages(m)),
    )


def spy(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[int, np.ndarray], dict[str, object]]:
    """Record each site's true contribution (by node) and what the server unmasks."""
    contributions: dict[int, np.ndarray] = {}
    seen: dict[str, object] = {}
    real_masked, real_unmask = SecAggSite.masked, server_side.unmask_sum

    def site_masked(self, vector, ciphertexts):  # type: ignore[no-untyped-def]
        contributions[self.node] = np.asarray(vector).view(np.int64).copy()
        return real_masked(self, vector, ciphertexts)

    def server_unmask(tag, masked, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen["masked"] = dict(masked)
        seen["total"] = real_unmask(tag, masked, *args, **kwargs)
        return seen["total"]

    monkeypatch.setattr(SecAggSite, "masked", site_masked)
    monkeypatch.setattr(server_side, "unmask_sum", server_unmask)
    return contributions, seen


def test_the_server_only_holds_masked_vectors_and_their_sum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = distributed_cfg(tmp_path)
    write_site_policies(tmp_path, [SitePolicy(max_epsilon=8.0, distributed_min_sites=3)] * SITES)
    contributions, seen = spy(monkeypatch)
    start = global_model(cfg).state_dict()
    rounds = rounds_for(cfg)
    new = rounds.run_round(SiteGrid(cfg), 1, ArrayRecord(start))
    assert new is not None
    vectors = [contributions[n] for n in sorted(contributions)]
    assert len(vectors) == SITES
    total = seen["total"]
    assert np.array_equal(total, np.sum(vectors, axis=0))  # exact: integers mod 2^64
    masked = seen["masked"]
    assert isinstance(masked, dict) and len(masked) == SITES
    for vec in masked.values():  # no masked vector is near any site's contribution
        for own in vectors:
            assert np.mean(np.abs(vec.view(np.int64) - own) < 2**50) < 0.01
    # The model moved by lr x momentum-free step of the decoded mean gradient.
    q = Quantizer(dim=sum(t.numel() for t in start.values()), clip=cfg.max_grad_norm)
    mean = total.astype(np.float64) / q.scale / (SITES * cfg.batch_size)
    flat_old = np.concatenate([t.reshape(-1).numpy() for t in start.values()])
    flat_new = np.concatenate([t.reshape(-1).numpy() for t in new.to_torch_state_dict().values()])
    np.testing.assert_allclose(flat_new, flat_old - cfg.lr * mean, atol=1e-5)
    assert rounds.strategy.last_round_sites == [f"site-{p}" for p in range(SITES)]
    # Each site's ledger records the mode, its noise share and the trust assumption.
    spend = ledger.read(simulated_ledger(tmp_path, 0)).spends[0]
    assert (spend.mode, spend.min_sites, spend.sites, spend.event.steps) == ("distributed", 3, 4, 1)
    assert spend.noise_share == pytest.approx(spend.event.noise_multiplier / 3**0.5)


def test_a_site_dropping_after_its_masked_vector_is_computed_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = distributed_cfg(tmp_path)
    write_site_policies(tmp_path, [SitePolicy(max_epsilon=8.0, distributed_min_sites=3)] * SITES)
    contributions, seen = spy(monkeypatch)
    rounds = rounds_for(cfg)
    grid = SiteGrid(cfg, drop=lambda node, stage: node == 102 and stage == "masked")
    new = rounds.run_round(grid, 1, ArrayRecord(global_model(cfg).state_dict()))
    assert new is not None
    masked = seen["masked"]
    assert isinstance(masked, dict) and sorted(masked) == [100, 101, 103]
    # site-2 computed (and spent) its contribution, but it is not in the sum.
    assert sorted(contributions) == [100, 101, 102, 103]
    survivors = [contributions[n] for n in (100, 101, 103)]
    assert np.array_equal(seen["total"], np.sum(survivors, axis=0))
    assert rounds.strategy.last_round_sites == ["site-0", "site-1", "site-3"]
    assert [f.site for f in rounds.strategy.failures] == ["site-2"]


def test_fewer_sites_than_the_noise_assumes_release_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = distributed_cfg(tmp_path, dp_min_sites=4, min_sites=4)
    write_site_policies(tmp_path, [SitePolicy(max_epsilon=8.0, distributed_min_sites=4)] * SITES)
    _, seen = spy(monkeypatch)
    grid = SiteGrid(cfg, drop=lambda node, stage: node == 101 and stage == "masked")
    assert rounds_for(cfg).run_round(grid, 1, ArrayRecord(global_model(cfg).state_dict())) is None
    assert "total" not in seen  # never unmasked


def test_sites_refuse_distributed_dp_unless_their_policy_allows_it(tmp_path: Path) -> None:
    cfg = distributed_cfg(tmp_path)
    policies = [SitePolicy(max_epsilon=8.0)] * 2 + [
        SitePolicy(max_epsilon=8.0, distributed_min_sites=4)
    ] * 2
    write_site_policies(tmp_path, policies)
    rounds = rounds_for(cfg)
    assert rounds.run_round(SiteGrid(cfg), 1, ArrayRecord(global_model(cfg).state_dict())) is None
    reasons = {r.site: r.reason for r in rounds.strategy.refusals}
    assert "policy-distributed-min-sites" in reasons["site-0"]
    assert "requires at least 4" in reasons["site-3"] and "Raise dp-min-sites" in reasons["site-3"]
    for pid in range(SITES):  # refused at setup: nothing spent
        assert ledger.read(simulated_ledger(tmp_path, pid)).spends == []


def test_a_sum_no_clipped_sites_could_send_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A hostile site masks a vector far beyond its clipped gradients: the server cannot
    see it alone, but the sum's norm gives it away and the round releases no model."""
    cfg = distributed_cfg(tmp_path)
    write_site_policies(tmp_path, [SitePolicy(max_epsilon=8.0, distributed_min_sites=3)] * SITES)
    real = SecAggSite.masked

    def hostile(self, vector, ciphertexts):  # type: ignore[no-untyped-def]
        if self.node == 101:
            vector = vector + np.uint64(10**15)
        return real(self, vector, ciphertexts)

    monkeypatch.setattr(SecAggSite, "masked", hostile)
    new = rounds_for(cfg).run_round(SiteGrid(cfg), 1, ArrayRecord(global_model(cfg).state_dict()))
    assert new is None
    assert "exceeds what clipped, noised sites can send" in caplog.text


def test_sites_refuse_to_spend_when_fewer_sites_share_keys_than_the_noise_assumes(
    tmp_path: Path,
) -> None:
    """A server that goes on below min-sites (here: it was told 2) after site-3 dropped at
    the key exchange: every site sees 3 senders, fewer than its 4, and spends nothing."""
    import dataclasses

    cfg = distributed_cfg(tmp_path, dp_min_sites=4, min_sites=4)
    write_site_policies(tmp_path, [SitePolicy(max_epsilon=8.0, distributed_min_sites=4)] * SITES)
    server = rounds_for(dataclasses.replace(cfg, min_sites=2))
    grid = SiteGrid(cfg, drop=lambda node, stage: node == 103 and stage == "share-keys")
    assert server.run_round(grid, 1, ArrayRecord(global_model(cfg).state_dict())) is None
    reasons = {r.site: r.reason for r in server.strategy.refusals}
    assert sorted(reasons) == ["site-0", "site-1", "site-2"]
    assert all("3 site(s) take part in this round" in r for r in reasons.values())
    for pid in range(SITES):
        assert ledger.read(simulated_ledger(tmp_path, pid)).spends == []
