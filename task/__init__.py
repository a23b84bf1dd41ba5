"""The learning task shared by server and sites: data, models, training. No Flower here.

The task interface a user writes against (see task/api.py):

    from fedsilo.task import Dataset, Task, make_dataset, read_csv
"""

from fedsilo.task.api import Task, cross_entropy, load_task
from fedsilo.task.data import Dataset, make_dataset
from fedsilo.task.tabular import read_csv, write_csv

__all__ = ["Dataset", "Task", "cross_entropy", "load_task", "make_dataset", "read_csv", "write_csv"]
