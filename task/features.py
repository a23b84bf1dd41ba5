"""A model's fixed front-end applied to a whole dataset once, optionally cached on disk.

A model with a data-independent, untrained front (ScatterNet's scattering
transform) trains and evaluates only its head; computing the front once per
dataset instead of once per step is what makes it cheap (a site's 6,000
Fashion-MNIST images take seconds; the head then trains in milliseconds per step).

The cache is a directory of `<data fingerprint>-<front key>.pt` files, written
atomically; a file that does not load is recomputed and replaced. Features of private
data are as private as the data (scatnet's are a near-invertible copy of the images):
the folder is owner-only (0700) and its files 0600, whatever the umask, and a site
deletes it when its run ends (`drop_cache`) unless its operator keeps it. Plain PyTorch,
no Flower.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from fedsilo.task.data import Dataset

log = logging.getLogger("fedsilo.features")
CHUNK = 32  # images per front call: larger chunks spill the FFT's temporaries out of cache


@torch.no_grad()
def featurize(front: nn.Module, data: Dataset, *, device: torch.device | None = None) -> Dataset:
    """`data` with x replaced by front(x), computed in chunks, kept on the CPU."""
    device = device or torch.device("cpu")
    front = front.to(device).eval()
    parts = [front(data.x[i : i + CHUNK].to(device)).cpu() for i in range(0, len(data), CHUNK)]
    x = torch.cat(parts) if parts else data.x.new_zeros((0,))
    return Dataset(x, data.y, data.num_classes, data.source)


def cached_features(
    front: nn.Module,
    data: Dataset,
    cache_dir: Path | None,
    *,
    front_key: str,
    data_id: str,
    device: torch.device | None = None,
    mmap: bool = False,
) -> Dataset:
    """featurize(front, data), read from `cache_dir` when computed before (None: no cache).

    `data_id` names the data: the fingerprint its ledger records
    (fedsilo.privacy.fingerprint), from which the cache file's name derives. `mmap`: map
    a cached file instead of reading it (a round that touches a sample of the rows).
    """
    if cache_dir is None:
        return featurize(front, data, device=device)
    digest = data_id.removeprefix("sha256:")
    path = cache_dir / f"{digest[:32]}-{front_key}.pt"
    cached = read_cached(path, mmap=mmap)
    if cached is not None and "x" in cached and cached["x"].shape[0] == len(data):
        return Dataset(cached["x"], data.y, data.num_classes, data.source)
    out = featurize(front, data, device=device)
    write_cached(path, {"x": out.x})
    return out


def read_cached(path: Path, *, mmap: bool = False) -> dict[str, torch.Tensor] | None:
    """Tensors a cache file holds; None when it is missing or unreadable (then rewritten).

    `mmap`: map the file instead of reading it (rows are read when indexed).
    """
    if not path.is_file():
        return None
    try:
        found = torch.load(path, weights_only=True, mmap=mmap)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        log.warning("cache: %s is unreadable (%s); recomputing", path, exc)
        return None
    if not isinstance(found, dict) or not all(isinstance(v, torch.Tensor) for v in found.values()):
        log.warning("cache: %s holds something else; recomputing", path)
        return None
    return found


def write_cached(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write atomically (a temporary file, then a rename), readable by the owner only."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def private_dir(path: Path) -> None:
    """Create `path` owner-only (0700), or narrow an existing folder to 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)


def drop_cache(cache_dir: Path) -> None:
    """Delete a site's cache folder (features and decoded data of its own examples)."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    if cache_dir.exists():
        log.warning("cache: could not delete %s; delete it by hand", cache_dir)
