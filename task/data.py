"""Dataset readers shared by the server (central evaluation) and the sites.

Plain NumPy/PyTorch, no Flower. Every reader returns a `Dataset` of float32
features and int64 labels held as tensors (no per-sample Python work later).

Formats:
- `digits`: scikit-learn's embedded 8x8 digits (1,797 images), split 80/20 with a
  fixed seed into train and test.
- `fashion-mnist`, `mnist`: IDX files (optionally gzipped), by default under
  `/usr/share/datasets/fashion-mnist/` (Debian package `dataset-fashion-mnist`).
- `npz`, the site data format: a NumPy `.npz` file with `x` (N x features...,
  float or uint8; uint8 is scaled to [0, 1]) and `y` (N integer labels in
  [0, classes)). `fedsilo data split` writes these.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedsilo.errors import DataError

DEFAULT_DIRS = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGE = (28, 28)  # fashion-mnist and mnist
DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Dataset:
    """Features and labels as tensors, with where they came from."""

    x: torch.Tensor  # float32, N x input shape
    y: torch.Tensor  # int64, N
    num_classes: int
    source: str  # a path or a name, used in messages and fingerprints

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: np.ndarray) -> Dataset:
        idx = torch.as_tensor(index, dtype=torch.long)
        return Dataset(self.x[idx], self.y[idx], self.num_classes, self.source)


def load_dataset(
    name: str, split: str, data_dir: str = "", *, index: np.ndarray | None = None
) -> Dataset:
    """Load the `train` or `test` split of a named dataset, or only the rows `index`.

    Selecting rows before the conversion to float32 keeps a site that needs a tenth of
    Fashion-MNIST from converting (and allocating) all of it.
    """
    if name == "digits":
        full = _load_digits(split)
        return full if index is None else full.subset(index)
    if name in ("fashion-mnist", "mnist"):
        root = _idx_root(name, data_dir)
        images, labels = IDX_FILES[split]
        x = read_idx(_find(root, images), expect_dims=3)
        y = read_idx(_find(root, labels), expect_dims=1)
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"{root}: {images} has {x.shape[0]} images but {labels} has {y.shape[0]} labels."
            )
        size = IDX_IMAGE
        if tuple(x.shape[1:]) != size:
            raise DataError(
                f"{root}: {images} holds {x.shape[1]}x{x.shape[2]} images; {name} is "
                f"{size[0]}x{size[1]}. Point --data-dir at the {name} IDX files, or bring "
                "your own data in the site data format (.npz)."
            )
        if index is not None:
            x, y = x[index], y[index]
        return make_dataset(x[:, None].astype(np.float32) / 255.0, y, 10, str(root))
    raise DataError(f"Unknown dataset {name!r}. Use one of digits, fashion-mnist, mnist.")


def _idx_root(name: str, data_dir: str) -> Path:
    root = Path(data_dir or DEFAULT_DIRS[name])
    if not root.is_dir():
        hint = (
            " Install it with `apt-get install dataset-fashion-mnist`, or pass --data-dir."
            if name == "fashion-mnist"
            else " Pass --data-dir with the IDX files."
        )
        raise DataError(f"{name}: data directory {root} does not exist.{hint}")
    return root


def load_npz(
    path: str | Path, *, num_classes: int = 10, input_shape: tuple[int, ...] | None = None
) -> Dataset:
    """Load a site data file (`.npz` with `x` and `y`), checking it fully."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: site data file does not exist. Create one with `fedsilo data split`."
        )
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc or 'empty file'}).") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path}: a single NumPy array (.npy), not an .npz archive with `x` and `y`. "
            "Save it with numpy.savez(path, x=features, y=labels)."
        )
    try:
        with loaded as f:
            missing = {"x", "y"} - set(f.files)
            if missing:
                raise DataError(
                    f"{path}: missing array(s) {sorted(missing)}; a site file needs `x` and `y`."
                )
            x, y = f["x"], f["y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc}).") from None
    if x.ndim < 2 or y.ndim != 1:
        raise DataError(
            f"{path}: `x` must be N x features (found shape {x.shape}) and `y` N labels "
            f"(found shape {y.shape})."
        )
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{path}: `x` must be numeric, found dtype {x.dtype}.")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: `y` must hold integer labels, found dtype {y.dtype}.")
    if input_shape is not None and tuple(x.shape[1:]) != input_shape:
        flat = int(np.prod(input_shape))
        if x.ndim >= 2 and int(np.prod(x.shape[1:])) == flat:
            x = x.reshape((x.shape[0], *input_shape))
        else:
            raise DataError(
                f"{path}: `x` has per-example shape {tuple(x.shape[1:])}, "
                f"the model needs {input_shape}."
            )
    return make_dataset(x.astype(np.float32), y, num_classes, str(path))


