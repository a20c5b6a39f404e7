"""Read and write PyTorch ``.pth`` checkpoints without PyTorch and without running their code.

A file written by ``torch.save`` (torch >= 1.6) is a zip archive with one top folder that holds

* ``data.pkl``: a protocol-2 pickle of the saved object. Tensors appear as calls to
  ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[,
  metadata])`` (``_rebuild_tensor_v3`` with an extra dtype argument for dtypes that have no
  legacy storage class, such as ``uint16`` or the float8 types), and storages are persistent ids
  ``("storage", torch.FloatStorage, key, location, numel)``;
* ``data/<key>``: the raw bytes of each storage;
* ``byteorder`` (``little`` when absent), ``version``, ``.format_version``,
  ``.storage_alignment`` and ``.data/serialization_id``.

:func:`load_pth` unpickles ``data.pkl`` with an allow-list: every global the pickle names is
mapped to an inert stand-in defined here, and any other global raises
:class:`UnsafePickleError` before anything is called. Tensors come back as C-contiguous numpy
arrays in native byte order (``bfloat16`` and the float8 types use ``ml_dtypes``);
``argparse.Namespace`` comes back as :class:`Namespace`, ``torch.device`` as
:class:`TorchDevice` and ``torch.float32``-style dtypes as :class:`TorchDtype`.

:func:`save_pth` writes the same layout from nested containers of numpy arrays, so that
``torch.load(path, weights_only=True)`` returns identical tensors.
"""

from __future__ import annotations

import _compat_pickle
import collections
import dataclasses
import hashlib
import io
import math
import os
import pickle
import secrets
import struct
import sys
import types
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from sammed3d_jax.files import replace_durably, temp_prefix

__all__ = [
    "Namespace",
    "PthCorruptError",
    "PthError",
    "PthLegacyFormatError",
    "PthNotFoundError",
    "TorchDevice",
    "TorchDtype",
    "UnsafePickleError",
    "find_state_dict",
    "load_pth",
    "save_pth",
]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class PthError(Exception):
    """Base class of every error raised while reading or writing a ``.pth`` file.

    The message starts with the file path when one is known; the path is also kept in
    ``self.path``.
    """

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        self.message = message
        super().__init__(message if self.path is None else f"{self.path}: {message}")


class PthNotFoundError(PthError):
    """The ``.pth`` file does not exist."""


class PthCorruptError(PthError):
    """The file is not a readable torch zip checkpoint: truncated, damaged or inconsistent."""


class PthLegacyFormatError(PthError):
    """The file uses the pre-1.6 (non-zip) ``torch.save`` format, which is not read."""


class UnsafePickleError(PthError):
    """The pickle names a global outside the allow-list; nothing from it was called."""

    def __init__(self, global_name: str, path: str | os.PathLike[str] | None = None) -> None:
        self.global_name = global_name
        super().__init__(
            f"refusing to load: data.pkl references the global {global_name!r}, which is not "
            "on the allow-list of plain checkpoint types (tensors, storages, containers, "
            "argparse.Namespace, torch.device, numpy scalars)",
            path,
        )


class _DataError(Exception):
    """Raised by the stand-ins on malformed arguments; load_pth adds the file path."""


# --------------------------------------------------------------------------------------------
# Inert stand-ins returned by the loader
# --------------------------------------------------------------------------------------------


def _refuse_state(self: Any, state: Any) -> None:
    # Set as ``__setstate__`` on the frozen stand-ins: a pickle BUILD must not alter them (the
    # dataclass default would write the fields).
    raise _DataError(f"pickle state cannot be applied to {type(self).__name__}")


