"""SecAgg+ in-process, both roles as pure objects: sums, dropouts, and the site's refusals.

`Federation` plays an honest server over real site identities (certificates from a
federation CA); each test that plays a hostile server changes one thing it sends.
The message-level attacks (through real ClientApps and ledgers) are in
tests/server/test_secure_round_attacks.py.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from fedsilo.errors import ConfigError
from fedsilo.privacy.identity import SiteIdentity, simulated_identity, verify_signed
from fedsilo.privacy.identity import write_simulated_identities as make_identities
from fedsilo.privacy.secagg import (
    MAX_NEIGHBOURS,
    RING_BYTES_MAX,
    SecAggError,
    check_ring_bytes,
    decode_vector,
    encode_vector,
    from_ring,
    mask,
    neighbours,
    ring_bytes_for,
    survivors,
    threshold_for,
    to_ring,
    unmask_sum,
)
from fedsilo.privacy.secagg_site import SecAggSite, SignedKeys

TAG = b"run-1/round-3"


class Federation:
    """n sites with CA-certified identities, and an honest server driving them."""

    def __init__(self, tmp: Path, n: int, *, min_sites: int = 2, graph: dict | None = None):
        names = [f"site-{i}" for i in range(n)]
        make_identities(tmp, names)
        self.ids: dict[int, SiteIdentity] = {
            100 + i: simulated_identity(tmp, name) for i, name in enumerate(names)
        }
        self.verify = functools.partial(verify_signed, next(iter(self.ids.values())).ca)
        self.sites = {
            node: SecAggSite(node=node, round_tag=TAG, min_sites=min_sites) for node in self.ids
        }
        self.keys = {node: s.advertise_keys(self.ids[node]) for node, s in self.sites.items()}
        self.graph = graph or neighbours(list(self.sites))

    def roster(self, node: int) -> dict[int, SignedKeys]:
        return {m: self.keys[m] for m in self.graph[node]}

    def share_keys(self) -> dict[int, dict[int, bytes]]:
        """Stage 1 at every site; the inbox: destination -> {source: ciphertext}."""
        inbox: dict[int, dict[int, bytes]] = {n: {} for n in self.sites}
        for node, site in self.sites.items():
            t = threshold_for(len(self.graph[node]))
            for dst, blob in site.share_keys(self.roster(node), t, self.verify).items():
                inbox[dst][node] = blob
        return inbox

    def run(
        self,
        vectors: dict[int, np.ndarray],
        *,
        drop_after_share: frozenset[int] = frozenset(),
        roundtrip: bool = True,
        ring_bytes: int = RING_BYTES_MAX,
    ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Every stage as an honest server drives it; (the sum, the masked vectors as
        the server decodes them off the wire, `ring_bytes` bytes a weight)."""
        if roundtrip:  # as the ClientApp keeps the object between messages
            self.sites = {n: SecAggSite.from_state(s.to_state()) for n, s in self.sites.items()}
        inbox = self.share_keys()
        partners, masked = {}, {}
        for n in self.sites:
            if n in drop_after_share:
                continue
            partners[n] = self.sites[n].receive_shares(inbox[n])
            wire = encode_vector(self.sites[n].masked_input(to_ring(vectors[n])), ring_bytes)
            masked[n] = decode_vector(wire, vectors[n].size, ring_bytes)
        active = survivors(masked, partners, self.graph)
        dead = {j for i in active for j in partners[i]} - active
        sigs = {
            n: self.sites[n].consistency_check(sorted(active), sorted(dead), self.ids[n])
            for n in active
        }
        shares = {n: self.sites[n].unmask(sigs, self.verify) for n in active}
        keys = {n: (k.c, k.s) for n, k in self.keys.items()}
        thresholds = {n: threshold_for(len(self.graph[n])) for n in self.sites}
        active_masked = {n: masked[n] for n in active}
        total = unmask_sum(TAG, active_masked, keys, partners, shares, thresholds, ring_bytes)
        return total, masked


def vectors_for(nodes: list[int], seed: int, low: int = -1000, high: int = 1000, size: int = 257):
    rng = np.random.default_rng(seed)
    return {n: rng.integers(low, high, size) for n in nodes}


def test_the_unmasked_sum_is_the_plain_sum_and_no_masked_vector_reveals_its_site(
    tmp_path: Path,
) -> None:
    fed = Federation(tmp_path, 5)
    vectors = vectors_for(list(fed.sites), 0, -(2**40), 2**40, 1000)
    total, masked = fed.run(vectors)
    assert np.array_equal(total, sum(vectors.values()))
    for n, vec in masked.items():  # what the server holds of one site: uniform noise
        diff = vec.view(np.int64) - vectors[n]
        assert np.mean(np.abs(diff) < 2**50) < 0.01


