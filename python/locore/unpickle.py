"""Restricted, metered unpickling: the first-stage and ground-truth pickles come from other people, so
nothing in them may run, and nothing in them may make us allocate much more than the file's own size.

:class:`RestrictedUnpickler` is a pure-Python unpickler (``pickle._Unpickler``'s opcode loop) with
three guards:

* **Globals**: only the names in :data:`ALLOWED_GLOBALS` resolve; every other global (``os.system``,
  ``posix.system``, ``builtins.eval``, ``subprocess.Popen``, ...) is refused by name before it is imported.
* **Calls**: the callable ones resolve to checking wrappers that accept only the argument forms
  pickle / numpy / torch actually write (``bytes()`` with no argument, ``bytearray(b"...")``,
  ``_codecs.encode(str, "latin1")``, ...), so ``bytes(2e9)`` or ``bytearray(10**10)`` is refused, not run.
  Non-callable globals (``numpy.ndarray``, torch dtypes) can be passed as arguments but never called;
  the opcodes that call classes directly (``NEWOBJ``, ``OBJ``, ``INST``) are refused.
* **Budget**: every opcode is charged for what it builds (object sizes, references, memo entries, the
  logical size of every array / tensor view, the tree size of every hashed tuple), and the loaded object
  is walked once more for its expanded size (a list that holds another list many times is as big, to
  ``numpy.asarray``, as all of the copies). Past :func:`budget_for` (``max(64 MiB, 64 x file size)``)
  the load stops with :class:`UnsafePickleError`.

``torch.save`` archives (zip or legacy) are first dry-run through the same unpickler (storages as
placeholders, each claimed storage checked against the bytes the file really holds), then read by
``torch.load(weights_only=True)``; the checkpoint loader uses the same pre-check (:func:`check_torch_file`).
"""
from __future__ import annotations

import _compat_pickle
import io
import math
import os
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from typing import Any, BinaryIO, Callable, Dict, Optional, Tuple

from .errors import DataError, UnsafePickleError

MIN_BUDGET = 64 << 20          # bytes any pickle may build, whatever its size
BUDGET_PER_FILE_BYTE = 64      # ... or this many times the file's size, whichever is larger
MAX_DEPTH = 100                # nesting of containers (legitimate files: < 10)


def budget_for(file_size: int) -> int:
    """Bytes a pickle of ``file_size`` bytes may build."""
    return max(MIN_BUDGET, BUDGET_PER_FILE_BYTE * file_size)


def _refuse(why: str) -> UnsafePickleError:
    return UnsafePickleError(why)


def _is_int(x) -> bool:
    return type(x) is int


def _shape(x, what: str) -> Tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(_is_int(s) and s >= 0 for s in x) or len(x) > 64:
        raise _refuse(f"{what} must be a tuple of non-negative ints")
    return tuple(x)


# ---------------------------------------------------------------------------------------------
# The allow-list. Each callable global is a checking wrapper; its ``call(unpickler, *args)`` validates
# the argument forms pickle / numpy / torch write, charges the budget, then calls the real thing.

class _Call:
    """A callable global as the unpickler sees it: a name and a checking implementation."""

    def __init__(self, name: str, impl: Callable):
        self.name, self.impl = name, impl

    def __repr__(self) -> str:
        return f"<allowed callable {self.name}>"


def _numpy_core(submodule: str, name: str):
    import importlib

    try:  # numpy >= 2
        mod = importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:  # numpy 1.x
        mod = importlib.import_module(f"numpy.core.{submodule}")
    return getattr(mod, name)


def _call_set(u: "RestrictedUnpickler", *args):
    kind = set if u._current_name == "builtins.set" else frozenset
    if not args:
        return kind()
    if len(args) != 1 or type(args[0]) not in (list, tuple):
        raise _refuse(f"{u._current_name} accepts only a list of items here")
    u._charge_hashing(args[0])
    u._charge(64 + 32 * len(args[0]))
    return kind(args[0])


def _call_bytes(u, *args):
    if args:  # pickle writes b"" as bytes() below protocol 3; bytes(n) would allocate n bytes
        raise _refuse("builtins.bytes may only be called with no argument (bytes(n) allocates n bytes)")
    return b""


