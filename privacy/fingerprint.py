"""What a spend was on: a dataset's fingerprint, as the ledger records it. No Flower.

SHA-256 over the training tensors (dtype, shape, bytes of x, then of y), written
`sha256:<hex>`. The same examples give the same fingerprint whatever file they came
from. It names the data in the ledger and in the audit; it never scopes the budget
(every spend on a ledger composes, whatever data it was on). A site's feature cache
derives its file names from it (fedsilo.task.features), never the reverse.
"""

from __future__ import annotations

import hashlib

from fedsilo.task.data import Dataset

PREFIX = "sha256:"


def fingerprint(data: Dataset) -> str:
    """`sha256:<hex>` of the dataset's tensors."""
    h = hashlib.sha256()
    for tensor in (data.x, data.y):
        a = tensor.detach().cpu().contiguous().numpy()
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.data)  # the bytes of tobytes(), without the copy
    return PREFIX + h.hexdigest()
