"""How a site's refusal to train travels to the server. No Flower imports.

A site that refuses a round (its policy forbids the run, its budget is spent, its
ledger is damaged) replies with a Flower error message whose code is
REFUSAL_CODE and whose reason is a small JSON object naming the site and why.
An error reply can never be mistaken for an update by any strategy, and Flower
carries the reason to the ServerApp unchanged (an exception raised in a
ClientApp would reach it only as "<class ...>:<'...'>" text, with a traceback
logged as if the site had crashed).
"""

from __future__ import annotations

import json

from fedsilo.errors import PrivacyError

REFUSAL_CODE = 4100  # outside Flower's ErrorCode values (0-8 in flwr 1.39)


def refusal_reason(site: str, why: str) -> str:
    """The error reason a refusing site sends."""
    return json.dumps({"site": site, "refused": why})


def parse_refusal(code: int, reason: str) -> tuple[str, str] | None:
    """(site, why) when an error reply is a fedsilo refusal, else None."""
    if code != REFUSAL_CODE:
        return None
    try:
        d = json.loads(reason)
        return str(d["site"]), str(d["refused"])
    except (ValueError, KeyError, TypeError):
        return None


def public_reason(exc: PrivacyError) -> str:
    """What a refusing site tells the server: the rule that refused, never its spend."""
    return exc.public
