"""What `fedsilo simulate` gives its simulation engine: where sites run, what each holds.

`EngineConfig` holds the simulation-only settings (`--ray-address`, `--site-cpus`,
`--site-gpus`): they decide where each virtual site's Ray actor runs and what it
holds there, never what a site computes, so they stay out of RunConfig (the run
config every site receives) and go to RUN_DIR/simulation.json for `--resume`.
`check_engine` checks them before anything is loaded: the flags, then that
something listens at the cluster's address (a wrong host or a closed port fails in
at most CONNECT_TIMEOUT_S), or that this machine can hold one site. Joining the
cluster and checking its nodes: fedsilo.simulations.cluster.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedsilo.errors import ConfigError

CONNECT_TIMEOUT_S = 10.0  # TCP connect to the head: a wrong host or closed port fails here
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class EngineConfig:
    """Where the simulation engine runs virtual sites and what each one holds there."""

    ray_address: str = ""  # "" = a private Ray instance on this machine, started for the run
    # One CPU per site: torch then runs one thread per site. Without that pinning two
    # actors x 2 threads ran the CNN's DP step ~4x slower than 2 x 1 on 2 cores
    # (bench/federation_overhead.py; OpenMP threads spin-waiting on each other).
    site_cpus: float = 1.0
    site_gpus: float = 0.0  # CPU sites by default; 0.25 lets four sites share one GPU

    def validate(self, *, device: str) -> None:
        """Raise ConfigError naming the first bad flag and the fix."""
        if not (math.isfinite(self.site_cpus) and self.site_cpus > 0):
            raise ConfigError(
                f"`--site-cpus` must be a finite number > 0 (the CPUs each virtual site holds; "
                f"0.5 lets two sites share one). Found {self.site_cpus:g}."
            )
        if not (math.isfinite(self.site_gpus) and self.site_gpus >= 0):
            raise ConfigError(
                f"`--site-gpus` must be a finite number >= 0 (the GPUs each virtual site holds; "
                f"0.25 lets four sites share one). Found {self.site_gpus:g}."
            )
        if self.site_gpus > 0 and device == "cpu":
            raise ConfigError(
                f"`--site-gpus` {self.site_gpus:g} gives each site a GPU, but `--device` is cpu. "
                "Drop --device cpu (the sites then train on their GPU) or drop --site-gpus."
            )
        if self.ray_address:
            parse_address(self.ray_address)

    @property
    def threads(self) -> int:
        """torch threads per site: the whole CPUs it holds, at least one."""
        return max(1, math.floor(self.site_cpus))

    @property
    def site_device(self) -> str | None:
        """The device a site trains on when it holds a GPU (None: the run's `device`)."""
        return "cuda" if self.site_gpus > 0 else None

    def client_resources(self) -> dict[str, float]:
        """What Flower's Ray backend reserves for each site's actor."""
        return {"num_cpus": self.site_cpus, "num_gpus": self.site_gpus}

    def worker_env(self) -> dict[str, str]:
        """Environment of the engine's workers: torch's thread count, read at import."""
        return {k: str(self.threads) for k in THREAD_VARS}

    def record(self) -> dict[str, float]:
        """What simulation.json keeps for `--resume` (the address may change on resume)."""
        return {"site-cpus": self.site_cpus, "site-gpus": self.site_gpus}

    @staticmethod
    def from_record(record: Mapping[str, Any], *, ray_address: str = "") -> EngineConfig:
        """The engine a recorded run used (before site resources were recorded: 1 CPU, 0 GPU)."""
        return EngineConfig(
            ray_address=ray_address,
            site_cpus=float(record.get("site-cpus", 1.0)),
            site_gpus=float(record.get("site-gpus", 0.0)),
        )


def parse_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a HOST:PORT address; None for `auto`. Raises ConfigError."""
    if address == "auto":
        return None
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not (sep and host and "/" not in host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(
            "`--ray-address` must be HOST:PORT of a Ray cluster's head (what `ray start --head` "
            f"prints; port 6379 by default) or auto. Found {address!r}."
        )
    return host, int(port)


def check_engine(engine: EngineConfig, *, device: str) -> None:
    """Check what can be checked without starting or joining Ray: the flags, then that
    something listens at `--ray-address`, or that this machine can hold one site."""
    engine.validate(device=device)
    if engine.ray_address:
        check_reachable(engine.ray_address)
        return
    gpus = 0
    if engine.site_gpus > 0:
        gpus = torch.cuda.device_count()
    check_local_capacity(engine, cpus=os.cpu_count() or 1, gpus=gpus)


def check_local_capacity(engine: EngineConfig, *, cpus: int, gpus: int) -> None:
    """Raise ConfigError unless this machine can host one site (private Ray instance)."""
    if engine.site_cpus > cpus:
        raise ConfigError(
            f"`--site-cpus` {engine.site_cpus:g} is more than this machine's {cpus} CPU(s), so "
            f"no site could start. Use --site-cpus {cpus} or less, or run on a cluster with "
            "bigger nodes (--ray-address)."
        )
    if engine.site_gpus > gpus:
        have = f"{gpus} GPU(s) torch can use" if gpus else "no GPU torch can use"
        raise ConfigError(
            f"`--site-gpus` {engine.site_gpus:g} is more than this machine has ({have}), so no "
            "site could start. Drop --site-gpus, or run on a cluster with GPUs (--ray-address)."
        )


def check_reachable(address: str) -> None:
    """Raise ConfigError unless something accepts TCP connections at HOST:PORT `address`."""
    hostport = parse_address(address)
    if hostport is None:  # auto: Ray looks for a cluster on this machine
        return
    try:
        socket.create_connection(hostport, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ConfigError(
            f"No Ray cluster answers at `--ray-address` {address} ({why}). Start one on the "
            f"head machine with `ray start --head --port {hostport[1]}`, or check the address "
            "and that the port is open from here."
        ) from None
