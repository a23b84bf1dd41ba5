"""The SuperLink's nodes, asked in this process (Flower internals; see the package).

`flwr supernode ls --format json` starts a Python process that imports Flower's CLI: about
1.5 s of CPU a call. `fedsilo server start` asks every second while it waits for the
SuperLink to answer and for sites to come online, so the subprocess cost more than half
a core. `list_nodes` makes the same Control API call (`ListNodes`, over the connection
named in a FLWR_HOME's config.toml) with the same pieces the CLI uses:
`flwr.cli.flower_config.read_superlink_connection`,
`flwr.cli.utils.init_http_client_from_connection` and the `ListNodesRequest` message.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def _flwr_home(home: Path) -> Iterator[None]:
    """FLWR_HOME set to `home` for the call (Flower reads it from the environment)."""
    before = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(home)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = before


def list_nodes(home: Path, connection: str) -> list[dict[str, Any]] | None:
    """Each node's id, owner name and status ("online", "offline", ...), as `flwr supernode
    ls --format json` lists them (deleted nodes left out); None while the Control API
    does not answer."""
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import ListNodesRequest

    quiet = io.StringIO()  # the CLI's helpers print "Using SuperLink: ..." on stdout
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)
    try:
        with _flwr_home(home), contextlib.redirect_stdout(quiet):
            client = init_http_client_from_connection(read_superlink_connection(connection))
            try:
                res = client.ListNodes(ListNodesRequest())
            finally:
                client.close()
    except Exception:
        return None
    finally:
        flwr_log.setLevel(level)
    return [
        {"node-id": str(n.node_id), "owner-name": n.owner_name, "status": n.status}
        for n in res.nodes_info
        if n.status != "deleted"
    ]
