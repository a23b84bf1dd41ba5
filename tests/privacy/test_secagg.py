"""SecAgg+ in-process: the server's sum equals the plain sum; dropouts; refusals."""

from __future__ import annotations

import numpy as np
import pytest

from fedsilo.privacy.secagg import (
    SecAggError,
    SecAggSite,
    mask,
    neighbours,
    threshold_for,
    to_ring,
    unmask_sum,
)

TAG = b"run-1/round-3"


def run_round(
    vectors: dict[int, np.ndarray],
    *,
    drop_after_share: set[int] = frozenset(),
    degree: int = 63,
    roundtrip_state: bool = True,
):
    """Drive every stage as the server would; returns (sum, what the server saw)."""
    nodes = sorted(vectors)
    graph = neighbours(nodes, degree=degree, seed=1)
    sites = {n: SecAggSite(node=n, round_tag=TAG) for n in nodes}
    keys = {n: sites[n].public_keys() for n in nodes}
    if roundtrip_state:  # as the ClientApp does between messages
        sites = {n: SecAggSite.from_state(s.to_state()) for n, s in sites.items()}
    outbox = {
        n: sites[n].share_keys({m: keys[m] for m in graph[n]}, threshold_for(len(graph[n])))
        for n in nodes
    }
    inbox: dict[int, dict[int, bytes]] = {n: {} for n in nodes}
    for src, sent in outbox.items():
        for dst, blob in sent.items():
            inbox[dst][src] = blob
    masked = {
        n: sites[n].masked(to_ring(vectors[n]), inbox[n])
        for n in nodes
        if n not in drop_after_share
    }
    active = sorted(masked)
    shares = {}
    for n in active:
        nb = set(graph[n])
        shares[n] = sites[n].unmask(
            [a for a in active if a in nb], [d for d in drop_after_share if d in nb]
        )
    total = unmask_sum(
        TAG,
        masked,
        keys,
        graph,
        {n: list(inbox[n]) for n in nodes},
        shares,
        {n: threshold_for(len(graph[n])) for n in nodes},
    )
    return total, masked


def test_the_unmasked_sum_is_the_plain_sum_and_no_masked_vector_reveals_its_site():
    rng = np.random.default_rng(0)
    vectors = {n: rng.integers(-(2**40), 2**40, 1000) for n in (11, 22, 33, 44, 55)}
    total, masked = run_round(vectors)
    assert np.array_equal(total, sum(vectors.values()))
    for n, vec in masked.items():  # what the server holds of one site: uniform noise
        diff = vec.view(np.int64) - vectors[n]
        assert np.mean(np.abs(diff) < 2**50) < 0.01


def test_a_site_dropping_after_sharing_keys_is_left_out_of_the_sum():
    rng = np.random.default_rng(1)
    vectors = {n: rng.integers(-1000, 1000, 257) for n in range(1, 8)}
    total, masked = run_round(vectors, drop_after_share={4, 6})
    assert set(masked) == {1, 2, 3, 5, 7}
    assert np.array_equal(total, sum(v for n, v in vectors.items() if n not in (4, 6)))


def test_sparse_graph_with_dropout():
    rng = np.random.default_rng(2)
    vectors = {n: rng.integers(-5, 5, 64) for n in range(100, 112)}
    graph = neighbours(sorted(vectors), degree=4, seed=1)
    assert all(len(v) == 5 for v in graph.values())
    assert all(a in graph[b] for a in graph for b in graph[a])  # symmetric
    total, _ = run_round(vectors, drop_after_share={105}, degree=4)
    assert np.array_equal(total, sum(v for n, v in vectors.items() if n != 105))


def test_too_many_dropouts_cannot_be_unmasked():
    vectors = {n: np.arange(10) for n in range(1, 6)}
    with pytest.raises(SecAggError, match="the threshold is 3"):
        run_round(vectors, drop_after_share={1, 2, 3})


def test_a_site_refuses_to_unmask_fewer_sites_than_its_noise_assumes():
    sites, _, inbox = _two_stage_site(5)
    sites[1].masked(to_ring(np.zeros(3, dtype=np.int64)), inbox[1])
    with pytest.raises(SecAggError, match="requires at least 5 for its noise share"):
        sites[1].unmask([1, 2, 3, 4], [5], min_active=5)


def _two_stage_site(n_sites: int = 4):
    nodes = list(range(1, n_sites + 1))
    sites = {n: SecAggSite(node=n, round_tag=TAG) for n in nodes}
    keys = {n: s.public_keys() for n, s in sites.items()}
    t = threshold_for(n_sites)
    out = {n: s.share_keys(keys, t) for n, s in sites.items()}
    inbox = {n: {src: sent[n] for src, sent in out.items() if src != n} for n in nodes}
    return sites, keys, inbox


def test_a_site_refuses_a_server_that_names_a_node_both_active_and_dropped():
    sites, _, inbox = _two_stage_site()
    sites[1].masked(to_ring(np.zeros(3, dtype=np.int64)), inbox[1])
    with pytest.raises(SecAggError, match="both active and dropped"):
        sites[1].unmask([1, 2, 3], [3, 4])


def test_a_site_answers_the_unmask_stage_once():
    sites, _, inbox = _two_stage_site()
    sites[1].masked(to_ring(np.zeros(3, dtype=np.int64)), inbox[1])
    sites[1].unmask([1, 2, 3], [4])
    with pytest.raises(SecAggError, match="unmask request at the done stage"):
        sites[1].unmask([1, 2, 3, 4], [])


def test_a_site_refuses_a_lowered_threshold_or_missing_own_keys():
    sites = {n: SecAggSite(node=n, round_tag=TAG) for n in (1, 2, 3, 4)}
    keys = {n: s.public_keys() for n, s in sites.items()}
    with pytest.raises(SecAggError, match="more than half"):
        sites[1].share_keys(keys, 2)
    other = SecAggSite(node=9, round_tag=TAG)
    with pytest.raises(SecAggError, match="own keys"):
        other.public_keys()
        other.share_keys(keys, 3)


def test_a_share_replayed_into_another_round_does_not_decrypt():
    sites, _, inbox = _two_stage_site()
    later = SecAggSite.from_state({**sites[1].to_state(), "round-tag": b"run-1/round-4"})
    with pytest.raises(SecAggError, match="does not decrypt"):
        later.masked(to_ring(np.zeros(3, dtype=np.int64)), inbox[1])


def test_masks_are_full_width_and_bound_to_their_context():
    a = mask(b"k" * 32, b"r1", 4096)
    assert a.dtype == np.uint64 and (a >> np.uint64(63)).any()  # top bit used
    assert not np.array_equal(a, mask(b"k" * 32, b"r2", 4096))
    assert np.array_equal(a, mask(b"k" * 32, b"r1", 4096))
