"""Reading shortlists from local-descriptor files: every layout, and a large virtual gallery.

For each layout (flat float32, flat float16, AMES's structured layout, a virtual dataset over structured
shards, a list of shard files) times ``LocalFeatures.read`` of one query's shortlist (random ids, the
leading S slots), validation included, and the peak RSS of one read. ``validate`` rows time the
read-time checks alone on the same rows. A ``virtual-large`` row reads from a virtual gallery of
``--large`` images (one source file mapped many times, so it costs nothing on disk) to show that the
cost of a read does not grow with the database.

    python benchmarks/bench_data.py                # CPU; writes benchmarks/results/cpu-<slug>-data.json
    python benchmarks/bench_data.py --no-write --images 200 --runs 5
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import PeakMemory, environment, format_table, results_path, summarize, time_runs, write_results  # noqa: E402

from locore.data import DESCRIPTOR_BOUND, LocalFeatures, validate_rows, write_local, write_virtual_local  # noqa: E402


def make_files(folder: str, n: int, slots: int, dim: int, large: int) -> dict:
    rng = np.random.default_rng(0)
    desc = rng.standard_normal((n, slots, dim)).astype(np.float32)
    scales = rng.integers(0, 3, (n, slots))
    mask = rng.random((n, slots)) < 0.2
    j = lambda name: os.path.join(folder, name)  # noqa: E731
    write_local(j("flat32.hdf5"), desc, scales, mask)
    write_local(j("flat16.hdf5"), desc, scales, mask, dtype=np.float16)
    write_local(j("structured.hdf5"), desc, scales, mask, layout="structured")
    cuts = np.linspace(0, n, 5).astype(int)
    shards = []
    for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        shards.append(j(f"shard_xa{'abcd'[k]}.hdf5"))
        write_local(shards[-1], desc[a:b], scales[a:b], mask[a:b], layout="structured")
    write_virtual_local(j("virtual.hdf5"), shards)
    write_virtual_local(j("virtual_large.hdf5"), [j("structured.hdf5")] * max(1, large // n))
    return {"flat32": j("flat32.hdf5"), "flat16": j("flat16.hdf5"), "structured": j("structured.hdf5"),
            "virtual": j("virtual.hdf5"), "shard-list": shards, "virtual-large": j("virtual_large.hdf5")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1000, help="gallery images per file")
    ap.add_argument("--slots", type=int, default=50, help="slots stored per image")
    ap.add_argument("--dim", type=int, default=768, help="descriptor dim D")
    ap.add_argument("--descriptors", type=int, default=48, help="slots read per image (S)")
    ap.add_argument("--shortlist", type=int, default=100, help="images read per call")
    ap.add_argument("--large", type=int, default=200_000, help="images of the large virtual gallery")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        files = make_files(tmp, args.images, args.slots, args.dim, args.large)
        print(f"wrote the files in {time.perf_counter() - t0:.1f} s")
        for name, path in files.items():
            with LocalFeatures(path, args.descriptors) as lf:
                rng = np.random.default_rng(1)
                id_sets = [rng.choice(len(lf), args.shortlist, replace=False) for _ in range(args.runs)]
                lf.read(id_sets[0])  # warm-up
                peak = PeakMemory(device)
                peak.start()
                peak_mb = peak.measure(lambda: lf.read(id_sets[-1]))
                t = summarize(time_runs(lambda i: lf.read(id_sets[i]), args.runs, device))
                rows.append({"bench": "data", "impl": name, "model": None, "dtype": None, "batch": args.shortlist,
                             "gallery": len(lf), "tokens": args.descriptors, "median_ms": t.median_ms,
                             "p10_ms": t.p10_ms, "p90_ms": t.p90_ms, "peak_mb": peak_mb, "runs": t.runs,
                             "slots": args.slots, "dim": args.dim})
                if name == "flat32":  # the checks alone, on rows already in memory
                    b = [lf._files[0].rows(np.sort(ids), args.descriptors) for ids in id_sets]
                    t = summarize(time_runs(lambda i: validate_rows("x", id_sets[i], b[i][0], b[i][1], 3,
                                                                    DESCRIPTOR_BOUND), args.runs, device))
                    rows.append({"bench": "data", "impl": "validate", "model": None, "dtype": None,
                                 "batch": args.shortlist, "gallery": len(lf), "tokens": args.descriptors,
                                 "median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms,
                                 "peak_mb": None, "runs": t.runs, "slots": args.slots, "dim": args.dim})
    print(format_table(rows, ["impl", "gallery", "batch", "tokens", "median_ms", "p10_ms", "p90_ms", "peak_mb"],
                       ["layout", "images", "shortlist", "S", "median ms", "p10 ms", "p90 ms", "peak MB"]))
    if not args.no_write:
        path = results_path(device, args.out_dir)
        path = path.with_name(f"{path.stem}-data.json")  # its own file: rows unlike the model benchmarks'
        write_results(path, environment(device), rows)
        print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
