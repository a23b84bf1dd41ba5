"""Failpoints: where a deployed site stops, so fault tests can kill it there. No Flower.

A real federation's fault tests (tests/e2e/test_deploy_faults.py) must kill a site in a
given stage of a given round, and a site's stages last milliseconds: no test can aim a
signal that well from outside. With `FEDSILO_FAILPOINT=POINT:ROUND:FILE` in its
environment, a site's ClientApp that reaches POINT in round ROUND writes FILE (its PID)
and sleeps; the test waits for FILE and kills the whole site (launcher, SuperNode,
ClientApps), as a machine dying there would, or stops the server while the round waits.
A failpoint stops a site once: with FILE already written it is passed (the round asked
again after a resume). The points, in a distributed-DP round
(fedsilo.clients.secure_round):

  masked-input   its spend is in the ledger and it trained; nothing masked or sent
  consistency    its masked vector was sent; it has not signed the server's view
  unmask         it signed the view; it has answered no share

and in a local-DP round (fedsilo.clients.site_round):

  train          nothing spent, nothing trained

Unset (every site's normal case) a failpoint costs one environment lookup; set, it can
only stop the site that set it, which a site's operator can do anyway.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "FEDSILO_FAILPOINT"
POINTS = ("masked-input", "consistency", "unmask", "train")


def reach(point: str, server_round: int) -> None:
    """Stop here for good when this process's failpoint names `point` and `server_round`."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, rest = spec.partition(":")
    rnd, _, marker = rest.partition(":")
    if name not in POINTS or not rnd.isdigit() or not marker:
        raise ValueError(
            f"{ENV}={spec!r}: expected POINT:ROUND:FILE with POINT one of "
            f"{', '.join(POINTS)}, e.g. unmask:3:/tmp/site-c-stopped"
        )
    if (name, int(rnd)) != (point, server_round) or Path(marker).exists():
        return
    Path(marker).write_text(f"{os.getpid()}\n")
    while True:  # until the test kills the site
        time.sleep(60)
