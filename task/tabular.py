"""Tabular site data: a CSV file with a header, feature columns by name and a label column.

The layout a tabular task documents for its sites:

    radius,texture,...,label          <- header: every feature the task names, and the label
    17.99,10.38,...,0                 <- one example per row; numbers only in feature columns
    20.57,17.77,...,benign            <- labels: class indices, or the task's class names

Columns are matched by name, so a site's export may order them as it likes; columns the
task does not name (a record number, say) are ignored and logged. Parsing is NumPy's C
parser (`numpy.loadtxt`, NumPy >= 1.23): fedsilo already depends on NumPy, it reads
100,000 rows of 30 features in about 0.6 s, and its errors name the row and
column; pandas or pyarrow would add a large dependency to every site for no gain here.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedsilo.errors import DataError
from fedsilo.task.data import Dataset, make_dataset

log = logging.getLogger("fedsilo.task")


def read_csv(
    path: str | Path,
    *,
    features: Sequence[str],
    label: str = "label",
    class_names: Sequence[str] = (),
    num_classes: int,
) -> Dataset:
    """Read a site's CSV file into a checked Dataset (features in the order of `features`).

    Raises:
        DataError: one line naming the file and the problem (unreadable, empty, missing
            columns, a non-numeric or missing cell with its line and column, NaN,
            unknown labels).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: site data file does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as UTF-8 text ({exc}).") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: the file is empty; a site needs a header row and examples.")
    header = [h.strip() for h in next(csv.reader([lines[0]]))]
    missing = [c for c in (*features, label) if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; the header must name every feature and "
            f"the label column `{label}`."
        )
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(f"{path}: column(s) {', '.join(dupes)} appear more than once.")
    extra = [h for h in header if h not in (*features, label)]
    if extra:
        log.info("read_csv: %s: ignoring column(s) %s", path, ", ".join(extra))
    # The examples with their line numbers: NumPy skips blank and comment-only lines,
    # so its row numbers are not the file's; it is given only the lines that hold data.
    numbered = [
        (number, line)
        for number, line in enumerate(lines[1:], start=2)
        if line.split("#", 1)[0].strip()
    ]
    if not numbered:
        raise DataError(f"{path}: a header but no examples.")
    for number, line in numbered:  # NumPy splits on every comma too (no quoting)
        cells = line.split("#", 1)[0].count(",") + 1
        if cells != len(header):
            raise DataError(
                f"{path}: line {number} has {cells} columns; the header has {len(header)}. "
                "Give every row one cell per header column."
            )
    rows = [line for _, line in numbered]
    cols = [header.index(c) for c in features]
    try:
        x = np.loadtxt(rows, delimiter=",", usecols=cols, dtype=np.float64, ndmin=2)
        raw_y = np.loadtxt(rows, delimiter=",", usecols=[header.index(label)], dtype=str, ndmin=1)
    except ValueError as exc:
        raise DataError(f"{path}: {_where(str(exc), header, numbered)}") from None
    numbers = [number for number, _ in numbered]
    y = _labels(path, raw_y, class_names, num_classes, numbers)
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise DataError(
            f"{path}: line {numbers[row]}, column `{features[col]}` is {x[row, col]}; features "
            "must be finite numbers."
        )
    return make_dataset(x.astype(np.float32), y, num_classes, str(path))


def write_csv(
    path: str | Path, x: np.ndarray, y: np.ndarray, *, features: Sequence[str], label: str = "label"
) -> None:
    """Write examples in the layout `read_csv` reads (one header row, then one row each)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow([*features, label])
        for row, target in zip(x, y, strict=True):
            out.writerow([*(f"{v:.6g}" for v in row), int(target)])


def _labels(
    path: Path,
    raw: np.ndarray,
    class_names: Sequence[str],
    num_classes: int,
    numbers: Sequence[int],
) -> np.ndarray:
    """Class indices from label cells (`numbers[i]`: the file line of cell i)."""
    names = {n: i for i, n in enumerate(class_names)}
    out = np.empty(len(raw), dtype=np.int64)
    for i, cell in enumerate(raw):
        text = str(cell).strip()
        if text in names:
            index = names[text]
        elif re.fullmatch(r"[+-]?\d+(\.0*)?", text):
            index = int(text.split(".")[0])  # a Python int: any size, checked before storing
        else:
            known = f" or one of {', '.join(class_names)}" if class_names else ""
            raise DataError(
                f"{path}: line {numbers[i]}: label {text!r} is not a class index in "
                f"[0, {num_classes}){known}."
            )
        if not 0 <= index < num_classes:
            raise DataError(
                f"{path}: line {numbers[i]}: label {index} is out of range [0, {num_classes})."
            )
        out[i] = index
    return out


def _where(message: str, header: Sequence[str], numbered: Sequence[tuple[int, str]]) -> str:
    """numpy.loadtxt's error with the file's line and column name instead of indices."""
    m = re.search(r"at row (\d+), column (\d+)", message)
    if m:  # the row counted from 0 among the data lines, the column from 1
        row, col = int(m.group(1)), int(m.group(2))
        line = numbered[row][0] if 0 <= row < len(numbered) else row + 2
        name = header[col - 1] if 0 < col <= len(header) else f"#{col}"
        what = message.split(" at row")[0]
        return f"line {line}, column `{name}`: {what}; features must be numbers."
    return f"not a well-formed CSV table ({message.splitlines()[0]})."
