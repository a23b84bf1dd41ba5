"""Secure aggregation: SecAgg+ (Bell, Bonawitz, Gascon, Lepoint, Raykova, CCS 2020). No Flower.

Both roles of one aggregation, as pure objects the apps drive over messages
(fedsilo.server.secure_round, fedsilo.clients.client_app). The server learns the sum
of the sites' integer vectors and nothing else about any one of them, as long as it
follows the protocol's message flow and fewer than `threshold` of a site's neighbours
give it their shares of that site's secrets (the semi-honest model of SecAgg+; see
"Against a malicious server" below).

One round, four exchanges (Flower's SecAgg+ workflow has the same stages):
  1. setup        each site makes two X25519 key pairs (c: encrypting shares, s: pairwise
                  masks) and sends both public keys.
  2. share-keys   the server sends each site its neighbours' public keys; the site makes a
                  fresh 256-bit self-mask seed b, Shamir-shares b and its mask key s among
                  its neighbours (itself included) with threshold t, and sends each share
                  AES-GCM-encrypted to its owner under their ECDH key (c).
  3. masked       the server forwards the ciphertexts; the site adds to its vector its self
                  mask PRG(b) and, for each neighbour j that shared keys, +PRG(s_ij) if its
                  node id is larger, -PRG(s_ij) otherwise (mod 2^64), and sends that.
  4. unmask       the server names who sent a masked vector (active) and who did not
                  (dead); each site returns its share of b for the active and its share of
                  s for the dead. The server rebuilds the self masks of the active and the
                  dead sites' pairwise masks, and removes them: what is left is the sum of
                  the active sites' vectors. A site that dropped after stage 2 is thus
                  handled as SecAgg+ specifies: its masks are removed, its vector never
                  counted.

Where fedsilo departs from flwr 1.39's implementation (flwr.client.mod.secaggplus_mod),
each time to close a hole an attacker could use:
- Masks come from ChaCha20 keyed with the full 256-bit secret (HKDF-SHA256, bound to
  the round); flwr folds the seed to 32 bits for numpy's RandomState, so a server can
  search all 2^32 self masks offline and strip one off a site's masked vector.
- Masks are uniform over Z_(2^64) (the keystream's words); flwr's randint(0, m - 1) never
  draws m - 1.
- Shares are encrypted with AES-GCM with the round, source and destination as
  associated data: a share cannot be replayed into another round or redirected.
- A site answers the unmask stage once per round, refuses a node named both active and
  dead (flwr only checks the count), and checks the threshold rule itself: t is more
  than half of its neighbourhood, so no two disjoint groups of answers can hand the
  server both b and s of one site.

Against a malicious server: a server that also controls sites (Sybils it registered, or
colluding sites) learns what those sites know; distributed DP (fedsilo.privacy.distributed)
states the number of honest sites its guarantee assumes. Sites do not verify each other's
identity here (the node ids and public keys are the SuperLink's to relay), so a server
that replaced every other site's keys with its own could unmask one site's vector; that
vector still carries the site's own noise share. Signing the keys with the sites' kit
keys would close this; it is not done yet.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

from fedsilo.errors import PrivacyError

KEY_BYTES = 32
NONCE_BYTES = 12
MAX_NEIGHBOURS = 64  # a site's neighbourhood (itself included) in SecAgg+'s sparse graph


class SecAggError(PrivacyError):
    """A secure-aggregation message that breaks the protocol; the site sends nothing."""


def threshold_for(neighbourhood: int) -> int:
    """Shamir threshold for a neighbourhood of `neighbourhood` sites (itself included).

    More than half: two disjoint sets of answers cannot both reach it, so the server
    can never rebuild both the self mask and the mask key of one site. With 2 sites
    that is both: no dropout is survivable, as with any secret split between two.
    """
    return neighbourhood // 2 + 1


def neighbours(
    nodes: Sequence[int], *, degree: int = MAX_NEIGHBOURS - 1, seed: int = 0
) -> dict[int, list[int]]:
    """SecAgg+'s communication graph: each node and its neighbours (itself included).

    Every node when there are at most `degree` + 1; else a random Harary-like ring:
    nodes in a shuffled order, each joined to `degree` // 2 on either side. Symmetric.
    """
    nodes = sorted(set(nodes))
    if len(nodes) <= degree + 1:
        return {n: list(nodes) for n in nodes}
    order = list(nodes)
    random.Random(seed).shuffle(order)
    half = degree // 2
    pos = {n: i for i, n in enumerate(order)}
    out: dict[int, list[int]] = {}
    for n in nodes:
        i = pos[n]
        around = {order[(i + d) % len(order)] for d in range(-half, half + 1)}
        out[n] = sorted(around)
    return out


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def _exchange(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # not a key, or a low-order point
        raise SecAggError(f"a neighbour's public key is not a valid X25519 key ({exc})") from None


def mask(secret: bytes, context: bytes, size: int) -> np.ndarray:
    """`size` uniform uint64 words: ChaCha20 under HKDF(secret, context)."""
    key = _hkdf(secret, b"fedsilo secagg mask " + context)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), None).encryptor()
    return np.frombuffer(stream.update(bytes(8 * size)), dtype="<u8").astype(np.uint64)


def _share_aad(round_tag: bytes, src: int, dst: int) -> bytes:
    return round_tag + src.to_bytes(8, "little") + dst.to_bytes(8, "little")


@dataclass
class SecAggSite:
    """One site's side of one aggregation (a round). Create it at stage 1; drive it in order."""

    node: int
    round_tag: bytes  # binds shares and masks to this run and round
    _c: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _s: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _b: bytes = field(default=b"", repr=False)
    _keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    _threshold: int = 0
    _shares_b: dict[int, bytes] = field(default_factory=dict, repr=False)
    _shares_s: dict[int, bytes] = field(default_factory=dict, repr=False)
    _stage: str = "setup"

    def public_keys(self) -> tuple[bytes, bytes]:
        """Stage 1: (c, s) public keys."""
        self._expect("setup", "share-keys")
        return self.public_keys_cached()

    def public_keys_cached(self) -> tuple[bytes, bytes]:
        """(c, s) public keys, at any stage."""
        return _raw_public(self._c.public_key()), _raw_public(self._s.public_key())

    def share_keys(
        self, keys: Mapping[int, tuple[bytes, bytes]], threshold: int
    ) -> dict[int, bytes]:
        """Stage 2: encrypted shares of b and s, one per neighbour (not itself).

        `keys`: every neighbour's (c, s) public keys, this site's included.
        """
        self._expect("share-keys", "masked")
        mine = self.public_keys_cached()
        if keys.get(self.node) != mine:
            raise SecAggError("the server's key list does not hold this site's own keys")
        n = len(keys)
        if n < 2:
            raise SecAggError("secure aggregation needs at least 2 sites; the server named 1")
        if threshold != threshold_for(n):
            raise SecAggError(
                f"threshold {threshold} for {n} neighbours; SecAgg+ needs more than half "
                f"({threshold_for(n)}) so the server can never rebuild both masks of a site"
            )
        flat = [k for pair in keys.values() for k in pair]
        if len(set(flat)) != len(flat) or any(len(k) != KEY_BYTES for k in flat):
            raise SecAggError("the neighbours' public keys are not distinct 32-byte keys")
        self._keys = {int(k): (c, s) for k, (c, s) in keys.items()}
        self._threshold = threshold
        self._b = os.urandom(KEY_BYTES)
        s_raw = self._s.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        order = sorted(self._keys)
        b_shares = create_shares(self._b, threshold, n)
        s_shares = create_shares(s_raw, threshold, n)
        out: dict[int, bytes] = {}
        for i, dst in enumerate(order):
            if dst == self.node:
                self._shares_b[dst], self._shares_s[dst] = b_shares[i], s_shares[i]
                continue
            key = _hkdf(_exchange(self._c, self._keys[dst][0]), b"fedsilo secagg share")
            nonce = os.urandom(NONCE_BYTES)
            plain = len(b_shares[i]).to_bytes(4, "little") + b_shares[i] + s_shares[i]
            aad = _share_aad(self.round_tag, self.node, dst)
            out[dst] = nonce + AESGCM(key).encrypt(nonce, plain, aad)
        return out

    def masked(self, vector: np.ndarray, ciphertexts: Mapping[int, bytes]) -> np.ndarray:
        """Stage 3: the uint64 `vector` plus its masks (mod 2^64).

        `ciphertexts`: the shares other neighbours sent this site, by sender; only
        those senders' pairwise masks are added (the server removes the same set).
        """
        self._expect("masked", "unmask")
        if len(ciphertexts) + 1 < self._threshold:
            raise SecAggError(
                f"only {len(ciphertexts)} neighbour(s) shared keys; the threshold is "
                f"{self._threshold} (itself included)"
            )
        for src, blob in ciphertexts.items():
            src = int(src)
            if src == self.node or src not in self._keys:
                raise SecAggError(f"a share from node {src}, which is not a neighbour")
            key = _hkdf(_exchange(self._c, self._keys[src][0]), b"fedsilo secagg share")
            try:
                plain = AESGCM(key).decrypt(
                    blob[:NONCE_BYTES],
                    blob[NONCE_BYTES:],
                    _share_aad(self.round_tag, src, self.node),
                )
            except InvalidTag:
                raise SecAggError(
                    f"the share from node {src} does not decrypt for this round"
                ) from None
            size = int.from_bytes(plain[:4], "little")
            self._shares_b[src], self._shares_s[src] = plain[4 : 4 + size], plain[4 + size :]
        vec = np.asarray(vector, dtype=np.uint64)
        out = vec + mask(self._b, self.round_tag, vec.size)
        for other in ciphertexts:
            m = mask(_exchange(self._s, self._keys[int(other)][1]), self.round_tag, vec.size)
            out = out + m if self.node > int(other) else out - m  # uint64: wraps mod 2^64
        return np.asarray(out, dtype=np.uint64)

    def unmask(
        self, active: Sequence[int], dead: Sequence[int], *, min_active: int = 0
    ) -> dict[int, bytes]:
        """Stage 4: shares of b for the `active` neighbours, of s for the `dead` ones.

        `active` and `dead` are the server's lists for the whole round (nodes outside
        this site's neighbourhood get nothing). Refuses (SecAggError) a node named both
        active and dead, a list without this site, fewer active sites than `min_active`
        (distributed DP's assumption) or fewer active neighbours than the threshold.
        """
        self._expect("unmask", "done")
        act, gone = {int(a) for a in active}, {int(d) for d in dead}
        if act & gone:
            raise SecAggError(
                f"node(s) {sorted(act & gone)[:3]} named both active and dropped: that would "
                "hand the server both masks of a site"
            )
        if self.node not in act:
            raise SecAggError("the server's active list leaves out this site")
        if len(act) < min_active:
            raise SecAggError(
                f"{len(act)} site(s) sent a masked vector; this site requires at least "
                f"{min_active} for its noise share to be enough"
            )
        held = set(self._shares_b)
        if len(act & held) < self._threshold:
            raise SecAggError(
                f"{len(act & held)} of this site's neighbours sent a masked vector; the "
                f"threshold is {self._threshold}"
            )
        out = {n: self._shares_b[n] for n in act & held}
        out.update({n: self._shares_s[n] for n in gone & held})
        return out

    def _expect(self, stage: str, then: str) -> None:
        """Each stage once, in order: a replayed or skipped request is refused."""
        if self._stage != stage:
            raise SecAggError(f"a {stage} request at the {self._stage} stage of this round")
        self._stage = then

    def to_state(self) -> dict[str, bytes | int | str | list[int] | list[bytes]]:
        """Everything the site needs between stages, for the site's own state store."""
        raw = serialization.Encoding.Raw, serialization.PrivateFormat.Raw
        nodes = sorted(self._keys)
        held = sorted(self._shares_b)
        return {
            "node": self.node,
            "round-tag": self.round_tag,
            "c": self._c.private_bytes(*raw, serialization.NoEncryption()),
            "s": self._s.private_bytes(*raw, serialization.NoEncryption()),
            "b": self._b,
            "key-nodes": nodes,
            "key-c": [self._keys[n][0] for n in nodes],
            "key-s": [self._keys[n][1] for n in nodes],
            "threshold": self._threshold,
            "share-nodes": held,
            "share-b": [self._shares_b[n] for n in held],
            "share-s": [self._shares_s[n] for n in held],
            "stage": self._stage,
        }

    @staticmethod
    def from_state(d: Mapping[str, object]) -> SecAggSite:
        def blist(key: str) -> list[bytes]:
            return [bytes(x) for x in d[key]]  # type: ignore[attr-defined]

        def ilist(key: str) -> list[int]:
            return [int(x) for x in d[key]]  # type: ignore[attr-defined]

        site = SecAggSite(
            node=int(d["node"]),  # type: ignore[call-overload]
            round_tag=bytes(d["round-tag"]),  # type: ignore[call-overload]
            _c=X25519PrivateKey.from_private_bytes(bytes(d["c"])),  # type: ignore[call-overload]
            _s=X25519PrivateKey.from_private_bytes(bytes(d["s"])),  # type: ignore[call-overload]
        )
        site._b = bytes(d["b"])  # type: ignore[call-overload]
        site._keys = dict(
            zip(ilist("key-nodes"), zip(blist("key-c"), blist("key-s"), strict=True), strict=True)
        )
        site._threshold = int(d["threshold"])  # type: ignore[call-overload]
        nodes = ilist("share-nodes")
        site._shares_b = dict(zip(nodes, blist("share-b"), strict=True))
        site._shares_s = dict(zip(nodes, blist("share-s"), strict=True))
        site._stage = str(d["stage"])
        return site


