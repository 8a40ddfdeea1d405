"""Global descriptors (SPEC section 8): raw float32 files or ``torch.save`` tensors, read lazily.

Two on-disk formats, detected from the file, never from its name (both are usually called ``*.pt``):

* raw: row-major float32 ``[num_images, dim]``, no header (the AMES format). The file carries no shape,
  so ``dim`` (or ``num_images``) comes from the caller and the size must be exactly num_images·dim·4 bytes.
* torch: a ``torch.save`` file holding one 2-D floating tensor, loaded with ``weights_only=True`` (no code
  from the file runs) and ``mmap=True`` (nothing is read until asked for).

:meth:`GlobalFeatures.iter_blocks` streams a database in row blocks read into one reused buffer with
``readinto``: pages of a memory map stay counted in the process RSS once touched, so scanning a 3 GB file
through ``np.memmap`` would show a 3 GB RSS; a buffer keeps it at one block. :class:`ConcatGlobal` joins
the gallery and the +1M distractors into one id range without copying either.
"""
from __future__ import annotations

import os
import pickle
import struct
import zipfile
from typing import Iterator, Optional, Protocol, Sequence, Tuple

import numpy as np

from ..errors import DataError, UnsafePickleError
from .local import _check_ids

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a"  # pickle protocol 2 + LONG1 of the legacy torch.save magic number


class GlobalDescriptors(Protocol):
    """What search and re-ranking need from a global-descriptor database (a file or a concatenation)."""

    path: str
    num_images: int
    dim: int

    def __len__(self) -> int: ...

    def read(self, ids: Sequence[int]) -> np.ndarray: ...

    def iter_blocks(self, block_rows: int) -> Iterator[Tuple[int, np.ndarray]]: ...


def _stored_data_offset(path: str, nbytes: int) -> Optional[int]:
    """Byte offset of the tensor bytes inside a ``torch.save`` zip when they can be read as raw float32:
    exactly one ``*/data/*`` record of ``nbytes`` bytes, stored uncompressed (torch never compresses).
    None otherwise (then blocks are sliced from torch's own memory map)."""
    with zipfile.ZipFile(path) as z:
        records = [i for i in z.infolist() if "/data/" in i.filename and not i.filename.endswith("/")]
        if len(records) != 1 or records[0].file_size != nbytes or records[0].compress_type != zipfile.ZIP_STORED:
            return None
        info = records[0]
    with open(path, "rb") as f:  # the local header's name/extra lengths may differ from the central directory's
        f.seek(info.header_offset)
        header = f.read(30)
    if header[:4] != _ZIP_MAGIC:
        return None
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


