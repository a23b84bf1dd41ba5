"""Secure aggregation against an active server: the primitives and the server's math. No Flower.

fedsilo's SecAgg+ is Bonawitz et al.'s protocol secure against an active adversary
("Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017,
Figure 4: the variant with a consistency check and signed messages) on Bell et al.'s
sparse neighbourhoods ("Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020). A round has five stages, named as in the papers; the site's
side is fedsilo.privacy.secagg_site.SecAggSite, the server's is
fedsilo.server.secure_round, which drives them over Flower messages:

  0. advertise-keys   each site makes two X25519 key pairs (c: encrypting shares, s:
                      pairwise masks) and sends both public keys, signed with its
                      identity key, with its certificate from the federation CA.
  1. share-keys       the server sends each site its neighbours' signed keys. The site
                      verifies every certificate against the federation CA and every
                      signature (bound to the run, round and node id), refuses
                      duplicates, a neighbourhood outside [dp-min-sites, MAX_NEIGHBOURS]
                      and any threshold but THRESHOLD's; it Shamir-shares a fresh
                      256-bit self-mask seed b and its mask key s among the neighbours
                      and sends each share AES-GCM-encrypted to its owner.
  2. masked-input     the server forwards the ciphertexts. The site decrypts every one
                      *before* it spends budget; a neighbour whose share does not
                      decrypt is dropped. With at least max(threshold, dp-min-sites)
                      verified sites (itself included) it spends, adds its self mask
                      PRG(b) and +-PRG(s_ij) for each partner j, and sends the masked
                      vector with the list of partners it masked with.
  3. consistency      the server names the surviving set U3 (active) and the partners
                      that dropped after sharing (dead). The site checks the view (it is
                      in U3, no node is both, every active neighbour is a partner, at
                      least max(threshold, dp-min-sites) active neighbours) and signs it.
  4. unmask           the server forwards the signatures; with at least `threshold`
                      valid signatures on its own view from active neighbours, the site
                      reveals its shares of b for the active and of s for the dead.
  The server rebuilds the active sites' self masks and the dead sites' pairwise masks
  and removes them: the sum of the active sites' vectors is what is left. A site sends
  the next round's advertised keys (fresh, signed for that round) with its unmask
  answer, so later rounds skip stage 0 for every site that answered: four exchanges.

What this buys against a server that deviates from the protocol:
- it cannot invent sites or substitute keys: keys are signed with site keys the
  federation CA certified (its key stays offline, not on the server);
- it cannot pad the active list to reach dp-min-sites: a site counts only neighbours
  whose signed keys and decrypted shares it holds;
- it cannot show different sites different views (to collect b of a site from some and
  s from others): each site reveals only after `threshold` neighbours signed the very
  view it signed. With THRESHOLD's t = floor(2n/3) + 1 in a neighbourhood of n, two
  views can both gather t signatures only if at least 2t - n > n/3 neighbours sign
  both: fewer than n/3 colluding sites cannot help it;
- for any site, an honest site reveals its share of b or of s in a round, never both.
Left to the server: dropping or delaying sites (a round then releases nothing, or a
sum over fewer sites that every site still counted to at least dp-min-sites).

Crypto: X25519 ECDH, HKDF-SHA256, AES-GCM (round, source and destination as associated
data, so a share cannot be replayed into another round or redirected), ChaCha20 masks
under the full 256-bit secrets, uniform over Z_(2^64) and so over every ring Z_(2^(8k))
a round narrows the vectors to on the wire (reduced modulo 2^(8k), k = 1..8 bytes,
told to the sites with the masked-input stage). Flower's secaggplus_mod folds
mask seeds to 32 bits for numpy's RandomState (a server can search them offline) and
trusts the server's lists; fedsilo uses neither, only Flower's Shamir sharing.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares

from fedsilo.config import MAX_MIN_SITES
from fedsilo.errors import ConfigError, PrivacyError

KEY_BYTES = 32
NONCE_BYTES = 12
# A site's neighbourhood (itself included). Up to this many sites every site neighbours
# every other; beyond, Bell et al.'s sparse graph gives each site MAX_MIN_SITES.
MAX_NEIGHBOURS = MAX_MIN_SITES + 1
# The widest ring the vectors are summed in: Z_(2^64). A round sends them in the narrowest
# ring its sum fits (fedsilo.privacy.distributed.ring_bytes), RING_BYTES_MAX at most.
RING_BYTES_MAX = 8

# (certificate DER, message, signature) -> the site name the federation CA certified;
# raises fedsilo.privacy.identity.IdentityError (a PrivacyError) when it does not verify.
Verifier = Callable[[bytes, bytes, bytes], str]


class Signer(Protocol):
    """A site's identity (fedsilo.privacy.identity.SiteIdentity): its certificate and key."""

    @property
    def cert(self) -> bytes: ...  # DER, issued by the federation CA

    def sign(self, message: bytes) -> bytes: ...


