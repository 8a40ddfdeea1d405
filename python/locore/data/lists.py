"""First-stage neighbour lists and ground truth (pickles, SPEC section 8)."""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..errors import DataError
from ..unpickle import safe_load_pickle


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


def _to_numpy(path: str, x, what: str) -> np.ndarray:
    """``x`` (a torch tensor, numpy array or nested lists) as a numeric numpy array; ragged lists, strings and
    other objects are a :class:`DataError` naming ``path``."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.numpy()
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise DataError(f"{path}: {what} is not a rectangular array ({e})") from None
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: {what} has dtype {arr.dtype} ({type(x).__name__}); expected numbers "
                        "(ragged rows or strings are not a [num_queries, topk] list)")
    return arr


def integer_ids(path: str, ids: np.ndarray, what: str) -> np.ndarray:
    """``ids`` as int64: integer dtypes, or floats holding whole numbers (the reference stores ids as
    float64); bool, fractional or non-finite values are a :class:`DataError` naming ``path``."""
    if ids.dtype.kind == "b":
        raise DataError(f"{path}: {what} are booleans; expected integer image ids")
    if ids.dtype.kind == "f":
        if not np.isfinite(ids).all():
            raise DataError(f"{path}: {what} contain NaN or inf; expected integer image ids")
        if (ids != np.floor(ids)).any():
            raise DataError(f"{path}: {what} are not whole numbers")
        if ids.size and np.abs(ids).max() >= 2 ** 53:
            raise DataError(f"{path}: {what} hold a value beyond 2^53, not an image id")
    elif ids.dtype.kind not in "iu":
        raise DataError(f"{path}: {what} have dtype {ids.dtype}; expected integer image ids")
    return ids.astype(np.int64)


def check_id_rows(path: str, ids: np.ndarray, num_images: Optional[int], what: str = "query") -> None:
    """Each row of ``ids [Q, k]`` holds distinct ids in ``[0, num_images)`` (``num_images`` None: only
    non-negative); otherwise a :class:`DataError` naming ``path`` and the first bad row."""
    if ids.size == 0:
        return
    bad = (ids < 0) | ((ids >= num_images) if num_images is not None else False)
    if bad.any():
        q, j = (int(i) for i in np.argwhere(bad)[0])
        bound = f"[0, {num_images})" if num_images is not None else "(negative)"
        raise DataError(f"{path}: {what} {q}, position {j}: image id {ids[q, j]} out of range {bound}")
    srt = np.sort(ids, axis=1)
    dup = srt[:, 1:] == srt[:, :-1]
    if dup.any():
        q, j = (int(i) for i in np.argwhere(dup)[0])
        raise DataError(f"{path}: {what} {q} lists image id {srt[q, j]} more than once (duplicates would be "
                        "counted twice by the metrics)")


def read_neighbours(path: str, num_images: Optional[int] = None) -> Neighbours:
    """Read a ``[2, num_queries, topk]`` neighbour pickle (torch tensor or numpy array, or a pair
    ``(sims, ids)``; ``[0]`` similarities, ``[1]`` ids). Refused with a :class:`DataError` naming the file:
    ragged or non-numeric lists, ids that are not whole numbers, non-finite similarities, an empty list,
    a row listing an id twice (naming the query), ids outside ``[0, num_images)`` when given (the size
    of the database the lists search: gallery, or gallery + distractors)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"neighbour file not found: {path}")
    obj = safe_load_pickle(path)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        sims, ids = _to_numpy(path, obj[0], "the similarities"), _to_numpy(path, obj[1], "the ids")
    else:
        arr = _to_numpy(path, obj, "the neighbour list")
        if arr.ndim != 3 or arr.shape[0] != 2:
            raise DataError(f"{path}: expected a [2, num_queries, topk] tensor (similarities, ids), got "
                            f"{type(obj).__name__} of shape {getattr(arr, 'shape', None)}")
        sims, ids = arr[0], arr[1]
    if sims.shape != ids.shape or sims.ndim != 2:
        raise DataError(f"{path}: similarities {sims.shape} and ids {ids.shape} must both be [num_queries, topk]")
    if 0 in sims.shape:
        raise DataError(f"{path}: empty neighbour lists (shape {sims.shape}); expected [num_queries, topk] "
                        "with both at least 1")
    ids = integer_ids(path, np.asarray(ids), "image ids (row [1])")
    sims = np.asarray(sims, dtype=np.float32)
    if not np.isfinite(sims).all():
        q = int(np.argwhere(~np.isfinite(sims))[0, 0])
        raise DataError(f"{path}: query {q} has a NaN or inf similarity")
    check_id_rows(path, ids, num_images)
    return Neighbours(sims=sims, ids=ids)


def write_neighbours(path: str, sims: np.ndarray, ids: np.ndarray) -> None:
    """Write the neighbour pickle as the reference does: ``pickle.dump`` of a float64 torch tensor
    ``[2, Q, topk]`` (similarities, then ids as floats)."""
    import torch

    arr = np.stack([np.asarray(sims, np.float64), np.asarray(ids, np.float64)])
    with open(os.fspath(path), "wb") as f:
        pickle.dump(torch.from_numpy(arr), f)


GND_ID_KEYS = ("easy", "hard", "junk", "ok")


