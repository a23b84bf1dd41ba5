"""Distributed DP over SecAgg+: the server's round driven against real ClientApps in-process.

The federation is tests/server/secure_harness.py's: every stage runs the real site and
server code (identities, ledgers, DP rounding and noise, masking, unmasking). The
hostile servers and sites are in test_secure_round_attacks.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedsilo.privacy import ledger
from fedsilo.privacy.distributed import Quantizer
from fedsilo.privacy.policy import SitePolicy
from fedsilo.privacy.secagg_site import SecAggSite
from fedsilo.server.evaluate import global_model
from fedsilo.server.server_app import close_round
from fedsilo.simulations.ledgers import simulated_ledger
from tests.server.secure_harness import (
    SITES,
    SiteGrid,
    Wire,
    distributed_cfg,
    federation,
    rounds_for,
    spends,
    spy,
    start,
)
from tests.server.secure_harness import _task_identity as _task_identity


def test_the_server_only_holds_masked_vectors_and_their_sum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = distributed_cfg(tmp_path)
    federation(cfg)
    contributions, seen = spy(monkeypatch)
    start = global_model(cfg).state_dict()
    rounds = rounds_for(cfg)
    new = rounds.run_round(SiteGrid(cfg), 1, ArrayRecord(start))
    assert new is not None
    vectors = [contributions[n] for n in sorted(contributions)]
    assert len(vectors) == SITES
    total = seen["total"]
    assert np.array_equal(total, np.sum(vectors, axis=0))  # exact: the ring holds the sum
    masked = seen["masked"]
    assert isinstance(masked, dict) and len(masked) == SITES
    ring = 2**24  # 3 bytes a weight here (test_the_honest_round_sums_in_a_ring_narrower_...)
    for vec in masked.values():  # uniform on the ring: near no site's contribution
        assert int(vec.max()) < ring
        for own in vectors:
            assert np.mean(np.abs(vec.astype(np.int64) - own % ring) < ring // 2**14) < 0.01
    # The model moved by lr x momentum-free step of the decoded mean gradient.
    q = Quantizer(dim=sum(t.numel() for t in start.values()), clip=cfg.max_grad_norm)
    mean = total.astype(np.float64) / q.scale / (SITES * cfg.batch_size)
    flat_old = np.concatenate([t.reshape(-1).numpy() for t in start.values()])
    flat_new = np.concatenate([t.reshape(-1).numpy() for t in new.to_torch_state_dict().values()])
    np.testing.assert_allclose(flat_new, flat_old - cfg.lr * mean, atol=1e-5)
    assert rounds.strategy.last_round_sites == [f"site-{p}" for p in range(SITES)]
    stages = ["advertise-keys", "share-keys", "masked-input", "consistency", "unmask"]
    assert list(rounds.stage_seconds) == [*stages, "unmask-sum"]  # metrics.jsonl's record
    # Each site's ledger records the mode, its noise share and the trust assumption.
    spend = ledger.read(simulated_ledger(tmp_path, 0)).spends[0]
    assert (spend.mode, spend.min_sites, spend.sites, spend.event.steps) == ("distributed", 3, 4, 1)
    assert spend.noise_share == pytest.approx(spend.event.noise_multiplier / 3**0.5)


def test_a_site_dropping_after_its_masked_vector_is_computed_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = distributed_cfg(tmp_path)
    federation(cfg)
    contributions, seen = spy(monkeypatch)
    rounds = rounds_for(cfg)
    grid = SiteGrid(cfg, drop=lambda node, stage: node == 102 and stage == "masked-input")
    new = rounds.run_round(grid, 1, ArrayRecord(global_model(cfg).state_dict()))
    assert new is not None
    masked = seen["masked"]
    assert isinstance(masked, dict) and sorted(masked) == [100, 101, 103]
    # site-2 computed (and spent) its contribution, but it is not in the sum.
    assert sorted(contributions) == [100, 101, 102, 103]
    survivors = [contributions[n] for n in (100, 101, 103)]
    assert np.array_equal(seen["total"], np.sum(survivors, axis=0))
    assert rounds.strategy.last_round_sites == ["site-0", "site-1", "site-3"]
    assert [(f.site, f.reason) for f in rounds.strategy.failures] == [
        ("site-2", "masked-input stage: no reply before the round timeout")
    ]


def test_a_site_dropping_after_its_masked_vector_arrived_stays_in_the_sum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its masked vector is in; the others' shares of its self-mask take it out of the
    masks, so the released sum holds its input: the round's sites name it, and its
    failure says at which stage it dropped and that its input was in by then."""
    cfg = distributed_cfg(tmp_path)
    federation(cfg)
    contributions, seen = spy(monkeypatch)
    rounds = rounds_for(cfg)
    grid = SiteGrid(cfg, drop=lambda node, stage: node == 102 and stage == "consistency")
    assert rounds.run_round(grid, 1, ArrayRecord(global_model(cfg).state_dict())) is not None
    assert np.array_equal(seen["total"], np.sum(list(contributions.values()), axis=0))
    assert rounds.strategy.last_round_sites == [f"site-{p}" for p in range(SITES)]
    assert [(f.site, f.reason) for f in rounds.strategy.failures] == [
        ("site-2", "consistency stage, after its masked input arrived: no reply before the "
         "round timeout")
    ]  # fmt: skip


