"""Local descriptors: lazy HDF5 readers and writers (SPEC section 8).

A database is one or more HDF5 files (shards, in id order), each holding a dataset ``features`` in one of
two layouts, detected from the file:

* ``flat``: float ``[num_images, slots, 5 + D]`` (float32 or float16), what the extractors write;
* ``structured``: ``[num_images]`` of compound dtype ``[('metadata', <f4, (slots, 5)), ('descriptor',
  <f2, (slots, D))]``, what AMES publishes for ROxf / RPar.

Either may be an h5py virtual dataset (how AMES joins shards and the +1M distractors). Only the rows asked
for are read, so memory does not grow with the database; the rows read are validated (finite, bounded
descriptors, integer scale indices in range, 0/1 masks) and a bad value is a :class:`DataError` naming the
file, the image id and the column.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

# Descriptors are L2-normalised or otherwise O(1) in every published extractor; values far beyond that
# overflow the fp32 attention logits into all-NaN scores (issue 13.2), so they are refused at read.
DESCRIPTOR_BOUND = 1e4
DEFAULT_NUM_SCALES = 3  # SPEC section 1; set LocalFeatures.num_scales from the model's config
METADATA_COLUMNS = ("x", "y", "scale index", "mask", "detector weight")
STRUCTURED_FIELDS = ("metadata", "descriptor")
# Exceptions h5py raises on damaged or unexpected files; turned into one-line DataErrors naming the file.
_H5_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError)


@contextmanager
def _h5_errors(path: str, doing: str) -> Iterator[None]:
    try:
        yield
    except DataError:
        raise
    except _H5_ERRORS as e:
        raise DataError(f"{path}: {doing} failed: {type(e).__name__}: {e}") from None


def _check_ids(path: str, ids: Sequence[int], num_images: int) -> np.ndarray:
    """``ids`` as a flat int64 array; :class:`DataError` naming ``path`` for one outside [0, num_images)."""
    ids = np.asarray(ids)
    if ids.size and ids.dtype.kind not in "iu":
        raise DataError(f"{path}: image ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64).reshape(-1)
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


class _LocalFile:
    """One HDF5 file of local descriptors; the layout is detected here and nowhere else."""

    def __init__(self, path: PathLike):
        import h5py

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise DataError(f"local descriptor file not found: {self.path}")
        with _h5_errors(self.path, "opening as HDF5"):
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as e:
                raise DataError(f"{self.path}: not a readable HDF5 file ({e})") from None
        try:
            with _h5_errors(self.path, "reading the 'features' header"):
                self._ds = self._open_features(h5py)
                self._detect_layout()
                if self._ds.is_virtual:
                    self._check_virtual_sources(h5py)
        except BaseException:
            self._file.close()
            raise

    def _open_features(self, h5py):
        link = self._file.get("features", getlink=True)
        if link is None:
            raise DataError(f"{self.path}: no dataset 'features' (found {list(self._file.keys())}); expected "
                            "[num_images, slots, 5 + D] float or [num_images] {metadata, descriptor}")
        if isinstance(link, h5py.ExternalLink):
            target = link.filename if os.path.isabs(link.filename) else os.path.join(
                os.path.dirname(os.path.abspath(self.path)), link.filename)
            if not (os.path.isfile(link.filename) or os.path.isfile(target)):
                raise DataError(f"{self.path}: 'features' is an external link to {link.filename}:{link.path}, "
                                "and that file does not exist")
        obj = self._file.get("features")
        if obj is None:
            raise DataError(f"{self.path}: 'features' cannot be opened (a dangling {type(link).__name__}, or a "
                            "damaged file)")
        if not isinstance(obj, h5py.Dataset):
            raise DataError(f"{self.path}: 'features' is a {type(obj).__name__}, expected a dataset")
        return obj

    def _detect_layout(self) -> None:
        ds, dt = self._ds, self._ds.dtype
        if dt.names is not None:  # structured
            if set(dt.names) != set(STRUCTURED_FIELDS):
                raise DataError(f"{self.path}: 'features' has compound fields {list(dt.names)}; expected "
                                f"{list(STRUCTURED_FIELDS)}")
            meta, desc = dt["metadata"], dt["descriptor"]
            if ds.ndim != 1 or len(meta.shape) != 2 or meta.shape[1] != 5 or len(desc.shape) != 2 \
                    or desc.shape[0] != meta.shape[0] or desc.shape[1] < 1:
                raise DataError(f"{self.path}: structured 'features' of shape {ds.shape} with metadata "
                                f"{meta.shape} and descriptor {desc.shape}; expected shape [num_images] with "
                                "metadata (slots, 5) and descriptor (slots, D)")
            for name, sub in (("metadata", meta), ("descriptor", desc)):
                if sub.base.kind != "f":
                    raise DataError(f"{self.path}: field '{name}' has dtype {sub.base}; expected float")
            self.layout = "structured"
            self.slots, self.dim = int(meta.shape[0]), int(desc.shape[1])
        else:
            if dt.kind != "f":
                raise DataError(f"{self.path}: 'features' has dtype {dt}; expected float32 or float16")
            if ds.ndim != 3 or ds.shape[2] <= 5 or ds.shape[1] < 1:
                raise DataError(f"{self.path}: 'features' has shape {ds.shape}; expected "
                                "[num_images, slots, 5 + D]")
            self.layout = "flat"
            self.slots, self.dim = int(ds.shape[1]), int(ds.shape[2]) - 5
        self.num_images = int(ds.shape[0])

    def _check_virtual_sources(self, h5py) -> None:
        """A virtual dataset reads a missing source as zeros (valid-looking rows), so refuse it at open."""
        here = os.path.dirname(os.path.abspath(self.path))
        total = int(np.prod(self._ds.shape))
        mapped = 0
        checked = set()
        for vs in self._ds.virtual_sources():
            mapped += int(vs.vspace.get_select_npoints())
            key = (vs.file_name, vs.dset_name)
            if key in checked:
                continue
            checked.add(key)
            if vs.file_name == ".":
                src_file = self.path
            else:
                candidates = [vs.file_name] if os.path.isabs(vs.file_name) else [os.path.join(here, vs.file_name),
                                                                                   vs.file_name]
                found = [c for c in candidates if os.path.isfile(c)]
                if not found:
                    raise DataError(f"{self.path}: virtual dataset 'features' maps rows to {vs.file_name}, which "
                                    "does not exist (h5py would read those rows as zeros)")
                src_file = found[0]
            with h5py.File(src_file, "r") as f:
                src = f.get(vs.dset_name)
                if not isinstance(src, h5py.Dataset):
                    raise DataError(f"{self.path}: virtual dataset 'features' maps rows to {vs.dset_name} in "
                                    f"{src_file}, which holds no such dataset")
                if src.dtype != self._ds.dtype:
                    raise DataError(f"{self.path}: virtual source {src_file}:{vs.dset_name} has dtype {src.dtype}, "
                                    f"the virtual dataset {self._ds.dtype}")
        if mapped < total:
            raise DataError(f"{self.path}: virtual dataset 'features' maps only {mapped} of its {total} elements "
                            "to source files (the rest would read as zeros)")

    def rows(self, local_ids: np.ndarray, S: int) -> Tuple[np.ndarray, np.ndarray]:
        """Metadata ``[n, S, 5]`` and descriptors ``[n, S, D]`` (float32) of sorted unique ``local_ids``."""
        n = local_ids.size
        if n == 0:
            return np.zeros((0, S, 5), np.float32), np.zeros((0, S, self.dim), np.float32)
        with _h5_errors(self.path, f"reading {n} rows"):
            if self.layout == "flat":
                # one hyperslab per run of consecutive ids: h5py's point selection (ds[list]) is ~40x
                # slower here (benchmarks/bench_data.py)
                cuts = np.flatnonzero(np.diff(local_ids) != 1) + 1
                runs = np.split(local_ids, cuts)
                rows = np.empty((n, S, self.dim + 5), self._ds.dtype)
                at = 0
                for run in runs:
                    a, b = int(run[0]), int(run[-1]) + 1
                    rows[at:at + b - a] = self._ds[a:b, :S, :]
                    at += b - a
                meta, desc = rows[:, :, :5], rows[:, :, 5:]
            else:  # a compound row is read whole (point selection is the fast path for it); S slots kept
                contiguous = local_ids[-1] - local_ids[0] + 1 == n
                sel = slice(int(local_ids[0]), int(local_ids[-1]) + 1) if contiguous else local_ids
                rec = self._ds[sel]
                meta, desc = rec["metadata"][:, :S], rec["descriptor"][:, :S]
        return meta.astype(np.float32, copy=False), np.ascontiguousarray(desc, dtype=np.float32)

    def close(self) -> None:
        self._file.close()


def _first_bad(bad: np.ndarray) -> Tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(bad)[0])


def validate_rows(path: str, image_ids: np.ndarray, meta: np.ndarray, desc: np.ndarray, num_scales: Optional[int],
                  bound: float = DESCRIPTOR_BOUND) -> None:
    """Refuse what the model cannot use, naming ``path``, the image id and the column: a descriptor value
    that is NaN / inf or above ``bound`` in magnitude, a scale index that is not an integer in
    ``[0, num_scales)``, a mask that is not exactly 0 or 1. ``image_ids[i]`` is the id of row i."""
    if desc.size and not (desc.min() >= -bound and desc.max() <= bound):  # NaN fails both; locate it below
        bad = ~(np.abs(desc) <= bound)
        i, s, c = _first_bad(bad)
        raise DataError(f"{path}: image {image_ids[i]}, slot {s}, descriptor column {5 + c}: value {desc[i, s, c]} "
                        f"(descriptors must be finite with |x| <= {bound:g})")
    scale = meta[:, :, 2]
    hi = np.inf if num_scales is None else num_scales
    bad = ~((scale >= 0) & (scale < hi) & (scale == np.floor(scale)))
    if bad.any():
        i, s = _first_bad(bad)
        want = f"0..{num_scales - 1}" if num_scales is not None else "a non-negative integer"
        raise DataError(f"{path}: image {image_ids[i]}, slot {s}, column 2 (scale index): value {scale[i, s]}; "
                        f"expected an integer in {want}")
    mask = meta[:, :, 3]
    bad = ~((mask == 0) | (mask == 1))
    if bad.any():
        i, s = _first_bad(bad)
        raise DataError(f"{path}: image {image_ids[i]}, slot {s}, column 3 (mask): value {mask[i, s]}; "
                        "expected exactly 0 (valid) or 1 (padding)")


class LocalFeatures:
    """Lazy reader of local descriptors: one HDF5 file, or several shard files read as one id range.

    ``paths``: a file or a sequence of shard files in id order (shard k holds the ids following shard
    k-1's); each may use either layout, and all must agree on slots and D. ``num_descriptors`` = S, the
    leading slots used per image (default: all stored). ``num_scales`` bounds the scale index checked at
    read (set it from the model's config once known; None checks only that it is a non-negative integer).
    The files stay open; :meth:`read` reads only the rows asked for.
    """

    def __init__(self, paths: Union[PathLike, Sequence[PathLike]], num_descriptors: Optional[int] = None,
                 num_scales: Optional[int] = DEFAULT_NUM_SCALES, bound: float = DESCRIPTOR_BOUND):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise DataError("no local descriptor file given")
        self._files: List[_LocalFile] = []
        try:
            for p in paths:
                self._files.append(_LocalFile(p))
            first = self._files[0]
            for f in self._files[1:]:
                if (f.slots, f.dim) != (first.slots, first.dim):
                    raise DataError(f"shards disagree: {first.path} stores {first.slots} slots of D={first.dim}, "
                                    f"{f.path} {f.slots} slots of D={f.dim}")
            self.paths = [f.path for f in self._files]
            self.path = self.paths[0] if len(paths) == 1 else f"{self.paths[0]} (+{len(paths) - 1} shards)"
            self.layouts = [f.layout for f in self._files]
            self.part_sizes = [f.num_images for f in self._files]
            self.offsets = np.cumsum([0] + self.part_sizes)
            self.num_images = int(self.offsets[-1])
            if self.num_images == 0:
                raise DataError(f"{self.path}: holds 0 images")
            self.slots, self.dim = first.slots, first.dim
            S = self.slots if num_descriptors is None else int(num_descriptors)
            if not 1 <= S <= self.slots:
                raise DataError(f"{self.path}: asked for {S} descriptors per image but the file stores "
                                f"{self.slots} slots (use at most {self.slots})")
        except BaseException:
            self.close()
            raise
        self.num_descriptors = S
        self.num_scales = num_scales
        self.bound = bound

    def __len__(self) -> int:
        return self.num_images

    def read(self, ids: Sequence[int]) -> LocalBatch:
        """Rows ``ids`` (any order, repeats allowed), first S slots each, validated."""
        ids = _check_ids(self.path, ids, self.num_images)
        uniq, inverse = np.unique(ids, return_inverse=True)
        S = self.num_descriptors
        bounds = np.searchsorted(uniq, self.offsets)  # uniq[bounds[k]:bounds[k+1]] lie in shard k
        metas, descs = [], []
        for k, f in enumerate(self._files):
            part = uniq[bounds[k]:bounds[k + 1]]
            if part.size == 0:
                continue
            meta, desc = f.rows(part - self.offsets[k], S)
            validate_rows(f.path, part, meta, desc, self.num_scales, self.bound)
            metas.append(meta)
            descs.append(desc)
        if not metas:
            return LocalBatch(desc=np.zeros((0, S, self.dim), np.float32), scales=np.zeros((0, S), np.int64),
                              mask=np.zeros((0, S), bool))
        meta = metas[0] if len(metas) == 1 else np.concatenate(metas)
        desc = descs[0] if len(descs) == 1 else np.concatenate(descs)
        if uniq.size != ids.size or (ids != uniq).any():  # back to the order (and repeats) asked for
            meta, desc = meta[inverse.reshape(-1)], desc[inverse.reshape(-1)]
        return LocalBatch(desc=np.ascontiguousarray(desc), scales=meta[:, :, 2].astype(np.int64),
                          mask=meta[:, :, 3] != 0)

    def close(self) -> None:
        for f in getattr(self, "_files", []):
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------------
# Writers (tests, the demo, users converting their own files)
# ------------------------------------------------------------------------------------------------

def _temp_beside(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{os.getpid()}")


def write_local(path: PathLike, desc: np.ndarray, scales: Optional[np.ndarray] = None,
                mask: Optional[np.ndarray] = None, xy: Optional[np.ndarray] = None,
                weights: Optional[np.ndarray] = None, slots: Optional[int] = None, layout: str = "flat",
                dtype: Union[str, np.dtype] = np.float32) -> None:
    """Write ``features`` in ``layout`` "flat" (``[n, slots, 5 + D]`` of ``dtype``) or "structured" (AMES's
    published compound layout: float32 metadata, float16 descriptors). ``desc [n, S, D]``;
    ``scales``/``mask`` ``[n, S]`` (mask True/1 = padding); ``slots`` ≥ S pads every image with masked zero
    slots (as AMES stores 100). Written to a temporary file beside ``path``, renamed when complete."""
    import h5py

    path = os.fspath(path)
    desc = np.asarray(desc, dtype=np.float32)
    n, S, D = desc.shape
    slots = S if slots is None else int(slots)
    if slots < S:
        raise ValueError(f"slots={slots} < {S} descriptors per image")
    meta = np.zeros((n, slots, 5), np.float32)
    meta[:, S:, 3] = 1.0
    if xy is not None:
        meta[:, :S, 0:2] = np.asarray(xy, np.float32)
    if scales is not None:
        meta[:, :S, 2] = np.asarray(scales, np.float32)
    if mask is not None:
        meta[:, :S, 3] = np.asarray(mask, np.float32)
    meta[:, :S, 4] = 1.0 if weights is None else np.asarray(weights, np.float32)
    full = np.zeros((n, slots, D), np.float32)
    full[:, :S] = desc
    if layout == "flat":
        data = np.concatenate([meta, full], axis=2).astype(dtype)
        chunks = (1, slots, 5 + D) if n else None
    elif layout == "structured":
        data = np.empty(n, dtype=structured_dtype(slots, D))
        data["metadata"], data["descriptor"] = meta, full
        chunks = (1,) if n else None
    else:
        raise ValueError(f"layout must be 'flat' or 'structured', got {layout!r}")
    tmp = _temp_beside(path)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=data, chunks=chunks)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def structured_dtype(slots: int, dim: int) -> np.dtype:
    """AMES's published compound dtype: metadata float32 ``(slots, 5)``, descriptor float16 ``(slots, dim)``."""
    return np.dtype([("metadata", "<f4", (slots, 5)), ("descriptor", "<f2", (slots, dim))])


def write_virtual_local(path: PathLike, sources: Sequence[PathLike]) -> None:
    """Write a virtual ``features`` joining the ``features`` of ``sources`` in order (AMES's VirtualLayout
    for shards and +1M); nothing is copied. All sources share one layout, slot count and D; a source may
    be listed several times. Sources are stored relative to the folder of ``path``, so the folder can move."""
    import h5py

    path = os.fspath(path)
    shapes, dtype = [], None
    for s in sources:
        with h5py.File(os.fspath(s), "r") as f:
            ds = f["features"]
            if dtype is None:
                dtype, row_shape = ds.dtype, ds.shape[1:]
            elif ds.dtype != dtype or ds.shape[1:] != row_shape:
                raise ValueError(f"{s}: features {ds.dtype} {ds.shape} does not match the first source "
                                 f"({dtype}, rows {row_shape})")
            shapes.append(ds.shape)
    if dtype is None:
        raise ValueError("write_virtual_local needs at least one source")
    total = sum(s[0] for s in shapes)
    layout = h5py.VirtualLayout(shape=(total,) + tuple(row_shape), dtype=dtype)
    here = os.path.dirname(os.path.abspath(path))
    start = 0
    for s, shape in zip(sources, shapes):
        rel = os.path.relpath(os.path.abspath(os.fspath(s)), here)
        layout[start:start + shape[0]] = h5py.VirtualSource(rel, "features", shape=shape)
        start += shape[0]
    tmp = _temp_beside(path)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_virtual_dataset("features", layout)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