def _gnd_ids(path: str, i: int, key: str, value: Any, num_images: Optional[int]) -> np.ndarray:
    """``gnd[i][key]`` as a flat int64 array of ids in ``[0, num_images)``, or a :class:`DataError`."""
    where = f"{path}: gnd[{i}]['{key}']"
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple, np.ndarray)) and \
            not hasattr(value, "numpy"):
        raise DataError(f"{where} is {type(value).__name__}; expected a list of image ids")
    try:
        arr = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
    except (ValueError, TypeError):
        raise DataError(f"{where} is not a flat list of image ids") from None
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iuf":
        raise DataError(f"{where} has {arr.dtype} values of shape {arr.shape}; expected a flat list of image ids")
    arr = integer_ids(path, arr, f"gnd[{i}]['{key}'] ids")
    bad = (arr < 0) | ((arr >= num_images) if num_images is not None else False)
    if bad.any():
        bound = f"[0, {num_images})" if num_images is not None else "(negative)"
        raise DataError(f"{where}: image id {arr[bad][0]} out of range {bound}")
    return arr


def read_gnd(path: str, num_images: Optional[int] = None) -> Dict[str, Any]:
    """Read a ground-truth pickle (revisited Oxford / Paris, or GLDv2 with per-query ``ok`` lists).

    Returns ``{"gnd": [...], "imlist": [...], "qimlist": [...]}``; each gnd entry has int64 arrays
    ``easy``, ``hard``, ``junk`` (empty when absent) and, when present, ``ok`` and ``bbx``. Every id must be
    an integer in ``[0, num_images)``: ``num_images`` when given (the gallery size; distractors are never
    positives), else ``len(imlist)`` when the file has an imlist. Anything else is a :class:`DataError`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"ground-truth file not found: {path}")
    obj = safe_load_pickle(path)
    if not isinstance(obj, dict) or "gnd" not in obj:
        raise DataError(f"{path}: expected a dict with key 'gnd' (and imlist, qimlist), got "
                        f"{type(obj).__name__}{' with keys ' + str(list(obj)) if isinstance(obj, dict) else ''}")
    lists = {}
    for key in ("imlist", "qimlist"):
        value = obj.get(key, [])
        if not isinstance(value, (list, tuple)):
            raise DataError(f"{path}: '{key}' is {type(value).__name__}; expected a list of image names")
        lists[key] = list(value)
    if num_images is None and lists["imlist"]:
        num_images = len(lists["imlist"])
    if not isinstance(obj["gnd"], (list, tuple)):
        raise DataError(f"{path}: 'gnd' is {type(obj['gnd']).__name__}; expected a list with one dict per query")
    gnd = []
    for i, g in enumerate(obj["gnd"]):
        if not isinstance(g, dict):
            raise DataError(f"{path}: gnd[{i}] is {type(g).__name__}, expected a dict with easy / hard / junk "
                            "(or ok)")
        if not any(k in g for k in ("easy", "hard", "ok")):
            raise DataError(f"{path}: gnd[{i}] has neither easy / hard nor ok (keys: {list(g)})")
        entry = {k: _gnd_ids(path, i, k, g.get(k, []), num_images) for k in ("easy", "hard", "junk")}
        if "ok" in g:
            entry["ok"] = _gnd_ids(path, i, "ok", g["ok"], num_images)
        if "bbx" in g:
            entry["bbx"] = g["bbx"]
        gnd.append(entry)
    return {"gnd": gnd, **lists}


def read_ranks(path: str, num_images: Optional[int] = None, num_queries: Optional[int] = None) -> np.ndarray:
    """Read a ranks file for evaluation: ``.npy`` of integer image ids ``[num_queries, n]``, best first.

    The header is checked against the file size before anything is allocated; refused with a
    :class:`DataError` naming the file (and the query where it applies): not an .npy, object / float /
    bool dtype, not 2-d, no query or no column, a row with a negative id, an id ``>= num_images`` when
    given, or a repeated id; a query count other than ``num_queries`` when given.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"ranks file not found: {path}")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = read_header(f)
        except (ValueError, OSError, SyntaxError, TypeError) as e:
            raise DataError(f"{path}: not a readable .npy file ({e})") from None
        data_start = f.tell()
    if dtype.hasobject or dtype.kind not in "iu":
        raise DataError(f"{path}: ranks have dtype {dtype}; expected integer image ids (int32 / int64)")
    if len(shape) != 2:
        raise DataError(f"{path}: expected ranks [num_queries, n], got shape {shape}")
    if 0 in shape:
        raise DataError(f"{path}: ranks of shape {shape} rank nothing; expected [num_queries, n], both >= 1")
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    actual = os.path.getsize(path) - data_start
    if actual != expected:
        raise DataError(f"{path}: the header says {shape} {dtype} ({expected} bytes) but the file holds "
                        f"{actual} bytes of data")
    if num_queries is not None and shape[0] != num_queries:
        raise DataError(f"{path}: ranks {shape[0]} queries, the ground truth has {num_queries}")
    ranks = np.load(path, allow_pickle=False).astype(np.int64, copy=False)
    check_id_rows(path, ranks, num_images)
    return ranks


def write_gnd(path: str, gnd: List[Dict[str, Any]], imlist: Sequence[str], qimlist: Sequence[str]) -> None:
    """Write a revisited ground-truth pickle (plain lists, as revisitop ships them)."""
    out = {"gnd": [{k: (np.asarray(v).tolist() if k != "bbx" else v) for k, v in g.items()} for g in gnd],
           "imlist": list(imlist), "qimlist": list(qimlist)}
    with open(os.fspath(path), "wb") as f:
        pickle.dump(out, f)
