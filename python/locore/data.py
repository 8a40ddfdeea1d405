"""Readers and writers for the descriptor files LoCoRE and AMES use (SPEC §8), and a safe unpickler.

Layout of a dataset folder (the AMES layout; ``{desc}`` is the descriptor name, e.g. ``dinov2``)::

    DIR/{desc}_query_local.hdf5     HDF5 dataset "features", float32 [num_queries, slots, 5 + D]
    DIR/{desc}_gallery_local.hdf5   HDF5 dataset "features", float32 [num_images, slots, 5 + D]
    DIR/{desc}_query_global.pt      raw float32 [num_queries, D_global], row-major (no pickle inside)
    DIR/{desc}_gallery_global.pt    raw float32 [num_images, D_global]
    DIR/nn_{desc}.pkl               pickled [2, num_queries, topk]: [0] similarities, [1] image ids
    DIR/gnd_*.pkl                   pickled dict: gnd (per query easy / hard / junk / bbx), imlist, qimlist

Local columns: 0-1 = x, y; 2 = scale index; 3 = mask (1 = padding); 4 = detector weight; then the D
descriptor values. A model uses the first S slots of each image.

Everything is read lazily: the HDF5 files stay open and only the rows asked for are read; the global
files are memory-mapped. Nothing reads a whole database into memory.

The two pickles usually come from other people. :func:`safe_load_pickle` opens them with
:class:`RestrictedUnpickler`, which admits only containers, numbers, strings, numpy arrays and torch
tensors and refuses every other global with :class:`UnsafePickleError` (naming it) before anything runs.
``torch.save`` archives (zip) go through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import _compat_pickle
import glob
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

__all__ = [
    "DataError", "UnsafePickleError", "RestrictedUnpickler", "safe_load_pickle",
    "LocalFeatures", "GlobalFeatures", "Neighbours", "read_neighbours", "read_gnd",
    "write_local", "write_global", "write_neighbours", "write_gnd",
    "AmesFiles", "ames_paths", "locate_files", "EXPECTED_LAYOUT",
]


class DataError(ValueError):
    """A problem with the user's input files: missing, malformed or inconsistent (the message says which)."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list; nothing from it was executed."""


EXPECTED_LAYOUT = """expected layout (AMES):
  DIR/{desc}_query_local.hdf5     HDF5 "features" float32 [num_queries, slots, 5 + D]
  DIR/{desc}_gallery_local.hdf5   HDF5 "features" float32 [num_images, slots, 5 + D]
  DIR/{desc}_query_global.pt      raw float32 [num_queries, D_global]   (not needed with --no-global)
  DIR/{desc}_gallery_global.pt    raw float32 [num_images, D_global]    (not needed with --no-global)
  DIR/nn_{desc}.pkl               pickled [2, num_queries, topk]: similarities, image ids  (or --nn FILE)
  DIR/gnd_*.pkl                   pickled dict with gnd, imlist, qimlist                (or --gnd FILE)"""


# --------------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Local descriptors (HDF5)
# --------------------------------------------------------------------------------------------------

