"""Read a legacy (pre-zip) ``torch.save`` file of tensors into numpy, without torch.

The legacy format is a run of pickles followed by raw storage bytes:

    magic number, protocol version, sys info      three small pickles
    the object (a state dict)                     storages appear as persistent ids
    the storage keys, in file order               a pickled list of str
    for each key: int64 element count, then the raw little-endian elements

Only tensors and ordered dicts are rebuilt; any other global in the file is refused, so a
hostile file cannot run code.
"""
from __future__ import annotations

import collections
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclass(frozen=True)
class _StorageType:
    dtype: type


@dataclass
class _TensorRef:
    """A tensor whose storage bytes come later in the file."""

    storage_key: str
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storages: dict):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}': only tensors are allowed")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel, view = pid[0], pid[1], pid[2], pid[3], pid[4], pid[5]
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid[:2]!r}")
        if view is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        self._storages.setdefault(key, (storage_type.dtype, int(numel)))
        return key


def load_legacy_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a legacy torch state dict as ``{name: ndarray}``, in file order."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            magic = pickle.load(f)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as error:
            raise ValueError(f"{path}: not a legacy torch file ({error})") from None
        if magic != LEGACY_MAGIC:
            raise ValueError(f"{path}: not a legacy torch file (zip-format files are not supported)")
        pickle.load(f)  # protocol version
        pickle.load(f)  # sys info: endianness and type sizes
        storages: dict[str, tuple] = {}
        state = _RestrictedUnpickler(f, storages).load()
        keys = pickle.load(f)
        arrays = {}
        for key in keys:
            dtype, numel = storages[key]
            count = int(np.frombuffer(f.read(8), "<i8")[0])
            if count != numel:
                raise ValueError(f"{path}: storage {key} holds {count} elements, expected {numel}")
            arrays[key] = np.frombuffer(f.read(count * np.dtype(dtype).itemsize), dtype=dtype)
    out = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            continue
        flat = arrays[ref.storage_key]
        item = flat.itemsize
        out[name] = np.lib.stride_tricks.as_strided(
            flat[ref.offset:], shape=ref.size, strides=tuple(s * item for s in ref.stride)
        ).copy()
    return out
