"""Distributed DP against the adversaries it exists to resist, through real ClientApps.

Each test plays a hostile server (it rewrites what the server sends, or sends stages
the honest server never would) or a hostile site (it rewrites its own reply), and
asserts that the honest sites refuse, that no honest budget moves where the attack
comes before the spend, and that nothing is unmasked. The findings are issue 22's.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedsilo import protocol
from fedsilo.privacy.identity import simulated_identity, write_simulated_identities
from fedsilo.privacy.secagg import keys_message, raw_public
from fedsilo.privacy.secagg_site import SecAggSite
from tests.server.secure_harness import (
    SiteGrid,
    Wire,
    distributed_cfg,
    federation,
    node,
    rounds_for,
    server_side,
    spends,
    spy,
    start,
    values_of,
)
from tests.server.secure_harness import _task_identity as _task_identity


def refused_everywhere(wire: Wire, stage: str, sites: int, match: str) -> None:
    reasons = wire.refusals(stage)
    assert len(reasons) == sites, reasons
    assert all(match in r for r in reasons), reasons


# ---------------------------------------------------------------- finding 4: identities


def test_a_server_substituting_a_sites_keys_is_refused_before_any_spend(tmp_path: Path) -> None:
    cfg = distributed_cfg(tmp_path)
    federation(cfg)
    mine = X25519PrivateKey.generate()

    def swap(stage: str, dst: int, values: dict[str, Any]) -> dict[str, Any]:
        if stage == "share-keys":  # site-1's keys replaced by the server's own
            i = list(values[protocol.NODES]).index(node(1))
            for key in (protocol.KEYS_C, protocol.KEYS_S):
                values[key] = [raw_public(mine) if j == i else k for j, k in enumerate(values[key])]
        return values

    wire = Wire(swap)
    assert rounds_for(cfg, wire).run_round(SiteGrid(cfg), 1, start(cfg)) is None
    reasons = wire.refusals("share-keys")
    assert len(reasons) == 4
    assert sum("own keys" in r for r in reasons) == 1  # site-1 sees its keys replaced
    assert sum("does not verify" in r or "signature" in r for r in reasons) == 3, reasons
    assert spends(cfg) == [0, 0, 0, 0]


def test_a_server_inventing_a_site_to_reach_the_noise_assumption_is_refused(
    tmp_path: Path,
) -> None:
    """Site-3 is offline; the server signs keys for a site of its own making (a cert from
    a CA it made, named site-3) to bring the neighbourhood back to dp-min-sites 4."""
    cfg = distributed_cfg(tmp_path, dp_min_sites=4, min_sites=4)
    federation(cfg)
    write_simulated_identities(tmp_path / "forged", ["site-3"])
    forged = simulated_identity(tmp_path / "forged", "site-3")
    fake = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    c, s = raw_public(fake[0]), raw_public(fake[1])

    def pad(stage: str, dst: int, values: dict[str, Any]) -> dict[str, Any] | None:
        if dst == node(3):
            return None  # site-3 is not there
        if stage == "share-keys":
            values[protocol.NODES] = [*values[protocol.NODES], 999]
            values[protocol.KEYS_C] = [*values[protocol.KEYS_C], c]
            values[protocol.KEYS_S] = [*values[protocol.KEYS_S], s]
            sig = forged.sign(keys_message(b"r1/1", 999, c, s))
            values[protocol.SIGNATURES] = [*values[protocol.SIGNATURES], sig]
            values[protocol.CERTS] = [*values[protocol.CERTS], forged.cert]
            values[protocol.THRESHOLD] = 3  # for 4
        return values

    wire = Wire(pad)
    server = rounds_for(dataclasses.replace(cfg, min_sites=3, dp_min_sites=3), wire)
    assert server.run_round(SiteGrid(cfg), 1, start(cfg)) is None
    refused_everywhere(wire, "share-keys", 3, "federation CA")
    assert spends(cfg) == [0, 0, 0, 0]


# ---------------------------------------------------------------- finding 7: parameters


def test_a_server_lowering_the_threshold_is_refused_before_any_spend(tmp_path: Path) -> None:
    cfg = distributed_cfg(tmp_path)
    federation(cfg)

    def lower(stage: str, dst: int, values: dict[str, Any]) -> dict[str, Any]:
        if stage == "share-keys":
            values[protocol.THRESHOLD] = 2
        return values

    wire = Wire(lower)
    assert rounds_for(cfg, wire).run_round(SiteGrid(cfg), 1, start(cfg)) is None
    refused_everywhere(wire, "share-keys", 4, "more than two thirds")
    assert spends(cfg) == [0, 0, 0, 0]


# ---------------------------------------------------------------- finding 2: padding


def test_a_padded_active_list_does_not_reach_the_noise_assumption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dp-min-sites 4; site-3's masked vector is lost. The server goes on anyway and
    pads the active list with node ids that never exchanged keys: no site counts them."""
    cfg = distributed_cfg(tmp_path, dp_min_sites=4, min_sites=4)
    federation(cfg)
    _, seen = spy(monkeypatch)

    def pad(stage: str, dst: int, values: dict[str, Any]) -> dict[str, Any]:
        if stage == "consistency":
            values[protocol.ACTIVE] = [*values[protocol.ACTIVE], 900, 901]
        return values

    wire = Wire(pad)
    server = rounds_for(dataclasses.replace(cfg, min_sites=2, dp_min_sites=2), wire)
    grid = SiteGrid(cfg, drop=lambda n, stage: n == node(3) and stage == "masked-input")
    assert server.run_round(grid, 1, start(cfg)) is None
    refused_everywhere(wire, "consistency", 3, "3 verified site(s) sent a masked vector")
    assert "unmask" not in wire.sent and "total" not in seen  # nothing was unmasked