def test_a_narrow_ring_carries_the_exact_sum_in_fewer_bytes_and_each_vector_stays_uniform(
    tmp_path: Path,
) -> None:
    """Two bytes a weight hold a sum of five vectors in [-1000, 1000): the server gets
    the same sum as in the 64-bit ring from a quarter of the bytes, one site dropping
    after it shared keys included, and each masked vector it holds is uniform on the
    ring: nothing of its site shows (the masks are uniform modulo any 2^(8k))."""
    fed = Federation(tmp_path, 6)
    vectors = vectors_for(list(fed.sites), 1, size=4000)
    gone = frozenset({105})
    total, masked = fed.run(vectors, ring_bytes=2, drop_after_share=gone)
    assert np.array_equal(total, sum(v for n, v in vectors.items() if n not in gone))
    assert len(encode_vector(masked[100], 2)) == 2 * 4000
    for n, vec in masked.items():
        assert vec.max() < 2**16
        ring = vec.astype(np.int64)
        assert abs(ring.mean() / 2**16 - 0.5) < 0.02  # uniform on [0, 2^16): mean 2^15
        assert abs(ring.std() / 2**16 - 12**-0.5) < 0.02  # ... and std 2^16 / sqrt(12)
        own = to_ring(vectors[n]).astype(np.uint64) & np.uint64(0xFFFF)
        assert np.mean(vec == own) < 0.01


def test_ring_widths_hold_twice_the_bound_and_the_64_bit_ring_is_the_limit() -> None:
    assert ring_bytes_for(0.0) == 1
    assert ring_bytes_for(64.0) == 1  # 2^7 >= 2 x 64
    assert ring_bytes_for(64.5) == 2
    assert ring_bytes_for(6.53e7) == 4  # 10 Fashion-MNIST sites' sum (test_distributed)
    assert ring_bytes_for(2.0**62) == RING_BYTES_MAX
    with pytest.raises(ConfigError, match="beyond the 64-bit ring"):
        ring_bytes_for(2.0**62 * 1.01)
    with pytest.raises(ConfigError, match="beyond the 64-bit ring"):
        ring_bytes_for(float("inf"))


def test_a_ring_reads_back_as_signed_integers_and_wraps_beyond_its_range() -> None:
    values = np.array([-129, -128, -1, 0, 1, 127, 128, 255, 256], dtype=np.int64)
    assert from_ring(to_ring(values), 1).tolist() == [127, -128, -1, 0, 1, 127, -128, -1, 0]
    assert from_ring(to_ring(values), 2).tolist() == values.tolist()
    assert from_ring(to_ring(values), 8).tolist() == values.tolist()
    wide = np.array([-(2**62), 2**62 - 1], dtype=np.int64)
    assert decode_vector(encode_vector(to_ring(wide), 8), 2).view(np.int64).tolist() == [
        -(2**62),
        2**62 - 1,
    ]


@pytest.mark.parametrize("width", [None, True, 0, 9, "4", 4.0])
def test_a_site_refuses_a_ring_width_it_cannot_send(width: object) -> None:
    with pytest.raises(SecAggError, match="ring width"):
        check_ring_bytes(width)


def test_a_masked_vector_of_the_wrong_width_is_refused() -> None:
    raw = encode_vector(np.arange(10, dtype=np.uint64), 3)
    assert decode_vector(raw, 10, 3).tolist() == list(range(10))
    with pytest.raises(SecAggError, match="10 words of 4 byte"):
        decode_vector(raw, 10, 4)


def test_a_site_dropping_after_sharing_keys_is_left_out_of_the_sum(tmp_path: Path) -> None:
    fed = Federation(tmp_path, 7)  # threshold 5 of 7: two may drop
    vectors = vectors_for(list(fed.sites), 1)
    total, masked = fed.run(vectors, drop_after_share=frozenset({103, 105}))
    assert set(masked) == {100, 101, 102, 104, 106}
    assert np.array_equal(total, sum(v for n, v in vectors.items() if n not in (103, 105)))


def test_a_sparse_graph_with_a_dropout(tmp_path: Path) -> None:
    nodes = list(range(100, 108))
    ring = {n: sorted({nodes[(i + d) % 8] for d in (-2, -1, 0, 1, 2)}) for i, n in enumerate(nodes)}
    fed = Federation(tmp_path, 8, min_sites=3, graph=ring)
    vectors = vectors_for(nodes, 2, -5, 5, 64)
    total, _ = fed.run(vectors, drop_after_share=frozenset({104}))
    assert np.array_equal(total, sum(v for n, v in vectors.items() if n != 104))


