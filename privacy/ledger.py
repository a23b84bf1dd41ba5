"""A site's privacy ledger: an append-only, hash-chained JSON Lines file.

Each line is one JSON object (keys sorted, no spaces) ending in a newline:
  {"kind": "policy", ...}   the site's policy (SitePolicy fields), written when the
                            ledger is created and again whenever the site changes it
  {"kind": "spend", ...}    one round's spend, written before the site trains it
                            (RoundSpend.to_dict, fedsilo.privacy.events: the
                            mechanism, clip norm, delta, data, run, round, time,
                            site; a distributed-DP spend also its trust assumption)
Every line also carries
  prev_sha256   SHA-256 (hex) of the previous line's bytes without its newline;
                64 zeros on the first line. Deleting, reordering or inserting a
                line breaks it at the line after.
  sha256        SHA-256 of the line's own canonical JSON without this key, so an
                edited value is caught on the line itself (the last line included).
The chain makes tampering evident, not impossible: whoever controls the file can
rewrite all of it. The server's summary records each site's ledger head, which the
audit checks against.

Appends hold an exclusive `fcntl.flock` on the file for the whole check-then-append
transaction, write the line with one `write` on an O_APPEND descriptor and fsync it
before returning, so two processes appending lose and corrupt nothing, and a spend
is durable before the update it pays for leaves the site.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsilo.errors import PrivacyError
from fedsilo.privacy.events import RoundSpend, SampledGaussianEvent
from fedsilo.privacy.policy import SitePolicy

GENESIS = "0" * 64  # prev_sha256 of a ledger's first line
MAX_PROBLEMS = 20  # problems kept per kind: a junk file must not print 390,000 lines
log = logging.getLogger("fedsilo.ledger")


class LedgerError(PrivacyError):
    """A ledger that cannot be trusted (tampered, truncated) or written."""

    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            public="the site's privacy ledger cannot be read, verified or written; the site "
            "trains no round until its operator repairs it.",
        )


@dataclass(frozen=True)
class PolicyEntry:
    """A policy line: from here on the site holds itself to `policy`."""

    site: str
    policy: SitePolicy
    time: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "policy", "site": self.site, **self.policy.to_dict(), "time": self.time}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PolicyEntry:
        return PolicyEntry(site=str(d["site"]), policy=SitePolicy.from_dict(d), time=str(d["time"]))


Entry = PolicyEntry | RoundSpend


@dataclass(frozen=True)
class LedgerContents:
    """What a ledger file holds, and anything wrong with it.

    `problems` name each line that breaks the chain or is not a ledger line at all
    ("line 3: ..."): the ledger was tampered with or damaged. `invalid` name lines
    whose hashes hold but whose values are no meaningful entry (noise 0, a sample rate
    above 1, NaN, steps < 1, ...): something wrote nonsense, and the ledger's spend
    cannot be computed from them (they are left out of `entries`). `entries` are the
    lines that parsed, in file order, whether or not the chain holds. Each list keeps
    the first MAX_PROBLEMS; `omitted` counts the rest.
    """

    path: Path
    entries: list[Entry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    head: str = GENESIS  # sha256 of the last complete line's bytes
    invalid: list[str] = field(default_factory=list)
    omitted: int = 0

    @property
    def tampered(self) -> bool:
        return bool(self.problems)

    @property
    def trusted(self) -> bool:
        """Intact and meaningful: a site appends only to such a ledger."""
        return not (self.problems or self.invalid or self.omitted)

    @property
    def policy(self) -> SitePolicy | None:
        """The policy in force now: the last policy line."""
        policies = [e.policy for e in self.entries if isinstance(e, PolicyEntry)]
        return policies[-1] if policies else None

    @property
    def site(self) -> str:
        return self.entries[0].site if self.entries else self.path.stem

    @property
    def spends(self) -> list[RoundSpend]:
        return [e for e in self.entries if isinstance(e, RoundSpend)]

    def events(self) -> list[SampledGaussianEvent]:
        """Every mechanism event on the ledger: together they are the site's spend."""
        return [s.event for s in self.spends]