class SecAggError(PrivacyError):
    """A secure-aggregation message that breaks the protocol; the site sends nothing."""


def threshold_for(neighbourhood: int) -> int:
    """Shamir threshold for a neighbourhood of `neighbourhood` sites (itself included).

    floor(2n/3) + 1 (Bonawitz et al., the active-adversary setting): the consistency
    check then holds against fewer than n/3 colluding neighbours, and up to n - t
    neighbours may drop out. For 2 or 3 sites that is all of them: no dropout is
    survivable, as with any secret split that few ways.
    """
    return 2 * neighbourhood // 3 + 1


def neighbours(nodes: Sequence[int], *, seed: int = 0) -> dict[int, list[int]]:
    """SecAgg+'s communication graph: each node and its neighbours (itself included).

    Every node when there are at most MAX_NEIGHBOURS; else a random Harary-like ring:
    nodes in a shuffled order, each joined to MAX_MIN_SITES // 2 on either side, so
    every neighbourhood holds MAX_MIN_SITES sites (the largest dp-min-sites). Symmetric.
    """
    nodes = sorted(set(nodes))
    if len(nodes) <= MAX_NEIGHBOURS:
        return {n: list(nodes) for n in nodes}
    order = list(nodes)
    random.Random(seed).shuffle(order)
    half = MAX_MIN_SITES // 2
    pos = {n: i for i, n in enumerate(order)}
    return {
        n: sorted({order[(pos[n] + d) % len(order)] for d in range(-half, half + 1)}) for n in nodes
    }


# ---------------------------------------------------------------- what is signed


def _framed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "little") + p for p in parts)


def _node(n: int) -> bytes:
    return int(n).to_bytes(8, "little")


def round_tag(run: str, server_round: int) -> bytes:
    """What one round's signatures, shares and masks are bound to: its run and number."""
    return f"{run}/{server_round}".encode()


def keys_message(round_tag: bytes, node: int, c: bytes, s: bytes) -> bytes:
    """What a site signs at advertise-keys: its keys, bound to the run, round and node."""
    return _framed(b"fedsilo secagg keys v1", round_tag, _node(node), c, s)


def view_message(round_tag: bytes, active: Iterable[int], dead: Iterable[int]) -> bytes:
    """What a site signs at the consistency check: the server's view of the round."""
    act = b"".join(_node(n) for n in sorted(active))
    gone = b"".join(_node(n) for n in sorted(dead))
    return _framed(b"fedsilo secagg view v1", round_tag, act, gone)


# ---------------------------------------------------------------- keys, shares, masks


def raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def exchange(private: X25519PrivateKey, public: bytes) -> bytes:
    """X25519 ECDH; SecAggError for anything that is not a usable public key."""
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
    return round_tag + _node(src) + _node(dst)


def seal_shares(
    c: X25519PrivateKey, peer_c: bytes, round_tag: bytes, src: int, dst: int, b: bytes, s: bytes
) -> bytes:
    """src's shares of b and s for dst, encrypted under their ECDH key (c)."""
    key = _hkdf(exchange(c, peer_c), b"fedsilo secagg share")
    nonce = os.urandom(NONCE_BYTES)
    plain = len(b).to_bytes(4, "little") + b + s
    return nonce + AESGCM(key).encrypt(nonce, plain, _share_aad(round_tag, src, dst))