def unmask_sum(
    round_tag: bytes,
    masked: Mapping[int, np.ndarray],
    keys: Mapping[int, tuple[bytes, bytes]],
    graph: Mapping[int, Sequence[int]],
    shared: Mapping[int, Iterable[int]],
    shares: Mapping[int, Mapping[int, bytes]],
    threshold: Mapping[int, int],
) -> np.ndarray:
    """The server's stage 4: the sum (int64, two's complement) of the active sites' vectors.

    masked: node -> its masked vector (the active sites); keys: node -> (c, s) public
    keys; graph: node -> neighbours; shared: node -> the neighbours whose stage-2 shares
    it received (the pairwise masks it added); shares: answering node -> {owner: share};
    threshold: node -> the threshold of its neighbourhood.
    """
    active = set(masked)
    size = next(iter(masked.values())).size
    total = np.zeros(size, dtype=np.uint64)
    for vec in masked.values():
        total += np.asarray(vec, dtype=np.uint64)
    for owner in active:  # self masks
        b = _combine(owner, shares, threshold[owner])
        total -= mask(b, round_tag, size)
    dead = {j for i in active for j in shared[i]} - active
    for j in dead:  # pairwise masks the active added for sites that then dropped
        s_raw = _combine(j, shares, threshold[j])
        s_j = X25519PrivateKey.from_private_bytes(s_raw)
        for i in active:
            if j in set(shared[i]):
                m = mask(_exchange(s_j, keys[i][1]), round_tag, size)
                total = total - m if i > j else total + m
    return total.view(np.int64)


def _combine(owner: int, shares: Mapping[int, Mapping[int, bytes]], threshold: int) -> bytes:
    got = [held[owner] for held in shares.values() if owner in held]
    if len(got) < threshold:
        raise SecAggError(
            f"{len(got)} share(s) of node {owner}'s secret came back; {threshold} are needed"
        )
    try:
        return combine_shares(got[:threshold])
    except ValueError:
        raise SecAggError(f"the shares of node {owner}'s secret do not combine") from None


def to_ring(values: np.ndarray) -> np.ndarray:
    """Signed integers (int64) as elements of Z_(2^64) (uint64, two's complement)."""
    return np.asarray(values, dtype=np.int64).view(np.uint64)


def encode_vector(vector: np.ndarray) -> bytes:
    """A uint64 vector as little-endian bytes (what a masked reply carries)."""
    return np.asarray(vector, dtype=np.uint64).astype("<u8").tobytes()


def decode_vector(raw: object, size: int) -> np.ndarray:
    """The uint64 vector of `size` words in `raw`; SecAggError when it is not one."""
    if not isinstance(raw, bytes) or len(raw) != 8 * size:
        raise SecAggError(f"the masked vector is not {size} 64-bit words")
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)
