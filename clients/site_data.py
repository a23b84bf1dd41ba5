"""A deployed site's training data: the file its operator named. No Flower.

`fedsilo client start --data PATH` passes the path as the SuperNode's `data-path`
node config; the file is in the site data format (`.npz` with `x` and `y`,
fedsilo.task.data.load_npz) and must fit the run's task.
"""

from __future__ import annotations

from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError
from fedsilo.task.data import SHAPES, Dataset, load_npz


def task_shape(cfg: RunConfig) -> tuple[tuple[int, ...], int]:
    """Input shape and class count of the run's task."""
    if cfg.dataset not in SHAPES:
        raise ConfigError(
            f"`dataset` {cfg.dataset!r} names no task shape; use digits, fashion-mnist or mnist."
        )
    return SHAPES[cfg.dataset]


def load_site_file(cfg: RunConfig, path: object) -> Dataset:
    """The site's own data file, checked against the run's task.

    Raises:
        ConfigError: no file was named.
        DataError: the file is missing, malformed or of another task's shape.
    """
    if not path or not str(path):
        raise ConfigError(
            "This site has no data: set `data-path` in its node config "
            "(fedsilo client start --data PATH)."
        )
    shape, classes = task_shape(cfg)
    return load_npz(str(path), num_classes=classes, input_shape=shape)
