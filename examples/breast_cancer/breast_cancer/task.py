"""Breast-cancer diagnosis as a fedsilo task: 30 tabular features, 2 classes.

    fedsilo simulate --task breast_cancer.task:task --sites 3 --rounds 5 --target-epsilon 3

The data is scikit-learn's embedded copy of the Wisconsin Diagnostic Breast Cancer
set (569 patients; 30 measurements of cell nuclei from a fine-needle aspirate;
malignant or benign).

- A deployed site reads its own CSV file (`read_site_data`): a header naming the 30
  FEATURES below and a `diagnosis` column (0 or `malignant`, 1 or `benign`), one
  patient per row; other columns (a record number) are ignored.
- A simulation partitions the embedded data's training split among virtual sites;
  the server evaluates on its test split (`public_data`), or on `--eval-data FILE`
  in the site format.
- Scaling never leaks between patients or sites: every feature is mapped to [-1, 1]
  with FIXED public ranges (the per-feature minimum and maximum the dataset's
  documentation publishes, RANGES), the same at every site and independent of any
  site's data. Statistics of a site's own data (its mean, its standard deviation)
  would make each patient's features depend on the other patients, outside what
  DP-SGD's guarantee covers; pooled statistics would also leak across sites.
- The model is logistic regression (one Linear layer): with about 150 patients a
  site and a budget of epsilon 3, fewer parameters means less noise per parameter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedsilo.task import Dataset, Task, make_dataset, read_csv

LABEL = "diagnosis"
CLASS_NAMES = ("malignant", "benign")  # scikit-learn's target order
_MEASURES = (
    "radius",
    "texture",
    "perimeter",
    "area",
    "smoothness",
    "compactness",
    "concavity",
    "concave_points",
    "symmetry",
    "fractal_dimension",
)
FEATURES = tuple(f"{kind}_{m}" for kind in ("mean", "se", "worst") for m in _MEASURES)
# Public per-feature ranges (min, max), from the dataset's documentation
# (sklearn.datasets.load_breast_cancer().DESCR, "Summary Statistics"), in FEATURES order.
RANGES = np.array(
    [
        (6.981, 28.11), (9.71, 39.28), (43.79, 188.5), (143.5, 2501.0), (0.053, 0.163),
        (0.019, 0.345), (0.0, 0.427), (0.0, 0.201), (0.106, 0.304), (0.05, 0.097),
        (0.112, 2.873), (0.36, 4.885), (0.757, 21.98), (6.802, 542.2), (0.002, 0.031),
        (0.002, 0.135), (0.0, 0.396), (0.0, 0.053), (0.008, 0.079), (0.001, 0.03),
        (7.93, 36.04), (12.02, 49.54), (50.41, 251.2), (185.2, 4254.0), (0.071, 0.223),
        (0.027, 1.058), (0.0, 1.252), (0.0, 0.291), (0.156, 0.664), (0.055, 0.208),
    ],
    dtype=np.float64,
)  # fmt: skip
TEST_FRACTION = 0.2
SPLIT_SEED = 2024  # a fixed split: the same train and test rows everywhere


def scale(x: np.ndarray) -> np.ndarray:
    """Each feature mapped to [-1, 1] by its public range (values outside are clipped)."""
    lo, hi = RANGES[:, 0], RANGES[:, 1]
    return np.clip(2.0 * (x - lo) / (hi - lo) - 1.0, -1.0, 1.0).astype(np.float32)


def read_site(path: Path) -> Dataset:
    """A site's CSV file: the FEATURES columns (any order) and the `diagnosis` column."""
    raw = read_csv(path, features=FEATURES, label=LABEL, class_names=CLASS_NAMES, num_classes=2)
    return make_dataset(scale(raw.x.numpy().astype(np.float64)), raw.y, 2, str(path))


def embedded(split: str, data_dir: str = "") -> Dataset:
    """The `train` or `test` split of scikit-learn's embedded copy (data_dir unused)."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(bunch.target))
    n_test = int(len(order) * TEST_FRACTION)
    rows = order[:n_test] if split == "test" else order[n_test:]
    return make_dataset(
        scale(bunch.data[rows]), bunch.target[rows], 2, f"sklearn:breast_cancer ({split})"
    )


def model() -> torch.nn.Module:
    """Logistic regression on the 30 scaled features."""
    return torch.nn.Linear(len(FEATURES), 2)


def sensitivity_specificity(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Extra central metrics: how many malignant (sensitivity) and benign cases are caught."""
    pred = logits.argmax(dim=1)
    malignant, benign = labels == 0, labels == 1
    return {
        "sensitivity": float((pred[malignant] == 0).float().mean()) if malignant.any() else 0.0,
        "specificity": float((pred[benign] == 1).float().mean()) if benign.any() else 0.0,
    }


task = Task(
    name="breast-cancer",
    input_shape=(len(FEATURES),),
    num_classes=2,
    model=model,
    read_site_data=read_site,
    public_data=embedded,
    metrics=sensitivity_specificity,
    site_format=f"a CSV file with a header naming the 30 features and `{LABEL}`",
)
