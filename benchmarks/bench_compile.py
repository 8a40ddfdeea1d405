#!/usr/bin/env python
"""``torch.compile(model.score, fullgraph=True)`` against the eager model on CPU (fp32, C++ attention).

Workload (bench_model's): one query and a shortlist of K gallery images, 48 local + 1 global 768-d
descriptors per image (T = 50 tokens with [SEP]), ``max-end`` scores (the pruned last layer runs the
rows op). Cases: tiny and small at K = 100 (N = 5050 tokens), tiny at K = 10 (N = 550, where per-op
overheads weigh more). Eager and compiled calls are interleaved run by run, so load changes hit both.

The compiled function is traced on its first call (Dynamo + inductor's C++ code generation): that
call is reported as ``compile_s`` and excluded from the timings. Inductor keeps compiled kernels in an
on-disk cache; unless ``--warm-cache``, it points at a fresh temporary folder, so ``compile_s`` is
the cold figure a new process pays. ``max_abs_diff``: largest |compiled - eager| of the scores.

    python benchmarks/bench_compile.py [--cases tiny:100 small:100 tiny:10] [--runs 5]

Prints a table and writes benchmarks/results/cpu-<slug>-compile.json (device, versions, commit, raw
timings). No target: the honest figure.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as bm  # noqa: E402
from locore.model import LoCoRe  # noqa: E402

LOCAL_PER_IMAGE, DESC_DIM, MODE = 48, 768, "max-end"


def inputs(gallery: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    B, K, S, D = 1, gallery, LOCAL_PER_IMAGE, DESC_DIM
    return (torch.randn(B, S, D, generator=g), torch.randint(0, 3, (B, S), generator=g),
            torch.zeros(B, S, dtype=torch.bool),
            torch.randn(B, K, S, D, generator=g), torch.randint(0, 3, (B, K, S), generator=g),
            torch.zeros(B, K, S, dtype=torch.bool),
            torch.randn(B, D, generator=g), torch.randn(B, K, D, generator=g))


def measure(name: str, gallery: int, runs: int) -> list[dict]:
    torch._dynamo.reset()
    model = LoCoRe.preset(name, device="cpu", dtype="float32", seed=0)
    x = inputs(gallery)
    eager = lambda: model.score(*x, mode=MODE)  # noqa: E731
    compiled_fn = torch.compile(model.score, fullgraph=True)
    compiled = lambda: compiled_fn(*x, mode=MODE)  # noqa: E731
    expected = eager()                    # also the eager warm-up
    t0 = time.perf_counter()
    got = compiled()
    compile_s = time.perf_counter() - t0
    max_abs_diff = float((got - expected).abs().max())
    compiled()                            # compiled warm-up
    times = {"eager": [], "compiled": []}
    for _ in range(runs):
        for impl, fn in (("eager", eager), ("compiled", compiled)):
            t0 = time.perf_counter()
            fn()
            times[impl].append((time.perf_counter() - t0) * 1e3)
    tokens = (1 + gallery) * (LOCAL_PER_IMAGE + 2)
    rows = []
    for impl, ts in times.items():
        t = bm.summarize(ts)
        rows.append({"bench": "compile", "impl": impl, "model": name, "dtype": "float32", "batch": 1,
                     "gallery": gallery, "tokens": tokens, "mode": MODE, "median_ms": t.median_ms,
                     "p10_ms": t.p10_ms, "p90_ms": t.p90_ms, "runs_ms": ts,
                     "compile_s": compile_s if impl == "compiled" else None,
                     "max_abs_diff": max_abs_diff if impl == "compiled" else None})
    rows[1]["vs_eager"] = rows[0]["median_ms"] / rows[1]["median_ms"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["tiny:100", "small:100", "tiny:10"],
                   help="model:gallery pairs (model = a LoCoRe preset, gallery = K)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warm-cache", action="store_true", help="use inductor's usual on-disk cache")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    cache = None
    if not args.warm_cache:
        cache = tempfile.TemporaryDirectory(prefix="locore-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    device = torch.device("cpu")
    load_before = os.getloadavg()[0]   # the machine may be shared: the 1-minute load average, before and after
    rows = []
    for case in args.cases:
        name, gallery = case.split(":")
        rows += measure(name, int(gallery), args.runs)
        print(f"{case}: done", flush=True)
    print(f"1-minute load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
          f"({os.cpu_count()} CPUs)")
    print(bm.format_table(rows, ["model", "tokens", "impl", "median_ms", "p10_ms", "p90_ms", "vs_eager",
                                 "compile_s", "max_abs_diff"],
                          ["model", "N", "impl", "median ms", "p10 ms", "p90 ms", "speed-up", "compile s",
                           "max |diff|"]))
    if not args.no_write:
        env = bm.environment(device)
        env["inductor_cache"] = "warm (default folder)" if args.warm_cache else "cold (fresh folder)"
        env["load_avg_1m"] = {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()}
        path = bm.results_path(device).with_name(bm.results_path(device).stem + "-compile.json")
        bm.write_results(path, env, rows)
        print(f"wrote {path}")
    if cache is not None:
        cache.cleanup()


if __name__ == "__main__":
    main()