def _check_ids(path: str, ids: Sequence[int], num_images: int) -> np.ndarray:
    """``ids`` as a flat int64 array; :class:`DataError` naming ``path`` for one outside [0, num_images)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= num_images):
        bad = ids[(ids < 0) | (ids >= num_images)][0]
        raise DataError(f"{path}: image id {bad} out of range [0, {num_images})")
    return ids


@dataclass
class LocalBatch:
    """Local descriptors of some images: ``desc [n, S, D]`` float32, ``scales [n, S]`` int64,
    ``mask [n, S]`` bool (True = padding, the AMES convention)."""

    desc: np.ndarray
    scales: np.ndarray
    mask: np.ndarray


class LocalFeatures:
    """Lazy reader of one local-descriptor HDF5 file (dataset ``features [n, slots, 5 + D]``).

    ``num_descriptors`` = S, the number of leading slots used per image (default: all stored slots).
    The file stays open; :meth:`read` reads only the rows asked for.
    """

    def __init__(self, path: str, num_descriptors: Optional[int] = None):
        import h5py

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise DataError(f"local descriptor file not found: {self.path}")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as e:
            raise DataError(f"{self.path}: not a readable HDF5 file ({e})") from None
        if "features" not in self._file:
            keys = list(self._file.keys())
            self._file.close()
            raise DataError(f"{self.path}: no dataset 'features' (found {keys}); expected float32 "
                            "[num_images, slots, 5 + D]")
        self._ds = self._file["features"]
        if self._ds.ndim != 3 or self._ds.shape[2] <= 5:
            shape = self._ds.shape
            self._file.close()
            raise DataError(f"{self.path}: 'features' has shape {shape}; expected [num_images, slots, 5 + D]")
        self.num_images, self.slots, cols = (int(s) for s in self._ds.shape)
        self.dim = cols - 5
        S = self.slots if num_descriptors is None else int(num_descriptors)
        if not 1 <= S <= self.slots:
            self._file.close()
            raise DataError(f"{self.path}: asked for {S} descriptors per image but the file stores "
                            f"{self.slots} slots (use at most {self.slots})")
        self.num_descriptors = S

    def __len__(self) -> int:
        return self.num_images

    def read(self, ids: Sequence[int]) -> LocalBatch:
        """Rows ``ids`` (any order, repeats allowed), first S slots each."""
        ids = _check_ids(self.path, ids, self.num_images)
        uniq, inverse = np.unique(ids, return_inverse=True)
        S = self.num_descriptors
        if uniq.size == 0:
            rows = np.zeros((0, S, self.dim + 5), np.float32)
        elif uniq.size == 1 or uniq[-1] - uniq[0] + 1 == uniq.size:  # one contiguous slice
            rows = self._ds[int(uniq[0]):int(uniq[-1]) + 1, :S, :]
        else:  # h5py point selection needs increasing, unique indices
            rows = self._ds[uniq, :S, :]
        rows = np.asarray(rows, dtype=np.float32)[inverse]
        return LocalBatch(desc=np.ascontiguousarray(rows[:, :, 5:]),
                          scales=rows[:, :, 2].astype(np.int64),
                          mask=rows[:, :, 3] != 0)

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_local(path: str, desc: np.ndarray, scales: Optional[np.ndarray] = None,
                mask: Optional[np.ndarray] = None, xy: Optional[np.ndarray] = None,
                weights: Optional[np.ndarray] = None, slots: Optional[int] = None) -> None:
    """Write ``features [n, slots, 5 + D]`` float32. ``desc [n, S, D]``; ``scales``/``mask`` ``[n, S]``
    (mask True/1 = padding); ``slots`` ≥ S pads every image with masked zero slots (as AMES stores 100)."""
    import h5py

    desc = np.asarray(desc, dtype=np.float32)
    n, S, D = desc.shape
    slots = S if slots is None else int(slots)
    if slots < S:
        raise ValueError(f"slots={slots} < {S} descriptors per image")
    feats = np.zeros((n, slots, 5 + D), np.float32)
    feats[:, S:, 3] = 1.0
    feats[:, :S, 5:] = desc
    if xy is not None:
        feats[:, :S, 0:2] = np.asarray(xy, np.float32)
    if scales is not None:
        feats[:, :S, 2] = np.asarray(scales, np.float32)
    if mask is not None:
        feats[:, :S, 3] = np.asarray(mask, np.float32)
    feats[:, :S, 4] = 1.0 if weights is None else np.asarray(weights, np.float32)
    with h5py.File(os.fspath(path), "w") as f:
        f.create_dataset("features", data=feats, chunks=(1, slots, 5 + D))


# --------------------------------------------------------------------------------------------------
# Global descriptors (raw float32)
# --------------------------------------------------------------------------------------------------

class GlobalFeatures:
    """Memory-mapped raw float32 global descriptors ``[num_images, dim]`` (row-major, no header).

    Give ``dim``, or ``num_images`` to infer it from the file size; the size is checked either way.
    """

    def __init__(self, path: str, dim: Optional[int] = None, num_images: Optional[int] = None):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise DataError(f"global descriptor file not found: {self.path}")
        nbytes = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(4)
        if head in (b"PK\x03\x04", b"\x80\x02\x8a\x0a"):  # zip / legacy torch.save magic
            raise DataError(f"{self.path}: looks like a pickle / torch.save archive, but global descriptors "
                            "are raw float32 (write them with np.asarray(x, np.float32).tofile(path))")
        if nbytes % 4:
            raise DataError(f"{self.path}: size {nbytes} bytes is not a multiple of 4 (float32)")
        count = nbytes // 4
        if dim is None:
            if not num_images:
                raise ValueError("GlobalFeatures needs dim or num_images")
            if count % num_images:
                raise DataError(f"{self.path}: {count} float32 values do not split into {num_images} rows "
                                "(one per image of the matching local file)")
            dim = count // num_images
        dim = int(dim)
        if dim <= 0 or count % dim:
            raise DataError(f"{self.path}: {count} float32 values ({nbytes} bytes) is not a multiple of "
                            f"dim={dim}; expected [num_images, {dim}] row-major")
        self.dim = dim
        self.num_images = count // dim
        if num_images is not None and self.num_images != num_images:
            raise DataError(f"{self.path}: holds {self.num_images} rows of dim {dim}, but the matching local "
                            f"file has {num_images} images")
        self.array = np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.num_images, dim))

    def __len__(self) -> int:
        return self.num_images

    def read(self, ids: Sequence[int]) -> np.ndarray:
        """Rows ``ids`` as a float32 array ``[len(ids), dim]`` (a copy)."""
        ids = _check_ids(self.path, ids, self.num_images)
        return np.array(self.array[ids], dtype=np.float32)


def write_global(path: str, array: np.ndarray) -> None:
    """Write ``[n, dim]`` as raw row-major float32 (the AMES ``*_global.pt`` format)."""
    np.ascontiguousarray(np.asarray(array, dtype=np.float32)).tofile(os.fspath(path))


# --------------------------------------------------------------------------------------------------
# First-stage neighbours and ground truth (pickles)
# --------------------------------------------------------------------------------------------------

@dataclass
class Neighbours:
    """First-stage lists: ``sims [Q, topk]`` float32 and ``ids [Q, topk]`` int64, best first."""

    sims: np.ndarray
    ids: np.ndarray

    @property
    def num_queries(self) -> int:
        return self.ids.shape[0]

    @property
    def topk(self) -> int:
        return self.ids.shape[1]


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def read_neighbours(path: str) -> Neighbours:
    """Read a ``[2, num_queries, topk]`` neighbour pickle (tensor or array; ``[0]`` sims, ``[1]`` ids)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"neighbour file not found: {path}")
    obj = safe_load_pickle(path)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        sims, ids = _to_numpy(obj[0]), _to_numpy(obj[1])
    else:
        arr = _to_numpy(obj)
        if arr.ndim != 3 or arr.shape[0] != 2:
            raise DataError(f"{path}: expected a [2, num_queries, topk] tensor (similarities, ids), got "
                            f"{type(obj).__name__} of shape {getattr(arr, 'shape', None)}")
        sims, ids = arr[0], arr[1]
    if sims.shape != ids.shape or sims.ndim != 2:
        raise DataError(f"{path}: similarities {sims.shape} and ids {ids.shape} must both be [num_queries, topk]")
    ids_f = np.asarray(ids)
    ids_i = np.rint(ids_f).astype(np.int64) if ids_f.dtype.kind == "f" else ids_f.astype(np.int64)
    if ids_f.dtype.kind == "f" and not np.array_equal(ids_i, ids_f):
        raise DataError(f"{path}: image ids (row [1]) are not whole numbers")
    if ids_i.size and ids_i.min() < 0:
        raise DataError(f"{path}: negative image id {ids_i.min()}")
    return Neighbours(sims=np.asarray(sims, dtype=np.float32), ids=ids_i)


