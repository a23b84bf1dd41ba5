"""Reading a record's arrays in place (Flower 1.39 keeps each Array as .npy bytes).

`ArrayRecord.to_torch_state_dict` deserialises every array into a new numpy array: a
model's worth of memory each time a process reads a model. `tensor_views` gives the
same tensors over the record's own bytes. It depends on how Flower stores an Array
(`Array.data` in numpy's .npy format when `Array.stype` is `SType.NUMPY`), hence its
home here.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy
import torch
from flwr.app import ArrayRecord
from flwr.common.constant import SType

from fedsilo.flwr_adapter import check_flower_version

check_flower_version()  # the format below is flwr 1.39's


def tensor_views(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """A model's arrays as tensors over the record's own bytes, copying none of them
    (`to_torch_state_dict` copies every array: a model's worth of memory each time).

    For readers only: the memory is the record's (Python `bytes`, which torch cannot
    mark read-only), so a write to a view would change the record itself. Reads what
    `Array.numpy` reads: the array's .npy header, then its values in place; a record
    that does not parse raises ValueError as `np.load` would. An array in any other
    form than .npy is copied as Flower reads it.
    """
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():  # torch warns that it cannot mark a tensor read-only
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for key, array in arrays.items():
            if array.stype != SType.NUMPY:
                out[key] = torch.from_numpy(array.numpy())
                continue
            head = io.BytesIO(array.data)  # shares the bytes: nothing is copied
            version = numpy.lib.format.read_magic(head)
            shape, fortran, dtype = (
                numpy.lib.format.read_array_header_1_0(head)
                if version == (1, 0)
                else numpy.lib.format.read_array_header_2_0(head)
            )
            flat = numpy.frombuffer(
                array.data, dtype=dtype, count=math.prod(shape), offset=head.tell()
            )
            out[key] = torch.from_numpy(flat.reshape(shape, order="F" if fortran else "C"))
    return out