class GlobalFeatures:
    """Global descriptors ``[num_images, dim]`` from one raw float32 or ``torch.save`` file.

    For a raw file give ``dim``, or ``num_images`` to infer it from the file size; the size is checked
    either way. A torch file knows its shape; ``dim`` / ``num_images`` are then checked against it.
    ``array`` is a read-only view (``np.memmap`` or a memory-mapped tensor's numpy view) for random access.
    """

    def __init__(self, path: str, dim: Optional[int] = None, num_images: Optional[int] = None):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise DataError(f"global descriptor file not found: {self.path}")
        with open(self.path, "rb") as f:
            head = f.read(4)
        self._offset: Optional[int] = 0  # byte offset of row 0 when rows can be read as raw float32
        self._tensor = None
        if head == _ZIP_MAGIC or head == _LEGACY_TORCH_MAGIC:
            self.format = "torch"
            self._open_torch(head == _ZIP_MAGIC)
        else:
            self.format = "raw"
            self._open_raw(dim, num_images)
        if dim is not None and self.dim != int(dim):
            raise DataError(f"{self.path}: descriptors have dim {self.dim}, expected {int(dim)}")
        if num_images is not None and self.num_images != int(num_images):
            raise DataError(f"{self.path}: holds {self.num_images} rows of dim {self.dim}, but the matching "
                            f"local file has {int(num_images)} images")

    def _open_raw(self, dim: Optional[int], num_images: Optional[int]) -> None:
        nbytes = os.path.getsize(self.path)
        if nbytes % 4:
            raise DataError(f"{self.path}: size {nbytes} bytes is not a multiple of 4 (raw float32)")
        count = nbytes // 4
        if dim is None:
            if not num_images:
                raise ValueError("GlobalFeatures needs dim or num_images for a raw float32 file")
            if count % num_images:
                raise DataError(f"{self.path}: {count} float32 values do not split into {num_images} rows "
                                "(one per image of the matching local file)")
            dim = count // num_images
        dim = int(dim)
        if dim <= 0 or count % dim:
            raise DataError(f"{self.path}: {count} float32 values ({nbytes} bytes) is not a multiple of "
                            f"dim={dim}; expected [num_images, {dim}] row-major")
        self.dim, self.num_images = dim, count // dim
        self.array = (np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.num_images, dim)) if count
                      else np.zeros((0, dim), np.float32))  # mmap refuses an empty file

    def _open_torch(self, is_zip: bool) -> None:
        import torch

        try:  # mmap needs the zip format; the legacy stream is read whole (small files in practice)
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=is_zip)
        except pickle.UnpicklingError as e:
            raise UnsafePickleError(f"{self.path}: refused by torch.load(weights_only=True): {e}") from None
        except Exception as e:  # a truncated zip, a raw file that happens to start like one, ...
            raise DataError(f"{self.path}: starts like a torch.save file but does not load "
                            f"({type(e).__name__}: {e})") from None
        if not isinstance(obj, torch.Tensor):
            raise DataError(f"{self.path}: torch.save file holds {type(obj).__name__}; expected one tensor "
                            "[num_images, dim]")
        if obj.ndim != 2 or not obj.is_floating_point():
            raise DataError(f"{self.path}: tensor has shape {tuple(obj.shape)} and dtype {obj.dtype}; expected "
                            "a floating tensor [num_images, dim]")
        self.num_images, self.dim = (int(s) for s in obj.shape)
        self._tensor = obj
        self.array = obj.detach().float().numpy() if obj.dtype == torch.bfloat16 else obj.detach().numpy()
        nbytes = self.num_images * self.dim * 4
        raw_ok = (is_zip and obj.dtype == torch.float32 and obj.is_contiguous() and obj.storage_offset() == 0
                  and obj.untyped_storage().nbytes() == nbytes)
        self._offset = _stored_data_offset(self.path, nbytes) if raw_ok else None

    def __len__(self) -> int:
        return self.num_images

    def read(self, ids: Sequence[int]) -> np.ndarray:
        """Rows ``ids`` as a float32 array ``[len(ids), dim]`` (a copy)."""
        ids = _check_ids(self.path, ids, self.num_images)
        return np.array(self.array[ids], dtype=np.float32)

    def iter_blocks(self, block_rows: int, start: int = 0,
                    stop: Optional[int] = None) -> Iterator[Tuple[int, np.ndarray]]:
        """Yield ``(first_row, rows [n, dim] float32)`` over rows ``[start, stop)``, ``block_rows`` at a time.

        The yielded array is a buffer reused by the next block: copy it to keep it. Memory stays at one
        block whatever the file size.
        """
        stop = self.num_images if stop is None else min(int(stop), self.num_images)
        block_rows = max(1, int(block_rows))
        if self._offset is None:  # a tensor torch cannot hand over as raw bytes (float16, strided, legacy)
            for s in range(start, stop, block_rows):
                yield s, np.ascontiguousarray(self.array[s:min(s + block_rows, stop)], dtype=np.float32)
            return
        buf = np.empty((min(block_rows, max(stop - start, 1)), self.dim), np.float32)
        with open(self.path, "rb", buffering=0) as f:
            for s in range(start, stop, block_rows):
                n = min(block_rows, stop - s)
                f.seek(self._offset + s * self.dim * 4)
                view = memoryview(buf[:n]).cast("B")
                got = 0
                while got < view.nbytes:  # readinto may return short counts
                    r = f.readinto(view[got:])
                    if not r:
                        raise DataError(f"{self.path}: file ended at row {s + got // (self.dim * 4)} of "
                                        f"{self.num_images} (was it truncated while reading?)")
                    got += r
                yield s, buf[:n]


class ConcatGlobal:
    """Several global-descriptor files as one id range (gallery ids 0..n-1, then distractors n..); no copy."""

    def __init__(self, parts: Sequence[GlobalFeatures]):
        if not parts:
            raise ValueError("ConcatGlobal needs at least one part")
        dims = {p.dim for p in parts}
        if len(dims) != 1:
            raise DataError("global descriptor dims disagree: " + ", ".join(f"{p.path} has {p.dim}" for p in parts))
        self.parts = list(parts)
        self.dim = parts[0].dim
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.num_images = int(self.starts[-1])
        self.path = " + ".join(p.path for p in parts)

    def __len__(self) -> int:
        return self.num_images

    def read(self, ids: Sequence[int]) -> np.ndarray:
        ids = _check_ids(self.path, ids, self.num_images)
        out = np.empty((ids.size, self.dim), np.float32)
        part = np.searchsorted(self.starts, ids, side="right") - 1
        for k, p in enumerate(self.parts):
            sel = part == k
            if sel.any():
                out[sel] = p.read(ids[sel] - self.starts[k])
        return out

    def close(self) -> None:
        for p in self.parts:
            if hasattr(p, "close"):
                p.close()

    def iter_blocks(self, block_rows: int) -> Iterator[Tuple[int, np.ndarray]]:
        """As :meth:`GlobalFeatures.iter_blocks`, ids counted over the concatenation (a block never spans
        two files, so the last block of a part may be shorter)."""
        for k, p in enumerate(self.parts):
            for s, rows in p.iter_blocks(block_rows):
                yield int(self.starts[k]) + s, rows


def write_global(path: str, array: np.ndarray, format: str = "raw") -> None:
    """Write ``[n, dim]`` float32 as raw row-major bytes (the AMES ``*_global.pt`` format), or with
    ``format="torch"`` as a ``torch.save`` tensor (what users who extract their own globals write)."""
    array = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
    if array.ndim != 2:
        raise ValueError(f"global descriptors must be [n, dim], got shape {array.shape}")
    if format == "raw":
        array.tofile(os.fspath(path))
    elif format == "torch":
        import torch

        torch.save(torch.from_numpy(array), os.fspath(path))
    else:
        raise ValueError(f"format must be 'raw' or 'torch', got {format!r}")
