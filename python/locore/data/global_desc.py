"""Global descriptors: memory-mapped raw float32 files (SPEC section 8)."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from .errors import DataError
from .local import _check_ids


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
