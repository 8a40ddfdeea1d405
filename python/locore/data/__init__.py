"""Readers and writers for the descriptor files LoCoRE and AMES use (SPEC §8), and a safe unpickler.

Layout of a dataset folder (the AMES layout; ``{desc}`` is the descriptor name, e.g. ``dinov2``)::

    DIR/{desc}_query_local.hdf5     HDF5 dataset "features": flat float [num_queries, slots, 5 + D], or
                                    structured [num_queries] {metadata <f4 (slots, 5), descriptor <f2 (slots, D)}
    DIR/{desc}_gallery_local.hdf5   the same for [num_images]; may be virtual, or split into shards
                                    {desc}_gallery_local_xaa.hdf5, ... (see folder.py, +1M distractors too)
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

from ..errors import DataError, UnsafePickleError
from .database import Database, open_database
from .folder import EXPECTED_LAYOUT, AmesFiles, ames_paths, locate_files, split_shards
from .global_desc import ConcatGlobal, GlobalFeatures, write_global
from .lists import Neighbours, read_gnd, read_neighbours, read_ranks, write_gnd, write_neighbours
from .local import (DESCRIPTOR_BOUND, LocalBatch, LocalFeatures, structured_dtype, validate_rows, write_local,
                    write_virtual_local)
from ..unpickle import RestrictedUnpickler, safe_load_pickle

__all__ = [
    "DataError", "UnsafePickleError", "RestrictedUnpickler", "safe_load_pickle",
    "LocalBatch", "LocalFeatures", "GlobalFeatures", "Neighbours", "read_neighbours", "read_gnd", "read_ranks",
    "write_local", "write_virtual_local", "write_global", "write_neighbours", "write_gnd", "structured_dtype",
    "validate_rows", "DESCRIPTOR_BOUND", "AmesFiles", "ames_paths", "locate_files", "split_shards",
    "EXPECTED_LAYOUT", "Database", "ConcatGlobal", "open_database",
]
