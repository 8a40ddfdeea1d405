"""A dataset folder in the AMES layout: the file names of one descriptor name, and finding them."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Optional

from .errors import DataError

EXPECTED_LAYOUT = """expected layout (AMES):
  DIR/{desc}_query_local.hdf5     HDF5 "features" float32 [num_queries, slots, 5 + D]
  DIR/{desc}_gallery_local.hdf5   HDF5 "features" float32 [num_images, slots, 5 + D]
  DIR/{desc}_query_global.pt      raw float32 [num_queries, D_global]   (not needed with --no-global)
  DIR/{desc}_gallery_global.pt    raw float32 [num_images, D_global]    (not needed with --no-global)
  DIR/nn_{desc}.pkl               pickled [2, num_queries, topk]: similarities, image ids  (or --nn FILE)
  DIR/gnd_*.pkl                   pickled dict with gnd, imlist, qimlist                (or --gnd FILE)"""


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
