"""Attention forward + backward (training) on CPU: our C++ backward vs the dense reference's autograd.

One LoCoRE-shaped attention call, default N = 5050 (query + 100 images of 50 tokens), 150 global
tokens (the query block's first 49 tokens and every [SEP]), w = 256, H = 12, D = 64, fp32. Each
implementation runs in its own subprocess so that its peak RSS (VmHWM, harness.PeakMemory) is its
own: inputs (6 projections, requires_grad) + forward + backward. Times are per run (forward, then
backward of a fixed random output gradient), medians over ``--runs`` after one warm-up.

    python benchmarks/bench_attention_backward.py                 # table + benchmarks/results JSON
    python benchmarks/bench_attention_backward.py --images 10 --runs 2 --no-write    # smoke run
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness as bm  # noqa: E402

TOKENS_PER_IMAGE = 50
IMPLS = ("locore-cpu", "dense-reference")


def child(impl: str, images: int, heads: int, head_dim: int, window: int, runs: int) -> dict:
    from locore_kernels import build_layout
    from locore_kernels.autograd import longformer_attention

    meter = bm.PeakMemory(torch.device("cpu"))
    meter.start()
    T = TOKENS_PER_IMAGE
    N = images * T
    pos = torch.arange(N)
    is_global = (((pos % T) == T - 1) | (pos < T - 1))[None]
    key_padding = torch.zeros_like(is_global)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, N, heads, head_dim, generator=g).requires_grad_() for _ in range(6)]
    grad_out = torch.randn(1, N, heads, head_dim, generator=g)
    backend = "cpu" if impl == "locore-cpu" else "reference"

    def step() -> tuple[float, float]:
        for x in xs:
            x.grad = None
        t0 = time.perf_counter()
        out = longformer_attention(*xs, is_global=is_global, key_padding=key_padding, one_sided_window=window,
                                   backend=backend)
        t1 = time.perf_counter()
        out.backward(grad_out)
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3

    step()  # warm-up
    peak_mb = meter.measure(step)
    fwd, bwd = zip(*(step() for _ in range(runs)))
    total = [f + b for f, b in zip(fwd, bwd)]
    return {"tokens": N, "globals": int(build_layout(is_global, key_padding, window).max_global),
            "fwd_ms": median(fwd), "bwd_ms": median(bwd), "median_ms": median(total),
            "min_ms": min(total), "runs": runs, "times_ms": total, "peak_mb": peak_mb,
            "peak_method": meter.method, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=101, help="images incl. the query (N = 50 * images)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=256, help="one-sided window w")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.images, args.heads, args.head_dim, args.window, args.runs)))
        return 0

    commit, dirty = bm.git_commit()
    rows = []
    for impl in args.impls.split(","):
        if impl not in IMPLS:
            raise SystemExit(f"unknown impl {impl!r}; choose from {IMPLS}")
        cmd = [sys.executable, __file__, "--child", impl, "--images", str(args.images), "--heads", str(args.heads),
               "--head-dim", str(args.head_dim), "--window", str(args.window), "--runs", str(args.runs)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{impl} failed:\n{res.stderr[-2000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append({"bench": "attention-backward", "impl": impl, "model": None, "dtype": "float32", "batch": 1,
                     "gallery": args.images - 1, "mode": f"fwd+bwd H={args.heads} D={args.head_dim} w={args.window}",
                     "commit": commit, "dirty": dirty, **r})
    base = next((r for r in rows if r["impl"] == "dense-reference"), None)
    for r in rows:
        if base is not None and r is not base:
            r["speedup_vs_dense"] = base["median_ms"] / r["median_ms"]
            r["peak_ratio_vs_dense"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] else None
    print(bm.format_table(rows, ["impl", "tokens", "globals", "fwd_ms", "bwd_ms", "median_ms", "peak_mb",
                                 "speedup_vs_dense", "peak_ratio_vs_dense"]))
    if not args.no_write:
        cpu = torch.device("cpu")
        path = bm.RESULTS_DIR / f"attention-backward-{bm.device_slug(cpu)}.json"
        bm.write_results(path, bm.environment(cpu), rows)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