def save_npz(path: str | Path, data: Dataset) -> None:
    """Write a Dataset in the site data format."""
    np.savez_compressed(path, x=data.x.numpy(), y=data.y.numpy())


def read_idx(path: Path, *, expect_dims: int) -> np.ndarray:
    """Read an IDX file (uint8 payload), gzipped or not, validating its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc}).") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: bad magic number; expected an unsigned-byte IDX file.")
    dims = raw[3]
    if dims != expect_dims:
        raise DataError(f"{path}: IDX file has {dims} dimensions, expected {expect_dims}.")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header.")
    shape = struct.unpack(f">{dims}I", raw[4:header])
    size = int(np.prod(shape))
    if size == 0:
        raise DataError(f"{path}: IDX file is empty.")
    if len(raw) - header != size:
        raise DataError(
            f"{path}: shape {shape} needs {size} bytes of data, file has {len(raw) - header}."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{root}: missing {stem}(.gz). Point --data-dir at the IDX files.")


def _load_digits(split: str) -> Dataset:
    from sklearn.datasets import load_digits  # lazy: only digits needs sklearn (0.08 s)

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(12345).permutation(len(y))  # fixed: same split everywhere
    n_test = int(len(y) * DIGITS_TEST_FRACTION)
    idx = order[n_test:] if split == "train" else order[:n_test]
    return make_dataset(x[idx], y[idx], 10, "sklearn:digits")


def make_dataset(x: object, y: object, num_classes: int, source: str) -> Dataset:
    """A checked Dataset from features and labels (NumPy arrays or tensors).

    Raises:
        DataError: naming `source` and the problem: no examples, labels that do not
            match the examples, non-numeric values, NaN or infinity, labels that are not
            integers in [0, num_classes).
    """
    xt = _tensor(x, source, "features")
    yt = _tensor(y, source, "labels")
    if xt.ndim < 1 or xt.shape[0] == 0:
        raise DataError(f"{source}: no examples.")
    if yt.ndim != 1 or yt.shape[0] != xt.shape[0]:
        raise DataError(f"{source}: {xt.shape[0]} examples but labels of shape {tuple(yt.shape)}.")
    if xt.is_complex() or xt.dtype == torch.bool:
        raise DataError(f"{source}: features must be real numbers, found {xt.dtype}.")
    xt = xt.to(torch.float32)
    if not bool(torch.isfinite(xt).all()):
        raise DataError(f"{source}: features contain NaN or infinity.")
    if yt.is_floating_point():
        if not bool(torch.isfinite(yt).all()) or not bool((yt == yt.round()).all()):
            raise DataError(f"{source}: labels must be integers (class indices).")
    elif yt.dtype == torch.bool or yt.is_complex():
        raise DataError(f"{source}: labels must be integers (class indices), found {yt.dtype}.")
    yt = yt.to(torch.int64)
    lo, hi = int(yt.min()), int(yt.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(
            f"{source}: labels must be in [0, {num_classes}), found range [{lo}, {hi}]."
        )
    return Dataset(xt.contiguous(), yt.contiguous(), num_classes, source)


def _tensor(value: object, source: str, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise DataError(f"{source}: {what} must be numeric, found dtype {array.dtype}.")
    array = np.ascontiguousarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())
