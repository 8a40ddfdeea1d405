"""First stage: inner-product search over global descriptors, written as the ``nn_{desc}.pkl`` the re-ranker reads.

``flat`` (the default) is exact: the database is streamed from its file in row blocks, each block is scored
with one matmul ``sims = queries @ block.T`` and its top M merged into the running top M. The order is
(similarity descending, image id ascending), so ties go to the smaller id; the result equals a brute-force
``queries @ database.T`` followed by that sort (the same ids; a similarity may differ in its last float32
bit where BLAS picks another kernel for a block's shape, e.g. a one-row block). FAISS ``IndexFlatIP``, the
published choice, computes the same inner products, but its heap orders exactly tied similarities its own
way, hence the rule written down here. Memory is one block plus the running lists, whatever the database size.

``ivf`` / ``hnsw`` are FAISS approximate indexes (``IndexIVFFlat`` / ``IndexHNSWFlat``, inner product) for
databases past a few million images. The index is saved beside the output with a fingerprint of the data
it was built on and reused by the next run; an index built for other data is refused, never used. Their
recall@M against the exact search is measured and reported (``check_recall``).

Output: a pickled torch tensor ``[2, Q, M]``: ``[0]`` similarities, ``[1]`` image ids (AMES layout), float32
(float64 when an id exceeds 2**24, the largest integer float32 holds exactly), written to a temp file beside
the target and renamed; an existing file is kept unless ``overwrite``.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import torch

from .errors import DataError
from .data.folder import split_shards
from .data.global_desc import ConcatGlobal, GlobalDescriptors, GlobalFeatures

INDEX_KINDS = ("flat", "ivf", "hnsw")
_FLOAT32_EXACT_IDS = 2 ** 24  # float32 represents every integer up to this one


class SearchError(DataError):
    """Bad search input or settings (the one-line message says which file / value and what was expected)."""


@dataclass(frozen=True)
class SearchSettings:
    """How to search. ``block_mb`` bounds the database block held in memory (and so the peak RSS)."""

    topk: int = 1600
    index: str = "flat"                 # flat (exact) | ivf | hnsw
    block_mb: int = 128                 # database rows read per block: block_mb MiB of float32
    block_rows: Optional[int] = None    # or exactly this many rows per block (tests use small blocks)
    device: str = "auto"                # auto (cuda when available) | cpu | cuda
    nlist: Optional[int] = None         # ivf: inverted lists (default round(sqrt(N)))
    nprobe: int = 64                    # ivf: lists visited per query
    hnsw_m: int = 32                    # hnsw: graph degree
    ef_construction: int = 80           # hnsw: build-time beam
    ef_search: Optional[int] = None     # hnsw: search beam (default 2 * topk; never below topk)
    check_recall: bool = True           # ivf / hnsw: also run the exact search and report recall@M
    overwrite: bool = False             # replace an existing output (and rebuild a mismatched index)
    progress: bool = True               # tqdm progress bar on stderr

    def __post_init__(self):
        if self.index not in INDEX_KINDS:
            raise SearchError(f"unknown index {self.index!r}; expected one of {', '.join(INDEX_KINDS)}")
        if self.topk < 1:
            raise SearchError(f"topk must be at least 1, got {self.topk}")
        if self.block_mb < 1 or (self.block_rows is not None and self.block_rows < 1):
            raise SearchError(f"block size must be positive, got block_mb={self.block_mb}, "
                              f"block_rows={self.block_rows}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise SearchError(f"device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class SearchResult:
    """``nn [2, Q, M]`` (what is written), plus what was measured."""

    nn: torch.Tensor
    search_s: float                     # time of the search itself (index build / load excluded)
    queries_per_s: float
    recall: Optional[float] = None      # ivf / hnsw: mean |approx ∩ exact| / M over queries
    build_s: Optional[float] = None     # ivf / hnsw: index build (or load) time
    index_path: Optional[str] = None
    index_reused: bool = False
    out: Optional[str] = None

    @property
    def sims(self) -> np.ndarray:
        return self.nn[0].numpy().astype(np.float32)

    @property
    def ids(self) -> np.ndarray:
        return self.nn[1].numpy().astype(np.int64)


# ------------------------------------------------------------------------------------------------
# Exact search: blocked matmul + exact top-M merge
# ------------------------------------------------------------------------------------------------

def _ordered(vals: torch.Tensor, ids: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` of each row in (value descending, id ascending) order."""
    by_id = torch.argsort(ids, dim=1)
    vals, ids = vals.gather(1, by_id), ids.gather(1, by_id)
    by_val = torch.argsort(vals, dim=1, descending=True, stable=True)[:, :k]  # stable: equal values keep id order
    return vals.gather(1, by_val), ids.gather(1, by_val)