class _ClassAttributesLocked(type):
    """Metaclass that forbids changing class attributes (a pickle BUILD could try)."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise AttributeError(f"{cls.__name__} is read-only")

    def __delattr__(cls, name: str) -> None:
        raise AttributeError(f"{cls.__name__} is read-only")


class Namespace(types.SimpleNamespace, metaclass=_ClassAttributesLocked):
    """Plain attribute holder that replaces ``argparse.Namespace`` in loaded checkpoints.

    Fields are ordinary attributes (``ns.img_size``) and ``vars(ns)`` gives them as a dict.
    """


@dataclasses.dataclass(frozen=True, slots=True)
class TorchDevice:
    """Stand-in for ``torch.device``: the device type (``"cuda"``) and optional index."""

    type: str
    index: int | None = None

    __setstate__ = _refuse_state

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return TorchDevice, (self.type, self.index)

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


@dataclasses.dataclass(frozen=True, slots=True)
class TorchDtype:
    """Stand-in for a ``torch`` dtype object such as ``torch.float32``."""

    name: str

    __setstate__ = _refuse_state

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return TorchDtype, (self.name,)

    @property
    def numpy(self) -> np.dtype | None:
        """The matching numpy dtype, or None where numpy has none (e.g. ``complex32``)."""
        return _TORCH_DTYPE_TO_NUMPY.get(self.name)

    def __str__(self) -> str:
        return f"torch.{self.name}"


# torch dtype name -> numpy dtype. Only names with an exact numpy equivalent.
_TORCH_DTYPE_TO_NUMPY: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}
if hasattr(ml_dtypes, "float8_e8m0fnu"):
    _TORCH_DTYPE_TO_NUMPY["float8_e8m0fnu"] = np.dtype(ml_dtypes.float8_e8m0fnu)

# torch dtypes that may appear as plain values but have no numpy equivalent.
_TORCH_DTYPES_WITHOUT_NUMPY = ("complex32", "qint8", "quint8", "qint32", "quint4x2")

# Legacy typed-storage class name -> element dtype. UntypedStorage counts bytes.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}
_NUMPY_TO_STORAGE: dict[np.dtype, str] = {
    dt: name for name, dt in _STORAGE_DTYPES.items() if name != "UntypedStorage"
}
_NUMPY_TO_TORCH_DTYPE: dict[np.dtype, str] = {dt: n for n, dt in _TORCH_DTYPE_TO_NUMPY.items()}


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    """Marker for a storage class global such as ``torch.FloatStorage``."""

    name: str
    dtype: np.dtype

    __setstate__ = _refuse_state


@dataclasses.dataclass(frozen=True, slots=True)
class _Marker:
    """Marker for a class global that is only ever passed as an argument (never called)."""

    name: str

    __setstate__ = _refuse_state


@dataclasses.dataclass(frozen=True, slots=True)
class _SafeCallable:
    """Immutable wrapper for an allowed function, so a pickle cannot alter the function."""

    name: str
    fn: Callable[..., Any]

    __setstate__ = _refuse_state

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


# --------------------------------------------------------------------------------------------
# Zip archive access
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Storage:
    """A storage record referenced by the pickle (bytes are read lazily and cached)."""

    archive: _Archive
    key: str
    storage_type: _StorageType
    numel: int

    __setstate__ = _refuse_state

    @property
    def nbytes(self) -> int:
        return self.numel * self.storage_type.dtype.itemsize


class _Archive:
    """The records of one torch zip checkpoint."""

    def __init__(self, path: str, zf: zipfile.ZipFile) -> None:
        self.path = path
        self.zf = zf
        names = zf.namelist()
        self.names = set(names)
        candidates = [
            n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)
        ]
        if not candidates:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise PthCorruptError(
                f"zip archive has no data.pkl record, so it is not a torch.save checkpoint "
                f"(records: {shown or 'none'})",
                path,
            )
        if len(set(candidates)) > 1:
            raise PthCorruptError(f"zip archive has several data.pkl records: {candidates}", path)
        self.prefix = candidates[0][: -len("data.pkl")]
        order = self._read_optional("byteorder")
        if order is None:
            self.big_endian = False
        else:
            text = order.decode("ascii", errors="replace").strip()
            if text not in ("little", "big"):
                raise PthCorruptError(f"unknown byteorder record {text!r}", path)
            self.big_endian = text == "big"
        self._cache: dict[str, bytes] = {}

    def _read(self, name: str) -> bytes:
        full = self.prefix + name
        try:
            return self.zf.read(full)
        except KeyError:
            raise PthCorruptError(
                f"record {full!r} is missing from the zip archive", self.path
            ) from None
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
            raise PthCorruptError(
                f"cannot read record {full!r} (truncated or corrupt file?): {e}", self.path
            ) from e

    def _read_optional(self, name: str) -> bytes | None:
        return self._read(name) if self.prefix + name in self.names else None

    def read_pickle(self) -> bytes:
        return self._read("data.pkl")

    def storage_bytes(self, key: str) -> bytes:
        data = self._cache.get(key)
        if data is None:
            data = self._cache[key] = self._read(f"data/{key}")
        return data


# --------------------------------------------------------------------------------------------
# Tensor reconstruction
# --------------------------------------------------------------------------------------------


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list):
        raise _DataError(f"tensor {what} must be a tuple of ints, got {type(value).__name__}")
    out = tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in out):
        raise _DataError(f"tensor {what} must hold non-negative ints, got {out!r}")
    return out


def _tensor_from_storage(
    storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype
) -> np.ndarray:
    if not isinstance(storage, _Storage):
        raise _DataError(f"tensor storage argument is a {type(storage).__name__}, not a storage")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise _DataError(f"tensor storage offset must be a non-negative int, got {offset!r}")
    size = _int_tuple(size, "size")
    stride = _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise _DataError(f"tensor size {size} and stride {stride} differ in length")
    record = f"{storage.archive.prefix}data/{storage.key}"
    itemsize = dtype.itemsize
    available = storage.nbytes // itemsize
    if math.prod(size) == 0:
        return np.zeros(size, dtype=dtype)
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if extent > available:
        raise PthCorruptError(
            f"storage record {record!r} holds {available} {dtype} elements but a tensor of size "
            f"{size}, stride {stride} and offset {offset} needs {extent}",
            storage.archive.path,
        )
    data = storage.archive.storage_bytes(storage.key)
    view = np.ndarray(
        shape=size,
        dtype=dtype,
        buffer=data,
        offset=offset * itemsize,
        strides=tuple(s * itemsize for s in stride),
    )
    out = np.array(view, dtype=dtype, order="C", copy=True)
    if storage.archive.big_endian != (sys.byteorder == "big") and itemsize > 1:
        out = out.byteswap()
    return out


def _apply_metadata(arr: np.ndarray, metadata: Any) -> np.ndarray:
    if metadata is None:
        return arr
    if not isinstance(metadata, dict):
        raise _DataError(f"tensor metadata must be a dict, got {type(metadata).__name__}")
    unknown = set(metadata) - {"conj", "neg"}
    if unknown:
        raise _DataError(f"unsupported tensor metadata keys {sorted(map(str, unknown))}")
    if metadata.get("neg"):
        arr = np.negative(arr)
    if metadata.get("conj"):
        arr = np.conj(arr)
    return arr


def _storage_dtype(storage: Any) -> np.dtype:
    if not isinstance(storage, _Storage):
        raise _DataError(f"tensor storage argument is a {type(storage).__name__}, not a storage")
    return storage.storage_type.dtype


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> np.ndarray:
    return _tensor_from_storage(storage, storage_offset, size, stride, _storage_dtype(storage))


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> np.ndarray:
    arr = _tensor_from_storage(storage, storage_offset, size, stride, _storage_dtype(storage))
    return _apply_metadata(arr, metadata)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> np.ndarray:
    if not isinstance(dtype, TorchDtype):
        raise _DataError(f"tensor dtype argument is a {type(dtype).__name__}, not a torch dtype")
    np_dtype = dtype.numpy
    if np_dtype is None:
        raise _DataError(f"tensors of dtype torch.{dtype.name} have no numpy equivalent")
    arr = _tensor_from_storage(storage, storage_offset, size, stride, np_dtype)
    return _apply_metadata(arr, metadata)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> Any:
    if not isinstance(data, np.ndarray):
        raise _DataError(f"parameter data is a {type(data).__name__}, not a tensor")
    return data


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> Any:
    return _rebuild_parameter(data, requires_grad, backward_hooks)


_TENSOR_CLASSES = (_Marker("torch.Tensor"), _Marker("torch.nn.parameter.Parameter"))


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # Tensor attributes (``state``) have nowhere to go on a numpy array and are dropped.
    if not any(func is f for f in _TENSOR_REBUILDERS):
        raise _DataError(f"_rebuild_from_type_v2 with an unexpected function {func!r}")
    if not any(new_type is t for t in _TENSOR_CLASSES):
        raise _DataError(f"_rebuild_from_type_v2 with an unexpected type {new_type!r}")
    if not isinstance(args, tuple):
        raise _DataError("_rebuild_from_type_v2 arguments must be a tuple")
    return func(*args)


# --------------------------------------------------------------------------------------------
# Other stand-ins: torch.device/Size, builtins, numpy scalars and arrays
# --------------------------------------------------------------------------------------------


def _make_device(spec: Any, index: Any = None) -> TorchDevice:
    if isinstance(spec, TorchDevice) and index is None:
        return spec
    if not isinstance(spec, str):
        raise _DataError(f"torch.device argument must be a str, got {type(spec).__name__}")
    if index is None and ":" in spec:
        spec, _, text = spec.partition(":")
        if not text.isdigit():
            raise _DataError(f"bad device index in {spec}:{text}")
        index = int(text)
    if index is not None and (not isinstance(index, int) or isinstance(index, bool)):
        raise _DataError(f"torch.device index must be an int, got {index!r}")
    return TorchDevice(spec, index)


def _make_size(dims: Any) -> tuple[int, ...]:
    return _int_tuple(dims, "torch.Size")


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Protocol-2 pickles spell bytes objects as _codecs.encode(latin-1 text, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _DataError("_codecs.encode is only allowed for latin-1 text")
    return text.encode("latin-1")


def _make_bytes(*args: Any) -> bytes:
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], bytes | bytearray):
        return bytes(args[0])
    raise _DataError("bytes() is only allowed with no argument or a bytes argument")


def _make_bytearray(*args: Any) -> bytearray:
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], bytes | bytearray):
        return bytearray(args[0])
    raise _DataError("bytearray() is only allowed with no argument or a bytes argument")


# numpy dtype kinds that hold plain data (no Python objects, no structured fields).
_PLAIN_NUMPY_KINDS = "biufcSUmM"


class _NumpyDtypeSpec:
    """Stand-in for ``numpy.dtype(...)`` in a pickle.

    numpy's own ``dtype.__setstate__`` accepts arbitrary flag words, so the pickle's BUILD
    state is consumed here (only its byte-order character is used) and the real dtype is made
    afterwards from the validated type string.
    """

    __slots__ = ("_byteorder", "_code")

    def __init__(self, code: str) -> None:
        object.__setattr__(self, "_code", code)
        object.__setattr__(self, "_byteorder", "=")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("numpy dtype stand-in is read-only")

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise _DataError(f"unexpected numpy dtype state {state!r}")
        object.__setattr__(self, "_byteorder", state[1])

    def resolve(self) -> np.dtype:
        dt = np.dtype(self._code)
        return dt if self._byteorder in ("|", "=") else dt.newbyteorder(self._byteorder)


def _make_numpy_dtype(obj: Any, align: Any = False, copy: Any = False) -> _NumpyDtypeSpec:
    if not isinstance(obj, str):
        raise _DataError(f"numpy.dtype argument must be a type string, got {type(obj).__name__}")
    try:
        dt = np.dtype(obj)
    except TypeError as e:
        raise _DataError(f"bad numpy dtype string {obj!r}") from e
    if dt.kind not in _PLAIN_NUMPY_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise _DataError(f"numpy dtype {obj!r} is not a plain scalar type")
    return _NumpyDtypeSpec(obj)


def _numpy_scalar(dtype: Any, data: Any = None) -> np.generic:
    if not isinstance(dtype, _NumpyDtypeSpec):
        raise _DataError("numpy scalar needs a numpy dtype")
    dt = dtype.resolve()
    if not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise _DataError(f"numpy scalar of dtype {dt} needs {dt.itemsize} bytes of data")
    return np.frombuffer(data, dtype=dt, count=1)[0]


class _PendingArray:
    """Stand-in for ``numpy._core.multiarray._reconstruct(ndarray, ...)``.

    The pickle's BUILD state (shape, dtype, order, raw bytes) is consumed by ``__setstate__``;
    after unpickling, every stand-in is replaced by the array it describes.
    """

    __slots__ = ("_array",)

    def __init__(self) -> None:
        object.__setattr__(self, "_array", None)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("numpy array stand-in is read-only")

    def __setstate__(self, state: Any) -> None:
        if self._array is not None:
            raise _DataError("numpy array state set twice")
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            raise _DataError("unexpected numpy array state")
        shape, dtype, fortran, raw = state
        shape = _int_tuple(shape, "numpy array shape")
        if not isinstance(dtype, _NumpyDtypeSpec):
            raise _DataError("numpy array state needs a numpy dtype")
        dt = dtype.resolve()
        if isinstance(raw, str):
            raw = raw.encode("latin-1")
        if not isinstance(raw, bytes) or len(raw) != math.prod(shape) * dt.itemsize:
            raise _DataError(f"numpy array data does not match shape {shape} and dtype {dt}")
        arr = np.frombuffer(raw, dtype=dt).reshape(shape, order="F" if fortran else "C")
        object.__setattr__(self, "_array", np.array(arr, dtype=dt.newbyteorder("="), order="C"))


_NDARRAY = _Marker("numpy.ndarray")


def _numpy_reconstruct(subtype: Any, shape: Any, typecode: Any) -> _PendingArray:
    if subtype is not _NDARRAY:
        raise _DataError(f"numpy _reconstruct of {subtype!r} is not allowed")
    return _PendingArray()


def _replace_pending_arrays(obj: Any, seen: dict[int, Any]) -> Any:
    """Return ``obj`` with every :class:`_PendingArray` replaced by its array (in place)."""
    if isinstance(obj, _PendingArray):
        if obj._array is None:
            raise _DataError("numpy array without state")
        return obj._array
    key = id(obj)
    if key in seen:
        return seen[key]
    if isinstance(obj, dict):
        seen[key] = obj
        for k, v in obj.items():
            new = _replace_pending_arrays(v, seen)
            if new is not v:
                obj[k] = new
    elif isinstance(obj, list):
        seen[key] = obj
        for i, v in enumerate(obj):
            new = _replace_pending_arrays(v, seen)
            if new is not v:
                obj[i] = new
    elif isinstance(obj, Namespace):
        seen[key] = obj
        for k, v in vars(obj).items():
            new = _replace_pending_arrays(v, seen)
            if new is not v:
                vars(obj)[k] = new
    elif isinstance(obj, tuple):
        items = tuple(_replace_pending_arrays(v, seen) for v in obj)
        if any(a is not b for a, b in zip(items, obj)):
            obj = items
        seen[key] = obj
    return obj


# --------------------------------------------------------------------------------------------
# The allow-list
# --------------------------------------------------------------------------------------------


_TENSOR_REBUILDERS = (
    _SafeCallable("torch._utils._rebuild_tensor", _rebuild_tensor),
    _SafeCallable("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
    _SafeCallable("torch._utils._rebuild_tensor_v3", _rebuild_tensor_v3),
    _SafeCallable("torch._utils._rebuild_parameter", _rebuild_parameter),
    _SafeCallable("torch._utils._rebuild_parameter_with_state", _rebuild_parameter_with_state),
)


def _build_allow_list() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {}
    for item in _TENSOR_REBUILDERS:
        module, _, attr = item.name.rpartition(".")
        allowed[(module, attr)] = item
    allowed[("torch._tensor", "_rebuild_from_type_v2")] = _SafeCallable(
        "torch._tensor._rebuild_from_type_v2", _rebuild_from_type_v2
    )
    for marker in _TENSOR_CLASSES:
        module, _, attr = marker.name.rpartition(".")
        allowed[(module, attr)] = marker
    allowed[("torch.nn", "Parameter")] = _TENSOR_CLASSES[1]
    for name, dtype in _STORAGE_DTYPES.items():
        for module in ("torch", "torch.storage", "torch.cuda"):
            allowed[(module, name)] = _StorageType(name, dtype)
    for name in (*_TORCH_DTYPE_TO_NUMPY, *_TORCH_DTYPES_WITHOUT_NUMPY):
        allowed[("torch", name)] = TorchDtype(name)
    allowed[("torch", "device")] = _SafeCallable("torch.device", _make_device)
    allowed[("torch", "Size")] = _SafeCallable("torch.Size", _make_size)
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed[("collections", "Counter")] = collections.Counter
    allowed[("argparse", "Namespace")] = Namespace
    for builtin in (set, frozenset, slice, complex):
        allowed[("builtins", builtin.__name__)] = builtin
    allowed[("builtins", "bytes")] = _SafeCallable("builtins.bytes", _make_bytes)
    allowed[("builtins", "bytearray")] = _SafeCallable("builtins.bytearray", _make_bytearray)
    allowed[("_codecs", "encode")] = _SafeCallable("_codecs.encode", _codecs_encode)
    allowed[("numpy", "dtype")] = _SafeCallable("numpy.dtype", _make_numpy_dtype)
    allowed[("numpy", "ndarray")] = _NDARRAY
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "scalar")] = _SafeCallable(f"{module}.scalar", _numpy_scalar)
        allowed[(module, "_reconstruct")] = _SafeCallable(
            f"{module}._reconstruct", _numpy_reconstruct
        )
    return allowed


_ALLOWED_GLOBALS = _build_allow_list()


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: _Archive) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self.saw_numpy_arrays = False

    def find_class(self, module: str, name: str) -> Any:
        # Python 3 writes protocol-2 pickles with Python 2 names (__builtin__, commands, ...).
        # The mapping only renames; the allow-list is checked on the Python 3 name.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        resolved = _ALLOWED_GLOBALS.get((module, name))
        if resolved is None:
            raise UnsafePickleError(f"{module}.{name}", self._archive.path)
        if resolved is _NDARRAY:
            self.saw_numpy_arrays = True
        return resolved

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _DataError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise _DataError(f"persistent id names {storage_type!r}, not a storage type")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise _DataError(f"malformed storage persistent id {pid!r}")
        storage = _Storage(self._archive, key, storage_type, numel)
        have = len(self._archive.storage_bytes(key))
        if have < storage.nbytes:
            raise PthCorruptError(
                f"storage record {self._archive.prefix}data/{key!r} has {have} bytes but the "
                f"pickle declares {numel} {storage_type.name} elements ({storage.nbytes} bytes)",
                self._archive.path,
            )
        return storage


# --------------------------------------------------------------------------------------------
# load_pth
# --------------------------------------------------------------------------------------------

# Start of a pre-1.6 torch.save file: protocol 2, then the 10-byte LONG1 magic number.
# torch's legacy magic number 0x1950A86A20F9469CFC6C pickled as a long: the first object
# of a legacy file (after the protocol header, and a frame header from protocol 4 on).
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _open_zip(path: str) -> zipfile.ZipFile:
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except FileNotFoundError as e:
        raise PthNotFoundError("no such file", path) from e
    except IsADirectoryError as e:
        raise PthError("is a directory, not a .pth file", path) from e
    except OSError as e:
        raise PthError(f"cannot read file: {e.strerror or e}", path) from e
    if not head:
        raise PthCorruptError("file is empty", path)
    if head.startswith(b"\x80") and _LEGACY_MAGIC in head[:24]:
        raise PthLegacyFormatError(
            "legacy (pre-1.6, non-zip) torch.save format is not supported; load it with "
            "torch and re-save it with torch >= 1.6 (the default zip format)",
            path,
        )
    if len(head) > 262 and head[257:262] == b"ustar":
        raise PthLegacyFormatError(
            "legacy tar-based torch.save format is not supported; load it with torch and "
            "re-save it with torch >= 1.6 (the default zip format)",
            path,
        )
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        if head.startswith(b"PK"):
            msg = f"zip archive is truncated or corrupt ({e})"
        else:
            msg = "not a zip archive, so not a torch.save (>= 1.6) checkpoint"
        raise PthCorruptError(msg, path) from e


def load_pth(path: str | os.PathLike[str]) -> Any:
    """Load a ``torch.save`` zip checkpoint without torch and without running its code.

    Args:
      path: the ``.pth``/``.pt``/``.ckpt`` file.

    Returns:
      The saved object. Tensors and parameters are C-contiguous numpy arrays in native byte
      order (``bfloat16`` and float8 via ``ml_dtypes``), with views, offsets and shared storages
      resolved into independent copies. Containers keep their types (``dict``,
      ``collections.OrderedDict``, ``collections.Counter``, lists, tuples, sets);
      ``argparse.Namespace`` becomes :class:`Namespace`, ``torch.device`` :class:`TorchDevice`,
      torch dtypes :class:`TorchDtype`, ``torch.Size`` a tuple; numpy scalars and arrays stay
      numpy. Keys are returned as stored (a DDP ``module.`` prefix is kept).

    Raises:
      UnsafePickleError: the pickle names a global outside the allow-list.
      PthNotFoundError: the file does not exist.
      PthLegacyFormatError: the file uses the pre-1.6 format.
      PthCorruptError: not a zip, truncated, CRC mismatch, missing records, short storages,
        malformed pickle.
    """
    spath = os.fspath(path)
    zf = _open_zip(spath)
    with zf:
        try:
            archive = _Archive(spath, zf)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise PthCorruptError(f"zip archive is truncated or corrupt ({e})", spath) from e
        data = archive.read_pickle()
        unpickler = _SafeUnpickler(data, archive)
        try:
            obj = unpickler.load()
            if unpickler.saw_numpy_arrays:
                obj = _replace_pending_arrays(obj, {})
        except PthError:
            raise
        except _DataError as e:
            raise PthCorruptError(f"malformed data.pkl: {e}", spath) from e
        except MemoryError as e:
            raise PthCorruptError("data.pkl asks for more memory than is available", spath) from e
        except Exception as e:
            raise PthCorruptError(
                f"cannot unpickle data.pkl (truncated or corrupt?): {type(e).__name__}: {e}",
                spath,
            ) from e
    return obj


# --------------------------------------------------------------------------------------------
# find_state_dict
# --------------------------------------------------------------------------------------------


def _is_flat_array_mapping(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())
    )


def find_state_dict(
    obj: Any, *, path: str | os.PathLike[str] | None = None
) -> tuple[dict[str, np.ndarray], str]:
    """Find the model weights in a loaded checkpoint.

    Args:
      obj: what :func:`load_pth` returned.
      path: the file it came from, only used in error messages.

    Returns:
      ``(state_dict, where)``: the mapping of parameter names to arrays (the object itself when
      it is a flat mapping of arrays, else ``obj["model_state_dict"]``, ``obj["state_dict"]`` or
      ``obj["model"]``, the first that is one), and where it was found: ``"top level"`` or
      ``"checkpoint['model_state_dict']"`` (likewise for the other keys).

    Raises:
      PthError: no flat mapping of arrays was found; the message lists the top-level keys.
    """
    if _is_flat_array_mapping(obj):
        return obj, "top level"
    if isinstance(obj, Mapping):
        for key in ("model_state_dict", "state_dict", "model"):
            if key in obj and _is_flat_array_mapping(obj[key]):
                return obj[key], f"checkpoint[{key!r}]"
        keys = ", ".join(repr(k) for k in list(obj)[:30])
        raise PthError(
            "no state dict found: the object is not a flat mapping of arrays and none of "
            f"'model_state_dict', 'state_dict', 'model' is one (top-level keys: {keys})",
            path,
        )
    raise PthError(
        f"no state dict found: the checkpoint is a {type(obj).__name__}, not a mapping", path
    )


# --------------------------------------------------------------------------------------------
# save_pth
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _GlobalRef:
    """A global written into the pickle by name (``GLOBAL module name``) without importing it."""

    module: str
    name: str

    def __call__(self, *args: Any) -> Any:  # pickle's save_reduce requires a callable
        raise TypeError(f"{self.module}.{self.name} is only a name in a pickle")


_REBUILD_TENSOR_V2 = _GlobalRef("torch._utils", "_rebuild_tensor_v2")
_REBUILD_TENSOR_V3 = _GlobalRef("torch._utils", "_rebuild_tensor_v3")
_UNTYPED_STORAGE = _GlobalRef("torch.storage", "UntypedStorage")


@dataclasses.dataclass(eq=False, slots=True)
class _StorageOut:
    """A storage to be written as ``data/<key>``."""

    key: str
    storage_type: _GlobalRef
    numel: int
    raw: np.ndarray  # the elements as flat little-endian uint8


def _native(dtype: np.dtype) -> np.dtype:
    """``dtype`` in native byte order (ml_dtypes types are always native)."""
    return dtype if dtype.byteorder in "=|" else dtype.newbyteorder("=")


def _little_endian_bytes(arr: np.ndarray) -> np.ndarray:
    """The elements of ``arr`` in C order and little-endian byte order, as a flat uint8 array."""
    arr = np.ascontiguousarray(arr)
    order = arr.dtype.byteorder
    if arr.dtype.itemsize > 1 and (order == ">" or (order == "=" and sys.byteorder == "big")):
        arr = arr.byteswap()
    return arr.reshape(-1).view(np.uint8)


_STORAGE_REFS = {dt: _GlobalRef("torch", name) for dt, name in _NUMPY_TO_STORAGE.items()}
_TORCH_DTYPE_REFS = {dt: _GlobalRef("torch", name) for dt, name in _NUMPY_TO_TORCH_DTYPE.items()}


class _TorchPickler(pickle._Pickler):
    """Protocol-2 pickler that writes numpy arrays as torch tensors.

    Built on the pure-Python pickler so the torch globals can be written by name
    (``_GlobalRef``) without importing torch.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=2)
        self.storages: list[_StorageOut] = []

    def _save_global_ref(self, ref: _GlobalRef) -> None:
        self.write(pickle.GLOBAL + f"{ref.module}\n{ref.name}\n".encode("ascii"))
        self.memoize(ref)

    dispatch[_GlobalRef] = _save_global_ref

    def persistent_id(self, obj: Any) -> tuple[Any, ...] | None:
        if isinstance(obj, _StorageOut):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, np.ndarray):
            return NotImplemented
        dtype = _native(obj.dtype)
        size = tuple(int(n) for n in obj.shape)
        stride = tuple(math.prod(size[i + 1 :]) for i in range(len(size)))  # C-contiguous
        raw = _little_endian_bytes(obj)
        key = str(len(self.storages))
        hooks = collections.OrderedDict()
        storage_ref = _STORAGE_REFS.get(dtype)
        if storage_ref is not None:
            storage = _StorageOut(key, storage_ref, obj.size, raw)
            self.storages.append(storage)
            return _REBUILD_TENSOR_V2, (storage, 0, size, stride, False, hooks)
        # dtypes without a legacy storage class: byte storage plus an explicit dtype, as torch
        storage = _StorageOut(key, _UNTYPED_STORAGE, raw.size, raw)
        self.storages.append(storage)
        args = (storage, 0, size, stride, False, hooks, _TORCH_DTYPE_REFS[dtype])
        return _REBUILD_TENSOR_V3, args