def _call_bytearray(u, *args):
    if not args:
        return bytearray()
    if len(args) == 1 and type(args[0]) is bytes:  # protocols < 5: bytearray(encode(str, 'latin1'))
        u._charge(len(args[0]) + 64)
        return bytearray(args[0])
    if len(args) == 2 and type(args[0]) is str and args[1] in ("latin-1", "latin1"):
        u._charge(len(args[0]) + 64)
        return bytearray(args[0], "latin-1")
    raise _refuse("builtins.bytearray may only copy bytes here (bytearray(n) allocates n bytes)")


def _call_encode(u, *args):
    if len(args) != 2 or type(args[0]) is not str or args[1] not in ("latin1", "latin-1"):
        raise _refuse("_codecs.encode is allowed only as encode(str, 'latin1') (how protocol 2 writes bytes)")
    u._charge(len(args[0]) + 40)
    return args[0].encode("latin-1")


def _call_ordered_dict(u, *args):
    if not args:
        return OrderedDict()
    if len(args) != 1 or type(args[0]) is not list or not all(type(p) in (list, tuple) and len(p) == 2
                                                               for p in args[0]):
        raise _refuse("collections.OrderedDict accepts only a list of (key, value) pairs here")
    for k, _ in args[0]:
        u._charge_hashing(k)
    u._charge(64 + 100 * len(args[0]))
    return OrderedDict(args[0])


def _call_dtype(u, *args):
    import numpy as np

    if not 1 <= len(args) <= 3 or type(args[0]) is not str or len(args[0]) > 64 \
            or not all(type(a) in (bool, int) and a in (0, 1) for a in args[1:]):
        raise _refuse("numpy.dtype accepts only (typestr, align, copy) as numpy writes it")
    try:
        return np.dtype(*args)
    except (TypeError, ValueError) as e:
        raise DataError(f"bad numpy dtype {args[0]!r} in the pickle ({e})") from None


def _call_reconstruct(u, *args):
    import numpy as np

    # numpy's ndarray.__reduce__ always writes _reconstruct(ndarray, (0,), b'b'); the data comes in BUILD.
    if len(args) != 3 or args[0] is not np.ndarray or tuple(args[1]) != (0,) or args[2] not in (b"b", "b"):
        raise _refuse("numpy _reconstruct is allowed only as _reconstruct(ndarray, (0,), b'b')")
    return _numpy_core("multiarray", "_reconstruct")(*args)


def _call_scalar(u, *args):
    import numpy as np

    if len(args) not in (1, 2) or not isinstance(args[0], np.dtype):
        raise _refuse("numpy scalar accepts only (dtype, data)")
    dtype = args[0]
    if dtype.hasobject:
        if len(args) != 2:
            raise _refuse("numpy object scalar needs its value")
        return args[1]
    if len(args) != 2 or type(args[1]) is not bytes or len(args[1]) != dtype.itemsize:
        raise _refuse(f"numpy scalar of {dtype} needs exactly {dtype.itemsize} bytes")
    return _numpy_core("multiarray", "scalar")(*args)


def _call_frombuffer(u, *args):
    import numpy as np

    if len(args) != 4 or not isinstance(args[1], np.dtype) or args[1].hasobject or args[3] not in ("C", "F"):
        raise _refuse("numpy _frombuffer accepts only (buffer, dtype, shape, order)")
    buf, dtype, shape = args[0], args[1], _shape(args[2], "numpy _frombuffer shape")
    if not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)):
        raise _refuse("numpy _frombuffer needs a bytes buffer")
    if math.prod(shape) * dtype.itemsize != memoryview(buf).nbytes:
        raise DataError(f"numpy array of shape {shape} and dtype {dtype} does not match its "
                        f"{memoryview(buf).nbytes}-byte buffer")
    u._charge(memoryview(buf).nbytes)  # the reshape may copy (order 'F')
    return _numpy_core("numeric", "_frombuffer")(*args)


def _storage_numel(storage) -> Tuple[Any, int]:
    """(dtype, elements) of a torch typed storage or of a dry-run placeholder."""
    if isinstance(storage, _StorageStub):
        return storage.dtype, storage.numel
    import torch

    if isinstance(storage, torch.storage.TypedStorage):  # (its public size() warns about deprecation)
        return storage.dtype, storage._untyped_storage.nbytes() // storage.dtype.itemsize
    raise _refuse(f"a torch tensor must be rebuilt from a storage, got {type(storage).__name__}")