def open_shares(
    c: X25519PrivateKey, peer_c: bytes, round_tag: bytes, src: int, dst: int, blob: bytes
) -> tuple[bytes, bytes]:
    """(b share, s share) src sealed for dst; SecAggError when they do not open."""
    key = _hkdf(exchange(c, peer_c), b"fedsilo secagg share")
    try:
        plain = AESGCM(key).decrypt(
            blob[:NONCE_BYTES], blob[NONCE_BYTES:], _share_aad(round_tag, src, dst)
        )
    except (InvalidTag, ValueError):
        raise SecAggError(f"the share from node {src} does not decrypt for this round") from None
    size = int.from_bytes(plain[:4], "little")
    if not 0 < size < len(plain) - 4:
        raise SecAggError(f"the share from node {src} is malformed")
    return plain[4 : 4 + size], plain[4 + size :]


# ---------------------------------------------------------------- the server's math


def survivors(
    masked: Iterable[int],
    partners: Mapping[int, Iterable[int]],
    graph: Mapping[int, Iterable[int]],
) -> set[int]:
    """U3: the sites whose masked vectors can enter the sum.

    `partners[i]`: whom site i masked with (the neighbours whose shares it opened).
    Masks cancel only between neighbours that both masked with each other, and a site
    checks that every active neighbour is one it masked with; so a site i that some
    active neighbour j did not mask with (i's share did not open at j) is left out of
    the sum. It then counts as dropped: its neighbours reveal its mask key, never its
    self-mask seed, so its vector stays hidden. Repeated until no such site is left.
    """
    active = set(masked)
    mine = {i: set(partners.get(i, ())) for i in active}
    while True:
        bad = {
            i for i in active if any(i not in mine[j] for j in graph[i] if j != i and j in active)
        }
        if not bad:
            return active
        active -= bad


def unmask_sum(
    round_tag: bytes,
    masked: Mapping[int, np.ndarray],
    keys: Mapping[int, tuple[bytes, bytes]],
    partners: Mapping[int, Iterable[int]],
    shares: Mapping[int, Mapping[int, bytes]],
    threshold: Mapping[int, int],
    ring_bytes: int = RING_BYTES_MAX,
) -> np.ndarray:
    """The sum (int64) of the vectors in `masked` (the active sites), read from the ring
    of `ring_bytes` bytes: exact while every coordinate of the true sum lies in
    [-2^(8 ring_bytes - 1), 2^(8 ring_bytes - 1)).

    keys: node -> (c, s) public keys; partners: node -> whom it masked with; shares:
    answering node -> {owner: share} (b for the active owners, s for the dead);
    threshold: owner -> the threshold its shares were made with. The masks are removed
    modulo 2^64, then the total is reduced to the ring (2^(8 ring_bytes) divides 2^64,
    so reducing commutes with the sums).
    """
    active = set(masked)
    size = next(iter(masked.values())).size
    total = np.zeros(size, dtype=np.uint64)
    for vec in masked.values():
        total += np.asarray(vec, dtype=np.uint64)
    for owner in sorted(active):  # self masks
        total -= mask(_combine(owner, shares, threshold[owner]), round_tag, size)
    dead = {j for i in active for j in partners[i]} - active
    for j in sorted(dead):  # pairwise masks the active added for sites that then dropped
        s_j = X25519PrivateKey.from_private_bytes(_combine(j, shares, threshold[j]))
        for i in sorted(active):
            if j in set(partners[i]):
                m = mask(exchange(s_j, keys[i][1]), round_tag, size)
                total = total - m if i > j else total + m
    return from_ring(total, ring_bytes)


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


# ---------------------------------------------------------------- vectors on the wire


def to_ring(values: np.ndarray) -> np.ndarray:
    """Signed integers (int64) as elements of Z_(2^64) (uint64, two's complement)."""
    return np.asarray(values, dtype=np.int64).view(np.uint64)


