"""A site's own operating figures, kept beside its ledger: step time, bytes, last error.

After each message the ClientApp answers (a round's train message, or one stage of a
secure round), the site rewrites `LEDGER.status.json` next to its ledger (a deployed
site: fed/sites/NAME/ledger.status.json; a simulated one: RUN_DIR/ledgers/NAME.status.json):

  messages{answered, refused, error}  messages by how the site answered them
  train_seconds_total                 seconds spent answering them
  dp_steps_total                      DP-SGD steps the answers report
  last_step_seconds                   the last trained answer's seconds per DP step
  bytes_received_total, bytes_sent_total   the messages' record bytes, in and out
  last_error, last_error_round, last_error_time   the last refusal or crash, and when

`fedsilo client start --metrics-port` serves them (fedsilo.clients.prometheus). They
stay on the site: the server sees a message's size and timing anyway, and a refusal's
public reason, but never this file; the error text is the site's own log line. The
file is operating data, not a privacy record: the ledger alone is audited, and a
missing or damaged status file only means the counters start again.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from flwr.app import Message

SCHEMA = 1
OUTCOMES = ("answered", "refused", "error")


@dataclass(frozen=True)
class SiteStatus:
    """What LEDGER.status.json holds (see the module docstring)."""

    site: str = ""
    messages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    train_seconds_total: float = 0.0
    dp_steps_total: int = 0
    last_step_seconds: float | None = None
    bytes_received_total: int = 0
    bytes_sent_total: int = 0
    last_round: int = 0
    last_error: str | None = None
    last_error_round: int | None = None
    last_error_time: float | None = None
    schema: int = SCHEMA


def status_path(ledger: Path) -> Path:
    return ledger.with_name(ledger.stem + ".status.json")


def read(ledger: Path) -> SiteStatus | None:
    """The status beside `ledger`; None when there is none or it is not one this reads."""
    try:
        raw = json.loads(status_path(ledger).read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
            return None
        status = SiteStatus(**raw)
        return replace(status, messages={**dict.fromkeys(OUTCOMES, 0), **status.messages})
    except (OSError, ValueError, TypeError):
        return None


def message_bytes(msg: Message) -> int:
    """The bytes of a message's records (arrays, metrics, configs): its payload's size."""
    if not msg.has_content():
        return 0
    return sum(_record_bytes(record) for record in msg.content.values())


def _record_bytes(record: Any) -> int:
    """Flower's count of a record's bytes; its count fails on an empty list (flwr 1.39),
    which a secure round's messages hold, so such a record is counted here alike."""
    try:
        return int(record.count_bytes())
    except (IndexError, ValueError, TypeError):
        pass
    total = 0
    for key, value in record.items():
        items = value if isinstance(value, list) else [value]
        total += len(key) + sum(len(v) if isinstance(v, str | bytes) else 8 for v in items)
    return total


def record(
    ledger: Path,
    site: str,
    *,
    server_round: int,
    outcome: str,
    seconds: float,
    received: int,
    sent: int,
    steps: int = 0,
    error: str | None = None,
) -> None:
    """Add one answered message to the status beside `ledger` (rewritten atomically).
    Never raises for the file: a site's round never fails over its statistics."""
    old = read(ledger) or SiteStatus(site=site)
    messages = dict(old.messages)
    messages[outcome] = messages.get(outcome, 0) + 1
    new = replace(
        old,
        site=site,
        messages=messages,
        train_seconds_total=old.train_seconds_total + seconds,
        dp_steps_total=old.dp_steps_total + steps,
        last_step_seconds=seconds / steps if steps else old.last_step_seconds,
        bytes_received_total=old.bytes_received_total + received,
        bytes_sent_total=old.bytes_sent_total + sent,
        last_round=max(old.last_round, server_round),
    )
    if error is not None:
        new = replace(
            new, last_error=error, last_error_round=server_round, last_error_time=time.time()
        )
    path = status_path(ledger)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps(_jsonable(asdict(new)), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def _jsonable(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in obj.items()}
