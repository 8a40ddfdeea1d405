"""A dataset folder in the AMES layout: the file names of one descriptor name, and finding them.

The database is the gallery, given as one file or as shards in id order, optionally followed by the +1M
revisitop distractors from their own folder (ids n..n+1M-1; the ground truth is unchanged). GLDv2
(``gldv2-test`` / ``gldv2-val``) uses the same layout: one folder with the test queries and the index
images as the gallery, ground truth ``gnd_gldv2-test.pkl`` with per-query ``ok`` lists (gldv2-val uses
the same files; the pipeline keeps all but the last 750 queries).
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

from ..errors import DataError

EXPECTED_LAYOUT = """expected layout (AMES):
  DIR/{desc}_query_local.hdf5     HDF5 "features": float [num_queries, slots, 5 + D] or the structured
                                  [num_queries] {metadata, descriptor} layout (either may be virtual)
  DIR/{desc}_gallery_local.hdf5   the same for the gallery [num_images, ...], or shards in id order
                                  DIR/{desc}_gallery_local_xaa.hdf5, _xab, ... (as `split` names them)
  DIR/{desc}_query_global.pt      float32 [num_queries, D_global], raw or torch.save (not with --no-global)
  DIR/{desc}_gallery_global.pt    float32 [num_images, D_global], or shards _xaa.pt, ... (not with --no-global)
  DIR/nn_{desc}.pkl               pickled [2, num_queries, topk]: similarities, image ids  (or --nn FILE)
  DIR/gnd_*.pkl                   pickled dict with gnd, imlist, qimlist                (or --gnd FILE)
  DISTRACTORS/{desc}_local.hdf5   +1M (--distractors DISTRACTORS): local descriptors of the distractors,
  DISTRACTORS/{desc}_global.pt    and their global ones; ids follow the gallery's"""

# Shard suffixes as coreutils `split` writes them (xaa, xab, ..., xzz): same length, so name order = id order.
_SPLIT_SUFFIX = re.compile(r"x[a-z]{2,}")


@dataclass
class AmesFiles:
    """Paths of one dataset in the AMES layout (``query_global``/``gallery_global`` None without globals,
    ``gnd`` None when the folder has no ground truth).

    ``database_local`` / ``database_global`` list every file of the database in id order: the gallery
    (one file or its shards), then the distractors; ``num_gallery_files`` of them are the gallery's.
    ``gallery_local`` / ``gallery_global`` keep the gallery's single file (its first shard when sharded).
    """

    query_local: str
    gallery_local: str
    query_global: Optional[str]
    gallery_global: Optional[str]
    nn: str
    gnd: Optional[str]
    database_local: List[str] = field(default_factory=list)
    database_global: List[str] = field(default_factory=list)
    gallery_local_parts: int = 1
    gallery_global_parts: int = 1
    distractors: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.database_local:
            self.database_local = [self.gallery_local]
        if not self.database_global and self.gallery_global is not None:
            self.database_global = [self.gallery_global]


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