def _block_topk(sims: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` columns of each row of ``sims`` under the tie rule (smaller column wins), in any order.

    One ``torch.topk`` of k + 1: where the k-th value is strictly above the (k+1)-th, the first k are the
    only possible answer. Elsewhere ``topk`` may have picked any of the columns tied with the k-th value;
    such rows (rare outside constructed data) are redone by hand: every column above the k-th value,
    then the tied ones in column order.
    """
    if sims.shape[1] <= k:  # the whole block
        return sims, torch.arange(sims.shape[1], device=sims.device).expand_as(sims)
    vals, cols = torch.topk(sims, k + 1, dim=1)  # sorted, descending
    ambiguous = (vals[:, k - 1] == vals[:, k]).nonzero().flatten().tolist()
    vals, cols = vals[:, :k].clone(), cols[:, :k].clone()
    for r in ambiguous:
        row, t = sims[r], vals[r, k - 1]
        above = (row > t).nonzero().flatten()
        tied = (row == t).nonzero().flatten()[: k - above.numel()]
        cols[r] = torch.cat([above, tied])
        vals[r] = row[cols[r]]
    return vals, cols


def _device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise SearchError("device 'cuda' asked for, but torch sees no CUDA device")
    return torch.device("cuda" if setting != "cpu" and torch.cuda.is_available() else "cpu")


def _block_rows(dim: int, settings: "SearchSettings") -> int:
    return settings.block_rows or max(1, (settings.block_mb << 20) // (4 * dim))


def _check_queries(queries: np.ndarray, db: GlobalDescriptors, topk: int, source: str) -> np.ndarray:
    queries = np.asarray(queries)
    if queries.ndim != 2:
        raise SearchError(f"{source}: query descriptors have shape {queries.shape}; expected [num_queries, dim]")
    if len(db) == 0:
        raise SearchError(f"{db.path}: the database is empty (0 images)")
    if queries.shape[1] != db.dim:
        raise SearchError(f"{source}: query descriptors have dim {queries.shape[1]} but the database "
                          f"({db.path}) has dim {db.dim}")
    if queries.shape[0] == 0:
        raise SearchError(f"{source}: no queries (0 rows)")
    if topk > len(db):
        raise SearchError(f"topk={topk} is larger than the database ({len(db)} images in {db.path})")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    bad = ~np.isfinite(queries).all(axis=1)
    if bad.any():
        raise SearchError(f"{source}: query {int(np.argmax(bad))} has a NaN or infinite value")
    return queries


def exact_search(queries: np.ndarray, db: GlobalDescriptors,
                 settings: "SearchSettings") -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-``settings.topk`` inner products of every query over ``db``: ``(sims [Q, M] float32,
    ids [Q, M] int64)``, ordered by similarity descending then id ascending; ``db`` is streamed in blocks."""
    from tqdm import tqdm

    topk, progress = settings.topk, settings.progress
    dev = _device(settings.device)
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(dev)
    Q = q.shape[0]
    # one extra row of ones: the matmul then also yields each database row's sum, which is finite exactly
    # when the row is (barring float32 overflow); the bad-value check costs one query instead of a pass
    q = torch.cat([q, torch.ones((1, q.shape[1]), device=dev)])
    # candidates of the blocks seen so far, merged into the running top M only every few blocks: the
    # merge sorts, and a few thousand columns more per query cost nothing
    cand_v: List[torch.Tensor] = [torch.full((Q, 0), float("-inf"), device=dev)]
    cand_i: List[torch.Tensor] = [torch.zeros((Q, 0), dtype=torch.int64, device=dev)]
    merge_every = max(1, (64 << 20) // (12 * Q * topk))  # pending candidates stay under ~64 MiB
    rows = _block_rows(db.dim, settings)
    if settings.block_rows is None:  # the [Q, rows] similarity block obeys the same bound (many queries)
        rows = min(rows, max(1024, (settings.block_mb << 20) // (4 * (Q + 1))))
    bar = tqdm(total=len(db), unit="img", unit_scale=True, desc="search", disable=not progress, file=sys.stderr)
    for start, block in db.iter_blocks(rows):
        b = torch.from_numpy(block).to(dev)  # on CPU a view of the reader's buffer, used before the next read
        sims = q @ b.T
        finite = torch.isfinite(sims[Q])
        if not bool(finite.all()):
            bad = start + int((~finite).nonzero()[0, 0])
            raise SearchError(f"{db.path}: database image {bad} has a NaN or infinite value (or values too "
                              "large for float32)")
        vals, cols = _block_topk(sims[:Q], topk)
        cand_v.append(vals)
        cand_i.append(cols + start)
        if len(cand_v) > merge_every:
            merged_v, merged_i = _ordered(torch.cat(cand_v, 1), torch.cat(cand_i, 1), topk)
            cand_v, cand_i = [merged_v], [merged_i]
        bar.update(block.shape[0])
    bar.close()
    best_v, best_i = _ordered(torch.cat(cand_v, 1), torch.cat(cand_i, 1), topk)
    if torch.isnan(best_v).any():  # finite inputs can still overflow to inf - inf
        raise SearchError(f"{db.path}: inner products overflowed float32 (descriptor values too large)")
    return best_v.cpu().numpy(), best_i.cpu().numpy()


def brute_force_search(queries: np.ndarray, database: np.ndarray, topk: int) -> Tuple[np.ndarray, np.ndarray]:
    """The definition the blocked search must equal: one full matmul, then the (value desc, id asc) sort.
    Holds the whole ``[Q, N]`` similarity matrix: for tests and benchmark baselines only."""
    q = torch.from_numpy(np.ascontiguousarray(queries, np.float32))
    sims = q @ torch.from_numpy(np.ascontiguousarray(database, np.float32)).T
    ids = torch.arange(sims.shape[1]).expand_as(sims)
    v, i = _ordered(sims, ids, topk)
    return v.numpy(), i.numpy()


# ------------------------------------------------------------------------------------------------
# FAISS approximate indexes
# ------------------------------------------------------------------------------------------------

def import_faiss(what: str):
    """``faiss``, or a :class:`SearchError` naming the extra that installs it."""
    try:
        import faiss
    except ImportError:
        raise SearchError(f"{what} needs FAISS, which is not installed: pip install .[search]  "
                          "(or pip install faiss-cpu)") from None
    return faiss


def _file_fingerprint(path: str) -> dict:
    """Size plus hashes of the first and last MiB and 16 evenly spaced 4 KiB pieces: cheap on a 3 GB file
    and changes with any rewrite of it in practice (not with a rename or copy)."""
    size = os.path.getsize(path)
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for off, n in [(0, 1 << 20), (max(0, size - (1 << 20)), 1 << 20)] + \
                [(size * i // 17, 4096) for i in range(1, 17)]:
            f.seek(off)
            h.update(f.read(n))
    return {"file": os.path.basename(path), "bytes": size, "sha1": h.hexdigest()}


def _data_fingerprint(db: GlobalDescriptors) -> dict:
    parts = db.parts if isinstance(db, ConcatGlobal) else [db]
    return {"num_images": len(db), "dim": db.dim, "parts": [_file_fingerprint(p.path) for p in parts]}


def index_path_for(out: str, kind: str) -> str:
    """Where the ``kind`` index of output ``out`` lives: ``nn_x.pkl`` -> ``nn_x.ivf.faiss``."""
    return os.path.splitext(os.fspath(out))[0] + f".{kind}.faiss"


def _build_params(settings: SearchSettings, n: int) -> dict:
    if settings.index == "ivf":
        nlist = settings.nlist or max(1, int(round(np.sqrt(n))))
        if nlist > n:
            raise SearchError(f"nlist={nlist} is larger than the database ({n} images)")
        return {"kind": "ivf", "nlist": nlist}
    return {"kind": "hnsw", "M": settings.hnsw_m, "ef_construction": settings.ef_construction}


def _build_index(faiss, db: GlobalDescriptors, params: dict, settings: SearchSettings):
    from tqdm import tqdm

    d = db.dim
    if params["kind"] == "ivf":
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        # k-means on a sample (50 points per list; FAISS wants at least 39), drawn in id order
        n_train = min(len(db), 50 * params["nlist"])
        sample = np.sort(np.random.default_rng(0).choice(len(db), n_train, replace=False))
        index.train(db.read(sample))
    else:
        index = faiss.IndexHNSWFlat(d, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
    bar = tqdm(total=len(db), unit="img", unit_scale=True, desc=f"build {params['kind']}",
               disable=not settings.progress, file=sys.stderr)
    for _, block in db.iter_blocks(_block_rows(d, settings)):
        index.add(block)
        bar.update(block.shape[0])
    bar.close()
    return index


def _load_or_build_index(faiss, db: GlobalDescriptors, settings: SearchSettings, index_file: Optional[str],
                         log: Callable[[str], None]):
    """The index at ``index_file`` when it was built for this data with these parameters, else a new one
    (saved there unless ``index_file`` is None). A mismatched index is refused unless ``overwrite``.
    Returns (index, reused)."""
    params = _build_params(settings, len(db))
    if index_file is None:
        return _build_index(faiss, db, params, settings), False
    meta_file = index_file + ".json"
    want = {"data": _data_fingerprint(db), "params": params}
    if os.path.exists(index_file):
        have = None
        if os.path.exists(meta_file):
            with open(meta_file) as f:
                have = json.load(f)
        if have == want:
            index = faiss.read_index(index_file)
            if index.ntotal == len(db) and index.d == db.dim:
                log(f"reusing {settings.index} index {index_file}")
                return index, True
        if not settings.overwrite:
            why = ("it has no fingerprint file " + meta_file) if have is None else (
                "its parameters differ" if have.get("data") == want["data"] else "its database differs")
            raise SearchError(f"{index_file} was built for other data ({why}); delete it or pass --overwrite "
                              "to rebuild it")
        log(f"rebuilding {index_file} (built for other data)")
    index = _build_index(faiss, db, want["params"], settings)
    _atomic_write(index_file, lambda tmp: faiss.write_index(index, tmp), overwrite=True)
    _atomic_write(meta_file, lambda tmp: open(tmp, "w").write(json.dumps(want, indent=1)), overwrite=True)
    return index, False


def _faiss_search(faiss, index, queries: np.ndarray, settings: SearchSettings) -> Tuple[np.ndarray, np.ndarray]:
    k = settings.topk
    if settings.index == "ivf":
        index.nprobe = min(settings.nprobe, index.nlist)
    else:
        index.hnsw.efSearch = max(settings.ef_search or 2 * k, k)
    if settings.index == "ivf" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 \
            and _device(settings.device).type == "cuda":
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)  # HNSW has no GPU version
    sims, ids = index.search(queries, k)
    missing = (ids < 0).any(axis=1)
    if missing.any():
        raise SearchError(f"the {settings.index} index returned fewer than topk={k} results for query "
                          f"{int(np.argmax(missing))}: raise --nprobe (ivf) or ef_search (hnsw)")
    v, i = _ordered(torch.from_numpy(sims), torch.from_numpy(ids.astype(np.int64)), k)
    return v.numpy(), i.numpy()


def recall_at(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / M (recall@M of an approximate list against the exact one)."""
    hits = [np.intersect1d(a, e).size for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits)) / exact_ids.shape[1]


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------

def _atomic_write(path: str, write: Callable[[str], object], overwrite: bool) -> None:
    """``write(tmp)`` to a temp file beside ``path``, then rename it over ``path``; nothing on failure."""
    if os.path.exists(path) and not overwrite:
        raise SearchError(f"{path} exists; pass --overwrite to replace it (or choose another --out)")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def nn_tensor(sims: np.ndarray, ids: np.ndarray) -> torch.Tensor:
    """The AMES ``[2, Q, M]`` tensor: float32, or float64 when an id is too large for float32 to hold."""
    dtype = torch.float32 if ids.size == 0 or int(ids.max()) < _FLOAT32_EXACT_IDS else torch.float64
    return torch.stack([torch.as_tensor(np.asarray(sims), dtype=dtype), torch.as_tensor(np.asarray(ids), dtype=dtype)])


def write_nn(path: str, nn: torch.Tensor, overwrite: bool = False) -> None:
    """Pickle ``nn [2, Q, M]`` to ``path`` (temp file + rename; refused when it exists unless ``overwrite``)."""
    def dump(tmp: str) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(nn, f)

    _atomic_write(os.fspath(path), dump, overwrite)


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------

def run_search(queries: Union[np.ndarray, GlobalDescriptors], db: GlobalDescriptors,
               settings: SearchSettings = SearchSettings(), out: Optional[str] = None,
               log: Callable[[str], None] = print) -> SearchResult:
    """Search ``queries`` over ``db``; write ``out`` when given. ``result.nn`` is the ``[2, Q, M]`` tensor."""
    source = getattr(queries, "path", "queries")
    if not isinstance(queries, np.ndarray):
        queries = queries.read(np.arange(len(queries)))
    queries = _check_queries(queries, db, settings.topk, source)
    if out is not None:
        out = os.fspath(out)
        if os.path.exists(out) and not settings.overwrite:  # refuse before any work, not after
            raise SearchError(f"{out} exists; pass --overwrite to replace it (or choose another --out)")
    Q = queries.shape[0]
    result_kw: dict = {}
    if settings.index == "flat":
        t0 = time.perf_counter()
        sims, ids = exact_search(queries, db, settings)
        search_s = time.perf_counter() - t0
    else:
        faiss = import_faiss(f"--index {settings.index}")
        index_file = index_path_for(out, settings.index) if out is not None else None  # no out: not kept
        t0 = time.perf_counter()
        index, reused = _load_or_build_index(faiss, db, settings, index_file, log)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sims, ids = _faiss_search(faiss, index, queries, settings)
        search_s = time.perf_counter() - t0
        result_kw = dict(build_s=build_s, index_path=index_file, index_reused=reused)
        if settings.check_recall:
            _, exact_ids = exact_search(queries, db, settings)
            result_kw["recall"] = recall_at(ids, exact_ids)
    result = SearchResult(nn=nn_tensor(sims, ids), search_s=search_s, queries_per_s=Q / max(search_s, 1e-9),
                          out=out, **result_kw)
    what = f"{settings.index} search: {Q} queries x {len(db)} images (dim {db.dim}), top {settings.topk}: " \
           f"{search_s:.2f} s, {result.queries_per_s:.1f} queries/s"
    if result.build_s is not None:
        what += f"; index {'loaded' if result.index_reused else 'built'} in {result.build_s:.2f} s"
    log(what)
    if result.recall is not None:
        log(f"recall@{settings.topk} against exact search: {result.recall:.4f}")
    if out is not None:
        write_nn(out, result.nn, overwrite=settings.overwrite)
        log(f"wrote {out} [2, {Q}, {settings.topk}]")
    return result


def _peek_torch(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in (b"PK\x03\x04", b"\x80\x02\x8a\x0a")


def _hdf5_rows(path: str) -> Optional[int]:
    """Rows of the ``features`` dataset of a local-descriptor file (its shape only), None if unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return int(f["features"].shape[0])
    except Exception:  # the search needs only globals: a broken local file is the re-ranker's problem
        return None


def _one_or_split(folder: str, stem: str) -> List[str]:
    """``folder/{stem}.pt``, else its ``split`` shards ``{stem}_xaa.pt``, ... in id order ([] if neither)."""
    single = os.path.join(folder, stem + ".pt")
    return [single] if os.path.isfile(single) else split_shards(folder, stem, ".pt")


def open_search_files(data_dir: str, desc: str, distractors: Optional[str] = None,
                      dim: Optional[int] = None) -> Tuple[GlobalFeatures, GlobalDescriptors]:
    """Query and database globals of a dataset folder (AMES layout): the gallery (one file or its
    ``split`` shards), followed by the distractors ``DIR1M/{desc}_global.pt`` (or shards) when given. Raw files carry no shape: their dim comes from
    ``dim``, a torch-saved file among them, or the row count of ``{desc}_query_local.hdf5``."""
    qpath = os.path.join(data_dir, f"{desc}_query_global.pt")
    missing = [] if os.path.isfile(qpath) else [qpath]
    paths = [qpath]
    for folder, stem in [(data_dir, f"{desc}_gallery_global")] + ([(distractors, f"{desc}_global")]
                                                                   if distractors else []):
        try:
            found = _one_or_split(folder, stem)
        except DataError as e:
            raise SearchError(str(e)) from None
        paths += found
        if not found:
            missing.append(os.path.join(folder, stem + ".pt") + f" (or its shards {stem}_xaa.pt, ...)")
    if missing:
        raise SearchError("missing global descriptor file(s): " + ", ".join(missing))
    try:
        if dim is None:
            for p in paths:
                if _peek_torch(p):
                    dim = GlobalFeatures(p).dim
                    break
        num_queries = _hdf5_rows(os.path.join(data_dir, f"{desc}_query_local.hdf5"))
        if dim is None and num_queries is None:
            raise SearchError(f"{qpath}: raw float32 files carry no shape; pass --dim D (or keep "
                              f"{desc}_query_local.hdf5 beside it to count the queries)")
        query = GlobalFeatures(qpath, dim=dim, num_images=num_queries)
        parts = [GlobalFeatures(p, dim=query.dim) if not _peek_torch(p) else GlobalFeatures(p) for p in paths[1:]]
        for p in parts:
            if p.dim != query.dim:
                raise SearchError(f"{p.path}: descriptors have dim {p.dim} but the queries ({qpath}) have "
                                  f"dim {query.dim}")
        db: GlobalDescriptors = parts[0] if len(parts) == 1 else ConcatGlobal(parts)
    except SearchError:
        raise
    except DataError as e:
        raise SearchError(str(e)) from None
    return query, db


def search_folder(data_dir: str, desc: str, settings: SearchSettings = SearchSettings(),
                  out: Optional[str] = None, distractors: Optional[str] = None, dim: Optional[int] = None,
                  log: Callable[[str], None] = print) -> SearchResult:
    """``locore search``: globals of ``data_dir`` (+ distractors) -> ``out`` (default ``DIR/nn_{desc}.pkl``)."""
    out = out if out is not None else os.path.join(data_dir, f"nn_{desc}.pkl")
    if os.path.exists(out) and not settings.overwrite:
        raise SearchError(f"{out} exists; pass --overwrite to replace it (or choose another --out)")
    query, db = open_search_files(data_dir, desc, distractors, dim)
    return run_search(query, db, settings, out=out, log=log)


# ------------------------------------------------------------------------------------------------
# Command line: `locore search` (the parser lives here so that the CLI module only mounts it)
# ------------------------------------------------------------------------------------------------

def add_search_args(p) -> None:
    """The flags of ``locore search`` on the argparse parser ``p``."""
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder (AMES layout)")
    p.add_argument("--desc", required=True, metavar="NAME",
                   help="descriptor name: reads DIR/NAME_query_global.pt and DIR/NAME_gallery_global.pt")
    p.add_argument("--topk", type=int, default=1600, metavar="M", help="neighbours kept per query (default 1600)")
    p.add_argument("--out", metavar="FILE", help="output [2, Q, M] pickle (default DIR/nn_NAME.pkl)")
    p.add_argument("--distractors", metavar="DIR1M",
                   help="append DIR1M/NAME_global.pt after the gallery (ids n .. n+len-1)")
    p.add_argument("--index", choices=INDEX_KINDS, default="flat",
                   help="flat: exact (default); ivf / hnsw: FAISS approximate, index saved beside --out")
    p.add_argument("--dim", type=int, metavar="D",
                   help="descriptor dim, needed only when every file is raw float32 and there is no "
                        "NAME_query_local.hdf5 to count the queries")
    p.add_argument("--nlist", type=int, help="ivf: inverted lists (default sqrt(N))")
    p.add_argument("--nprobe", type=int, default=64, help="ivf: lists visited per query (default 64)")
    p.add_argument("--hnsw-m", type=int, default=32, help="hnsw: graph degree (default 32)")
    p.add_argument("--ef-search", type=int, help="hnsw: search beam (default 2 * topk)")
    p.add_argument("--no-recall", action="store_true", help="ivf / hnsw: skip the exact search behind recall@M")
    p.add_argument("--block-mb", type=int, default=128, help="database block read at a time, MiB (default 128)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the flat search's matmuls run (default auto: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and a mismatched index)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_search(args) -> int:
    """Run ``locore search`` from parsed arguments; errors are :class:`SearchError` (one line)."""
    settings = SearchSettings(topk=args.topk, index=args.index, block_mb=args.block_mb, device=args.device,
                              nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m, ef_search=args.ef_search,
                              check_recall=not args.no_recall, overwrite=args.overwrite,
                              progress=not args.no_progress)
    search_folder(args.data, args.desc, settings, out=args.out, distractors=args.distractors, dim=args.dim)
    return 0


__all__ = ["SearchError", "SearchSettings", "SearchResult", "run_search", "search_folder", "open_search_files",
           "exact_search", "brute_force_search", "recall_at", "write_nn", "nn_tensor", "index_path_for",
           "import_faiss", "INDEX_KINDS", "add_search_args", "cmd_search"]