def test_sites_refuse_to_spend_when_fewer_sites_share_keys_than_the_noise_assumes(
    tmp_path: Path,
) -> None:
    """A server that goes on below min-sites after site-3 dropped at the key exchange:
    every site opens 3 sites' shares, fewer than its 4, and spends nothing."""
    cfg = distributed_cfg(tmp_path, dp_min_sites=4, min_sites=4)
    federation(cfg)
    wire = Wire()
    server = rounds_for(dataclasses.replace(cfg, min_sites=2, dp_min_sites=2), wire)
    grid = SiteGrid(cfg, drop=lambda n, stage: n == node(3) and stage == "share-keys")
    assert server.run_round(grid, 1, start(cfg)) is None
    reasons = {r.site: r.reason for r in server.strategy.refusals}
    assert sorted(reasons) == ["site-0", "site-1", "site-2"]
    assert all("3 verified site(s)" in r for r in reasons.values()), reasons
    assert spends(cfg) == [0, 0, 0, 0]


# ---------------------------------------------------------------- finding 3: split views


def send(grid: SiteGrid, dst: int, stage: str, values: dict[str, Any]) -> Message:
    """One stage message to one site, as a hostile server may send it; the reply."""
    config = ConfigRecord({protocol.SERVER_ROUND: 1, protocol.SECAGG_STAGE: stage, **values})
    msg = Message(
        content=RecordDict({protocol.CONFIG: config}),
        dst_node_id=dst,
        message_type=MessageType.TRAIN,
    )
    msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    (reply,) = grid.pull_messages(grid.push_messages([msg]))
    return reply


