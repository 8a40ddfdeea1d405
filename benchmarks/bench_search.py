"""First-stage search (``locore.search``): time and peak RSS of the exact flat search against plain loops,
and build time / query time / recall@M of the FAISS approximate indexes.

Per database size (generated once to a raw float32 file under ``--workdir``; clustered, L2-normalised rows,
so the approximate indexes face neighbourhoods like real descriptors', and the queries are noisy copies
of database rows):

* ``locore-flat``    :func:`locore.search.exact_search`: the file streamed through one reused block buffer
* ``torch-blocked``  the plain loop the issue names: ``np.memmap`` of the same file, ``q @ block.T`` and
                     ``torch.topk`` over the running list and the block, block by block
* ``naive-full``     the whole file read into memory, one ``[Q, N]`` matmul, one ``torch.topk``
* ``faiss-flat``     ``faiss.IndexFlatIP``: the file read into the index, then ``search`` (the published code)
* ``ivf`` / ``hnsw`` :func:`locore.search.run_search` with ``index=ivf|hnsw``: build (or load) + search;
                     recall@M against the exact lists

Time: median of ``--runs`` calls (after one untimed warm-up call that also brings the file into the page
cache, so every row reads it from memory). Peak RSS: the kernel's high-water mark (VmHWM) reset before the
call, minus the RSS before it (harness.PeakMemory). Exactness: every exact row's ids are compared with
``locore-flat``'s (``same_ids``; ties aside, FAISS's order of exactly tied values differs).

    python benchmarks/bench_search.py                       # 70 queries; 100k x 128, 1M x 128, 1M x 768
    python benchmarks/bench_search.py --sizes 100000x128 --runs 1 --no-write     # smoke run
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import harness  # noqa: E402
from locore.data.global_desc import GlobalFeatures  # noqa: E402
from locore.search import SearchSettings, _ordered, exact_search, recall_at, run_search  # noqa: E402


def make_database(path: Path, n: int, d: int, clusters: int = 1000, seed: int = 0, chunk: int = 65536) -> None:
    """Clustered, L2-normalised rows written chunk by chunk (memory: one chunk)."""
    if path.exists() and path.stat().st_size == n * d * 4:
        return
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            x = centres[rng.integers(0, clusters, m)] + 0.8 * rng.standard_normal((m, d), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            x.tofile(f)
    os.replace(tmp, path)


def make_queries(db: GlobalFeatures, q: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = db.read(np.sort(rng.choice(len(db), q, replace=False)))
    x = x + 0.3 * rng.standard_normal(x.shape, dtype=np.float32) / np.sqrt(db.dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# the comparators
# ------------------------------------------------------------------------------------------------

def torch_blocked(queries: np.ndarray, path: str, n: int, d: int, k: int, block_rows: int):
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=(n, d))
    q = torch.from_numpy(queries)
    best_v = torch.empty((len(queries), 0))
    best_i = torch.empty((len(queries), 0), dtype=torch.int64)
    for s in range(0, n, block_rows):
        sims = q @ torch.from_numpy(np.array(mm[s:s + block_rows])).T  # a copy, as locore-flat reads one
        v = torch.cat([best_v, sims], 1)
        i = torch.cat([best_i, torch.arange(s, s + sims.shape[1]).expand(len(queries), -1)], 1)
        best_v, top = torch.topk(v, min(k, v.shape[1]), dim=1)
        best_i = i.gather(1, top)
    return best_v.numpy(), best_i.numpy()


def naive_full(queries: np.ndarray, path: str, n: int, d: int, k: int):
    db = torch.from_numpy(np.fromfile(path, dtype=np.float32).reshape(n, d))
    v, i = torch.topk(torch.from_numpy(queries) @ db.T, k, dim=1)
    return v.numpy(), i.numpy()


def faiss_flat(queries: np.ndarray, path: str, n: int, d: int, k: int):
    import faiss

    index = faiss.IndexFlatIP(d)
    index.add(np.fromfile(path, dtype=np.float32).reshape(n, d))
    return index.search(queries, k)


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------

def measure(fn: Callable[[], Tuple[np.ndarray, np.ndarray]], runs: int) -> Tuple[dict, np.ndarray]:
    device = torch.device("cpu")
    peak = harness.PeakMemory(device)
    peak.start()
    out = fn()  # warm-up: page cache, thread pools, allocator
    times = []
    for _ in range(runs):
        harness.release_memory(device)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    harness.release_memory(device)
    peak.start()
    peak_mb = peak.measure(fn)
    return {"median_s": statistics.median(times), "times_s": times, "peak_mb": peak_mb,
            "peak_method": peak.method}, (np.asarray(out[0]), np.asarray(out[1]))


def parse_sizes(text: str) -> List[Tuple[int, int]]:
    out = []
    for item in text.split(","):
        n, d = item.lower().split("x")
        out.append((int(float(n)), int(d)))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000x128,1000000x128,1000000x768", help="NxD,... database sizes")
    p.add_argument("--queries", type=int, default=70)
    p.add_argument("--topk", type=int, default=1600)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--impls", default="locore-flat,torch-blocked,naive-full,faiss-flat")
    p.add_argument("--approx-sizes", default="1000000x128:ivf,100000x128:hnsw,100000x128:ivf",
                   help="NxD:kind,... for the approximate indexes (none to skip)")
    p.add_argument("--nprobe", type=int, default=64)
    p.add_argument("--block-mb", type=int, default=128)
    p.add_argument("--workdir", default="/tmp/locore-bench-search")
    p.add_argument("--keep-files", action="store_true", help="keep the generated databases")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    device = torch.device("cpu")
    env = harness.environment(device)
    try:
        import faiss
        env["faiss"] = faiss.__version__
    except ImportError:
        env["faiss"] = None
    env["numpy"] = np.__version__
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"device: {env['device']}; torch {env['torch']}, faiss {env['faiss']}; commit {env['commit']}"
          f"{' (dirty)' if env['dirty'] else ''}")
    rows: List[dict] = []
    k = args.topk
    block_rows_of = lambda d: (args.block_mb << 20) // (4 * d)  # noqa: E731
    made: List[Path] = []

    def database(n: int, d: int) -> Tuple[Path, GlobalFeatures]:
        path = work / f"db_{n}x{d}.f32"
        t0 = time.perf_counter()
        make_database(path, n, d)
        if path not in made:
            made.append(path)
            print(f"\n== database {n} x {d} ({path.stat().st_size / 2**30:.2f} GiB), ready in "
                  f"{time.perf_counter() - t0:.1f} s")
        return path, GlobalFeatures(path, dim=d)

    for n, d in parse_sizes(args.sizes):
        path, db = database(n, d)
        queries = make_queries(db, args.queries)
        settings = SearchSettings(topk=k, block_mb=args.block_mb, device="cpu", progress=False)
        impls: Dict[str, Callable] = {
            "locore-flat": lambda: exact_search(queries, db, settings),
            "torch-blocked": lambda: torch_blocked(queries, str(path), n, d, k, block_rows_of(d)),
            "naive-full": lambda: naive_full(queries, str(path), n, d, k),
            "faiss-flat": lambda: faiss_flat(queries, str(path), n, d, k),
        }
        ref_ids = None
        for name in args.impls.split(","):
            if name == "faiss-flat" and env["faiss"] is None:
                continue
            stats, (sims, ids) = measure(impls[name], args.runs)
            gc.collect()
            if name == "locore-flat":
                ref_ids = ids
            # other orders of exactly tied similarities aside: re-sort by (similarity desc, id asc) first
            same = overlap = None
            if ref_ids is not None:
                _, resorted = _ordered(torch.from_numpy(sims.astype(np.float32)), torch.from_numpy(ids.astype(np.int64)), k)
                same, overlap = bool(np.array_equal(resorted.numpy(), ref_ids)), recall_at(ids, ref_ids)
            row = {"bench": "search", "impl": name, "index": "flat", "queries": args.queries, "db": n, "dim": d,
                   "topk": k, "file_gb": n * d * 4 / 1e9, **stats, "queries_per_s": args.queries / stats["median_s"],
                   "same_ids": same, "overlap": overlap, "commit": env["commit"]}
            rows.append(row)
            print(f"{name:14s} {n:>8d} x {d:<4d} median {stats['median_s']:.2f} s  peak RSS "
                  f"{stats['peak_mb']:.0f} MB  same ids as locore-flat: {same} (overlap {overlap})")

    if args.approx_sizes != "none" and env["faiss"] is not None:
        for item in args.approx_sizes.split(","):
            size, kind = item.split(":")
            (n, d), = parse_sizes(size)
            path, db = database(n, d)
            queries = make_queries(db, args.queries)
            out = work / f"nn_{n}x{d}_{kind}.pkl"
            for f in (out, Path(str(out.with_suffix("")) + f".{kind}.faiss"),
                      Path(str(out.with_suffix("")) + f".{kind}.faiss.json")):
                if f.exists():
                    f.unlink()
            settings = SearchSettings(topk=k, index=kind, nprobe=args.nprobe, device="cpu", progress=False,
                                      check_recall=False, overwrite=True)
            built = run_search(queries, db, settings, out=str(out), log=lambda s: None)
            searches = [run_search(queries, db, settings, out=str(out), log=lambda s: None)
                        for _ in range(args.runs)]
            _, exact_ids = exact_search(queries, db, SearchSettings(topk=k, progress=False))
            recall = recall_at(searches[-1].ids, exact_ids)
            row = {"bench": "search", "impl": f"faiss-{kind}", "index": kind, "queries": args.queries, "db": n,
                   "dim": d, "topk": k, "file_gb": n * d * 4 / 1e9, "build_s": built.build_s,
                   "load_s": statistics.median(r.build_s for r in searches),
                   "median_s": statistics.median(r.search_s for r in searches),
                   "times_s": [r.search_s for r in searches], "queries_per_s": None, "recall": recall,
                   "nprobe": args.nprobe if kind == "ivf" else None, "nlist": round(np.sqrt(n)) if kind == "ivf" else None,
                   "hnsw_m": settings.hnsw_m if kind == "hnsw" else None,
                   "ef_search": max(settings.ef_search or 2 * k, k) if kind == "hnsw" else None,
                   "commit": env["commit"]}
            row["queries_per_s"] = args.queries / row["median_s"]
            rows.append(row)
            print(f"{row['impl']:14s} {n:>8d} x {d:<4d} build {row['build_s']:.1f} s, load {row['load_s']:.2f} s, "
                  f"search {row['median_s']:.3f} s, recall@{k} {recall:.4f}")
            for f in out.parent.glob(out.stem + "*"):
                f.unlink()

    flat = [r for r in rows if r["index"] == "flat"]
    for r in flat:
        base = next((b for b in flat if b["impl"] == "torch-blocked" and (b["db"], b["dim"]) == (r["db"], r["dim"])),
                    None)
        r["time_vs_torch_blocked"] = None if base is None else r["median_s"] / base["median_s"]
    print("\nexact flat search, {} queries, top {}:".format(args.queries, k))
    print(harness.format_table(flat, ["impl", "db", "dim", "file_gb", "median_s", "queries_per_s", "peak_mb",
                                      "time_vs_torch_blocked", "same_ids", "overlap"],
                               ["impl", "images", "dim", "file GB", "median s", "queries/s", "peak RSS MB",
                                "time / torch-blocked", "same ids", "overlap"]))
    approx = [r for r in rows if r["index"] != "flat"]
    if approx:
        print("\napproximate indexes (FAISS):")
        print(harness.format_table(approx, ["impl", "db", "dim", "build_s", "load_s", "median_s", "queries_per_s",
                                            "recall"],
                                   ["index", "images", "dim", "build s", "load s", "search s", "queries/s",
                                    f"recall@{k}"]))
    if not args.keep_files:
        for path in made:
            path.unlink()
    if not args.no_write:
        out = harness.RESULTS_DIR / f"cpu-{env['device_slug']}-search.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(out.read_text()).get("rows", []) if out.exists() else []
        key = lambda r: (r["impl"], r["db"], r["dim"], r["topk"], r["queries"])  # noqa: E731
        fresh = {key(r) for r in rows}  # a rerun replaces the rows it measures again, keeps the others
        tmp = out.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump({**env, "rows": [r for r in old if key(r) not in fresh] + rows}, f, indent=1)
            f.write("\n")
        os.replace(tmp, out)
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
