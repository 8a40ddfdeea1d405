#!/usr/bin/env python
"""Attention-op benchmark: our kernels vs transformers' chunked Longformer attention, FlexAttention
and dense masked SDPA, on LoCoRE's token layout (issue 3, "Benchmark").

Workload: one sequence (B = 1) of ``images x 50`` tokens, images = 26 .. 808 (a query and 25 .. 807
gallery images; N = 1300 .. 40400, with the target sizes N = 5050 and 20200 among them; the issue's
"1275" is not a whole number of 50-token images, 1300 is the nearest that is),
H = 12 heads, D = 64, one-sided window w = 256, globals where LoCoRE puts them (every [SEP] and the
query block's first 49 tokens), no padding. bf16 on GPU, fp32 on CPU. Every implementation gets the
same six projections and the same prebuilt layout (masks built once per layout, as in the model,
outside what is timed); the op alone is timed.

    python benchmarks/bench_attention.py                    # GPU: all sizes, all impls
    python benchmarks/bench_attention.py --cpu              # CPU: images 26, 51, 101
    python benchmarks/bench_attention.py --cpu --images 26 --impls locore,sdpa-dense --runs 3

Prints a table and the issue's target ratios, writes rows (bench "attention") into the device's
results JSON (see ``harness.py``) and a plot of time vs N beside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402
import locore_kernels  # noqa: E402
import harness as bm  # noqa: E402
from locore.model import as_dtype  # noqa: E402

TOKENS_PER_IMAGE = 50
HEADS, HEAD_DIM, WINDOW = 12, 64, 256
IMPLS = ("locore", "hf-longformer", "flex", "sdpa-dense")
GPU_IMAGES = (26, 51, 101, 202, 404, 808)
CPU_IMAGES = (26, 51, 101)
TARGET_IMAGES, SCALING_IMAGES = 101, 404     # N = 5050 and N = 20200

# issue 3 "Targets": minimum speed-up of locore over each baseline at N = 5050.
GPU_TARGETS = {"flex": 1.5, "sdpa-dense": 4.0, "hf-longformer": 20.0}
GPU_SCALING_TARGET = 4.5                      # time(20200) / time(5050) <= 4.5
CPU_TARGETS = {"sdpa-dense": 3.0, "hf-longformer": 4.0}


def locore_layout(batch: int, images: int, device: torch.device) -> locore_kernels.AttentionLayout:
    """Globals as LoCoRE places them: every [SEP] (position T-1 of each image) and the query
    block's first T-1 tokens; no padding (every image has all its descriptors)."""
    T = TOKENS_PER_IMAGE
    pos = torch.arange(images * T, device=device)
    is_global = ((pos % T) == T - 1) | (pos < T - 1)
    is_global = is_global[None].expand(batch, -1).contiguous()
    key_padding = torch.zeros_like(is_global)
    return locore_kernels.build_layout(is_global, key_padding, WINDOW)


