"""Restricted unpickling: the first-stage and ground-truth pickles come from other people, so nothing in them
may run (:class:`RestrictedUnpickler`, :func:`safe_load_pickle`)."""
from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import zipfile
from typing import Any, Dict

from .errors import DataError, UnsafePickleError


def _safe_load_storage_from_bytes(b: bytes):
    """Stand-in for ``torch.storage._load_from_bytes`` (what ``pickle.dump`` of a tensor references).

    The original calls ``torch.load(..., weights_only=False)`` on the embedded bytes, which would run
    any pickle hidden there; the embedded bytes are a legacy ``torch.save`` stream of one storage, so
    the weights-only loader reads them fine.
    """
    import torch

    if not isinstance(b, (bytes, bytearray)):
        raise UnsafePickleError("torch.storage._load_from_bytes called with a non-bytes argument")
    try:
        return torch.load(io.BytesIO(bytes(b)), weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"refused a tensor storage embedded in the pickle: {e}") from None


def _numpy_core(submodule: str, name: str):
    def resolve():
        import importlib

        try:  # numpy >= 2
            mod = importlib.import_module(f"numpy._core.{submodule}")
        except ImportError:  # numpy 1.x
            mod = importlib.import_module(f"numpy.core.{submodule}")
        return getattr(mod, name)

    return resolve


def _attr(module: str, name: str):
    def resolve():
        import importlib

        return getattr(importlib.import_module(module), name)

    return resolve


def _torch_dtype(name: str):
    def resolve():
        import torch

        value = getattr(torch, name)
        if not isinstance(value, torch.dtype):
            raise UnsafePickleError(f"torch.{name} is not a dtype")
        return value

    return resolve


def _build_allow_list() -> Dict[tuple, Any]:
    allowed: Dict[tuple, Any] = {}
    # Containers, numbers and strings (what protocols < 4 spell as globals; newer ones use opcodes).
    for name in ("set", "frozenset", "list", "dict", "tuple", "int", "float", "complex", "bool", "str",
                 "bytes", "bytearray", "slice", "range"):
        allowed[("builtins", name)] = _attr("builtins", name)
    allowed[("collections", "OrderedDict")] = _attr("collections", "OrderedDict")
    allowed[("_codecs", "encode")] = _attr("_codecs", "encode")  # bytes under protocol 2 (str -> latin1)
    # numpy arrays and scalars: the reconstruct helpers numpy's own __reduce__ references.
    for core in ("numpy._core", "numpy.core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = _numpy_core("multiarray", "_reconstruct")
        allowed[(f"{core}.multiarray", "scalar")] = _numpy_core("multiarray", "scalar")
        allowed[(f"{core}.numeric", "_frombuffer")] = _numpy_core("numeric", "_frombuffer")
    allowed[("numpy", "ndarray")] = _attr("numpy", "ndarray")
    allowed[("numpy", "dtype")] = _attr("numpy", "dtype")
    # torch tensors as pickle.dump writes them (torch.save archives go through torch.load instead).
    allowed[("torch._utils", "_rebuild_tensor_v2")] = _attr("torch._utils", "_rebuild_tensor_v2")
    allowed[("torch._utils", "_rebuild_tensor")] = _attr("torch._utils", "_rebuild_tensor")
    allowed[("torch.storage", "_load_from_bytes")] = lambda: _safe_load_storage_from_bytes
    allowed[("torch", "Size")] = _attr("torch", "Size")
    for dt in ("float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64",
               "bool", "half", "float", "double", "long", "int", "short"):
        allowed[("torch", dt)] = _torch_dtype(dt)
    return allowed


_ALLOWED = _build_allow_list()


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` admits only data types.

    Allowed: builtin containers / numbers / strings, ``collections.OrderedDict``, ``_codecs.encode``
    (protocol-2 bytes), numpy's ``_reconstruct`` / ``_frombuffer`` / ``scalar`` / ``ndarray`` /
    ``dtype``, and the torch helpers ``pickle.dump`` of a tensor references (``_rebuild_tensor_v2``,
    ``torch.Size``, dtypes, and ``torch.storage._load_from_bytes``, replaced by a weights-only loader).
    Anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, arbitrary classes) raises
    :class:`UnsafePickleError` naming the global, before it is imported or called.
    """

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key not in _ALLOWED:  # Python 2 names (__builtin__.set, copy_reg, ...) as fix_imports maps them
            if key in _compat_pickle.NAME_MAPPING:
                key = _compat_pickle.NAME_MAPPING[key]
            elif module in _compat_pickle.IMPORT_MAPPING:
                key = (_compat_pickle.IMPORT_MAPPING[module], name)
        resolve = _ALLOWED.get(key)
        if resolve is None:
            spelled = "" if key == (module, name) else f" (written as '{module}.{name}')"
            raise UnsafePickleError(
                f"refusing to load global '{key[0]}.{key[1]}'{spelled} from an untrusted pickle: only "
                "containers, numbers, strings, numpy arrays and torch tensors are allowed")
        return resolve()


# torch.save's legacy (non-zip) format starts with this pickled magic number.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _numpy_safe_globals() -> list:
    import numpy

    items = [_numpy_core("multiarray", "_reconstruct")(), _numpy_core("multiarray", "scalar")(),
             _numpy_core("numeric", "_frombuffer")(), numpy.ndarray, numpy.dtype]
    dtypes_mod = getattr(numpy, "dtypes", None)
    if dtypes_mod is not None:
        items += [getattr(dtypes_mod, n) for n in dir(dtypes_mod) if n.endswith("DType")]
    return items


def _torch_weights_only_load(path: str):
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"{path}: refused by torch.load(weights_only=True): {e}") from None


def safe_load_pickle(path: str) -> Any:
    """Load a pickle (or a ``torch.save`` file) without executing code from it.

    Plain pickles go through :class:`RestrictedUnpickler`; ``torch.save`` archives (zip, or the legacy
    stream) through ``torch.load(weights_only=True)`` with numpy's array helpers allowed.
    Raises :class:`UnsafePickleError` for a pickle that asks for anything else.
    """
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        return _torch_weights_only_load(path)
    with open(path, "rb") as f:
        try:
            obj = RestrictedUnpickler(f).load()
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:
        return _torch_weights_only_load(path)
    return obj
