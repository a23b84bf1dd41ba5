"""Dataset readers: shapes, ranges, and one-line errors for bad files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from fedsilo.errors import DataError
from fedsilo.task.data import load_dataset, load_npz, read_idx, save_npz

FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_idx(
    path: Path, arr: np.ndarray, *, magic: bytes = b"\x00\x00\x08", gz: bool = False
) -> Path:
    payload = magic + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload += arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)  # type: ignore[operator]
    return path


def test_digits_split_is_fixed_and_disjoint() -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    assert train.x.shape[1:] == (64,) and float(train.x.max()) <= 1.0
    assert set(train.y.unique().tolist()) == set(range(10))
    again = load_dataset("digits", "train")
    assert bool((again.x == train.x).all())


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs the dataset-fashion-mnist package")
def test_fashion_mnist_idx() -> None:
    test = load_dataset("fashion-mnist", "test")
    assert tuple(test.x.shape) == (10000, 1, 28, 28)
    assert float(test.x.min()) >= 0.0 and float(test.x.max()) <= 1.0


def test_loading_selected_rows_equals_selecting_from_the_full_split(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, gz=False)
    index = np.array([5, 0, 2])
    full = load_dataset("mnist", "train", str(tmp_path))
    part = load_dataset("mnist", "train", str(tmp_path), index=index)
    assert bool((part.x == full.x[index]).all()) and part.y.tolist() == [9, 3, 4]
    assert part.x.dtype == full.x.dtype and float(part.x.max()) <= 1.0


def test_idx_roundtrip_plain_and_gzip(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for gz in (False, True):
        path = write_idx(tmp_path / f"a{'.gz' if gz else ''}", arr, gz=gz)
        assert (read_idx(path, expect_dims=3) == arr).all()


@pytest.mark.parametrize(
    "case,needle",
    [
        ("magic", "bad magic number"),
        ("dims", "dimensions"),
        ("truncated", "needs 24 bytes"),
        ("empty", "empty"),
    ],
)
def test_idx_errors_name_file_and_problem(tmp_path: Path, case: str, needle: str) -> None:
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    path = tmp_path / "bad-idx"
    if case == "magic":
        write_idx(path, arr, magic=b"\x00\x00\x0d")
    elif case == "dims":
        write_idx(path, np.zeros(5, dtype=np.uint8))
    elif case == "truncated":
        write_idx(path, arr)
        path.write_bytes(path.read_bytes()[:-3])
    else:
        write_idx(path, np.zeros((0, 3, 4), dtype=np.uint8))
    with pytest.raises(DataError) as err:
        read_idx(path, expect_dims=3)
    assert str(path) in str(err.value) and needle in str(err.value)
    assert "\n" not in str(err.value)


def test_idx_dir_missing_and_label_mismatch(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("fashion-mnist", "train", str(tmp_path / "nope"))
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28)))
    with pytest.raises(DataError, match="missing train-labels"):
        load_dataset("fashion-mnist", "train", str(tmp_path))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2))
    with pytest.raises(DataError, match=r"3 images but .* 2 labels"):
        load_dataset("fashion-mnist", "train", str(tmp_path))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 12]))
    with pytest.raises(DataError, match=r"labels must be in \[0, 10\)"):
        load_dataset("fashion-mnist", "train", str(tmp_path))


def test_npz_roundtrip_and_uint8_scaling(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", x=x, y=np.arange(5))
    data = load_npz(tmp_path / "s.npz", input_shape=(1, 28, 28))
    assert tuple(data.x.shape) == (5, 1, 28, 28)
    assert np.allclose(data.x.numpy()[:, 0], x / 255.0)
    save_npz(tmp_path / "t.npz", data)
    again = load_npz(tmp_path / "t.npz", input_shape=(1, 28, 28))
    assert bool((again.x == data.x).all()) and bool((again.y == data.y).all())


@pytest.mark.parametrize(
    "arrays,needle",
    [
        ({"x": np.zeros((3, 64))}, "missing array"),
        ({"x": np.zeros((3, 64)), "y": np.array([0, 1, 10])}, "labels must be in"),
        ({"x": np.zeros((3, 64)), "y": np.array([0, 1])}, "3 examples but labels"),
        ({"x": np.zeros((3, 10)), "y": np.array([0, 1, 2])}, "per-example shape"),
        ({"x": np.zeros((0, 64)), "y": np.zeros(0, dtype=int)}, "no examples"),
        ({"x": np.zeros((2, 64)), "y": np.array([0.5, 1.0])}, "integer labels"),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict[str, np.ndarray], needle: str) -> None:
    path = tmp_path / "site.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=needle):
        load_npz(path, input_shape=(64,))


def test_npz_missing_and_not_npz(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_npz(tmp_path / "junk.npz")
