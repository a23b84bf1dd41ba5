"""Write site CSV files from the embedded data, to try a deployed federation.

    python -m breast_cancer.make_sites OUT --sites 3

writes OUT/site-1.csv ... OUT/site-N.csv (the training split, shared out at random)
and OUT/eval.csv (the test split, for the server's --eval-data), in the layout
`task.read_site` reads: raw measurements, a header, the `diagnosis` column.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from breast_cancer.task import FEATURES, LABEL, SPLIT_SEED, TEST_FRACTION
from fedsilo.task import write_csv


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for the CSV files")
    p.add_argument("--sites", type=int, default=3)
    args = p.parse_args(argv)
    if args.sites < 1:
        p.error("--sites must be >= 1")
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(bunch.target))
    n_test = int(len(order) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    args.out.mkdir(parents=True, exist_ok=True)
    shares = np.array_split(np.random.default_rng(0).permutation(train), args.sites)
    files = [(f"site-{i + 1}.csv", rows, "") for i, rows in enumerate(shares)]
    for name, rows, note in [*files, ("eval.csv", test, " (the server's --eval-data)")]:
        path = args.out / name
        write_csv(path, bunch.data[rows], bunch.target[rows], features=FEATURES, label=LABEL)
        print(f"{path}: {len(rows)} patients{note}")


if __name__ == "__main__":
    main()
