#!/usr/bin/env python
"""Call overhead of the ``locore::attention`` custom op (torch.library) against calling its backend directly.

Three ways to run the same C++ attention on CPU (fp32; a tiny call N = 16, H = 1, D = 16 where the
overhead shows, then LoCoRE's layout: H = 12, D = 64, w = 256, globals at every [SEP] and the query
block's first 49 tokens, no padding):
  * ``backend``  - ``backends.REGISTRY["cpu"].attention`` (what an eager inference call runs);
  * ``public``   - ``attention_with_layout`` (validation + dispatch, then the backend directly);
  * ``op``       - ``torch.ops.locore.attention`` (the dispatcher; what torch.compile and autograd see).
The first call of the op imports torch._dynamo (seconds, once per process); it is reported separately
and excluded from the timed runs.

    python benchmarks/bench_custom_op.py [--images 4 101] [--runs 20]

Prints a table and writes benchmarks/results/cpu-<slug>-custom-op.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as bm  # noqa: E402
import locore_kernels  # noqa: E402
from locore_kernels.backends import REGISTRY  # noqa: E402
from locore_kernels.custom_ops import layout_tensors  # noqa: E402

T, H, D, W = 50, 12, 64, 256


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, nargs="+", default=[4, 101])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    device = torch.device("cpu")
    rows = []
    first_op_s = None
    # (tokens, heads, head dim, window, runs): a tiny call first, where the kernel costs microseconds and
    # the per-call overhead shows; then LoCoRE-sized calls
    # the tiny call runs on one thread: an OpenMP wake-up of a second thread on a loaded machine costs
    # milliseconds of noise that would hide the overhead being measured
    threads = torch.get_num_threads()
    shapes = [(16, 1, 16, 4, args.runs * 20, 1)] + [(images * T, H, D, W, args.runs, threads) for images in args.images]
    for N, heads, head_dim, w, runs, n_threads in shapes:
        torch.set_num_threads(n_threads)
        pos = torch.arange(N)
        glob = (((pos % T) == T - 1) | (pos < T - 1))[None]
        layout = locore_kernels.build_layout(glob, torch.zeros_like(glob), w)
        g = torch.Generator().manual_seed(0)
        x = [torch.randn(1, N, heads, head_dim, generator=g) for _ in range(6)]
        x[3] = layout.gather_global(x[3])
        op_args = (*x, *layout_tensors(layout), layout.one_sided_window, "cpu")
        calls = {
            "backend": lambda: REGISTRY["cpu"].attention(*x, layout),
            "public": lambda: locore_kernels.attention_with_layout(*x, layout, backend="cpu"),
            "op": lambda: torch.ops.locore.attention(*op_args),
        }
        if first_op_s is None:
            t0 = time.perf_counter()
            calls["op"]()
            first_op_s = time.perf_counter() - t0
        times = {name: [] for name in calls}
        for _ in range(2):  # warm-up
            for fn in calls.values():
                fn()
        for _ in range(runs):  # interleaved, so load changes hit every impl alike
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
        base = statistics.median(times["backend"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({"bench": "custom-op", "impl": name, "dtype": "float32", "batch": 1, "tokens": N,
                         "model": f"H={heads} D={head_dim} w={w} threads={n_threads}", "median_ms": med, "overhead_ms": med - base,
                         "runs_ms": ts})
    print(bm.format_table(rows, ["tokens", "model", "impl", "median_ms", "overhead_ms"],
                          ["N", "shape", "call", "median ms", "minus backend ms"]))
    print(f"first call of the op in this process (imports torch._dynamo): {first_op_s:.2f} s")
    if not args.no_write:
        env = bm.environment(device)
        env["first_op_call_s"] = first_op_s
        path = bm.results_path(device).with_name(bm.results_path(device).stem + "-custom-op.json")
        bm.write_results(path, env, rows)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