def test_fewer_sites_than_the_noise_assumes_release_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = distributed_cfg(tmp_path, dp_min_sites=4, min_sites=4)
    federation(cfg)
    _, seen = spy(monkeypatch)
    grid = SiteGrid(cfg, drop=lambda node, stage: node == 101 and stage == "masked-input")
    rounds = rounds_for(cfg)
    assert rounds.run_round(grid, 1, ArrayRecord(global_model(cfg).state_dict())) is None
    assert "total" not in seen  # never unmasked
    assert rounds.why_not == (
        "3 site(s) left after the masked-input stage, fewer than 4 (the sites the noise "
        "assumes, and min-sites); nothing was released"
    )  # the run's stop reason (close_round), not the previous round's count of sites
    assert close_round(1, None, rounds.strategy, cfg, _never, rounds.why_not) == rounds.why_not


def test_sites_refuse_distributed_dp_unless_their_policy_allows_it(tmp_path: Path) -> None:
    cfg = distributed_cfg(tmp_path)
    policies = [SitePolicy(max_epsilon=8.0)] * 2 + [
        SitePolicy(max_epsilon=8.0, distributed_min_sites=4)
    ] * 2
    federation(cfg, policies=policies)
    rounds = rounds_for(cfg)
    assert rounds.run_round(SiteGrid(cfg), 1, ArrayRecord(global_model(cfg).state_dict())) is None
    reasons = {r.site: r.reason for r in rounds.strategy.refusals}
    assert "policy-distributed-min-sites" in reasons["site-0"]
    assert "requires at least 4" in reasons["site-3"] and "Raise dp-min-sites" in reasons["site-3"]
    assert spends(cfg) == [0] * SITES  # refused at advertise-keys: nothing spent


def test_a_sum_no_clipped_sites_could_send_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A hostile site masks a vector far beyond its clipped gradients: the server cannot
    see it alone, but the sum's norm gives it away and the round releases no model."""
    cfg = distributed_cfg(tmp_path)
    federation(cfg)
    real = SecAggSite.masked_input

    def hostile(self, vector):  # type: ignore[no-untyped-def]
        if self.node == 101:
            vector = vector + np.uint64(10**15)
        return real(self, vector)

    monkeypatch.setattr(SecAggSite, "masked_input", hostile)
    caplog.set_level(logging.ERROR)
    new = rounds_for(cfg).run_round(SiteGrid(cfg), 1, ArrayRecord(global_model(cfg).state_dict()))
    assert new is None
    assert "exceeds what clipped, noised sites can send" in caplog.text


def test_later_rounds_take_the_keys_sites_advertised_with_their_unmask_answers(
    tmp_path: Path,
) -> None:
    """Round 2 asks no site for keys (four exchanges, not five), except a site that
    missed round 1's unmask stage; its keys are signed for round 2, not replayed."""
    cfg = distributed_cfg(tmp_path, rounds=3)
    federation(cfg)
    wire = Wire()
    rounds = rounds_for(cfg, wire)
    grid = SiteGrid(cfg)
    new = rounds.run_round(grid, 1, start(cfg))
    assert new is not None and len(wire.sent["advertise-keys"]) == SITES
    assert rounds.run_round(grid, 2, new) is not None
    assert len(wire.sent["advertise-keys"]) == SITES  # none asked in round 2
    assert spends(cfg) == [2] * SITES
    # As if site-3's round-2 unmask answer had been lost: round 3 asks it alone for keys.
    rounds.advertised = (3, {n: k for n, k in rounds.advertised[1].items() if n != 103})
    assert rounds.run_round(grid, 3, new) is not None
    assert [m.metadata.dst_node_id for m in wire.sent["advertise-keys"][SITES:]] == [103]
    assert rounds.strategy.last_round_sites == [f"site-{p}" for p in range(SITES)]


def _never(state: object) -> object:
    raise AssertionError("a round that released nothing is not evaluated")
