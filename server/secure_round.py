"""The server's side of a distributed-DP round: SecAgg+ over Flower messages, then one step.

`SecureRounds.run_round` drives the five stages of fedsilo.privacy.secagg through the
Grid (`SecureRound`, one method per stage, named as in Bonawitz et al.), keeping the
reply book's records (failures, refusals, reports: fedsilo.server.replies) for every
stage. What this code ever holds of a site: its signed public keys and certificate,
its encrypted shares (addressed to other sites), its masked vector (uniform noise
without the masks), its signature on the round's view and its public metrics; after
unmasking, only the sum over the sites that survived. It then takes one SGD step
(with momentum, post-processing) on the global model: the decoded sum divided by the
run's expected pooled batch, once the sum's norm is within what clipped, noised sites
can send, a bound computed from the run config alone (never from what sites report).

Sites check everything this server sends (fedsilo.privacy.secagg_site); the server
checks what sites send too, so that one hostile site's bad keys or shares cost the
honest sites nothing: a site whose keys do not verify is left out before any share is
made, and a site whose shares another site could not open is left out of the sum
(its masks are removed as a dropped site's). A round ends without a new model (and
the run stops, as for local DP) when fewer than min-sites sites remain at any stage,
or when the sum cannot be unmasked or fails its norm check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsilo import protocol
from fedsilo.config import RunConfig
from fedsilo.errors import PrivacyError
from fedsilo.flwr_adapter.arrays import tensor_views
from fedsilo.privacy.distributed import (
    Quantizer,
    decode_sum,
    expected_pooled_batch,
    ring_bytes,
    sum_norm_bound,
)
from fedsilo.privacy.secagg import (
    KEY_BYTES,
    SecAggError,
    Verifier,
    decode_vector,
    keys_message,
    neighbours,
    round_tag,
    survivors,
    threshold_for,
    unmask_sum,
    view_message,
)
from fedsilo.server.local_round import Exchange
from fedsilo.server.replies import INVALID, InvalidReply, SiteReport
from fedsilo.server.strategy import SiteReports

log = logging.getLogger("fedsilo.server")
Keys = tuple[bytes, bytes, bytes, bytes]  # a site's signed keys: c, s, signature, certificate


@dataclass
class SecureRounds:
    """Distributed-DP rounds of one run: the protocol's rounds and the server's optimizer."""

    cfg: RunConfig
    run: str  # the run identity the sites bind their signatures, shares and masks to
    strategy: SiteReports
    exchange: Exchange
    verify: Verifier  # the federation CA's check of a site's signature
    velocity: torch.Tensor | None = field(default=None, repr=False)
    # Seconds per stage of the last round (metrics.jsonl's `stage_seconds`).
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # Keys sites advertised for the next round with their unmask answers: (round, by node).
    advertised: tuple[int, dict[int, Keys]] = (0, {})
    # Why the last round released nothing (run_round returned None), for the stop reason.
    why_not: str = ""

    def run_round(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> ArrayRecord | None:
        """One round; the new global model, or None when it could not complete."""
        rnd = SecureRound(self, grid, server_round, arrays)
        self.stage_seconds = rnd.clock.laps
        self.why_not = ""
        stages = (
            rnd.advertise_keys,
            rnd.share_keys,
            rnd.collect_masked_input,
            rnd.consistency_check,
            rnd.unmask,
        )
        for stage in stages:
            if not stage():
                self.why_not = rnd.why_not
                return None
        try:
            grad = rnd.decoded_sum()
        except (SecAggError, PrivacyError, ValueError) as exc:
            self.why_not = f"the sum cannot be used: {exc}; nothing was released"
            log.error("secure round %d: %s", server_round, self.why_not)
            return None
        self.strategy.book.took_part(rnd.active)
        log.info("secure round %d: %d sites; %s", server_round, len(rnd.active), rnd.clock)
        batch = expected_pooled_batch(batch_size=self.cfg.batch_size, sites=len(rnd.active))
        return ArrayRecord(self._step(rnd.state, batch, grad))

    def _step(
        self, state: dict[str, torch.Tensor], batch: float, grad_sum: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """SGD with momentum on the flat parameters: grad = sum / expected pooled batch."""
        flat = torch.cat([t.reshape(-1).to(torch.float32) for t in state.values()])
        grad = grad_sum / batch
        self.velocity = grad if self.velocity is None else self.cfg.momentum * self.velocity + grad
        flat = flat - self.cfg.lr * self.velocity
        out, start = {}, 0
        for k, t in state.items():
            out[k] = flat[start : start + t.numel()].view_as(t).to(t.dtype)
            start += t.numel()
        return out


class SecureRound:
    """One round's stages and what the server learns along the way."""

    def __init__(self, rounds: SecureRounds, grid: Grid, server_round: int, arrays: ArrayRecord):
        self.rounds, self.grid, self.server_round, self.arrays = rounds, grid, server_round, arrays
        self.cfg, self.book = rounds.cfg, rounds.strategy.book
        self.tag = round_tag(rounds.run, server_round)
        self.clock = _Clock()
        self.state = tensor_views(arrays)  # the global model, read only
        self.dim = sum(t.numel() for t in self.state.values())
        self.quantizer = Quantizer(dim=self.dim, clip=self.cfg.max_grad_norm)
        self.need = max(2, self.cfg.min_sites, self.cfg.dp_min_sites)
        self.keys: dict[int, Keys] = {}
        self.graph: dict[int, list[int]] = {}
        self.threshold: dict[int, int] = {}
        self.inbox: dict[int, dict[int, bytes]] = {}
        self.masked: dict[int, np.ndarray] = {}
        self.partners: dict[int, list[int]] = {}
        self.active: set[int] = set()
        self.dead: set[int] = set()
        self.signatures: dict[int, bytes] = {}
        self.shares: dict[int, dict[int, bytes]] = {}
        self.ring_bytes = 0  # the masked-input stage sets it from the round's sites
        self.why_not = ""  # why a stage ended the round

    # ------------------------------------------------------------ 0. advertise keys

    def advertise_keys(self) -> bool:
        """Each site's signed keys: sent with its last unmask answer, else asked for now."""
        sent = self.rounds.strategy.configure_train(
            self.server_round, self.arrays, ConfigRecord(), self.grid
        )
        nodes = sorted(m.metadata.dst_node_id for m in sent)
        early = self.rounds.advertised[1] if self.rounds.advertised[0] == self.server_round else {}
        self.rounds.advertised = (0, {})
        self.keys = {n: early[n] for n in nodes if n in early}
        missing = [n for n in nodes if n not in self.keys]
        if missing:  # round 1, a resumed run, a site that missed the last unmask stage
            replies = self._stage(protocol.ADVERTISE_KEYS, {n: {} for n in missing})
            for node, rec in replies.items():
                keys = self._signed_keys(node, rec, self.server_round, protocol.ADVERTISE_KEYS)
                if keys is not None:
                    self.keys[node] = keys
        if not self._enough(self.keys, protocol.ADVERTISE_KEYS):
            return False
        self.graph = neighbours(list(self.keys), seed=self.server_round)
        return True

    def _signed_keys(
        self, node: int, rec: ConfigRecord, server_round: int, stage: str
    ) -> Keys | None:
        """A site's keys for `server_round` when it signed them as its own site, else None
        (recorded as the site's failure in this round, at `stage`)."""
        c, s = _bytes(rec, protocol.KEY_C), _bytes(rec, protocol.KEY_S)
        sig, cert = _bytes(rec, protocol.SIGNATURE), _bytes(rec, protocol.CERT)
        if not (len(c) == len(s) == KEY_BYTES and sig and cert):
            self._fail(node, stage, INVALID + "no signed 32-byte keys")
            return None
        tag = round_tag(self.rounds.run, server_round)
        try:
            name = self.rounds.verify(cert, keys_message(tag, node, c, s), sig)
        except PrivacyError as exc:
            self._fail(node, stage, f"{INVALID}keys not signed: {exc}")
            return None
        if name != self.book.site_name(node):
            self._fail(node, stage, f"{INVALID}keys signed as site {name!r}, not this node's site")
            return None
        return c, s, sig, cert

    # ------------------------------------------------------------ 1. share keys

    def share_keys(self) -> bool:
        asks: dict[int, dict[str, Any]] = {}
        for n in self.keys:
            near = self.graph[n]
            asks[n] = {
                protocol.NODES: near,
                protocol.KEYS_C: [self.keys[m][0] for m in near],
                protocol.KEYS_S: [self.keys[m][1] for m in near],
                protocol.SIGNATURES: [self.keys[m][2] for m in near],
                protocol.CERTS: [self.keys[m][3] for m in near],
                protocol.THRESHOLD: threshold_for(len(near)),
            }
        replies = self._stage(protocol.SHARE_KEYS, asks)
        for node, rec in replies.items():
            dsts, blobs = _list(rec, protocol.DESTINATIONS), _list(rec, protocol.CIPHERTEXTS)
            if len(dsts) != len(blobs) or set(dsts) != set(self.graph[node]) - {node}:
                self._fail(node, protocol.SHARE_KEYS, INVALID + "shares not for its neighbours")
                continue
            self.threshold[node] = threshold_for(len(self.graph[node]))
            for dst, blob in zip(dsts, blobs, strict=True):
                self.inbox.setdefault(int(dst), {})[node] = bytes(blob)
        return self._enough(self.threshold, protocol.SHARE_KEYS)

    # ------------------------------------------------------------ 2. masked input

    def collect_masked_input(self) -> bool:
        shared = set(self.threshold)
        # What the sum of every site asked can reach: the ring holds it.
        self.ring_bytes = ring_bytes(self._sum_bound(len(shared)), self.quantizer)
        asks: dict[int, dict[str, Any]] = {}
        for n in shared:  # each site is sent exactly the shares of sites that shared keys
            srcs = sorted(s for s in self.inbox.get(n, {}) if s in shared)
            asks[n] = {
                protocol.SOURCES: srcs,
                protocol.CIPHERTEXTS: [self.inbox[n][s] for s in srcs],
                protocol.RING_BYTES: self.ring_bytes,
            }
        replies = self._send(protocol.MASKED_INPUT, asks, self.arrays)
        for node, msg in replies.items():
            try:
                report, vec, partners = self._masked_input(node, msg, asks[node])
            except (InvalidReply, SecAggError) as exc:
                self._fail(node, protocol.MASKED_INPUT, f"{INVALID}{exc}")
                continue
            self.book.accept(report)
            self.masked[node] = vec
            self.partners[node] = partners
        self.active = survivors(self.masked, self.partners, self.graph)
        for node in sorted(set(self.masked) - self.active):
            self._fail(node, protocol.MASKED_INPUT, "its shares did not open at another site")
        return self._enough(self.active, protocol.MASKED_INPUT)

    def _masked_input(
        self, node: int, msg: Message, ask: Mapping[str, Any]
    ) -> tuple[SiteReport, np.ndarray, list[int]]:
        """A site's masked input: its public report, masked vector and partners.

        Raises:
            InvalidReply, SecAggError: any is missing or malformed, or a partner is not a
                site it was sent shares of (`ask`).
        """
        report = self.book.report_of(node, self.server_round, msg)
        record = msg.content.get(protocol.SECAGG)
        if not isinstance(record, ConfigRecord):
            raise InvalidReply(f"no `{protocol.SECAGG}` record")
        vec = decode_vector(record.get(protocol.MASKED), self.dim, self.ring_bytes)
        partners = _list(record, protocol.PARTNERS)
        if not set(partners) <= set(ask[protocol.SOURCES]):
            raise InvalidReply("its partners are not sites it was sent shares of")
        return report, vec, [int(p) for p in partners]

    # ------------------------------------------------------------ 3. consistency check

    def consistency_check(self) -> bool:
        self.dead = {j for i in self.active for j in self.partners[i]} - self.active
        view = {protocol.ACTIVE: sorted(self.active), protocol.DEAD: sorted(self.dead)}
        replies = self._stage(protocol.CONSISTENCY, {n: view for n in self.active})
        message = view_message(self.tag, self.active, self.dead)
        for node, rec in replies.items():
            sig = _bytes(rec, protocol.SIGNATURE)
            try:
                self.rounds.verify(self.keys[node][3], message, sig)
            except PrivacyError as exc:
                self._fail(node, protocol.CONSISTENCY, f"{INVALID}view not signed: {exc}")
                continue
            self.signatures[node] = sig
        return self._enough(self.signatures, protocol.CONSISTENCY)

    # ------------------------------------------------------------ 4. unmask

    def unmask(self) -> bool:
        signers = sorted(self.signatures)
        ask = {protocol.NODES: signers, protocol.SIGNATURES: [self.signatures[n] for n in signers]}
        replies = self._stage(protocol.UNMASK, {n: ask for n in signers})
        early: dict[int, Keys] = {}
        for node, rec in replies.items():
            owners, blobs = _list(rec, protocol.NODES), _list(rec, protocol.SHARES)
            if owners and len(owners) == len(blobs):
                self.shares[node] = {int(o): bytes(b) for o, b in zip(owners, blobs, strict=True)}
            else:
                self._fail(node, protocol.UNMASK, INVALID + "no shares")
                continue
            if self.server_round < self.cfg.rounds and protocol.KEY_C in rec:
                keys = self._signed_keys(node, rec, self.server_round + 1, protocol.UNMASK)
                if keys is not None:  # the next round asks this site for no keys
                    early[node] = keys
        self.rounds.advertised = (self.server_round + 1, early)
        return True

    def decoded_sum(self) -> torch.Tensor:
        """The active sites' float gradient sum, once its norm is within the run's bound."""
        total = unmask_sum(
            self.tag,
            {n: self.masked[n] for n in self.active},
            {n: (c, s) for n, (c, s, _, _) in self.keys.items()},
            self.partners,
            self.shares,
            self.threshold,
            self.ring_bytes,
        )
        self.clock.lap("unmask-sum")
        grad = decode_sum(total, self.quantizer)
        check_sum(grad, self._sum_bound(len(self.active)))
        return grad

    def _sum_bound(self, sites: int) -> float:
        """The largest norm an honest sum of `sites` sites reaches (sum_norm_bound)."""
        return sum_norm_bound(
            clip=self.cfg.max_grad_norm,
            batch_size=self.cfg.batch_size,
            sites=sites,
            noise_multiplier=self.cfg.noise_multiplier,
            min_sites=self.cfg.dp_min_sites,
            quantizer=self.quantizer,
        )

    # ------------------------------------------------------------ messages

    def _fail(self, node: int, stage: str, reason: str) -> None:
        """Record node `node`'s failure in this round at `stage`, and why."""
        self.book.fail(node, self.server_round, _where(stage) + reason)

    def _enough(self, got: Iterable[int], stage: str) -> bool:
        n = len(list(got))
        if n < self.need:
            self.why_not = (
                f"{n} site(s) left after the {stage} stage, fewer than {self.need} (the sites "
                "the noise assumes, and min-sites); nothing was released"
            )
            log.error("secure round %d: %s", self.server_round, self.why_not)
            return False
        return True

    def _send(
        self,
        stage: str,
        asks: Mapping[int, Mapping[str, Any]],
        arrays: ArrayRecord | None = None,
    ) -> dict[int, Message]:
        """Send one stage to every site in `asks`; the usable replies by node."""
        t0 = time.monotonic()
        out = []
        for node, values in asks.items():
            config = ConfigRecord(
                {protocol.SERVER_ROUND: self.server_round, protocol.SECAGG_STAGE: stage, **values}
            )
            content = RecordDict({protocol.CONFIG: config})
            if arrays is not None:
                content[protocol.ARRAYS] = arrays
            out.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN))
        replies = self.rounds.exchange(self.grid, out)
        usable = self.book.stage_replies(self.server_round, out, replies, _where(stage))
        self.clock.laps[stage] = time.monotonic() - t0
        self.clock.last = time.monotonic()
        return usable

    def _stage(self, stage: str, asks: Mapping[int, Mapping[str, Any]]) -> dict[int, ConfigRecord]:
        """Send one stage; the SECAGG records of the usable replies by node."""
        records: dict[int, ConfigRecord] = {}
        for node, msg in self._send(stage, asks).items():
            rec = msg.content.get(protocol.SECAGG)
            if isinstance(rec, ConfigRecord):
                records[node] = rec
            else:
                self._fail(node, stage, f"{INVALID}no `{protocol.SECAGG}`")
        return records