def now() -> str:
    """The current UTC time, ISO 8601 to the millisecond."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def line_sha256(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def encode(entry: Entry, prev_sha256: str) -> bytes:
    """The ledger line (without newline) for `entry` after a line hashing to `prev_sha256`."""
    body = {**entry.to_dict(), "prev_sha256": prev_sha256}
    body["sha256"] = _digest(body)
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def decode(raw: bytes) -> Entry:
    """The entry a line holds; raises ValueError/KeyError when it is not one."""
    d = json.loads(raw)
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    if d.get("kind") == "policy":
        return PolicyEntry.from_dict(d)
    if d.get("kind") == "spend":
        return RoundSpend.from_dict(d)
    raise ValueError(f"unknown kind {d.get('kind')!r}")


# A site verifies its whole ledger every round (a line costs ~20 us: two JSON parses and
# two hashes), so a 440-round run's later rounds spent ~7 ms a read on lines already
# verified. Each process remembers, per ledger path, the last clean parse: the bytes'
# length and SHA-256, the entries and the head. A parse whose data starts with exactly
# those bytes (checked by hashing them: ~1 ms per MB) verifies only the lines after
# them. The parse is a function of the bytes alone, so the answer is the same; anything
# else (a changed, cut or damaged prefix) is parsed from the first line.
RESUME_MEMO = 1024  # ledgers remembered per process (LRU)
_Resume = tuple[int, bytes, tuple["Entry", ...], str, int]  # length, sha256, entries, head, lines
_RESUME: OrderedDict[str, _Resume] = OrderedDict()


def parse(path: Path, data: bytes) -> LedgerContents:
    """Verify a ledger's bytes line by line; never raises for bad content."""
    entries: list[Entry] = []
    problems: list[str] = []
    invalid: list[str] = []
    omitted = 0
    start, first, prev = 0, 1, GENESIS
    whole = hashlib.sha256()  # of the bytes verified so far: the memo's key if clean
    known = _RESUME.get(str(path))
    if known is not None:
        length, sha, clean, head, count = known
        prefix = hashlib.sha256(memoryview(data)[:length])
        if len(data) >= length and prefix.digest() == sha:
            start, first, prev, entries, whole = length, count + 1, head, list(clean), prefix

    def note(found: list[str], text: str) -> None:
        nonlocal omitted
        if len(found) < MAX_PROBLEMS:
            found.append(text)
        else:
            omitted += 1

    lines = data[start:].split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    for number, raw in enumerate(complete, start=first):
        where = f"line {number}"
        this, prev_line = line_sha256(raw), prev
        prev = this
        try:
            d = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python parses
            note(problems, f"{where}: not a ledger line (not JSON, or nested too deeply)")
            continue
        if not isinstance(d, dict):
            note(problems, f"{where}: not a ledger line (not a JSON object)")
            continue
        try:
            digest = _digest({k: v for k, v in d.items() if k != "sha256"})
        except (ValueError, RecursionError):  # parsed, but too deep to write back
            note(problems, f"{where}: not a ledger line (nested too deeply)")
            continue
        if d.get("sha256") != digest:
            note(problems, f"{where}: content does not match its sha256 (edited)")
        if d.get("prev_sha256") != prev_line:
            note(
                problems,
                f"{where}: prev_sha256 does not match line {number - 1}"
                if number > 1
                else f"{where}: first line's prev_sha256 is not {GENESIS[:8]}... (lines removed?)",
            )
        try:
            entries.append(decode(raw))
        except (ValueError, KeyError, TypeError, OverflowError, PrivacyError) as exc:
            note(invalid, f"{where}: not a valid entry ({exc})")
    if tail:
        note(
            problems,
            f"line {first + len(complete)}: incomplete (no newline; truncated or a write cut "
            "short)",
        )
    elif not (problems or invalid):  # a clean ledger: later parses start after it
        total = first - 1 + len(complete)
        whole.update(memoryview(data)[start:])
        _RESUME[str(path)] = (len(data), whole.digest(), tuple(entries), prev, total)
        _RESUME.move_to_end(str(path))
        while len(_RESUME) > RESUME_MEMO:
            _RESUME.popitem(last=False)
    return LedgerContents(path, entries, problems, prev, invalid, omitted)


def read(path: str | Path) -> LedgerContents:
    """Parse and verify the ledger at `path` (an empty ledger when it does not exist)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        data = b""
    except OSError as exc:
        raise LedgerError(f"Cannot read ledger {p}: {exc.strerror}.") from None
    return parse(p, data)


class Transaction:
    """The verified contents of a locked ledger, and appends to it."""

    def __init__(self, fd: int, contents: LedgerContents) -> None:
        self._fd = fd
        self.contents = contents

    def append(self, entry: Entry) -> str:
        """Append `entry` durably (write + fsync); return the new head sha256.

        A write that fails or falls short (a full disk) is rolled back: the file is cut
        back to its length before the write, so the ledger stays intact and the round
        that asked is refused.

        Raises:
            LedgerError: the line could not be written and made durable.
        """
        line = encode(entry, self.contents.head)
        data = line + b"\n"
        before = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"only {written} of {len(data)} bytes written")
            os.fsync(self._fd)
        except OSError as exc:
            self._roll_back(before)
            raise LedgerError(
                f"Cannot write to ledger {self.contents.path} ({exc.strerror or exc}); the "
                "entry was rolled back and nothing was spent. Free disk space and retry."
            ) from None
        head = line_sha256(line)
        self.contents = LedgerContents(
            self.contents.path, [*self.contents.entries, entry], [], head
        )
        return head

    def _roll_back(self, length: int) -> None:
        try:
            os.ftruncate(self._fd, length)
            os.fsync(self._fd)
        except OSError as exc:  # the next read reports the damaged tail; nothing trains
            log.error("ledger: could not roll back %s: %s", self.contents.path, exc)


@contextmanager
def transaction(path: str | Path) -> Iterator[Transaction]:
    """Lock the ledger at `path` (creating it), verify it, and yield a Transaction.

    Raises:
        LedgerError: the ledger cannot be opened, or fails verification (a site
            never adds spend to a ledger it cannot trust).
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as exc:
        raise LedgerError(f"Cannot open ledger {p}: {exc.strerror}.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        contents = parse(p, _read_all(fd))
        if not contents.trusted:
            found = [*contents.problems, *contents.invalid][:3]
            raise LedgerError(
                f"Ledger {p} fails verification ({'; '.join(found)}). The site will not "
                f"train until an operator restores it: run `fedsilo audit {p}`."
            )
        yield Transaction(fd, contents)
    finally:
        os.close(fd)  # closing releases the lock


def ensure_policy(path: str | Path, site: str, policy: SitePolicy) -> None:
    """Make `policy` the ledger's policy in force (appending it when it differs)."""
    with transaction(path) as txn:
        if txn.contents.policy != policy:
            txn.append(PolicyEntry(site=site, policy=policy, time=now()))


def _read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
