"""Opening a dataset's readers: queries, and the database (gallery shards, then +1M distractors) as one id range.

Nothing is copied: the local files stay open and are read row by row, the global files are memory-mapped,
and :class:`~locore.data.global_desc.ConcatGlobal` routes each id to the file that holds it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from ..errors import DataError
from .folder import AmesFiles
from .global_desc import ConcatGlobal, GlobalFeatures
from .local import DEFAULT_NUM_SCALES, LocalFeatures


def _globals_for(paths: List[str], local_sizes: List[int], what: str) -> List[GlobalFeatures]:
    """Global readers for one group of local files (the gallery, or the distractors): one global file per
    local file, or one global file for the whole group."""
    if len(paths) == len(local_sizes):
        return [GlobalFeatures(p, num_images=n) for p, n in zip(paths, local_sizes)]
    if len(paths) == 1:
        return [GlobalFeatures(paths[0], num_images=sum(local_sizes))]
    raise DataError(f"the {what} has {len(local_sizes)} local descriptor files but {len(paths)} global ones "
                    f"({', '.join(paths)}); expected one global file per local file, or one for all")


@dataclass
class Database:
    """The opened readers of one run. ``gallery_local`` / ``gallery_global`` span the whole database: ids
    ``0..num_gallery-1`` are the gallery's, the rest (``num_distractors``) the distractors'."""

    query_local: LocalFeatures
    gallery_local: LocalFeatures
    query_global: Optional[GlobalFeatures]
    gallery_global: Optional[ConcatGlobal]
    num_gallery: int
    num_distractors: int

    @property
    def num_images(self) -> int:
        return len(self.gallery_local)

    def set_num_scales(self, num_scales: int) -> None:
        """Bound the scale index checked at read by the model's ``num_scales`` (known once it is loaded)."""
        self.query_local.num_scales = self.gallery_local.num_scales = int(num_scales)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for r in (self.query_local, self.gallery_local, self.query_global, self.gallery_global):
            if r is not None and hasattr(r, "close"):
                r.close()


def open_database(files: AmesFiles, num_descriptors: Optional[int] = None,
                  num_scales: Optional[int] = DEFAULT_NUM_SCALES) -> Database:
    """Open every reader of ``files`` (from :func:`locate_files`) and check that they agree: query and
    database D, global dims, one global row per local row."""
    opened: list = []
    try:
        q_local = LocalFeatures(files.query_local, num_descriptors, num_scales)
        opened.append(q_local)
        g_local = LocalFeatures(files.database_local, num_descriptors, num_scales)
        opened.append(g_local)
        if q_local.dim != g_local.dim:
            raise DataError(f"query descriptors have D={q_local.dim} ({q_local.path}) but database descriptors "
                            f"D={g_local.dim} ({g_local.path})")
        if q_local.slots != g_local.slots and num_descriptors is None:
            raise DataError(f"query files store {q_local.slots} slots, database files {g_local.slots}; "
                            "choose how many to use (--descriptors)")
        n_parts = files.gallery_local_parts
        num_gallery = int(sum(g_local.part_sizes[:n_parts]))
        q_global = g_global = None
        if files.query_global is not None:
            q_global = GlobalFeatures(files.query_global, num_images=len(q_local))
            opened.append(q_global)
            n_g = files.gallery_global_parts
            parts = _globals_for(files.database_global[:n_g], g_local.part_sizes[:n_parts], "gallery")
            if len(files.database_local) > n_parts:
                parts += _globals_for(files.database_global[n_g:], g_local.part_sizes[n_parts:], "distractor set")
            g_global = ConcatGlobal(parts)
            opened.append(g_global)
            if q_global.dim != g_global.dim:
                raise DataError(f"query global descriptors have dim {q_global.dim} ({q_global.path}), database "
                                f"ones {g_global.dim} ({g_global.path})")
    except BaseException:
        for r in opened:
            if hasattr(r, "close"):
                r.close()
        raise
    return Database(query_local=q_local, gallery_local=g_local, query_global=q_global, gallery_global=g_global,
                    num_gallery=num_gallery, num_distractors=len(g_local) - num_gallery)