def test_a_server_showing_sites_different_views_gets_no_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five sites mask their vectors; the server tells two that every site is active and
    three that site-4 dropped (to rebuild site-4's self mask from the first group and
    its mask key from the second). It forwards every signature it got: no site sees
    enough on its own view, and none reveals a share."""
    cfg = distributed_cfg(tmp_path)
    federation(cfg, sites=5)
    _, seen = spy(monkeypatch)
    everyone = [node(p) for p in range(5)]
    view_a = {protocol.ACTIVE: everyone, protocol.DEAD: []}
    view_b = {protocol.ACTIVE: everyone[:4], protocol.DEAD: [node(4)]}

    def split(stage: str, dst: int, values: dict[str, Any]) -> dict[str, Any]:
        if stage == "consistency":
            values.update(view_a if dst in everyone[:2] else view_b)
        return values

    wire = Wire(split)
    grid = SiteGrid(cfg, sites=5)
    rounds_for(cfg, wire, sites=5).run_round(grid, 1, start(cfg))
    signed = {
        m.metadata.src_node_id: m.content[protocol.SECAGG][protocol.SIGNATURE]
        for m in wire.replies["consistency"]
        if m.has_content()
    }
    assert len(signed) == 4  # site-4 was told it dropped: it signs nothing
    nodes = sorted(signed)
    for dst in everyone[:4]:
        reply = send(
            grid,
            dst,
            "unmask",
            {protocol.NODES: nodes, protocol.SIGNATURES: [signed[n] for n in nodes]},
        )
        assert reply.has_error() and "signed this site's view" in reply.error.reason
    assert "total" not in seen


# ---------------------------------------------------------------- finding 5: bad shares


def garbage_shares(victim: int):  # type: ignore[no-untyped-def]
    def hostile(src: int, stage: str, reply: Message) -> Message:
        if src == victim and stage == "share-keys" and reply.has_content():
            rec = reply.content[protocol.SECAGG]
            rec[protocol.CIPHERTEXTS] = [b"\x01" * len(b) for b in rec[protocol.CIPHERTEXTS]]
        return reply

    return hostile


def test_a_hostile_sites_bad_shares_leave_it_out_and_the_round_releases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = distributed_cfg(tmp_path)  # dp-min-sites 3 of 4
    federation(cfg)
    contributions, seen = spy(monkeypatch)
    rounds = rounds_for(cfg)
    new = rounds.run_round(SiteGrid(cfg, hostile=garbage_shares(node(1))), 1, start(cfg))
    assert new is not None
    honest = [node(p) for p in (0, 2, 3)]
    assert rounds.strategy.last_round_sites == ["site-0", "site-2", "site-3"]
    assert np.array_equal(seen["total"], np.sum([contributions[n] for n in honest], axis=0))
    assert [f.site for f in rounds.strategy.failures] == ["site-1"]


def test_a_hostile_sites_bad_shares_cost_the_honest_sites_nothing_below_the_assumption(
    tmp_path: Path,
) -> None:
    cfg = distributed_cfg(tmp_path, dp_min_sites=4, min_sites=4)
    federation(cfg)
    rounds = rounds_for(cfg)
    grid = SiteGrid(cfg, hostile=garbage_shares(node(1)))
    assert rounds.run_round(grid, 1, start(cfg)) is None
    reasons = {r.site: r.reason for r in rounds.strategy.refusals}
    assert sorted(reasons) == ["site-0", "site-2", "site-3"]
    assert spends(cfg)[0] == spends(cfg)[2] == spends(cfg)[3] == 0


# ---------------------------------------------------------------- finding 6: the norm bound


def test_a_site_claiming_a_billion_examples_cannot_widen_the_norm_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Site-1 reports 10^9 examples and masks a vector of norm ~10^5 (in gradient units):
    the bound comes from the run config alone, so the round releases no model."""
    cfg = distributed_cfg(tmp_path)
    federation(cfg)
    real = SecAggSite.masked_input

    def inflated(self, vector):  # type: ignore[no-untyped-def]
        if self.node == node(1):
            vector = vector + np.uint64(10**7)  # 10^7 / scale per coordinate: norm 10^5 x C
        return real(self, vector)

    def claim(src: int, stage: str, reply: Message) -> Message:
        if src == node(1) and stage == "masked-input" and reply.has_content():
            metrics = dict(reply.content[protocol.METRICS])
            metrics[protocol.NUM_EXAMPLES] = 10**9
            reply.content[protocol.METRICS] = MetricRecord(metrics)
        return reply

    monkeypatch.setattr(SecAggSite, "masked_input", inflated)
    caplog.set_level(logging.ERROR)
    rounds = rounds_for(cfg)
    assert rounds.run_round(SiteGrid(cfg, hostile=claim), 1, start(cfg)) is None
    assert "exceeds what clipped, noised sites can send" in caplog.text