def _check_view(u, storage, offset, size, stride, what: str) -> None:
    dtype, numel = _storage_numel(storage)
    size, stride = _shape(size, f"{what} size"), _shape(stride, f"{what} stride")
    if len(size) != len(stride) or not _is_int(offset) or offset < 0:
        raise _refuse(f"{what}: size {size}, stride {stride} and offset {offset!r} do not describe a view")
    n = math.prod(size)
    if n and offset + sum((s - 1) * st for s, st in zip(size, stride)) >= numel:
        raise DataError(f"{what}: a tensor of size {list(size)} reaches past its {numel}-element storage")
    # The logical size counts, not the storage's: a stride-0 view of a few bytes becomes n elements on any
    # copy. In a dry run the storage bytes are checked against the file instead, so only the excess counts.
    excess = n - numel if isinstance(storage, _StorageStub) else n
    u._charge(max(excess, 0) * dtype.itemsize + 128)


def _call_rebuild_tensor_v2(u, *args):
    if len(args) not in (6, 7):
        raise _refuse("torch _rebuild_tensor_v2 takes (storage, offset, size, stride, requires_grad, hooks"
                      "[, metadata])")
    storage, offset, size, stride, requires_grad, hooks = args[:6]
    metadata = args[6] if len(args) == 7 else None
    _check_view(u, storage, offset, size, stride, "torch tensor")
    if type(requires_grad) is not bool or not isinstance(hooks, OrderedDict) or hooks or metadata:
        raise _refuse("torch tensors in a pickle may carry no backward hooks or metadata")
    if isinstance(storage, _StorageStub):
        return _TensorStub()
    import torch._utils

    return torch._utils._rebuild_tensor_v2(storage, offset, tuple(size), tuple(stride), requires_grad,
                                           OrderedDict())


def _call_rebuild_tensor(u, *args):
    if len(args) != 4:
        raise _refuse("torch _rebuild_tensor takes (storage, offset, size, stride)")
    _check_view(u, *args, what="torch tensor")
    if isinstance(args[0], _StorageStub):
        return _TensorStub()
    import torch._utils

    return torch._utils._rebuild_tensor(args[0], args[1], tuple(args[2]), tuple(args[3]))


def _call_load_from_bytes(u, *args):
    """Stand-in for ``torch.storage._load_from_bytes`` (what ``pickle.dump`` of a tensor references).

    The original calls ``torch.load(..., weights_only=False)`` on the embedded bytes, which would run
    any pickle hidden there; the embedded bytes are a legacy ``torch.save`` stream of one storage, which
    is dry-run here (its claimed storage sizes checked against its length) and then read weights-only.
    """
    import torch

    if len(args) != 1 or type(args[0]) not in (bytes, bytearray):
        raise _refuse("torch.storage._load_from_bytes called with a non-bytes argument")
    b = bytes(args[0])
    try:
        check_torch_stream(io.BytesIO(b), len(b), "embedded tensor storage", budget=u.budget - u.built)
    except UnsafePickleError as e:
        raise _refuse(f"refused a tensor storage embedded in the pickle: {e}") from None
    u._charge(len(b) + 256)
    try:
        return torch.load(io.BytesIO(b), weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refuse(f"refused a tensor storage embedded in the pickle: {e}") from None
    except Exception as e:  # noqa: BLE001 - a malformed embedded stream is a data problem
        raise DataError(f"unreadable tensor storage embedded in the pickle ({type(e).__name__}: {e})") from None


def _call_torch_size(u, *args):
    import torch

    if len(args) != 1:
        raise _refuse("torch.Size takes one tuple")
    return torch.Size(_shape(args[0], "torch.Size"))


def _torch_dtype(name: str):
    import torch

    value = getattr(torch, name)
    if not isinstance(value, torch.dtype):
        raise _refuse(f"torch.{name} is not a dtype")
    return value


TORCH_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64",
                     "bool", "half", "float", "double", "long", "int", "short")
