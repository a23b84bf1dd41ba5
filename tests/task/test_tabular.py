"""Tabular site data: CSV files are read by column name, and every bad file is one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedsilo.errors import DataError
from fedsilo.task import read_csv, write_csv

FEATURES = ("age", "dose", "score")


def read(path: Path) -> object:
    return read_csv(
        path, features=FEATURES, label="outcome", class_names=("no", "yes"), num_classes=2
    )


def test_columns_are_matched_by_name_and_extra_columns_ignored(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    path.write_text(
        "record,score,outcome,age,dose\nr1,0.5,yes,61,2.5\nr2,-1e-1,0,45,0\nr3,3,1,70,1.25\n"
    )
    data = read_csv(
        path, features=FEATURES, label="outcome", class_names=("no", "yes"), num_classes=2
    )
    assert np.allclose(data.x.numpy(), [[61, 2.5, 0.5], [45, 0, -0.1], [70, 1.25, 3]])
    assert data.y.tolist() == [1, 0, 1]
    assert data.source == str(path)


def test_write_csv_round_trips(tmp_path: Path) -> None:
    x = np.array([[1.5, 2.0, 3.25], [4.0, 5.0, 6.0]])
    write_csv(tmp_path / "a.csv", x, np.array([0, 1]), features=FEATURES, label="outcome")
    data = read_csv(tmp_path / "a.csv", features=FEATURES, label="outcome", num_classes=2)
    assert np.allclose(data.x.numpy(), x) and data.y.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("age,dose,score,outcome\n", "a header but no examples"),
        ("age,dose,outcome\n1,2,0\n", "missing column.*score"),
        ("age,dose,score,score,outcome\n1,2,3,3,0\n", "column.*score appear more than once"),
        ("age,dose,score,outcome\n1,2,3,0\n4,x,6,1\n", r"line 3, column `dose`.*'x'"),
        ("age,dose,score,outcome\n1,2,3,0\n4,,6,1\n", r"line 3, column `dose`"),
        ("age,dose,score,outcome\n1,2,3,0\n1,2,3,0\n4,5\n", "line 4 has 2 columns"),
        ("age,dose,score,outcome\n1,2,nan,0\n", r"line 2, column `score` is nan"),
        ("age,dose,score,outcome\n1,2,3,maybe\n", r"line 2: label 'maybe' is not a class"),
        ("age,dose,score,outcome\n1,2,3,0\n1,2,3,2\n", r"line 3: label 2 is out of range"),
        # Blank and comment-only lines count in the line numbers.
        ("age,dose,score,outcome\n1,2,3,0\n\n# note\n1,2,3,x\n", r"line 5: label 'x' is not"),
        ("age,dose,score,outcome\n1,2,3,0\n\n4,x,6,1\n", r"line 4, column `dose`.*'x'"),
        ("age,dose,score,outcome\n\n1,2,inf,0\n", r"line 3, column `score` is inf"),
        # Extra cells are refused, not dropped.
        ("age,dose,score,outcome\n1,2,3,0\n1,2,3,0,9\n", "line 3 has 5 columns; the header has 4"),
        ("age,dose,score,outcome\n1,2,3,1e22\n", r"line 2: label '1e22' is not a class"),
        (
            "age,dose,score,outcome\n1,2,3,10000000000000000000000\n",
            r"line 2: label 1000.* out of range",
        ),
    ],
)
def test_bad_files_give_one_line_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "site.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as err:
        read(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read(tmp_path / "nope.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(DataError, match="cannot read it as UTF-8"):
        read(tmp_path / "bin.csv")
