"""The ledger: round-trips, hash chain tamper evidence, and concurrent appends."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.privacy import ledger
from fedsilo.privacy.events import RoundSpend, SampledGaussianEvent
from fedsilo.privacy.ledger import GENESIS, LedgerError, PolicyEntry
from fedsilo.privacy.policy import SitePolicy


def spend(round_: int, *, run: str = "1", steps: int = 10) -> RoundSpend:
    return RoundSpend(
        event=SampledGaussianEvent(noise_multiplier=1.1, sample_rate=0.1, steps=steps),
        clip_norm=1.0,
        delta=1e-5,
        dataset="sha256:" + "ab" * 32,
        run=run,
        round=round_,
        time="2026-01-01T00:00:00.000Z",
        site="site-a",
    )


def write(path: Path, rounds: int = 3) -> None:
    ledger.ensure_policy(path, "site-a", SitePolicy(max_epsilon=8.0))
    with ledger.transaction(path) as txn:
        for r in range(1, rounds + 1):
            txn.append(spend(r))


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


spends = st.builds(
    RoundSpend,
    event=st.builds(
        SampledGaussianEvent,
        noise_multiplier=st.floats(0.1, 100),
        sample_rate=st.floats(1e-6, 1),
        steps=st.integers(1, 10**6),
    ),
    clip_norm=st.floats(1e-3, 1e3),
    delta=st.floats(1e-12, 0.5),
    dataset=st.text(min_size=1),
    run=st.text(),
    round=st.integers(1, 10**6),
    time=st.text(),
    site=st.text(),
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(entries=st.lists(spends, min_size=1, max_size=6))
def test_write_read_round_trips(
    tmp_path_factory: pytest.TempPathFactory, entries: list[RoundSpend]
) -> None:
    path = tmp_path_factory.mktemp("rt") / "ledger.jsonl"
    with ledger.transaction(path) as txn:
        for e in entries:
            txn.append(e)
    contents = ledger.read(path)
    assert contents.problems == []
    assert contents.entries == entries


def test_lines_carry_the_required_fields_and_chain(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    write(path, rounds=2)
    raw = lines(path)
    objs = [json.loads(x) for x in raw]
    assert objs[0]["kind"] == "policy" and objs[0]["max_epsilon"] == 8.0
    assert objs[0]["prev_sha256"] == GENESIS
    for prev, obj in zip(raw[:-1], objs[1:], strict=True):
        for key in (
            "noise_multiplier",
            "sample_rate",
            "steps",
            "delta",
            "dataset",
            "run",
            "round",
            "time",
        ):
            assert key in obj
        assert obj["prev_sha256"] == ledger.line_sha256(prev.rstrip(b"\n"))
    assert ledger.read(path).head == ledger.line_sha256(raw[-1].rstrip(b"\n"))


def test_policy_is_recorded_once_and_again_when_changed(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    write(path, rounds=1)
    ledger.ensure_policy(path, "site-a", SitePolicy(max_epsilon=8.0))
    ledger.ensure_policy(path, "site-a", SitePolicy(max_epsilon=4.0))
    contents = ledger.read(path)
    assert [type(e) for e in contents.entries] == [PolicyEntry, RoundSpend, PolicyEntry]
    assert contents.policy == SitePolicy(max_epsilon=4.0)


def test_edit_a_number_is_caught_on_that_line(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    write(path)
    raw = lines(path)
    raw[2] = raw[2].replace(b'"steps":10', b'"steps":1')
    path.write_bytes(b"".join(raw))
    problems = ledger.read(path).problems
    assert problems[0].startswith("line 3: content does not match")
    assert any(p.startswith("line 4: prev_sha256") for p in problems)


def test_edit_of_the_last_line_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    write(path)
    path.write_bytes(path.read_bytes().replace(b'"round":3', b'"round":2'))
    assert ledger.read(path).problems == ["line 4: content does not match its sha256 (edited)"]


def test_deleted_line_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    write(path)
    raw = lines(path)
    del raw[2]
    path.write_bytes(b"".join(raw))
    assert ledger.read(path).problems == ["line 3: prev_sha256 does not match line 2"]


def test_deleted_first_line_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    write(path)
    path.write_bytes(b"".join(lines(path)[1:]))
    assert ledger.read(path).problems[0].startswith("line 1: first line's prev_sha256")


def test_swapped_lines_are_caught(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    write(path)
    raw = lines(path)
    raw[2], raw[3] = raw[3], raw[2]
    path.write_bytes(b"".join(raw))
    problems = ledger.read(path).problems
    assert problems[0] == "line 3: prev_sha256 does not match line 2"


def test_truncated_last_line_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    write(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # a write cut short mid-line
    contents = ledger.read(path)
    assert contents.problems == ["line 4: incomplete (no newline; truncated or a write cut short)"]
    assert len(contents.spends) == 2


def test_a_damaged_ledger_takes_no_more_spend(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    write(path)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(LedgerError, match="fails verification"), ledger.transaction(path) as txn:
        txn.append(spend(4))
    assert not path.read_bytes().endswith(b"\n")


def _append_many(path: str, worker: int, count: int) -> None:
    for i in range(count):
        with ledger.transaction(path) as txn:
            txn.append(spend(i + 1, run=f"w{worker}"))


def test_concurrent_appends_lose_nothing(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "l.jsonl"
    write(path, rounds=0)
    workers, count = 4, 25
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, count)) for w in range(workers)]
    # Execute
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    # Assert: every line there once, the chain intact.
    assert [p.exitcode for p in procs] == [0] * workers
    contents = ledger.read(path)
    assert contents.problems == []
    got = sorted((s.run, s.round) for s in contents.spends)
    assert got == sorted((f"w{w}", i + 1) for w in range(workers) for i in range(count))


def test_an_invalid_policy_line_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    write(path, rounds=1)
    path.write_bytes(path.read_bytes().replace(b'"max_epsilon":8.0', b'"max_epsilon":-1', 1))
    contents = ledger.read(path)
    assert contents.problems[0] == "line 1: content does not match its sha256 (edited)"
    assert contents.invalid[0].startswith("line 1: not a valid entry (`policy-max-epsilon` must be")


def test_unusable_ledger_paths_are_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with (
        pytest.raises(LedgerError, match="Cannot open ledger"),
        ledger.transaction(blocker / "l.jsonl"),
    ):
        pass
    with pytest.raises(LedgerError, match="Cannot read ledger"):
        ledger.read(tmp_path)


@pytest.mark.parametrize("failure", ["enospc", "short"])
def test_a_failed_append_is_rolled_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    # Prepare: a full disk that takes half the line, then fails (or reports a short write).
    import errno
    import os

    path = tmp_path / "l.jsonl"
    write(path, rounds=2)
    before = path.read_bytes()
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        written = real_write(fd, data[: len(data) // 2])
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        return written

    monkeypatch.setattr(ledger.os, "write", full_disk)
    # Execute
    with pytest.raises(LedgerError, match="rolled back"), ledger.transaction(path) as txn:
        txn.append(spend(3))
    monkeypatch.undo()
    # Assert: the ledger is exactly as before, still trusted, and the next round can append.
    assert path.read_bytes() == before
    with ledger.transaction(path) as txn:
        txn.append(spend(3))
    assert ledger.read(path).trusted and len(ledger.read(path).spends) == 3


def rewrite(path: Path, number: int, **changes: object) -> None:
    """Give line `number` new values with valid hashes, as a buggy writer could."""
    import json

    lines = path.read_bytes().split(b"\n")[:-1]
    out, prev = [], ledger.GENESIS
    for i, raw in enumerate(lines, start=1):
        d = json.loads(raw)
        if i == number:
            d.update(changes)
        d.pop("sha256")
        d["prev_sha256"] = prev
        d["sha256"] = ledger._digest(d)
        line = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        out.append(line)
        prev = ledger.line_sha256(line)
    path.write_bytes(b"\n".join(out) + b"\n")


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier must be a finite number > 0"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier must be a finite number > 0"),
        ({"sample_rate": 2.0}, "sample_rate must be in (0, 1]"),
        ({"steps": -5}, "steps must be an integer >= 1"),
        ({"steps": 1.5}, "steps must be an integer"),
        ({"clip_norm": float("inf")}, "clip_norm must be a finite number > 0"),
        ({"delta": 1.0}, "delta must be in (0, 1)"),
        ({"round": 0}, "round must be >= 1"),
        # Integers no float holds, or past 63 bits: JSON allows them, Python parses them.
        ({"noise_multiplier": 10**400}, "noise_multiplier must be a finite number, not an"),
        ({"round": 10**30}, "round must be an integer of at most 63 bits, not an integer of"),
    ],
)
def test_hash_valid_but_meaningless_entries_are_invalid(
    tmp_path: Path, changes: dict[str, object], needle: str
) -> None:
    path = tmp_path / "l.jsonl"
    write(path, rounds=2)
    rewrite(path, 3, **changes)
    contents = ledger.read(path)
    assert contents.problems == []  # the chain holds ...
    assert len(contents.invalid) == 1 and contents.invalid[0].startswith("line 3: not a valid")
    assert needle in contents.invalid[0]  # ... but line 3 is no spend
    assert len(contents.spends) == 1 and not contents.trusted
    with pytest.raises(LedgerError, match="fails verification"), ledger.transaction(path):
        pass


def test_junk_is_reported_in_a_bounded_number_of_lines(tmp_path: Path) -> None:
    import os

    path = tmp_path / "junk.jsonl"
    path.write_bytes(b"\n".join(os.urandom(100) for _ in range(5000)) + b"\n")
    contents = ledger.read(path)
    assert len(contents.problems) == ledger.MAX_PROBLEMS
    assert contents.omitted >= 5000 - ledger.MAX_PROBLEMS


def test_a_line_nested_past_pythons_limit_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    write(path, rounds=2)
    rows = lines(path)
    path.write_bytes(b"".join([rows[0], b"[" * 100_000 + b"\n", *rows[1:]]))
    contents = ledger.read(path)
    assert contents.problems[0] == "line 2: not a ledger line (not JSON, or nested too deeply)"
    assert len(contents.spends) == 2 and not contents.trusted


def test_a_clean_prefix_is_verified_once_and_every_change_to_it_is_still_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site verifies its ledger every round: lines a process already verified (the same
    bytes, by their SHA-256) are not verified again, while an edit, a cut or junk
    anywhere is reported as a fresh parse reports it, with the right line numbers."""
    path = tmp_path / "l.jsonl"
    write(path, rounds=3)  # policy + 3 spends, verified clean by the last transaction
    with ledger.transaction(path) as txn:
        txn.append(spend(4))
    verified: list[bytes] = []
    real = ledger.line_sha256
    monkeypatch.setattr(ledger, "line_sha256", lambda raw: verified.append(raw) or real(raw))
    got = ledger.read(path)
    assert len(verified) == 1  # only line 5, the one appended since
    ledger._RESUME.clear()
    fresh = ledger.read(path)
    assert (got.entries, got.head, got.problems) == (fresh.entries, fresh.head, [])
    assert len(verified) == 6

    raw = lines(path)
    edited = raw[1].replace(b'"round":1', b'"round":7')  # same length, line 2
    path.write_bytes(b"".join([raw[0], edited, *raw[2:]]))
    assert ledger.read(path).problems[0] == "line 2: content does not match its sha256 (edited)"
    path.write_bytes(b"".join(raw))
    assert ledger.read(path).trusted
    path.write_bytes(b"".join(raw)[:-5])  # the last line cut short
    assert ledger.read(path).problems == [
        "line 5: incomplete (no newline; truncated or a write cut short)"
    ]
    path.write_bytes(b"".join(raw) + b"junk\n")
    assert ledger.read(path).problems == [
        "line 6: not a ledger line (not JSON, or nested too deeply)"
    ]