def write_neighbours(path: str, sims: np.ndarray, ids: np.ndarray) -> None:
    """Write the neighbour pickle as the reference does: ``pickle.dump`` of a float64 torch tensor
    ``[2, Q, topk]`` (similarities, then ids as floats)."""
    import torch

    arr = np.stack([np.asarray(sims, np.float64), np.asarray(ids, np.float64)])
    with open(os.fspath(path), "wb") as f:
        pickle.dump(torch.from_numpy(arr), f)


def read_gnd(path: str) -> Dict[str, Any]:
    """Read a revisited ground-truth pickle.

    Returns ``{"gnd": [...], "imlist": [...], "qimlist": [...]}``; each gnd entry has int64 arrays
    ``easy``, ``hard``, ``junk`` (empty when absent) and, when present, ``ok`` and ``bbx``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"ground-truth file not found: {path}")
    obj = safe_load_pickle(path)
    if not isinstance(obj, dict) or "gnd" not in obj:
        raise DataError(f"{path}: expected a dict with key 'gnd' (and imlist, qimlist), got "
                        f"{type(obj).__name__}{' with keys ' + str(list(obj)) if isinstance(obj, dict) else ''}")
    gnd = []
    for i, g in enumerate(obj["gnd"]):
        if not isinstance(g, dict):
            raise DataError(f"{path}: gnd[{i}] is {type(g).__name__}, expected a dict with easy / hard / junk")
        entry = {k: np.asarray(g.get(k, []), dtype=np.int64).reshape(-1) for k in ("easy", "hard", "junk")}
        if "ok" in g:
            entry["ok"] = np.asarray(g["ok"], dtype=np.int64).reshape(-1)
        elif not any(k in g for k in ("easy", "hard")):
            raise DataError(f"{path}: gnd[{i}] has neither easy / hard nor ok (keys: {list(g)})")
        if "bbx" in g:
            entry["bbx"] = g["bbx"]
        gnd.append(entry)
    return {"gnd": gnd, "imlist": list(obj.get("imlist", [])), "qimlist": list(obj.get("qimlist", []))}


def write_gnd(path: str, gnd: List[Dict[str, Any]], imlist: Sequence[str], qimlist: Sequence[str]) -> None:
    """Write a revisited ground-truth pickle (plain lists, as revisitop ships them)."""
    out = {"gnd": [{k: (np.asarray(v).tolist() if k != "bbx" else v) for k, v in g.items()} for g in gnd],
           "imlist": list(imlist), "qimlist": list(qimlist)}
    with open(os.fspath(path), "wb") as f:
        pickle.dump(out, f)


# --------------------------------------------------------------------------------------------------
# A dataset folder
# --------------------------------------------------------------------------------------------------

@dataclass
class AmesFiles:
    """Paths of one dataset in the AMES layout (``query_global``/``gallery_global`` None without globals,
    ``gnd`` None when the folder has no ground truth)."""

    query_local: str
    gallery_local: str
    query_global: Optional[str]
    gallery_global: Optional[str]
    nn: str
    gnd: Optional[str]


def ames_paths(data_dir: str, desc: str, nn: Optional[str] = None, gnd: Optional[str] = None,
               use_global: bool = True) -> AmesFiles:
    """The paths the AMES layout gives descriptor name ``desc`` in ``data_dir`` (nothing is checked;
    ``gnd`` stays as given: the default is a search, see :func:`locate_files`)."""
    j = lambda name: os.path.join(data_dir, name)  # noqa: E731
    return AmesFiles(
        query_local=j(f"{desc}_query_local.hdf5"), gallery_local=j(f"{desc}_gallery_local.hdf5"),
        query_global=j(f"{desc}_query_global.pt") if use_global else None,
        gallery_global=j(f"{desc}_gallery_global.pt") if use_global else None,
        nn=nn if nn is not None else j(f"nn_{desc}.pkl"), gnd=gnd)


def locate_files(data_dir: str, desc: str, nn: Optional[str] = None, gnd: Optional[str] = None,
                 use_global: bool = True, require_gnd: bool = False) -> AmesFiles:
    """Resolve the files of ``data_dir`` for descriptor name ``desc``; name every missing one.

    ``nn`` / ``gnd`` override the default ``nn_{desc}.pkl`` / the single ``gnd_*.pkl`` of the folder.
    """
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f"data folder not found: {data_dir}\n{EXPECTED_LAYOUT}")
    j = lambda name: os.path.join(data_dir, name)  # noqa: E731
    files = ames_paths(data_dir, desc, nn=nn, gnd=gnd, use_global=use_global)
    problems = [p for p in (files.query_local, files.gallery_local, files.query_global, files.gallery_global,
                            files.nn) if p is not None and not os.path.isfile(p)]
    if gnd is None:
        found = sorted(glob.glob(j("gnd_*.pkl")))
        if len(found) == 1:
            files.gnd = found[0]
        elif len(found) > 1:
            raise DataError(f"{data_dir} holds several ground-truth files ({', '.join(map(os.path.basename, found))});"
                            " choose one with --gnd FILE")
        elif require_gnd:
            problems.append(j("gnd_*.pkl"))
    elif not os.path.isfile(gnd):
        problems.append(gnd)
    if problems:
        raise DataError("missing input file(s):\n  " + "\n  ".join(problems) + f"\n{EXPECTED_LAYOUT}")
    return files