def test_the_sparse_graph_beyond_the_largest_neighbourhood() -> None:
    nodes = list(range(1, 200))
    small = neighbours(nodes[:MAX_NEIGHBOURS])
    assert all(len(v) == MAX_NEIGHBOURS for v in small.values())  # everyone
    graph = neighbours(nodes, seed=3)
    assert all(len(v) == MAX_NEIGHBOURS - 1 for v in graph.values())  # the largest M
    assert all(a in graph[b] for a in graph for b in graph[a])  # symmetric


def test_the_threshold_is_more_than_two_thirds_of_the_neighbourhood() -> None:
    for n in range(2, MAX_NEIGHBOURS + 1):
        t = threshold_for(n)
        assert 3 * t > 2 * n and t <= n
        # Two views signed by t sites each share at least 2t - n signers: more than n/3.
        assert 2 * t - n > n / 3


# ---------------------------------------------------------------- what a site refuses


def staged(tmp: Path, n: int = 4, *, min_sites: int = 2) -> tuple[Federation, dict]:
    fed = Federation(tmp, n, min_sites=min_sites)
    return fed, fed.share_keys()


def test_a_site_refuses_a_lowered_threshold(tmp_path: Path) -> None:
    fed = Federation(tmp_path, 4)
    with pytest.raises(SecAggError, match="more than two thirds"):
        fed.sites[100].share_keys(fed.roster(100), 2, fed.verify)


def test_a_site_refuses_a_neighbourhood_smaller_than_its_noise_assumes(tmp_path: Path) -> None:
    fed = Federation(tmp_path, 4, min_sites=4)
    roster = {n: fed.keys[n] for n in (100, 101, 102)}
    with pytest.raises(SecAggError, match="neighbourhood of 3 site"):
        fed.sites[100].share_keys(roster, threshold_for(3), fed.verify)


def test_a_site_refuses_keys_without_its_own_or_with_a_duplicate_site(tmp_path: Path) -> None:
    fed = Federation(tmp_path, 4)
    roster = fed.roster(100)
    with pytest.raises(SecAggError, match="own keys"):
        fed.sites[100].share_keys({n: k for n, k in roster.items() if n != 100}, 3, fed.verify)
    fed = Federation(tmp_path, 4)
    roster = fed.roster(100)
    roster[999] = roster[101]  # site-1's signed keys replayed under another node id
    with pytest.raises(SecAggError, match="signature does not verify"):
        fed.sites[100].share_keys(roster, threshold_for(5), fed.verify)


def test_a_share_that_does_not_open_drops_its_sender_before_anything_is_masked(
    tmp_path: Path,
) -> None:
    fed, inbox = staged(tmp_path, 4)
    inbox[100][101] = inbox[100][101][:-1] + bytes([inbox[100][101][-1] ^ 1])
    assert fed.sites[100].receive_shares(inbox[100]) == [102, 103]


def test_a_site_refuses_to_go_on_below_its_threshold_or_noise_assumption(tmp_path: Path) -> None:
    fed, inbox = staged(tmp_path, 4, min_sites=4)
    bad = dict(inbox[100])
    bad[101] = b"\0" * len(bad[101])
    with pytest.raises(SecAggError, match="3 verified site"):
        fed.sites[100].receive_shares(bad)


def test_a_share_replayed_into_another_round_does_not_open(tmp_path: Path) -> None:
    fed, inbox = staged(tmp_path, 4)
    later = SecAggSite.from_state({**fed.sites[100].to_state(), "round-tag": b"run-1/round-4"})
    with pytest.raises(SecAggError, match="1 verified site"):
        later.receive_shares(inbox[100])


def masked_all(fed: Federation, inbox: dict) -> None:
    for n, site in fed.sites.items():
        site.receive_shares(inbox[n])
        site.masked_input(to_ring(np.zeros(3, dtype=np.int64)))


def test_a_site_refuses_a_view_naming_a_node_both_active_and_dropped(tmp_path: Path) -> None:
    fed, inbox = staged(tmp_path)
    masked_all(fed, inbox)
    with pytest.raises(SecAggError, match="both active and dropped"):
        fed.sites[100].consistency_check([100, 101, 102], [102, 103], fed.ids[100])


