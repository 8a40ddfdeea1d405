"""Local descriptors: lazy HDF5 readers and writers (SPEC section 8)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .errors import DataError


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
