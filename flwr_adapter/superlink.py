"""The server's SuperLink: `flower-superlink` with message contents kept in memory.

`python -m fedsilo.flwr_adapter.superlink ARGS...` is what `fedsilo server start` runs
instead of `flower-superlink ARGS...`: the same SuperLink, with one change. With a
`--database` file, flwr 1.39 keeps both its link state (registered nodes, runs,
messages) and its object store (every message's content: the model and each site's
update, in 5 MB chunks) in that SQLite file (`config_loader.
get_objectstore_linkstate_factories` builds both from `--database`). Each chunk a
process pushes was written to the file, read back when pulled and deleted: measured on
a 17 M-parameter model (68 MB, 2 sites), about 3 s of SuperLink CPU a round, on the
round's critical path.

fedsilo needs the file only for the link state: sites are registered on a staging
SuperLink whose state the real one reopens (fedsilo.server.launcher). Contents never
outlive the SuperLink: a resumed run starts a new SuperLink on a fresh database. So
here the object store is Flower's in-memory one (`InMemoryObjectStore`, the store of
a SuperLink without a database), and the link state stays in the file.
"""

from __future__ import annotations

import sys

from fedsilo.errors import ConfigError
from fedsilo.flwr_adapter import SUPPORTED, check_flower_version, disable_telemetry


def in_memory_object_store() -> None:
    """Make this process's SuperLink keep message contents in memory (see above)."""
    check_flower_version()
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink import config_loader

    if not isinstance(getattr(config_loader, "ObjectStoreFactory", None), type):
        raise ConfigError(  # Flower changed: fail here, not with a slow or broken SuperLink
            f"flwr {SUPPORTED}x's superlink.config_loader builds no ObjectStoreFactory; "
            "fedsilo/flwr_adapter/superlink.py needs updating."
        )

    def in_memory(database: str) -> ObjectStoreFactory:
        return ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME)

    config_loader.ObjectStoreFactory = in_memory  # type: ignore[attr-defined,assignment]


def main() -> None:
    disable_telemetry()
    in_memory_object_store()
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