# ---------------------------------------------------------------- a round asked twice


def test_a_server_asking_a_spent_round_again_gets_no_second_masking_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A (restarted or curious) server runs round 1 again with fresh keys: a site that
    masked its round-1 input for one set of neighbours would, masking it again for
    another, let the server difference the masks away. Every site refuses the round
    it already spent before it trains or masks anything, and nothing more is spent:
    with distributed DP the round in flight at a crash is lost, by design."""
    cfg = distributed_cfg(tmp_path)
    federation(cfg)
    contributions, _ = spy(monkeypatch)
    assert rounds_for(cfg).run_round(SiteGrid(cfg), 1, start(cfg)) is not None
    assert spends(cfg) == [1, 1, 1, 1] and len(contributions) == 4
    contributions.clear()
    wire = Wire()
    again = rounds_for(cfg, wire)  # a new server object: the crash forgot everything
    assert again.run_round(SiteGrid(cfg), 1, start(cfg)) is None
    refused_everywhere(wire, "masked-input", 4, "already trained")
    assert contributions == {}  # no site masked anything a second time
    assert spends(cfg) == [1, 1, 1, 1]
    assert "nothing was released" in again.why_not


# ---------------------------------------------------------------- the ring's width


def test_the_honest_round_sums_in_a_ring_narrower_than_64_bits_and_releases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sized from the run's norm bound, the ring is 3 bytes here (4 digits sites at
    batch 100): each masked vector crosses the wire in 3/8 of the bytes of the 64-bit
    ring, and the sum is exact."""
    cfg = distributed_cfg(tmp_path)
    federation(cfg)
    contributions, seen = spy(monkeypatch)
    wire = Wire()
    assert rounds_for(cfg, wire).run_round(SiteGrid(cfg), 1, start(cfg)) is not None
    asks = [dict(m.content[protocol.CONFIG]) for m in wire.sent["masked-input"]]
    assert {a[protocol.RING_BYTES] for a in asks} == {3}
    dim = next(iter(contributions.values())).size
    for reply in wire.replies["masked-input"]:
        assert len(values_of(reply)[protocol.MASKED]) == 3 * dim
    assert np.array_equal(seen["total"], sum(contributions.values()))


def test_a_server_choosing_a_one_byte_ring_learns_only_the_sum_modulo_256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The width is the server's to choose, and no choice shows it more: each masked
    vector is uniform on the ring it asked for, and what it unmasks is the sites' sum
    reduced modulo 2^8, a function of the sum the full ring would have given."""
    cfg = distributed_cfg(tmp_path)
    federation(cfg)
    contributions, seen = spy(monkeypatch)
    monkeypatch.setattr(server_side, "ring_bytes", lambda *_: 1)
    rounds_for(cfg).run_round(SiteGrid(cfg), 1, start(cfg))
    true_sum = sum(contributions.values())
    assert np.array_equal(seen["total"], ((true_sum + 128) % 256) - 128)
    for node_id, vec in seen["masked"].items():  # type: ignore[union-attr]
        assert vec.max() < 256 and abs(vec.astype(np.int64).mean() / 256 - 0.5) < 0.05
        own = contributions[node_id].view(np.uint64) & np.uint64(0xFF)
        assert np.mean(vec == own) < 0.02  # about 1/256 by chance


def test_a_server_sending_no_usable_ring_width_is_refused_before_any_spend(
    tmp_path: Path,
) -> None:
    cfg = distributed_cfg(tmp_path)
    federation(cfg)

    def widen(stage: str, dst: int, values: dict[str, Any]) -> dict[str, Any]:
        if stage == "masked-input":
            values[protocol.RING_BYTES] = 9
        return values

    wire = Wire(widen)
    assert rounds_for(cfg, wire).run_round(SiteGrid(cfg), 1, start(cfg)) is None
    refused_everywhere(wire, "masked-input", 4, "ring width 9 bytes")
    assert spends(cfg) == [0, 0, 0, 0]
