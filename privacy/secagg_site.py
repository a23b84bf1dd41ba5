"""A site's side of one secure aggregation (a round), stage by stage. No Flower.

The stages and what each checks are in fedsilo.privacy.secagg. The object is built at
advertise-keys and kept between messages in the site's own state store (`to_state`):
its secrets never leave the site except as Shamir shares, encrypted to their owners.
Each stage runs once, in order; any message that breaks the protocol raises
SecAggError and the site sends nothing more in the round.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.common.secure_aggregation.crypto.shamir import create_shares

from fedsilo.errors import PrivacyError
from fedsilo.privacy.secagg import (
    KEY_BYTES,
    MAX_NEIGHBOURS,
    SecAggError,
    Signer,
    Verifier,
    exchange,
    keys_message,
    mask,
    open_shares,
    raw_private,
    raw_public,
    seal_shares,
    threshold_for,
    view_message,
)


@dataclass(frozen=True)
class SignedKeys:
    """A site's advertised keys: (c, s) public keys, its signature and its certificate."""

    c: bytes
    s: bytes
    signature: bytes
    cert: bytes  # DER, issued by the federation CA


@dataclass
class SecAggSite:
    """One site's side of one aggregation. Create it at advertise-keys; drive it in order."""

    node: int
    round_tag: bytes  # binds signatures, shares and masks to this run and round
    min_sites: int  # dp-min-sites: the verified sites every sum must hold
    _c: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _s: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _b: bytes = field(default=b"", repr=False)
    _roster: dict[int, SignedKeys] = field(default_factory=dict, repr=False)  # verified
    _threshold: int = 0
    _partners: list[int] = field(default_factory=list)  # whom it masked with
    _shares_b: dict[int, bytes] = field(default_factory=dict, repr=False)
    _shares_s: dict[int, bytes] = field(default_factory=dict, repr=False)
    # The (active, dead) view of the round it signed at the consistency check.
    _view: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))
    _stage: str = "advertise-keys"

    # ------------------------------------------------------------ 0. advertise keys

    def advertise_keys(self, identity: Signer) -> SignedKeys:
        """Stage 0: (c, s) public keys, signed by the site's identity."""
        self._expect("advertise-keys", "share-keys")
        c, s = raw_public(self._c), raw_public(self._s)
        signature = identity.sign(keys_message(self.round_tag, self.node, c, s))
        return SignedKeys(c, s, signature, identity.cert)

    # ------------------------------------------------------------ 1. share keys

    def share_keys(
        self, roster: Mapping[int, SignedKeys], threshold: int, verify: Verifier
    ) -> dict[int, bytes]:
        """Stage 1: encrypted shares of b and s for each neighbour (not itself).

        `roster`: every neighbour's signed keys, this site's included. Refuses the whole
        roster when any entry does not verify: only a server that deviates sends one.
        """
        self._expect("share-keys", "masked-input")
        n = len(roster)
        mine = roster.get(self.node)
        if mine is None or (mine.c, mine.s) != (raw_public(self._c), raw_public(self._s)):
            raise SecAggError("the server's key list does not hold this site's own keys")
        if not self.min_sites <= n <= MAX_NEIGHBOURS:
            raise SecAggError(
                f"the server named a neighbourhood of {n} site(s); this run needs "
                f"{self.min_sites} to {MAX_NEIGHBOURS} (dp-min-sites to the SecAgg+ maximum)"
            )
        if threshold != threshold_for(n):
            raise SecAggError(
                f"threshold {threshold} for {n} neighbours; this protocol needs "
                f"{threshold_for(n)} (more than two thirds) so the server can never rebuild "
                "both masks of a site"
            )
        names: dict[str, int] = {}
        for node, keys in roster.items():
            if len(keys.c) != KEY_BYTES or len(keys.s) != KEY_BYTES:
                raise SecAggError(f"node {node}'s public keys are not 32-byte keys")
            signed = keys_message(self.round_tag, node, keys.c, keys.s)
            try:
                name = verify(keys.cert, signed, keys.signature)
            except PrivacyError as exc:
                raise SecAggError(
                    f"node {node}'s keys are not a federation site's: {exc}"
                ) from None
            if name in names:
                raise SecAggError(
                    f"site {name!r} appears as nodes {names[name]} and {node}; a site takes "
                    "part once"
                )
            names[name] = node
        flat = [k for e in roster.values() for k in (e.c, e.s)]
        if len(set(flat)) != len(flat):
            raise SecAggError("the neighbours' public keys are not distinct")
        self._roster = {int(k): v for k, v in roster.items()}
        self._threshold = threshold
        self._b = os.urandom(KEY_BYTES)
        order = sorted(self._roster)
        b_shares = create_shares(self._b, threshold, n)
        s_shares = create_shares(raw_private(self._s), threshold, n)
        out: dict[int, bytes] = {}
        for i, dst in enumerate(order):
            if dst == self.node:
                self._shares_b[dst], self._shares_s[dst] = b_shares[i], s_shares[i]
                continue
            c_dst = self._roster[dst].c
            out[dst] = seal_shares(
                self._c, c_dst, self.round_tag, self.node, dst, b_shares[i], s_shares[i]
            )
        return out

    # ------------------------------------------------------------ 2. masked input

    def receive_shares(self, ciphertexts: Mapping[int, bytes]) -> list[int]:
        """Stage 2, before any spend: open the shares sent to this site; its partners.

        A share that does not open drops its sender (no mask with it, not counted).
        Raises SecAggError when fewer than max(threshold, dp-min-sites) verified sites,
        itself included, are left: the round could not be unmasked, or would not hold
        the noise this site's share assumes.
        """
        self._expect("masked-input", "masked-input-ready")
        for src, blob in ciphertexts.items():
            src = int(src)
            if src == self.node or src not in self._roster:
                raise SecAggError(f"a share from node {src}, which is not a neighbour")
            try:
                b, s = open_shares(
                    self._c, self._roster[src].c, self.round_tag, src, self.node, bytes(blob)
                )
            except SecAggError:
                continue  # a hostile or tampered share: that neighbour is dropped
            self._shares_b[src], self._shares_s[src] = b, s
            self._partners.append(src)
        self._partners.sort()
        need = max(self._threshold, self.min_sites)
        if len(self._partners) + 1 < need:
            raise SecAggError(
                f"{len(self._partners) + 1} verified site(s) (this one included) sent "
                f"usable shares; this site requires at least {need}: dp-min-sites for its "
                "noise share, the threshold for the sum to be unmasked"
            )
        return list(self._partners)

    def masked_input(self, vector: np.ndarray) -> np.ndarray:
        """Stage 2, after the spend: the uint64 `vector` plus its masks (mod 2^64)."""
        self._expect("masked-input-ready", "consistency")
        vec = np.asarray(vector, dtype=np.uint64)
        out = vec + mask(self._b, self.round_tag, vec.size)
        for other in self._partners:
            m = mask(exchange(self._s, self._roster[other].s), self.round_tag, vec.size)
            out = out + m if self.node > other else out - m  # uint64: wraps mod 2^64
        return np.asarray(out, dtype=np.uint64)

    # ------------------------------------------------------------ 3. consistency check

    def consistency_check(
        self, active: Sequence[int], dead: Sequence[int], identity: Signer
    ) -> bytes:
        """Stage 3: check the server's view of the round and sign it."""
        self._expect("consistency", "unmask")
        act, gone = {int(a) for a in active}, {int(d) for d in dead}
        if act & gone:
            raise SecAggError(
                f"node(s) {sorted(act & gone)[:3]} named both active and dropped: that would "
                "hand the server both masks of a site"
            )
        if self.node not in act:
            raise SecAggError("the server's active list leaves out this site")
        held = set(self._partners) | {self.node}
        near = act & set(self._roster)
        if not near <= held:
            raise SecAggError(
                f"node(s) {sorted(near - held)[:3]} named active, but this site did not mask "
                "with them (their shares never reached it)"
            )
        need = max(self._threshold, self.min_sites)
        if len(near) < need:
            raise SecAggError(
                f"{len(near)} verified site(s) sent a masked vector; this site requires at "
                f"least {need} (dp-min-sites {self.min_sites} for its noise share to be "
                f"enough, threshold {self._threshold})"
            )
        self._view = (sorted(act), sorted(gone))
        return identity.sign(view_message(self.round_tag, act, gone))

    # ------------------------------------------------------------ 4. unmask

    def unmask(self, signatures: Mapping[int, bytes], verify: Verifier) -> dict[int, bytes]:
        """Stage 4: shares of b for the active neighbours, of s for the dead ones.

        Only when at least `threshold` active neighbours signed the view this site
        signed: a server that showed sites different views cannot gather them.
        """
        self._expect("unmask", "done")
        active, dead = self._view
        message = view_message(self.round_tag, active, dead)
        signers = set()
        for node, signature in signatures.items():
            node = int(node)
            if node not in self._roster or node not in active:
                continue
            try:
                verify(self._roster[node].cert, message, bytes(signature))
            except PrivacyError:
                continue  # forged, or over another view: not counted
            signers.add(node)
        if len(signers) < self._threshold:
            raise SecAggError(
                f"{len(signers)} neighbour(s) signed this site's view of the round; the "
                f"threshold is {self._threshold}"
            )
        owners = set(self._shares_b)
        out = {n: self._shares_b[n] for n in owners & set(active)}
        out.update({n: self._shares_s[n] for n in owners & set(dead)})
        return out

    def _expect(self, stage: str, then: str) -> None:
        """Each stage once, in order: a replayed or skipped request is refused."""
        if self._stage != stage:
            raise SecAggError(f"a {stage} request at the {self._stage} stage of this round")
        self._stage = then

    # ------------------------------------------------------------ state between messages

    def to_state(self) -> dict[str, bytes | int | str | list[int] | list[bytes]]:
        """Everything the site needs between stages, for the site's own state store."""
        nodes = sorted(self._roster)
        held = sorted(self._shares_b)
        r = self._roster
        return {
            "node": self.node,
            "round-tag": self.round_tag,
            "min-sites": self.min_sites,
            "c": raw_private(self._c),
            "s": raw_private(self._s),
            "b": self._b,
            "key-nodes": nodes,
            "key-c": [r[n].c for n in nodes],
            "key-s": [r[n].s for n in nodes],
            "key-sig": [r[n].signature for n in nodes],
            "key-cert": [r[n].cert for n in nodes],
            "threshold": self._threshold,
            "partners": list(self._partners),
            "share-nodes": held,
            "share-b": [self._shares_b[n] for n in held],
            "share-s": [self._shares_s[n] for n in held],
            "view-active": list(self._view[0]),
            "view-dead": list(self._view[1]),
            "stage": self._stage,
        }

    @staticmethod
    def from_state(d: Mapping[str, object]) -> SecAggSite:
        def blist(key: str) -> list[bytes]:
            return [bytes(x) for x in d[key]]  # type: ignore[attr-defined]

        def ilist(key: str) -> list[int]:
            return [int(x) for x in d[key]]  # type: ignore[attr-defined]

        def one(key: str) -> bytes:
            value = d[key]
            if not isinstance(value, bytes):
                raise SecAggError(f"this round's stored state holds no `{key}`")
            return value

        site = SecAggSite(
            node=int(d["node"]),  # type: ignore[call-overload]
            round_tag=one("round-tag"),
            min_sites=int(d["min-sites"]),  # type: ignore[call-overload]
            _c=X25519PrivateKey.from_private_bytes(one("c")),
            _s=X25519PrivateKey.from_private_bytes(one("s")),
        )
        site._b = one("b")
        entries = zip(
            blist("key-c"), blist("key-s"), blist("key-sig"), blist("key-cert"), strict=True
        )
        site._roster = {n: SignedKeys(*e) for n, e in zip(ilist("key-nodes"), entries, strict=True)}
        site._threshold = int(d["threshold"])  # type: ignore[call-overload]
        site._partners = ilist("partners")
        nodes = ilist("share-nodes")
        site._shares_b = dict(zip(nodes, blist("share-b"), strict=True))
        site._shares_s = dict(zip(nodes, blist("share-s"), strict=True))
        site._view = (ilist("view-active"), ilist("view-dead"))
        site._stage = str(d["stage"])
        return site
