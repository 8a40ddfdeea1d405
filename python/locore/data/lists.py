"""First-stage neighbour lists and ground truth (pickles, SPEC section 8)."""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import numpy as np

from .errors import DataError
from .pickles import safe_load_pickle


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
