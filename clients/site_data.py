"""A deployed site's training data: the file its operator named, read by the run's task.

`fedsilo client start --data PATH` passes the path as the SuperNode's `data-path`
node config; the task's reader (fedsilo.task.api.Task.read_site_data) reads it, and
fedsilo checks what it returns against the task (shape, labels, NaN, emptiness).
No Flower.
"""

from __future__ import annotations

from fedsilo.errors import ConfigError
from fedsilo.task.api import Task
from fedsilo.task.data import Dataset


def load_site_file(task: Task, path: object) -> Dataset:
    """The site's own data file, read and checked by the run's task.

    Raises:
        ConfigError: no file was named.
        DataError: the file is missing, unreadable or does not fit the task.
    """
    if not path or not str(path):
        raise ConfigError(
            "This site has no data: set `data-path` in its node config "
            "(fedsilo client start --data PATH)."
        )
    return task.site_data(str(path))
