"""patch_longformer vs the library: a transformers LongformerModel forward, patched and unpatched.

Workload (issue 14): base width (hidden 768, 12 heads, FFN 3072), 6 layers, attention_window 512,
batch 1, random weights (the library's init; vocab 1000, which changes no timing of the encoder),
global tokens spread evenly over the sequence. Both implementations run on the same model object,
in the same process, one row after the other: the library's own forward, then the same model after
``patch_longformer``. Everything under ``torch.inference_mode()``.

Per row: one warm-up call, one call for the peak memory (harness.PeakMemory: on CPU the RSS
high-water mark reset before the call, minus the RSS before the row built its model, so it holds the
weights, the inputs and the call's activations; ``act_peak_mb`` subtracts the weights), then
``--runs`` timed calls; medians. A patched row also records its largest difference to the library's
output on the same input (relative to the largest magnitude), for sequences up to ``--check-max-tokens``.

    PYTHONPATH=python:. python benchmarks/bench_patch.py --cpu                  # 1024 (0, 16 globals), 4096 (16)
    PYTHONPATH=python:. python benchmarks/bench_patch.py --cpu --lengths 4096 --globals 1,16,150
    PYTHONPATH=python:. python benchmarks/bench_patch.py --dtypes fp32,bf16     # GPU

Results: benchmarks/results/patch-<device-slug>.json (rows merged by key) and a table on stdout.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as bm  # noqa: E402
from locore.integrations import patch_longformer, unpatch_longformer  # noqa: E402

IMPLS = ("transformers", "transformers+patch")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL = "longformer-base-6L"


def build_model(dtype: torch.dtype, device: torch.device, max_tokens: int, seed: int = 0):
    from transformers import LongformerConfig, LongformerModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = LongformerConfig(vocab_size=1000, hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
                           intermediate_size=3072, attention_window=512, max_position_embeddings=max_tokens + 2,
                           pad_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return LongformerModel(cfg, add_pooling_layer=False).to(device=device, dtype=dtype).eval()


def make_input(tokens: int, globals_: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 1000, (1, tokens), generator=g)
    global_mask = torch.zeros(1, tokens, dtype=torch.long)
    if globals_:
        global_mask[0, torch.linspace(0, tokens - 1, globals_).round().long()] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "global_attention_mask": global_mask.to(device)}


def forward(model, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**x).last_hidden_state


def measure_row(impl: str, tokens: int, globals_: int, dtype_name: str, device: torch.device, runs: int,
                check_max_tokens: int, commit: Optional[str]) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    row: dict[str, Any] = {"bench": "patch", "impl": impl, "model": MODEL, "dtype": dtype_name, "batch": 1,
                           "gallery": None, "tokens": tokens, "mode": f"{globals_} globals", "globals": globals_,
                           "median_ms": None, "p10_ms": None, "p90_ms": None, "peak_mb": None, "commit": commit}
    memory = bm.PeakMemory(device)
    model = None
    try:
        memory.start()
        model = build_model(dtype, device, tokens)
        weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        if impl == "transformers+patch":
            patch_longformer(model)
        inputs = [make_input(tokens, globals_, device, seed) for seed in range(2)]
        t0 = time.perf_counter()
        out = forward(model, inputs[0])                 # warm-up (kernel compilation on GPU)
        bm.synchronize(device)
        row["first_call_s"] = round(time.perf_counter() - t0, 3)
        if impl == "transformers+patch" and tokens <= check_max_tokens:
            unpatch_longformer(model)
            ref = forward(model, inputs[0]).float()
            patch_longformer(model)
            row["max_rel_diff_vs_library"] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            del ref
        del out
        row["peak_mb"] = memory.measure(lambda: forward(model, inputs[0]))
        row["peak_method"] = memory.method
        row["weights_mb"] = weights_mb
        row["act_peak_mb"] = None if row["peak_mb"] is None else row["peak_mb"] - weights_mb
        times = bm.time_runs(lambda i: forward(model, inputs[i % len(inputs)]), runs, device)
        t = bm.summarize(times)
        row.update({"median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms, "mean_ms": t.mean_ms,
                    "min_ms": t.min_ms, "runs": t.runs, "times_ms": [round(x, 3) for x in times],
                    "rotation": len(inputs)})
    except Exception as exc:  # one row that cannot run (e.g. out of memory) must not stop the others
        row["skipped"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    finally:
        del model
        gc.collect()
        bm.release_memory(device)
    return row


def ratios(rows: Sequence[dict[str, Any]], on_cpu: bool) -> list[dict[str, Any]]:
    out = []
    by_key = {(r["dtype"], r["tokens"], r["globals"], r["impl"]): r for r in rows if r["median_ms"] is not None}
    for (dt, n, g, impl), ours in sorted(by_key.items()):
        lib = by_key.get((dt, n, g, "transformers"))
        if impl != "transformers+patch" or lib is None:
            continue
        speedup = lib["median_ms"] / ours["median_ms"]
        target = 2.0 if on_cpu else 5.0
        out.append({"case": f"{dt} N={n} G={g}", "speedup": speedup, "speedup_target": f">= {target:g}",
                    "peak_ratio": None if not lib["peak_mb"] else ours["peak_mb"] / lib["peak_mb"],
                    "act_peak_ratio": None if not lib["act_peak_mb"] else ours["act_peak_mb"] / lib["act_peak_mb"],
                    "peak_target": "<= 0.5" if on_cpu else "-",
                    "met": speedup >= target and (not on_cpu or (ours["peak_mb"] or 0) <= 0.5 * (lib["peak_mb"] or 0))})
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (fp32)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--lengths", default=None, help="comma list of sequence lengths (default 1024,4096)")
    p.add_argument("--globals", default=None,
                   help="comma list of global-token counts (default 0,16 at 1024 and 16 at 4096 on CPU; 1,16,150 on GPU)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32, bf16, fp16 (default fp32 on CPU, fp32,bf16 on GPU)")
    p.add_argument("--runs", type=int, default=None, help="timed calls per row (CPU 3, GPU 20)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--check-max-tokens", type=int, default=1024,
                   help="record the patched output's difference to the library up to this length (one extra library call)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/patch-<device-slug>.json)")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu" if args.cpu else (args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    on_cpu = device.type == "cpu"
    dtypes = (args.dtypes or ("fp32" if on_cpu else "fp32,bf16")).split(",")
    bad = sorted(set(dtypes) - set(DTYPES))
    if bad:
        raise SystemExit(f"unknown dtype(s) {bad}; choose from {sorted(DTYPES)}")
    lengths = [int(x) for x in (args.lengths or "1024,4096").split(",")]
    runs = args.runs or (3 if on_cpu else 20)
    grid = []
    for n in lengths:
        if args.globals:
            counts = [int(x) for x in args.globals.split(",")]
        elif on_cpu:
            counts = [0, 16] if n <= 1024 else [16]
        else:
            counts = [1, 16, 150]
        grid += [(dt, n, g) for dt in dtypes for g in counts]
    commit, _ = bm.git_commit()
    print(f"patch_longformer benchmark on {bm.device_name(device)}, torch threads {torch.get_num_threads()}: "
          f"{MODEL} (hidden 768, 12 heads, FFN 3072, window 512), batch 1")
    print(f"method: per row 1 warm-up call, 1 peak-memory call, {runs} timed calls (median); same process, same model")
    rows = []
    for dt, n, g in grid:
        for impl in IMPLS:
            row = measure_row(impl, n, g, dt, device, runs, args.check_max_tokens, commit)
            rows.append(row)
            what = (f"{row['median_ms']:.0f} ms, peak {row['peak_mb']:.0f} MB" if row["median_ms"] is not None
                    else f"skipped: {row['skipped']}")
            print(f"  {dt} N={n:>5} G={g:>3} {impl:<19} {what}", flush=True)

    print()
    print(bm.format_table(rows, ["impl", "dtype", "tokens", "globals", "median_ms", "p10_ms", "p90_ms", "runs",
                                 "peak_mb", "act_peak_mb", "max_rel_diff_vs_library", "skipped"],
                          ["impl", "dtype", "N", "globals", "median ms", "p10", "p90", "runs", "peak MB",
                           "peak - weights MB", "rel diff", "skipped"]))
    print()
    print(bm.format_table(ratios(rows, on_cpu), ["case", "speedup", "speedup_target", "peak_ratio",
                                                 "act_peak_ratio", "peak_target", "met"],
                          ["case", "speed-up", "target", "peak ratio", "peak-weights ratio", "target", "met"]))
    if not args.no_write:
        path = Path(args.out) if args.out else bm.RESULTS_DIR / f"patch-{bm.device_slug(device)}.json"
        bm.write_results(path, bm.environment(device), rows)
        print(f"\nwrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