def _estimated_bytes(impl: str, n: int, g: int, elem: int) -> int:
    """Rough transient memory of one call (scores and masks), to skip sizes that cannot fit."""
    H = HEADS
    if impl == "sdpa-dense":
        # boolean N x N mask, possibly expanded to an additive mask in the input dtype, + the
        # fallback's scores if no fused kernel takes the mask
        return n * n * (1 + elem) + (0 if elem < 4 else H * n * n * 4)
    if impl == "hf-longformer":
        npad = -(-n // (2 * WINDOW)) * 2 * WINDOW
        return 4 * H * npad * (2 * WINDOW + 1 + g) * 4     # fp32 probs + a few copies of the scores
    return 0


def _skip_reason(impl: str, n: int, g: int, dtype: torch.dtype, device: torch.device,
                 max_cpu_dense_tokens: int) -> Optional[str]:
    elem = torch.finfo(dtype).bits // 8
    need = _estimated_bytes(impl, n, g, elem)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.8 * free:
            return f"needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
    elif impl in ("sdpa-dense", "hf-longformer") and n > max_cpu_dense_tokens:
        return f"N > {max_cpu_dense_tokens} on CPU (--max-cpu-dense-tokens): O(N^2) too slow here"
    return None


def make_case(impl: str, images: int, dtype: torch.dtype, device: torch.device, batch: int,
              skip: Optional[str]) -> bm.Case:
    n = images * TOKENS_PER_IMAGE
    backend = locore_kernels.resolve_backend(None, device, dtype)
    note = {"locore": f"locore_kernels backend '{backend}'",
            "hf-longformer": "transformers LongformerSelfAttention forward, our projections; N padded to 2w",
            "flex": "torch.compile(flex_attention); globals gathered in front of the keys",
            "sdpa-dense": "F.scaled_dot_product_attention, dense bool mask"}[impl]
    row = {"bench": "attention", "impl": impl, "model": None, "dtype": str(dtype).replace("torch.", ""),
           "batch": batch, "gallery": images - 1, "images": images, "tokens": n, "mode": None,
           "heads": HEADS, "head_dim": HEAD_DIM, "window": WINDOW, "note": note}

    def setup():
        layout = locore_layout(batch, images, device)
        G = layout.max_global
        if impl == "locore":
            def op(q, k, v, qg, kg, vg, lay):
                return locore_kernels.attention_with_layout(q, k, v, qg, kg, vg, lay, backend=backend,
                                                            validate=False)
            fn = op
        else:
            # masks are built once per layout, outside the timing: no need to compile their builder
            fn = baselines.make_attention_baseline(impl, num_heads=HEADS, head_dim=HEAD_DIM,
                                                   one_sided_window=WINDOW, compile_masks=False)

        def make_input(r: int):
            gen = torch.Generator(device=device).manual_seed(1000 + r)
            q, k, v, kg, vg = (torch.randn(batch, n, HEADS, HEAD_DIM, generator=gen, device=device,
                                           dtype=dtype) for _ in range(5))
            qg = torch.randn(batch, G, HEADS, HEAD_DIM, generator=gen, device=device, dtype=dtype)
            if r == 0 and impl == "locore":  # validate the shapes once, outside the timing
                locore_kernels.attention_with_layout(q, k, v, qg, kg, vg, layout, backend=backend)
            if impl == "hf-longformer":
                return fn.prepare(q, k, v, qg, kg, vg, layout)   # padding done here, not timed
            return (q, k, v, qg, kg, vg)

        def call(x):
            with torch.inference_mode():
                return x() if impl == "hf-longformer" else fn(*x, layout)

        return call, make_input

    return bm.Case(row=row, setup=setup, skip_reason=skip)


def ratios(rows: Sequence[dict[str, Any]], cpu: bool) -> list[dict[str, Any]]:
    """The issue's target ratios from the measured rows (PASS / FAIL, or '-' when not measured)."""
    t = {(r["impl"], r["tokens"]): r["median_ms"] for r in rows if r.get("median_ms") is not None}
    n0, n1 = TARGET_IMAGES * TOKENS_PER_IMAGE, SCALING_IMAGES * TOKENS_PER_IMAGE
    ours = t.get(("locore", n0))
    out = []
    for impl, target in (CPU_TARGETS if cpu else GPU_TARGETS).items():
        other = t.get((impl, n0))
        value = other / ours if ours and other else None
        out.append({"ratio": f"{impl} / locore at N={n0}", "value": value, "target": f">= {target:g}",
                    "result": "-" if value is None else ("PASS" if value >= target else "FAIL")})
    if not cpu:
        big = t.get(("locore", n1))
        value = big / ours if ours and big else None
        out.append({"ratio": f"locore time({n1}) / time({n0})", "value": value,
                    "target": f"<= {GPU_SCALING_TARGET:g}",
                    "result": "-" if value is None else ("PASS" if value <= GPU_SCALING_TARGET else "FAIL")})
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_attention.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    p.add_argument("--images", default=None,
                   help=f"comma list of image counts, N = 50 x images (GPU {GPU_IMAGES}, CPU {CPU_IMAGES})")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="GPU bf16, CPU fp32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-cpu-dense-tokens", type=int, default=10050,
                   help="CPU: skip sdpa-dense and hf-longformer above this N (default 10050)")
    bm.add_common_args(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    s = bm.settings_from_args(args)
    device = args.device
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = sorted(set(impls) - set(IMPLS))
    if bad:
        raise SystemExit(f"unknown impl(s) {bad}; choose from {IMPLS}")
    images = [int(x) for x in args.images.split(",")] if args.images else \
        list(CPU_IMAGES if args.cpu else GPU_IMAGES)
    dtype = as_dtype(args.dtype or ("fp32" if args.cpu else "bf16"))

    print(f"attention benchmark on {bm.device_name(device)}; {dtype}; B={args.batch}, H={HEADS}, "
          f"D={HEAD_DIM}, w={WINDOW}, 50 tokens/image, LoCoRE globals")
    print(f"method: {bm.describe_settings(s)}")
    # the sizes the targets read first, so that a --time-limit cuts the others
    targets_first = (TARGET_IMAGES,) if args.cpu else (TARGET_IMAGES, SCALING_IMAGES)
    images.sort(key=lambda i: (i not in targets_first, i))
    cases = []
    for n_img in images:
        n = n_img * TOKENS_PER_IMAGE
        g = (TOKENS_PER_IMAGE - 1) + n_img
        for impl in impls:
            skip = _skip_reason(impl, n, g, dtype, device, args.max_cpu_dense_tokens)
            cases.append(make_case(impl, n_img, dtype, device, args.batch, skip))
    rows = bm.run_cases(cases, s, lambda r: f"N={r['tokens']:>6} {r['impl']:<14}", args.time_limit)
    rows.sort(key=lambda r: (r["tokens"], IMPLS.index(r["impl"])))

    ours = {r["tokens"]: r["median_ms"] for r in rows if r["impl"] == "locore" and r["median_ms"]}
    for r in rows:
        r["x_locore"] = (r["median_ms"] / ours[r["tokens"]]
                         if r["median_ms"] is not None and r["tokens"] in ours else None)
    print()
    print(bm.format_table(rows, ["impl", "dtype", "images", "tokens", "median_ms", "p10_ms", "p90_ms",
                                 "peak_mb", "runs", "x_locore", "skipped"],
                          ["impl", "dtype", "images", "N", "median ms", "p10", "p90", "peak MB", "runs",
                           "x locore", "skipped"]))
    print()
    where = "this CPU, fp32" if args.cpu else "H100, bf16"
    print(f"targets (issue 3; stated for {where}; measured here on {bm.device_name(device)}):")
    print(bm.format_table(ratios(rows, args.cpu), ["ratio", "value", "target", "result"]))

    if not args.no_write:
        path = bm.output_path(args)
        data = bm.write_results(path, bm.environment(device), rows)
        print(f"\nwrote {len(rows)} rows to {path}")
        if not args.no_plot:
            png = bm.plot_attention(data["rows"], path.with_name(path.stem + "-attention.png"),
                                    f"Longformer attention op, {bm.device_name(device)}")
            if png:
                print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