def split_shards(folder: str, stem: str, ext: str) -> List[str]:
    """Files ``folder/{stem}_x??{ext}`` (``split``'s suffixes, all of one length) in id order; [] if none."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(stem)}_x*{ext}")):
        suffix = os.path.basename(path)[len(stem) + 1:len(os.path.basename(path)) - len(ext)]
        if _SPLIT_SUFFIX.fullmatch(suffix):
            found.append((suffix, path))
    if len({len(s) for s, _ in found}) > 1:
        raise DataError(f"{folder}: shards {stem}_x*{ext} have suffixes of different lengths "
                        f"({', '.join(s for s, _ in sorted(found))}), so their id order is ambiguous; "
                        "list them in order explicitly")
    found.sort()
    # the shards must run xaa, xab, ... without a gap: a missing one would shift every later id silently
    for i, (suffix, path) in enumerate(found):
        value = 0
        for ch in suffix[1:]:
            value = 26 * value + ord(ch) - ord("a")
        if value != i:
            expected = "".join(chr(ord("a") + (i // 26 ** k) % 26) for k in reversed(range(len(suffix) - 1)))
            raise DataError(f"{folder}: shard {stem}_x{expected}{ext} is missing (found {os.path.basename(path)} "
                            f"after {i} shard(s)); the shards must run x{'a' * (len(suffix) - 1)}, ... without a gap")
    return [p for _, p in found]


def _one_or_shards(folder: str, stem: str, ext: str, problems: List[str]) -> List[str]:
    """``folder/{stem}{ext}`` if it exists, else its split shards; a missing one is appended to ``problems``."""
    single = os.path.join(folder, stem + ext)
    if os.path.isfile(single):
        return [single]
    shards = split_shards(folder, stem, ext)
    if not shards:
        problems.append(single)
        return [single]
    return shards


def _gallery_shard_list(data_dir: str, gallery_shards: Union[str, Sequence[str]]) -> List[str]:
    """An explicit shard list (in id order) or a glob (expanded in name order; refused when ambiguous)."""
    if isinstance(gallery_shards, (str, os.PathLike)):
        pattern = os.fspath(gallery_shards)
        if not os.path.isabs(pattern) and not os.path.exists(pattern):
            pattern = os.path.join(data_dir, pattern)
        paths = sorted(glob.glob(pattern))
        if not paths:
            raise DataError(f"--gallery-shards {gallery_shards}: no file matches")
        names = [os.path.basename(p) for p in paths]
        if len({len(n) for n in names}) > 1:
            raise DataError(f"--gallery-shards {gallery_shards}: matched names of different lengths "
                            f"({', '.join(names)}), so name order need not be id order; list the shards in order")
        return paths
    paths = [os.fspath(p) for p in gallery_shards]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError("missing gallery shard(s):\n  " + "\n  ".join(missing))
    return paths


def locate_files(data_dir: str, desc: str, nn: Optional[str] = None, gnd: Optional[str] = None,
                 use_global: bool = True, require_gnd: bool = False, distractors: Optional[str] = None,
                 gallery_shards: Union[None, str, Sequence[str]] = None) -> AmesFiles:
    """Resolve the files of ``data_dir`` for descriptor name ``desc``; name every missing one.

    ``nn`` / ``gnd`` override the default ``nn_{desc}.pkl`` / the single ``gnd_*.pkl`` of the folder.
    The gallery is ``{desc}_gallery_local.hdf5``, else its ``split`` shards ``{desc}_gallery_local_xaa.hdf5``
    ..., or ``gallery_shards`` (a glob or a list, in id order); its globals likewise. ``distractors``: a
    folder with ``{desc}_local.hdf5`` (or its shards) and ``{desc}_global.pt`` appended to the database.
    """
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f"data folder not found: {data_dir}\n{EXPECTED_LAYOUT}")
    j = lambda name: os.path.join(data_dir, name)  # noqa: E731
    files = ames_paths(data_dir, desc, nn=nn, gnd=gnd, use_global=use_global)
    problems = [p for p in (files.query_local, files.query_global, files.nn) if p is not None and not os.path.isfile(p)]
    if gallery_shards is not None:
        g_local = _gallery_shard_list(data_dir, gallery_shards)
    else:
        g_local = _one_or_shards(data_dir, f"{desc}_gallery_local", ".hdf5", problems)
    g_global = _one_or_shards(data_dir, f"{desc}_gallery_global", ".pt", problems) if use_global else []
    d_local: List[str] = []
    d_global: List[str] = []
    if distractors is not None:
        distractors = os.fspath(distractors)
        if not os.path.isdir(distractors):
            raise DataError(f"distractor folder not found: {distractors}\n{EXPECTED_LAYOUT}")
        d_local = _one_or_shards(distractors, f"{desc}_local", ".hdf5", problems)
        d_global = _one_or_shards(distractors, f"{desc}_global", ".pt", problems) if use_global else []
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
    files.gallery_local = g_local[0]
    files.gallery_global = g_global[0] if use_global else None
    files.database_local = g_local + d_local
    files.database_global = g_global + d_global
    files.gallery_local_parts, files.gallery_global_parts = len(g_local), len(g_global)
    files.distractors = distractors
    return files
