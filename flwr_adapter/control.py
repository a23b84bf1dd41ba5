"""The SuperLink's Control API from this process: list and register nodes (Flower internals).

`flwr supernode ls --format json` starts a Python process that imports Flower's CLI: about
1.5 s of CPU a call. `fedsilo server start` asks every second while it waits for the
SuperLink to answer and for sites to come online, so the subprocess cost more than half
a core. `list_nodes` makes the same Control API call (`ListNodes`, over the connection
named in a FLWR_HOME's config.toml) with the same pieces the CLI uses:
`flwr.cli.flower_config.read_superlink_connection`,
`flwr.cli.utils.init_http_client_from_connection` and the `ListNodesRequest` message.
`register_node` does what `flwr supernode register KEY --name NAME` does
(`RegisterNodeRequest`), once per site at every server start.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


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


@contextlib.contextmanager
def _control(home: Path, connection: str) -> Iterator[Any]:
    """A Control API client for `connection` in the FLWR_HOME `home`, quietly."""
    # lazy, here and below: `fedsilo --help` imports this module (through the server
    # launcher), and Flower's CLI helpers take 0.34 s
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection

    quiet = io.StringIO()  # the CLI's helpers print "Using SuperLink: ..." on stdout
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)
    try:
        with _flwr_home(home), contextlib.redirect_stdout(quiet):
            client = init_http_client_from_connection(read_superlink_connection(connection))
            try:
                yield client
            finally:
                client.close()
    finally:
        flwr_log.setLevel(level)


def list_nodes(home: Path, connection: str) -> list[dict[str, Any]] | None:
    """Each node's id, owner name and status ("online", "offline", ...), as `flwr supernode
    ls --format json` lists them (deleted nodes left out); None while the Control API
    does not answer."""
    from flwr.proto.control_pb2 import ListNodesRequest  # lazy: see _control

    try:
        with _control(home, connection) as client:
            res = client.ListNodes(ListNodesRequest())
    except Exception:
        return None
    return [
        {"node-id": str(n.node_id), "owner-name": n.owner_name, "status": n.status}
        for n in res.nodes_info
        if n.status != "deleted"
    ]


def register_node(home: Path, connection: str, public_key: Path, name: str) -> int:
    """Allow-list a site's public key (an OpenSSH EC key file) under `name`; its node id.

    Raises:
        ValueError: the key is not a NIST EC public key, or the SuperLink refused it
            (the message says which).
    """
    from flwr.proto.control_pb2 import RegisterNodeRequest  # lazy: see _control
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    try:
        key = serialization.load_ssh_public_key(public_key.read_bytes())
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
        raise ValueError(f"{public_key} is not a NIST elliptic-curve public key")
    try:
        with _control(home, connection) as client:
            res = client.RegisterNode(
                request=RegisterNodeRequest(public_key=public_key_to_bytes(key), name=name)
            )
    except Exception as exc:
        raise ValueError(f"the SuperLink refused it ({exc})") from None
    if not res.node_id:
        raise ValueError("the SuperLink returned no node id")
    return int(res.node_id)
