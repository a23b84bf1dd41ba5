"""The server's side of a distributed-DP round: SecAgg+ over Flower messages, then one step.

`SecureRounds.run` drives the four stages of fedsilo.privacy.secagg (setup, share-keys,
masked, unmask) through the Grid, keeping SiteReports' books (failures, refusals,
reports) for every stage. What this code ever holds of a site: its public keys, its
encrypted shares (addressed to other sites), its masked vector (uniform noise without
the masks) and its public metrics; after unmasking, only the sum over the sites that
sent a masked vector. It then takes one SGD step (with momentum, post-processing) on
the global model with the decoded sum divided by the sites' expected pooled batch.

A site that drops after sharing its keys is handled as SecAgg+ specifies: the others
return shares of its mask key and its pairwise masks are removed; it is not in the
sum. A round ends without a new model (and the run stops, as for local DP) when fewer
than min-sites sites remain at any stage, or when the sum cannot be unmasked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsilo import protocol
from fedsilo.config import RunConfig
from fedsilo.errors import PrivacyError
from fedsilo.privacy.distributed import Quantizer, decode_sum
from fedsilo.privacy.secagg import (
    KEY_BYTES,
    SecAggError,
    decode_vector,
    neighbours,
    threshold_for,
    unmask_sum,
)
from fedsilo.server.strategy import InvalidReply, SiteReports

log = logging.getLogger("fedsilo.server")
Exchange = Callable[[Grid, Iterable[Message]], list[Message]]


@dataclass
class SecureRounds:
    """Distributed-DP rounds of one run: the stages, and the server's optimizer state."""

    cfg: RunConfig
    run: str  # the run identity the sites bind their shares and masks to
    strategy: SiteReports
    exchange: Exchange
    velocity: torch.Tensor | None = field(default=None, repr=False)

    def run_round(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> ArrayRecord | None:
        """One round; the new global model, or None when it could not complete."""
        st = self.strategy
        clock = _Clock()
        sent = list(st.configure_train(server_round, arrays, ConfigRecord(), grid))
        nodes = sorted(m.metadata.dst_node_id for m in sent)
        state = arrays.to_torch_state_dict()
        dim = sum(t.numel() for t in state.values())
        need = max(2, self.cfg.min_sites)

        # 1. setup: public keys
        replies = clock.time("setup", self._stage)(
            grid, server_round, "setup", {n: {} for n in nodes}
        )
        keys: dict[int, tuple[bytes, bytes]] = {}
        for node, rec in replies.items():
            c, s = rec.get(protocol.KEY_C), rec.get(protocol.KEY_S)
            if not (_key(c) and _key(s)):
                st.fail(node, server_round, "invalid reply: no 32-byte public keys")
                continue
            keys[node] = (c, s)
        if not self._enough(keys, need, server_round, "setup"):
            return None
        graph = neighbours(list(keys), seed=server_round)
        thresholds = {n: threshold_for(len(graph[n])) for n in keys}

        # 2. share-keys: encrypted shares, routed by the server
        asks = {
            n: {
                protocol.NODES: graph[n],
                protocol.KEYS_C: [keys[m][0] for m in graph[n]],
                protocol.KEYS_S: [keys[m][1] for m in graph[n]],
                protocol.THRESHOLD: thresholds[n],
            }
            for n in keys
        }
        replies = clock.time("share-keys", self._stage)(grid, server_round, "share-keys", asks)
        inbox: dict[int, dict[int, bytes]] = {}
        shared_keys: set[int] = set()
        for node, rec in replies.items():
            dsts, blobs = rec.get(protocol.DESTINATIONS), rec.get(protocol.CIPHERTEXTS)
            ok = isinstance(dsts, list) and isinstance(blobs, list) and len(dsts) == len(blobs)
            if not ok or set(dsts) != set(graph[node]) - {node}:
                st.fail(node, server_round, "invalid reply: shares not for its neighbours")
                continue
            shared_keys.add(node)
            for dst, blob in zip(dsts, blobs, strict=True):
                inbox.setdefault(int(dst), {})[node] = bytes(blob)
        if not self._enough(shared_keys, need, server_round, "share-keys"):
            return None
        # Each site masks with exactly the neighbours whose shares it is sent.
        shared = {n: sorted(s for s in inbox.get(n, {}) if s in shared_keys) for n in shared_keys}

        # 3. masked: the global model and the shares; each site trains and masks
        asks = {
            n: {
                protocol.SOURCES: shared[n],
                protocol.CIPHERTEXTS: [inbox[n][s] for s in shared[n]],
            }
            for n in shared_keys
        }
        replies = clock.time("masked", self._stage)(
            grid, server_round, "masked", asks, arrays=arrays, full=True
        )
        masked: dict[int, np.ndarray] = {}
        for node, msg in replies.items():
            try:
                report = st.accept_report(node, server_round, msg)
                vec = decode_vector(msg.content[protocol.SECAGG].get(protocol.MASKED), dim)
            except (InvalidReply, SecAggError, KeyError) as exc:
                st.fail(node, server_round, f"invalid reply: {exc}")
                continue
            st.reports[report.site] = report
            masked[node] = vec
        if not self._enough(masked, need, server_round, "masked"):
            return None

        # 4. unmask: shares of the active sites' seeds and of the dropped sites' mask keys
        active, dead = sorted(masked), sorted(shared_keys - set(masked))
        asks = {n: {protocol.ACTIVE: active, protocol.DEAD: dead} for n in active}
        replies = clock.time("unmask", self._stage)(grid, server_round, "unmask", asks)
        shares: dict[int, dict[int, bytes]] = {}
        for node, rec in replies.items():
            owners, blobs = rec.get(protocol.NODES), rec.get(protocol.SHARES)
            if isinstance(owners, list) and isinstance(blobs, list) and len(owners) == len(blobs):
                shares[node] = {int(o): bytes(b) for o, b in zip(owners, blobs, strict=True)}
            else:
                st.fail(node, server_round, "invalid reply: no shares")
        try:
            total = unmask_sum(
                f"{self.run}/{server_round}".encode(),
                masked,
                keys,
                graph,
                shared,
                shares,
                thresholds,
            )
            quantizer = Quantizer(dim=dim, clip=self.cfg.max_grad_norm)
            grad = decode_sum(total, quantizer)
            check_sum(grad, self._bound(active, quantizer))
        except (SecAggError, PrivacyError, ValueError) as exc:
            log.error("secure round %d: the sum cannot be used: %s", server_round, exc)
            return None
        clock.lap("unmask-sum")
        st.last_round_sites = sorted(st.site_name(n) for n in active)
        log.info("secure round %d: %d sites; %s", server_round, len(active), clock)
        return ArrayRecord(self._step(state, self._pooled_batch(active), grad))

    def _bound(self, active: Iterable[int], quantizer: Quantizer) -> float:
        """The largest L2 norm an honest sum can have, with 8 standard deviations of noise.

        Each site's clipped sum is at most C x its examples; each of the n shares has std
        sigma x Delta / sqrt(M) per coordinate (in integer units), sigma the largest any
        site reported, so their sum sigma x Delta x sqrt(n / M). A site cannot be checked
        on its own (it is masked); a sum beyond this bound means one sent more than
        clipped gradients, and it is dropped.
        """
        st = self.strategy
        names = [st.site_name(n) for n in active]
        examples = sum(st.committed[n] for n in names)
        sigma = max(st.noise.get(n, 0.0) for n in names)
        shares = max(1.0, len(names) / max(1, self.cfg.dp_min_sites))
        std = sigma * quantizer.sensitivity / quantizer.scale * shares**0.5
        return float(self.cfg.max_grad_norm * examples + 8.0 * std * quantizer.dim**0.5)

    def _pooled_batch(self, active: Iterable[int]) -> float:
        """The sites' expected pooled Poisson batch: each samples min(batch, its examples)."""
        st, b = self.strategy, self.cfg.batch_size
        return float(sum(min(b, st.committed[st.site_name(n)]) for n in active))

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

    def _enough(self, got: Iterable[int], need: int, server_round: int, stage: str) -> bool:
        n = len(list(got))
        if n < need:
            log.error(
                "secure round %d: %d site(s) after the %s stage, fewer than %d",
                server_round,
                n,
                stage,
                need,
            )
            return False
        return True

    def _stage(
        self,
        grid: Grid,
        server_round: int,
        stage: str,
        asks: Mapping[int, Mapping[str, object]],
        *,
        arrays: ArrayRecord | None = None,
        full: bool = False,
    ) -> dict[int, ConfigRecord] | dict[int, Message]:
        """Send one stage to every site in `asks`; usable replies by node."""
        out = []
        for node, values in asks.items():
            config = ConfigRecord(
                {protocol.SERVER_ROUND: server_round, protocol.SECAGG_STAGE: stage, **values}  # type: ignore[dict-item]
            )
            content = RecordDict({protocol.CONFIG: config})
            if arrays is not None:
                content[protocol.ARRAYS] = arrays
            out.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN))
        replies = self.exchange(grid, out)
        usable = self.strategy.stage_replies(server_round, out, replies)
        if full:
            return usable
        records: dict[int, ConfigRecord] = {}
        for node, msg in usable.items():
            rec = msg.content.get(protocol.SECAGG)
            if isinstance(rec, ConfigRecord):
                records[node] = rec
            else:
                self.strategy.fail(node, server_round, f"invalid reply: no `{protocol.SECAGG}`")
        return records


class _Clock:
    """Seconds per stage of a round, for the server's log."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.last = time.monotonic()

    def time(self, name: str, fn: Callable) -> Callable:  # type: ignore[type-arg]
        def timed(*args: object, **kwargs: object) -> object:
            self.last = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                self.lap(name)

        return timed

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.2f} s" for k, v in self.laps.items())


def check_sum(grad: torch.Tensor, bound: float) -> None:
    """Refuse a decoded sum whose norm no honest set of sites could produce."""
    norm = float(torch.linalg.vector_norm(grad.to(torch.float64)))
    if not norm <= bound:
        raise PrivacyError(
            f"the aggregated gradient's norm {norm:.3g} exceeds what clipped, noised sites can "
            f"send ({bound:.3g}); a site sent more than its clipped gradients"
        )


def _key(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == KEY_BYTES