class _Clock:
    """Seconds per stage of a round, for the server's log."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.last = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.2f} s" for k, v in self.laps.items())


def _where(stage: str) -> str:
    """How a failure's reason begins: its stage, and whether the site's masked input was
    in by then (it then stays in the sum: its self-mask is removed with the others'
    shares, and the round's `sites` name it)."""
    after = stage in (protocol.CONSISTENCY, protocol.UNMASK)
    return f"{stage} stage{', after its masked input arrived' if after else ''}: "


def check_sum(grad: torch.Tensor, bound: float) -> None:
    """Refuse a decoded sum whose norm no honest set of sites could produce."""
    norm = float(torch.linalg.vector_norm(grad.to(torch.float64)))
    if not norm <= bound:
        raise PrivacyError(
            f"the aggregated gradient's norm {norm:.3g} exceeds what clipped, noised sites can "
            f"send ({bound:.3g}); a site sent more than its clipped gradients"
        )


def _bytes(record: ConfigRecord, key: str) -> bytes:
    """`record[key]` when it is bytes, else b"" (a reply that lacks it is invalid)."""
    value = record.get(key)
    return value if isinstance(value, bytes) else b""


def _list(record: ConfigRecord, key: str) -> list[Any]:
    """`record[key]` when it is a list, else []."""
    value = record.get(key)
    return value if isinstance(value, list) else []