TORCH_STORAGE_DTYPES = {"FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
                        "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
                        "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}

# (module, name) -> a resolver; the callable ones resolve to _Call wrappers.
_RESOLVERS: Dict[Tuple[str, str], Callable[[], Any]] = {
    ("builtins", "set"): lambda: _Call("builtins.set", _call_set),
    ("builtins", "frozenset"): lambda: _Call("builtins.frozenset", _call_set),
    ("builtins", "bytes"): lambda: _Call("builtins.bytes", _call_bytes),
    ("builtins", "bytearray"): lambda: _Call("builtins.bytearray", _call_bytearray),
    ("collections", "OrderedDict"): lambda: _Call("collections.OrderedDict", _call_ordered_dict),
    ("_codecs", "encode"): lambda: _Call("_codecs.encode", _call_encode),
    ("numpy", "dtype"): lambda: _Call("numpy.dtype", _call_dtype),
    ("numpy", "ndarray"): lambda: __import__("numpy").ndarray,  # an argument of _reconstruct, never called
    ("torch._utils", "_rebuild_tensor_v2"): lambda: _Call("torch._utils._rebuild_tensor_v2", _call_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor"): lambda: _Call("torch._utils._rebuild_tensor", _call_rebuild_tensor),
    ("torch.storage", "_load_from_bytes"): lambda: _Call("torch.storage._load_from_bytes", _call_load_from_bytes),
    ("torch", "Size"): lambda: _Call("torch.Size", _call_torch_size),
}
for _core in ("numpy._core", "numpy.core"):  # numpy 2 and numpy 1 spell the module differently
    _RESOLVERS[(f"{_core}.multiarray", "_reconstruct")] = lambda: _Call("numpy _reconstruct", _call_reconstruct)
    _RESOLVERS[(f"{_core}.multiarray", "scalar")] = lambda: _Call("numpy scalar", _call_scalar)
    _RESOLVERS[(f"{_core}.numeric", "_frombuffer")] = lambda: _Call("numpy _frombuffer", _call_frombuffer)
for _dt in TORCH_DTYPE_NAMES:
    _RESOLVERS[("torch", _dt)] = (lambda n: lambda: _torch_dtype(n))(_dt)

#: Every global a plain pickle may name (after Python 2 names are mapped: ``__builtin__.set`` -> ``builtins.set``).
ALLOWED_GLOBALS = frozenset(_RESOLVERS)
#: The storage types a ``torch.save`` archive's persistent ids name, allowed in archives only.
TORCH_ARCHIVE_GLOBALS = frozenset(("torch", n) for n in TORCH_STORAGE_DTYPES)


# ---------------------------------------------------------------------------------------------
# Dry-run placeholders for torch archives: storages and tensors are checked, never allocated.

class _StorageStub:
    def __init__(self, dtype, numel: int):
        self.dtype, self.numel = dtype, numel


class _TensorStub:
    pass


class _StorageType:
    def __init__(self, name: str):
        import torch

        self.name, self.dtype = name, getattr(torch, TORCH_STORAGE_DTYPES[name])


# ---------------------------------------------------------------------------------------------
# The unpickler.

_P = pickle
# Opcodes that only push a new object built from the file's bytes: charged by its size.
_PUSH_OPS = (_P.INT, _P.BININT, _P.BININT1, _P.BININT2, _P.LONG, _P.LONG1, _P.LONG4, _P.STRING, _P.BINSTRING,
             _P.SHORT_BINSTRING, _P.UNICODE, _P.BINUNICODE, _P.SHORT_BINUNICODE, _P.BINUNICODE8, _P.BINBYTES,
             _P.SHORT_BINBYTES, _P.BINBYTES8, _P.BYTEARRAY8, _P.BINFLOAT, _P.FLOAT, _P.EMPTY_LIST, _P.EMPTY_DICT,
             _P.EMPTY_SET, _P.EMPTY_TUPLE, _P.NONE, _P.NEWTRUE, _P.NEWFALSE, _P.GLOBAL, _P.STACK_GLOBAL)
_REF_OPS = (_P.GET, _P.BINGET, _P.LONG_BINGET, _P.DUP)              # one more reference
_MEMO_OPS = (_P.PUT, _P.BINPUT, _P.LONG_BINPUT, _P.MEMOIZE)         # one memo entry
_PLAIN_OPS = (_P.MARK, _P.POP, _P.POP_MARK, _P.PROTO, _P.FRAME, _P.STOP)
_TUPLE_OPS = (_P.TUPLE, _P.TUPLE1, _P.TUPLE2, _P.TUPLE3)
_FILL_OPS = (_P.APPENDS, _P.LIST)
_FILL_KEY_OPS = (_P.ADDITEMS, _P.FROZENSET)
_FILL_PAIR_OPS = (_P.SETITEMS, _P.DICT)
# Everything else (NEWOBJ, NEWOBJ_EX, OBJ, INST, EXT1/2/4, PERSID without a handler, out-of-band
# buffers) is refused: none of them appears in the data files we read.


class RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler that resolves only :data:`ALLOWED_GLOBALS`, calls only their checking
    wrappers, and stops once what it built passes ``budget`` bytes (see the module docstring).

    ``torch_archive=True`` also resolves the storage types of a ``torch.save`` archive and turns its
    persistent ids into placeholders (:attr:`storages` maps storage key -> bytes claimed): a dry run.
    """

    dispatch: Dict[int, Callable] = {}

    def __init__(self, file: BinaryIO, budget: int = MIN_BUDGET, torch_archive: bool = False):
        super().__init__(file)
        self.budget, self.built = budget, 0
        self.torch_archive = torch_archive
        self.storages: Dict[str, int] = {}
        self._current_name = ""
        self._tuple_sizes: Dict[int, Tuple[tuple, int]] = {}

    # -- budget ---------------------------------------------------------------------------------
    def _charge(self, nbytes: int) -> None:
        self.built += nbytes
        if self.built > self.budget:
            raise UnsafePickleError(
                f"the pickle builds more than {self.budget >> 20} MiB (the limit is max({MIN_BUDGET >> 20} MiB, "
                f"{BUDGET_PER_FILE_BYTE} x the file size)); refusing a memory bomb")

    def _tuple_size(self, t) -> int:
        """Tree size of a tuple (what hashing or comparing it costs); 1 for anything else."""
        if type(t) is not tuple:
            return 1
        hit = self._tuple_sizes.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else 1 + len(t)

    def _charge_hashing(self, key) -> None:
        self._charge(8 * self._tuple_size(key))

    # -- globals --------------------------------------------------------------------------------
    def find_class(self, module: str, name: str):
        key = (module, name)
        if key not in _RESOLVERS:  # Python 2 names (__builtin__.set, ...) as fix_imports maps them
            if key in _compat_pickle.NAME_MAPPING:
                key = _compat_pickle.NAME_MAPPING[key]
            elif module in _compat_pickle.IMPORT_MAPPING:
                key = (_compat_pickle.IMPORT_MAPPING[module], name)
        resolve = _RESOLVERS.get(key)
        if resolve is None and self.torch_archive and key in TORCH_ARCHIVE_GLOBALS:
            return _StorageType(key[1])
        if resolve is None:
            spelled = "" if key == (module, name) else f" (written as '{module}.{name}')"
            raise UnsafePickleError(
                f"refusing to load global '{key[0]}.{key[1]}'{spelled} from an untrusted pickle: only "
                "containers, numbers, strings, numpy arrays and torch tensors are allowed")
        return resolve()

    def persistent_load(self, pid):
        if not self.torch_archive:
            raise UnsafePickleError("refusing a persistent id outside a torch.save archive")
        if type(pid) is not tuple or len(pid) not in (5, 6) or pid[0] != "storage" \
                or not isinstance(pid[1], _StorageType) or type(pid[2]) is not str or not _is_int(pid[4]) \
                or pid[4] < 0 or (len(pid) == 6 and pid[5] is not None):
            raise UnsafePickleError("a torch.save persistent id must be ('storage', type, key, location, numel)")
        nbytes = pid[4] * pid[1].dtype.itemsize
        self.storages[pid[2]] = max(self.storages.get(pid[2], 0), nbytes)
        self._charge(128)
        return _StorageStub(pid[1].dtype, pid[4])

    # -- opcodes --------------------------------------------------------------------------------
    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not isinstance(func, _Call):
            raise UnsafePickleError(f"refusing to call {type(func).__name__} from an untrusted pickle: only the "
                                    "allowed constructors may be called")
        if type(args) is not tuple:
            raise UnsafePickleError("REDUCE arguments must be a tuple")
        self._current_name = func.name
        self.stack[-1] = func.impl(self, *args)

    def load_build(self):
        import numpy as np

        state, inst = self.stack[-1], self.stack[-2]
        if type(inst) is np.ndarray:
            self._check_array_state(state)
        elif isinstance(inst, np.dtype):
            if type(state) is not tuple or len(state) > 9:
                raise UnsafePickleError("numpy dtype state must be the tuple numpy writes")
        elif type(inst) is OrderedDict:  # a state_dict's _metadata attribute
            if type(state) is not dict or not all(type(k) is str for k in state):
                raise UnsafePickleError("OrderedDict state must be a dict of attributes")
        else:
            raise UnsafePickleError(f"refusing to set the state of a {type(inst).__name__} from an untrusted pickle")
        try:
            super().load_build()
        except (TypeError, ValueError) as e:
            raise DataError(f"bad {type(inst).__name__} state in the pickle ({e})") from None

    def _check_array_state(self, state) -> None:
        import numpy as np

        if type(state) is not tuple or len(state) not in (4, 5):
            raise UnsafePickleError("numpy array state must be (version, shape, dtype, is_fortran, data)")
        shape, dtype, data = state[-4], state[-3], state[-1]
        shape = _shape(shape, "numpy array shape")
        if not isinstance(dtype, np.dtype):
            raise UnsafePickleError("numpy array state needs a dtype")
        n = math.prod(shape)
        if dtype.hasobject:
            if type(data) is not list or len(data) != n:
                raise DataError(f"numpy object array of shape {shape} needs a list of {n} items")
            self._charge(8 * n)
        else:
            if type(data) not in (bytes, bytearray) and not isinstance(data, pickle.PickleBuffer):
                raise UnsafePickleError("numpy array data must be bytes")
            if n * dtype.itemsize != memoryview(data).nbytes:
                raise DataError(f"numpy array of shape {shape} and dtype {dtype} does not match its "
                                f"{memoryview(data).nbytes}-byte buffer")
            self._charge(n * dtype.itemsize)

    def load(self):
        obj = super().load()
        self._check_expanded(obj)
        return obj

    def _check_expanded(self, root) -> None:
        """Walk the loaded object once (iteratively, with a memo): refuse recursive structures, nesting
        deeper than MAX_DEPTH, and a total expanded size (shared sub-lists counted once per use, as
        numpy.asarray or a copy would) past the budget."""
        sizes: Dict[int, int] = {}
        limit = self.budget // 8
        stack = [(root, 0, False)]
        on_path: set = set()
        while stack:
            obj, depth, done = stack.pop()
            if type(obj) not in (list, tuple, dict, set, frozenset, OrderedDict):
                continue
            oid = id(obj)
            if done:
                on_path.discard(oid)
                items = obj.items() if isinstance(obj, dict) else obj
                total = 1
                for it in items:
                    for x in (it if isinstance(obj, dict) else (it,)):
                        total += sizes.get(id(x), 1)
                sizes[oid] = min(total, limit + 1)
                if total > limit:
                    raise UnsafePickleError(
                        f"the pickle expands to more than {limit} items (shared sub-lists counted per use; "
                        f"the limit is max({MIN_BUDGET >> 20} MiB, {BUDGET_PER_FILE_BYTE} x the file size) / 8)")
                continue
            if oid in sizes:
                continue
            if oid in on_path:
                raise UnsafePickleError("the pickle holds a recursive structure (a container inside itself)")
            if depth > MAX_DEPTH:
                raise UnsafePickleError(f"the pickle nests containers deeper than {MAX_DEPTH} levels")
            on_path.add(oid)
            stack.append((obj, depth, True))
            children = obj.items() if isinstance(obj, dict) else obj
            for it in children:
                for x in (it if isinstance(obj, dict) else (it,)):
                    if type(x) in (list, tuple, dict, set, frozenset, OrderedDict) and id(x) not in sizes:
                        stack.append((x, depth + 1, False))


def _measured(op: Callable, kind: str) -> Callable:
    getsizeof = sys.getsizeof

    if kind == "push":
        def run(self):
            op(self)
            self._charge(getsizeof(self.stack[-1]) + 8)
    elif kind == "call":  # the wrappers charge what they build; sizeof of a torch storage would warn
        def run(self):
            op(self)
            top = self.stack[-1]
            self._charge((getsizeof(top) if type(top) in (bytes, bytearray, set, frozenset) else 64) + 8)
    elif kind == "ref":
        def run(self):
            op(self)
            self._charge(8)
    elif kind == "memo":
        def run(self):
            op(self)
            self._charge(72)
    elif kind == "tuple":
        def run(self):
            op(self)
            t = self.stack[-1]
            size = 1 + sum(self._tuple_size(x) for x in t)
            self._tuple_sizes[id(t)] = (t, size)
            self._charge(getsizeof(t) + 8)
    elif kind == "fill":  # APPENDS / LIST: the items on the stack since the MARK
        def run(self):
            self._charge(64 + 16 * len(self.stack))
            op(self)
    elif kind in ("fill_keys", "fill_pairs"):  # ADDITEMS / FROZENSET, SETITEMS / DICT: hashed on the way in
        step = 1 if kind == "fill_keys" else 2

        def run(self):
            items = self.stack
            for k in items[::step]:
                self._charge_hashing(k)
            self._charge(64 + 40 * len(items))
            op(self)
    elif kind == "setitem":
        def run(self):
            self._charge_hashing(self.stack[-2])
            self._charge(40)
            op(self)
    else:  # append
        def run(self):
            self._charge(16)
            op(self)
    return run


_UNPICKLER_DISPATCH = pickle._Unpickler.dispatch
for _ops, _kind in ((_PUSH_OPS, "push"), (_REF_OPS, "ref"), (_MEMO_OPS, "memo"), (_TUPLE_OPS, "tuple"),
                    (_FILL_OPS, "fill"), (_FILL_KEY_OPS, "fill_keys"), (_FILL_PAIR_OPS, "fill_pairs"), ((_P.SETITEM,), "setitem"), ((_P.APPEND,), "append")):
    for _op in _ops:
        RestrictedUnpickler.dispatch[_op[0]] = _measured(_UNPICKLER_DISPATCH[_op[0]], _kind)
for _op in _PLAIN_OPS:
    RestrictedUnpickler.dispatch[_op[0]] = _UNPICKLER_DISPATCH[_op[0]]
RestrictedUnpickler.dispatch[_P.REDUCE[0]] = _measured(RestrictedUnpickler.load_reduce, "call")
RestrictedUnpickler.dispatch[_P.BUILD[0]] = RestrictedUnpickler.load_build
RestrictedUnpickler.dispatch[_P.BINPERSID[0]] = _measured(_UNPICKLER_DISPATCH[_P.BINPERSID[0]], "ref")


def _refused_opcode(code: int) -> Callable:
    name = next((n for n in dir(pickle) if n.isupper() and getattr(pickle, n) == bytes([code])), hex(code))

    def run(self):
        raise UnsafePickleError(f"refusing pickle opcode {name} from an untrusted pickle")
    return run


for _code in range(256):
    if _code not in RestrictedUnpickler.dispatch:
        RestrictedUnpickler.dispatch[_code] = _refused_opcode(_code)


# ---------------------------------------------------------------------------------------------
# torch.save archives: dry run, then torch.load(weights_only=True).

# torch.save's legacy (non-zip) format starts with this pickled magic number.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _load_restricted(f: BinaryIO, budget: int, torch_archive: bool = False) -> Tuple[Any, "RestrictedUnpickler"]:
    u = RestrictedUnpickler(f, budget=budget, torch_archive=torch_archive)
    return u.load(), u


def check_torch_stream(f: BinaryIO, size: int, name: str, budget: Optional[int] = None) -> None:
    """Dry-run a legacy ``torch.save`` stream (magic, protocol, sys info, object, storage keys, raw
    storages): only allowed globals, and the storages it claims must fit in the bytes that follow."""
    budget = budget_for(size) if budget is None else budget
    magic, _ = _load_restricted(f, budget)
    if magic != _TORCH_LEGACY_MAGIC:
        raise DataError(f"{name}: not a torch.save stream (bad magic number)")
    _load_restricted(f, budget)        # protocol version
    _load_restricted(f, budget)        # sys info
    _, u = _load_restricted(f, budget, torch_archive=True)
    keys, _ = _load_restricted(f, budget)
    if type(keys) is not list or not all(type(k) is str for k in keys):
        raise DataError(f"{name}: the storage key list of the torch.save stream is malformed")
    claimed = sum(u.storages.get(k, 0) + 8 for k in keys)
    left = size - f.tell()
    if set(u.storages) - set(keys) or claimed > left:
        raise UnsafePickleError(f"{name}: the torch.save stream claims {claimed} bytes of storage but holds "
                                f"{left}; refusing a memory bomb")


def check_torch_zip(path: str) -> None:
    """Dry-run a ``torch.save`` zip archive's ``data.pkl``: only allowed globals, every storage it names
    present as a record at least as large as the bytes claimed, and a bounded pickle."""
    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise DataError(f"{path}: a torch.save archive holds one <name>/data.pkl, found {len(pkl)}")
        prefix = pkl[0][: -len("data.pkl")]
        info = z.getinfo(pkl[0])
        budget = budget_for(info.file_size)
        if info.file_size > budget_for(os.path.getsize(path)):
            raise UnsafePickleError(f"{path}: data.pkl claims {info.file_size} bytes; refusing a zip bomb")
        with z.open(info) as f:
            _, u = _load_restricted(io.BytesIO(f.read()), budget, torch_archive=True)
        for key, nbytes in u.storages.items():
            name = f"{prefix}data/{key}"
            try:
                have = z.getinfo(name).file_size
            except KeyError:
                raise DataError(f"{path}: the archive names storage {key!r} but holds no record {name}") from None
            if have < nbytes:
                raise UnsafePickleError(f"{path}: storage {key!r} claims {nbytes} bytes but its record holds {have}")


def check_torch_file(path: str) -> None:
    """Pre-check a ``torch.save`` file (zip or legacy) before ``torch.load`` reads it; raises
    :class:`UnsafePickleError` (code, memory bomb) or :class:`DataError` (malformed)."""
    try:
        if zipfile.is_zipfile(path):
            check_torch_zip(path)
        else:
            with open(path, "rb") as f:
                check_torch_stream(f, os.path.getsize(path), path)
    except (UnsafePickleError, DataError):
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, RecursionError, MemoryError, zipfile.BadZipFile, struct.error, UnicodeError) as e:
        raise DataError(f"{path}: not a readable torch.save file ({type(e).__name__}: {e})") from None


def _numpy_safe_globals() -> list:
    import numpy

    items = [_numpy_core("multiarray", "_reconstruct"), _numpy_core("multiarray", "scalar"),
             _numpy_core("numeric", "_frombuffer"), numpy.ndarray, numpy.dtype]
    dtypes_mod = getattr(numpy, "dtypes", None)
    if dtypes_mod is not None:
        items += [getattr(dtypes_mod, n) for n in dir(dtypes_mod) if n.endswith("DType")]
    return items


def _torch_weights_only_load(path: str):
    import torch

    try:
        check_torch_file(path)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: refused before torch.load(weights_only=True): {e}") from None
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"{path}: refused by torch.load(weights_only=True): {e}") from None
    except Exception as e:  # noqa: BLE001 - a malformed archive is a data problem
        raise DataError(f"{path}: not a readable torch.save file ({type(e).__name__}: {e})") from None


_READ_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                OverflowError, RecursionError, struct.error, UnicodeError)


def safe_load_pickle(path: str) -> Any:
    """Load a pickle (or a ``torch.save`` file) without executing code from it, within a memory budget.

    Plain pickles go through :class:`RestrictedUnpickler`; ``torch.save`` archives (zip, or the legacy
    stream) are dry-run through it, then read by ``torch.load(weights_only=True)`` with numpy's array
    helpers allowed. Raises :class:`UnsafePickleError` for a pickle that asks for anything else or would
    build more than :func:`budget_for` its size, :class:`DataError` for one that is malformed.
    """
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        return _torch_weights_only_load(path)
    with open(path, "rb") as f:
        try:
            obj, _ = _load_restricted(f, budget_for(os.path.getsize(path)))
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path}: {e}") from None
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
        except _READ_ERRORS as e:
            raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    if type(obj) is int and obj == _TORCH_LEGACY_MAGIC:
        return _torch_weights_only_load(path)
    return obj