def from_ring(total: np.ndarray, ring_bytes: int) -> np.ndarray:
    """Elements of Z_(2^64) (uint64), reduced to the ring of `ring_bytes` bytes, as the
    signed integers (int64) in [-2^(8 ring_bytes - 1), 2^(8 ring_bytes - 1)) they stand for."""
    check_ring_bytes(ring_bytes)
    words = np.asarray(total, dtype=np.uint64)
    if ring_bytes < RING_BYTES_MAX:
        bits = 8 * ring_bytes
        low = words & np.uint64((1 << bits) - 1)
        sign = np.uint64(1 << (bits - 1))
        words = (low ^ sign) - sign  # sign-extends; wraps mod 2^64 as uint64 does
    return words.view(np.int64)


def check_ring_bytes(ring_bytes: object) -> int:
    """`ring_bytes` when it is a ring width fedsilo uses (1 to 8 bytes); else SecAggError."""
    if ring_bytes is None:
        raise SecAggError("the server sent no ring width (`ring-bytes`)")
    if isinstance(ring_bytes, bool) or not isinstance(ring_bytes, int):
        raise SecAggError(f"the ring width {ring_bytes!r} is not a whole number of bytes")
    if not 1 <= ring_bytes <= RING_BYTES_MAX:
        raise SecAggError(f"the ring width {ring_bytes} bytes is not 1 to {RING_BYTES_MAX}")
    return ring_bytes


def ring_bytes_for(bound: float) -> int:
    """The fewest bytes whose ring holds, with a factor of 2 to spare, every integer of
    magnitude up to `bound`: 2^(8 k - 1) >= 2 bound. The spare factor makes a sum that
    wrapped by less than the ring fail the server's norm check instead of passing it.

    Raises:
        ConfigError: not even 8 bytes (the 64-bit ring) hold it.
    """
    finite = math.isfinite(bound)
    need_bits = math.log2(max(2.0 * bound, 1.0)) + 1.0 if finite else math.inf  # + the sign
    ring_bytes = max(1, math.ceil(need_bits / 8)) if finite else RING_BYTES_MAX + 1
    if ring_bytes > RING_BYTES_MAX:
        raise ConfigError(
            f"the secure sum can reach {bound:.3g} in integer units, beyond the 64-bit ring "
            f"it is added in (at most {2.0**62:.3g} with fedsilo's factor 2 to spare). Use "
            "fewer sites a round, a smaller batch-size or a smaller model."
        )
    return ring_bytes


def encode_vector(vector: np.ndarray, ring_bytes: int = RING_BYTES_MAX) -> bytes:
    """A uint64 vector reduced to the ring of `ring_bytes` bytes, each element as that
    many little-endian bytes (what a masked reply carries). Reducing a masked vector
    keeps it uniform: its masks are uniform in every ring 2^(8 k)."""
    check_ring_bytes(ring_bytes)
    words = np.ascontiguousarray(vector, dtype="<u8")
    if ring_bytes == RING_BYTES_MAX:
        return words.tobytes()
    return words.view(np.uint8).reshape(-1, RING_BYTES_MAX)[:, :ring_bytes].tobytes()


def decode_vector(raw: object, size: int, ring_bytes: int = RING_BYTES_MAX) -> np.ndarray:
    """The uint64 vector of `size` elements of `ring_bytes` bytes in `raw`; SecAggError
    when it is not one."""
    check_ring_bytes(ring_bytes)
    if not isinstance(raw, bytes) or len(raw) != ring_bytes * size:
        raise SecAggError(f"the masked vector is not {size} words of {ring_bytes} byte(s)")
    if ring_bytes == RING_BYTES_MAX:
        return np.frombuffer(raw, dtype="<u8").astype(np.uint64)
    words = np.zeros((size, RING_BYTES_MAX), dtype=np.uint8)
    words[:, :ring_bytes] = np.frombuffer(raw, dtype=np.uint8).reshape(size, ring_bytes)
    return words.view("<u8").reshape(size).astype(np.uint64)