def _normalize_key(key: Any, where: str) -> Any:
    if isinstance(key, np.generic) and key.dtype.kind in "biuf" and key.dtype.isbuiltin:
        return key.item()
    if key is None:
        return key
    for kind in (bool, int, float, str):
        if isinstance(key, kind):
            return kind(key)
    if isinstance(key, tuple):
        return tuple(_normalize_key(k, where) for k in key)
    raise TypeError(f"{where}: dict key {key!r} has unsupported type {type(key).__name__}")


def _normalize(obj: Any, where: str, active: set[int]) -> Any:
    """Check that ``obj`` holds only what torch's weights-only loader accepts; convert leaves."""
    if isinstance(obj, np.generic):  # before the builtins: np.float64 subclasses float
        if obj.dtype.kind in "biuf" and obj.dtype.isbuiltin:
            return obj.item()
        raise TypeError(
            f"{where}: numpy scalar of dtype {obj.dtype} cannot be saved; "
            "wrap it in np.asarray to save a 0-d tensor"
        )
    if obj is None:
        return obj
    for kind in (bool, int, float, str):  # subclasses (enums, ...) would pickle as globals
        if isinstance(obj, kind):
            return kind(obj)
    if isinstance(obj, np.ndarray) or (hasattr(obj, "__array__") and hasattr(obj, "dtype")):
        arr = np.asarray(obj)
        if _native(arr.dtype) not in _NUMPY_TO_TORCH_DTYPE:
            raise TypeError(f"{where}: arrays of dtype {arr.dtype} cannot be saved as tensors")
        return arr
    if isinstance(obj, dict | list | tuple):
        if id(obj) in active:
            raise TypeError(f"{where}: the object contains itself")
        active.add(id(obj))
        try:
            if isinstance(obj, dict):
                ordered = isinstance(obj, collections.OrderedDict)
                out: dict[Any, Any] = collections.OrderedDict() if ordered else {}
                for k, v in obj.items():
                    out[_normalize_key(k, where)] = _normalize(v, f"{where}[{k!r}]", active)
                return out
            items = [_normalize(v, f"{where}[{i}]", active) for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else tuple(items)
        finally:
            active.discard(id(obj))
    raise TypeError(f"{where}: values of type {type(obj).__name__} cannot be saved")


_ALIGNMENT = 64
_PADDING_EXTRA_ID = 0x4650  # private extra-field id used only to align storage records


def _write_record(zf: zipfile.ZipFile, fh: BinaryIO, name: str, data: Any, align: bool) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    view = memoryview(data).cast("B")
    info.file_size = view.nbytes
    zip64 = view.nbytes * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule for this header
    if align:
        header = 30 + len(name.encode("utf-8")) + (20 if zip64 else 0)
        pad = -(fh.tell() + header) % _ALIGNMENT
        if pad:
            pad += _ALIGNMENT if pad < 4 else 0
            info.extra = struct.pack("<HH", _PADDING_EXTRA_ID, pad - 4) + bytes(pad - 4)
    with zf.open(info, mode="w", force_zip64=zip64) as out:
        chunk = 1 << 26
        for start in range(0, view.nbytes, chunk):
            out.write(view[start : start + chunk])


def _archive_name(path: Path) -> str:
    stem = path.name.split(".", 1)[0]
    ok = stem and all(c.isalnum() or c in "_-" for c in stem) and stem.isascii()
    return stem if ok else "archive"


def save_pth(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as a ``torch.save``-style zip checkpoint without torch.

    The file loads with ``torch.load(path, weights_only=True)`` and gives back tensors with the
    same dtype, shape and values, and containers of the same types.

    Args:
      path: the destination. It is written to a temporary file in the same directory and then
        renamed into place, so a reader never sees a half-written file.
      obj: nested ``dict``/``collections.OrderedDict``/``list``/``tuple`` of ``str``, ``int``,
        ``float``, ``bool``, ``None`` and arrays. Arrays (numpy, or anything ``np.asarray``
        accepts that has a ``dtype``) become tensors, each with its own contiguous storage;
        supported dtypes are float32/16/64, bfloat16, int8/16/32/64, uint8/16/32/64, bool,
        complex64/128 and the float8 types. numpy scalars become Python numbers.

    Raises:
      TypeError: ``obj`` holds a value torch's weights-only loader would not accept.
      OSError: the file cannot be written.
    """
    target = Path(os.fspath(path))
    normalized = _normalize(obj, "obj", set())
    buf = io.BytesIO()
    pickler = _TorchPickler(buf)
    pickler.dump(normalized)
    pickled = buf.getvalue()
    prefix = _archive_name(target) + "/"
    digest = hashlib.sha256(pickled)
    for storage in pickler.storages:
        digest.update(storage.raw[:4096].tobytes())
    serialization_id = f"{int.from_bytes(digest.digest()[:17], 'little') % 10**40:040d}"
    records = [
        ("data.pkl", pickled, False),
        (".format_version", b"1", False),
        (".storage_alignment", str(_ALIGNMENT).encode(), False),
        ("byteorder", b"little", False),
        *((f"data/{st.key}", st.raw, True) for st in pickler.storages),
        ("version", b"3\n", False),
        (".data/serialization_id", serialization_id.encode(), False),
    ]

    tmp = target.with_name(f"{temp_prefix(target.name)}{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED) as zf:
                for name, data, align in records:
                    _write_record(zf, fh, prefix + name, data, align)
        replace_durably(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