def test_a_padded_active_list_does_not_count_towards_the_noise_assumption(tmp_path: Path) -> None:
    """Node ids that never exchanged keys with this site count for nothing."""
    fed, inbox = staged(tmp_path, 4, min_sites=4)
    masked_all(fed, inbox)
    with pytest.raises(SecAggError, match="3 verified site"):
        fed.sites[100].consistency_check([100, 101, 102, 900, 901], [103], fed.ids[100])


def test_a_site_answers_each_stage_once(tmp_path: Path) -> None:
    fed, inbox = staged(tmp_path)
    masked_all(fed, inbox)
    view = ([100, 101, 102, 103], [])
    sigs = {n: s.consistency_check(*view, fed.ids[n]) for n, s in fed.sites.items()}
    fed.sites[100].unmask(sigs, fed.verify)
    with pytest.raises(SecAggError, match="unmask request at the done stage"):
        fed.sites[100].unmask(sigs, fed.verify)


def test_a_site_reveals_nothing_without_enough_signatures_on_its_own_view(
    tmp_path: Path,
) -> None:
    """The split-view attack: two sites are told site 103 dropped, two that it is active."""
    fed, inbox = staged(tmp_path, 4)
    masked_all(fed, inbox)
    view_a, view_b = ([100, 101, 102], [103]), ([100, 101, 102, 103], [])
    sigs = {n: fed.sites[n].consistency_check(*view_a, fed.ids[n]) for n in (100, 101)}
    sigs |= {n: fed.sites[n].consistency_check(*view_b, fed.ids[n]) for n in (102, 103)}
    for site in fed.sites.values():  # every signature is forwarded: each view has 2 < 3
        with pytest.raises(SecAggError, match="signed this site's view"):
            site.unmask(sigs, fed.verify)


def test_a_forged_signature_on_the_view_is_not_counted(tmp_path: Path) -> None:
    fed, inbox = staged(tmp_path, 4)
    masked_all(fed, inbox)
    view = ([100, 101, 102, 103], [])
    sigs = {n: fed.sites[n].consistency_check(*view, fed.ids[n]) for n in (100, 101)}
    sigs[102] = sigs[101]  # another site's signature passed off as 102's
    with pytest.raises(SecAggError, match="2 neighbour"):
        fed.sites[100].unmask(sigs, fed.verify)


def test_survivors_leave_out_a_site_whose_share_did_not_open() -> None:
    graph = {n: [1, 2, 3, 4] for n in (1, 2, 3, 4)}
    partners = {1: [2, 3, 4], 2: [1, 3, 4], 3: [1, 2], 4: [1, 2, 3]}  # 4's share to 3 was bad
    assert survivors([1, 2, 3, 4], partners, graph) == {1, 2, 3}


def test_masks_are_full_width_and_bound_to_their_context() -> None:
    a = mask(b"k" * 32, b"r1", 4096)
    assert a.dtype == np.uint64 and (a >> np.uint64(63)).any()  # top bit used
    assert not np.array_equal(a, mask(b"k" * 32, b"r2", 4096))
    assert np.array_equal(a, mask(b"k" * 32, b"r1", 4096))


def test_a_site_whose_share_did_not_open_is_left_out_and_its_vector_stays_masked(
    tmp_path: Path,
) -> None:
    """Site 104's share does not open at 103: 103 never masks with it, 104 is left out
    of the sum after it sent its masked vector, and the server learns 104's mask key,
    never its self-mask seed, so what it holds of 104 stays uniform."""
    fed, inbox = staged(tmp_path, 7)  # threshold 5: 104's key needs 5 holders
    inbox[103][104] = b"\0" * len(inbox[103][104])
    vec = np.arange(50, dtype=np.int64)
    partners, masked = {}, {}
    for n, site in fed.sites.items():
        partners[n] = site.receive_shares(inbox[n])
        masked[n] = site.masked_input(to_ring(vec))
    assert 104 not in partners[103]
    active = survivors(masked, partners, fed.graph)
    assert active == {100, 101, 102, 103, 105, 106}
    dead = {j for i in active for j in partners[i]} - active
    assert dead == {104}
    sigs = {
        n: fed.sites[n].consistency_check(sorted(active), sorted(dead), fed.ids[n]) for n in active
    }
    shares = {n: fed.sites[n].unmask(sigs, fed.verify) for n in active}
    seeds = {o for held in shares.values() for o in held}
    assert seeds == set(fed.sites)  # b of the active, s of 104: never both
    keys = {n: (k.c, k.s) for n, k in fed.keys.items()}
    thresholds = {n: threshold_for(7) for n in fed.sites}
    total = unmask_sum(TAG, {n: masked[n] for n in active}, keys, partners, shares, thresholds)
    assert np.array_equal(total, 6 * vec)
