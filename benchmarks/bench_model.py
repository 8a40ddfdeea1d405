#!/usr/bin/env python
"""Model benchmark: latency and peak memory of LoCoRE on our engine against the paper's Table 5,
transformers' Longformer (the published path), our model on FlexAttention / dense SDPA, RRT and AMES.

Workload (the paper's): one query with a shortlist of K gallery images, 48 local + 1 global
descriptors per image (768-d, all valid; T = 50 tokens per image with [SEP]), ``max-end`` scores.
K = 100 gives N = 5050 tokens in one pass. The scaling series K = 25, 50, 100, 200, 400 runs
single-pass as far as the position table allows (N <= 5120: K <= 101) and beyond that as the paper's
pipeline does: sliding windows of 100 images, stride 50, end-to-start (``locore.rerank``), one
forward pass per window, fused scores re-sorted between windows (K = 200: 3 passes, 400: 7).
B = 1 and B = 8 queries per call. Every implementation of one model size runs the same random
weights (``LoCoRe.preset(name, seed=0)``) on the same inputs; inputs are on the device already.

Rows (``impl``): ``locore`` (our engine; on CUDA eager and CUDA-graph modes), ``locore-flex`` /
``locore-sdpa`` (our model with its attention swapped for FlexAttention / dense masked SDPA, see
``baselines.py``), ``hf-longformer`` (transformers' ``LongformerModel`` fed as the published code
feeds it: fp32, and fp32 weights under bf16 autocast), ``rrt`` and ``ames`` (re-implementations at
their papers' configurations: 100 pairs x 1004 tokens, 100 pairs x 651 tokens).

    python benchmarks/bench_model.py                 # GPU: everything (see --time-limit)
    python benchmarks/bench_model.py --cpu           # CPU: fp32, tiny and small, vs transformers
    python benchmarks/bench_model.py --cpu --models tiny --impls locore --gallery 25 \\
        --scaling none --runs 3 --no-write          # smoke run

Prints a table with Table 5 beside and the issue's targets as PASS / FAIL; writes the rows (bench
"model") into the device's results JSON and two plots beside it (see ``harness.py``).
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402
import harness as bm  # noqa: E402
from locore.checkpoint import state_dict_to_reference  # noqa: E402
from locore.config import preset_config  # noqa: E402
from locore.model import Batch, LoCoRe  # noqa: E402
from locore.rerank import sliding_rerank, window_starts  # noqa: E402

MODELS = ("tiny", "small", "base")
IMPLS = ("locore", "locore-flex", "locore-sdpa", "hf-longformer", "rrt", "ames")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LOCAL_PER_IMAGE, DESC_DIM = 48, 768             # + 1 global descriptor per image -> T = 50
TOKENS_PER_IMAGE = LOCAL_PER_IMAGE + 2
MAIN_GALLERY = 100
WINDOW, STRIDE, ORDER, ALPHA, TEMP = 100, 50, "end-to-start", 0.5, 0.1
RRT_LOCAL, RRT_LOCAL_DIM, RRT_GLOBAL_DIM = 500, 128, 2048
AMES_QUERY_LOCAL, AMES_GALLERY_LOCAL = 600, 50

# issue 6 "Targets" (H100, bf16, one query, 100-image shortlist)
LATENCY_TARGET_MS = {"base": 2.5, "small": 1.3, "tiny": 0.3}
BASE_PEAK_TARGET_MB = 350.0
VS_HF_FP32_TARGET, VS_FLEX_TARGET = 30.0, 1.3


def max_single_pass_gallery(max_position_embeddings: int) -> int:
    """Largest K with (1 + K) * T <= P - 2 (K = 101 at T = 50, P = 5122)."""
    return (max_position_embeddings - 2) // TOKENS_PER_IMAGE - 1


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------

def locore_inputs(batch: int, gallery: int, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """Random AMES-layout descriptors on the device (all slots valid), plus first-stage similarities."""
    g = torch.Generator(device=device).manual_seed(seed)
    B, K, S, D = batch, gallery, LOCAL_PER_IMAGE, DESC_DIM
    randn = lambda *shape: torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    return {
        "query_local": randn(B, S, D),
        "query_scales": torch.randint(0, 3, (B, S), generator=g, device=device),
        "query_mask": torch.zeros(B, S, dtype=torch.bool, device=device),
        "gallery_local": randn(B, K, S, D),
        "gallery_scales": torch.randint(0, 3, (B, K, S), generator=g, device=device),
        "gallery_mask": torch.zeros(B, K, S, dtype=torch.bool, device=device),
        "query_global": randn(B, D),
        "gallery_global": randn(B, K, D),
        # first-stage similarities in first-stage (descending) order, on the host like a shortlist file
        "global_sim": np.sort(np.random.default_rng(seed).uniform(0.2, 0.9, (B, K)), axis=1)[:, ::-1].copy(),
    }


GALLERY_KEYS = ("gallery_local", "gallery_scales", "gallery_mask", "gallery_global")


def windowed(score: Callable[..., torch.Tensor], x: dict) -> np.ndarray:
    """The paper's sliding-window re-ranking over the whole shortlist, one ``score`` call per window.

    Returns the final order [B, K] (indices into the shortlist)."""
    device = x["gallery_local"].device
    fixed = {k: v for k, v in x.items() if k != "global_sim" and k not in GALLERY_KEYS}  # the query side

    def score_fn(cand: np.ndarray) -> np.ndarray:
        idx = torch.from_numpy(cand).to(device)
        window = {k: torch.take_along_dim(x[k], idx.view(idx.shape + (1,) * (x[k].dim() - 2)), dim=1)
                  for k in GALLERY_KEYS}
        return score(**fixed, **window).float().cpu().numpy()

    return sliding_rerank(score_fn, x["global_sim"], ORDER, WINDOW, STRIDE, ALPHA, TEMP)


def passes_for(gallery: int, single_pass_limit: int) -> int:
    return 1 if gallery <= single_pass_limit else len(window_starts(ORDER, gallery, WINDOW, STRIDE))


# --------------------------------------------------------------------------------------------------
# transformers' LongformerModel, fed as the published LoCoRE code feeds it
# --------------------------------------------------------------------------------------------------

class HFLongformerScorer:
    """``LongformerModel`` (transformers) holding the model's weights, with LoCoRE's sequence assembly
    and ``max-end`` scores around it, vectorised on the device (``hf_baseline``'s own wrapper
    is the test oracle: image-by-image loops on the host). ``autocast``: run under
    ``torch.autocast(dtype=autocast)`` with fp32 weights, as the published code's mixed precision does.
    """

    def __init__(self, master: LoCoRe, device: torch.device, autocast: Optional[torch.dtype]):
        from hf_baseline import build_hf_longformer

        cfg = master.config
        sd = state_dict_to_reference(master)
        self.cfg, self.device, self.autocast = cfg, device, autocast
        self.hf = build_hf_longformer(sd, cfg, torch.float32).to(device)
        # the pieces outside the Longformer, read from the SPEC-named weights
        self.local_to_lm = copy.deepcopy(master.local_to_lm).float().to(device)
        self.global_to_lm = copy.deepcopy(master.global_to_lm).float().to(device)
        self.scale = sd["scale_encoder.weight"].to(device)
        self.sep = sd["language_model.longformer.sep_embedding"].to(device)
        self.cls_w = sd["language_model.classifier.weight"].to(device)
        self.cls_b = sd["language_model.classifier.bias"].to(device)
        self.masks = master.masks  # the model's own valid / global-token rule (reads only the config)

    def _project(self, proj: torch.nn.Module, desc: torch.Tensor) -> torch.Tensor:
        out = proj(desc)  # SPEC section 2: optional L2 normalisation after the projection
        return F.normalize(out, dim=-1) if self.cfg.l2_normalize else out

    def __call__(self, query_local, query_scales, query_mask, gallery_local, gallery_scales, gallery_mask,
                 query_global, gallery_global) -> torch.Tensor:
        B, K, S, _ = gallery_local.shape
        I, T, H = 1 + K, S + 2, self.cfg.hidden
        N = I * T
        local = torch.cat([query_local[:, None], gallery_local], 1).float()
        scales = torch.cat([query_scales[:, None], gallery_scales], 1)
        padding = torch.cat([query_mask[:, None], gallery_mask], 1).bool()
        glob = torch.cat([query_global[:, None], gallery_global], 1).float()
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16,
                                                    enabled=self.autocast is not None):
            tokens = torch.cat([self._project(self.global_to_lm, glob)[:, :, None],
                                self._project(self.local_to_lm, local) + self.scale[scales],
                                self.sep.expand(B, I, 1, H).to(local.dtype)], dim=2).reshape(B, N, H)
            is_global, key_padding = self.masks(Batch(local, scales, padding, glob))       # [B, N] each
            hidden = self.hf(inputs_embeds=tokens.float(), attention_mask=(~key_padding).long(),
                             global_attention_mask=is_global.long(),
                             position_ids=(2 + torch.arange(N, device=self.device)).expand(B, N),
                             token_type_ids=torch.zeros(B, N, dtype=torch.long, device=self.device)
                             ).last_hidden_state
            logits = F.linear(hidden, self.cls_w, self.cls_b)
        return logits.float().view(B, I, T, 2)[:, 1:, T - 2, 1]                            # max-end


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    impl: str
    model: str
    dtype: str          # "bf16" | "fp32"
    batch: int
    gallery: int
    mode: Optional[str] = None   # locore: eager | graph; hf-longformer: eager | autocast


class Context:
    """Shared state of one run: one CPU master model per size (the weights every row of that size
    copies), and the fp32 locore scores each other implementation is checked against."""

    def __init__(self, device: torch.device):
        self.device = device
        self._masters: dict[str, LoCoRe] = {}
        self.reference: dict[tuple, torch.Tensor] = {}

    def master(self, name: str) -> LoCoRe:
        if name not in self._masters:
            self._masters[name] = LoCoRe.preset(name, device="cpu", dtype=torch.float32, seed=0)
        return self._masters[name]

    def model(self, name: str, dtype: torch.dtype) -> LoCoRe:
        return copy.deepcopy(self.master(name)).to(device=self.device, dtype=dtype)


def _dtype_name(spec: Spec) -> str:
    return str(DTYPES[spec.dtype]).replace("torch.", "")


def make_case(spec: Spec, ctx: Context, single_pass_limit: int) -> bm.Case:
    device, dtype = ctx.device, DTYPES[spec.dtype]
    B, K = spec.batch, spec.gallery
    row: dict[str, Any] = {"bench": "model", "impl": spec.impl, "model": spec.model, "dtype": _dtype_name(spec),
                           "batch": B, "gallery": K, "mode": spec.mode}
    paper = bm.TABLE5.get(spec.model if spec.impl not in ("rrt", "ames") else spec.impl)
    if spec.impl in ("rrt", "ames"):
        row["model"] = spec.impl
    if paper and K == MAIN_GALLERY and B == 1:
        row["paper_ms"], row["paper_peak_mb"] = paper["latency_ms"], paper["peak_mb"]

    if spec.impl == "rrt":
        row.update(tokens=baselines.RRT.tokens_per_pair(RRT_LOCAL), passes=1,
                   note=f"{B * K} pairs x {baselines.RRT.tokens_per_pair(RRT_LOCAL)} tokens, one batched call")
        return bm.Case(row=row, setup=lambda: _rrt_setup(B, K, device, dtype))
    if spec.impl == "ames":
        tokens = baselines.AMES.tokens_per_pair(AMES_QUERY_LOCAL, AMES_GALLERY_LOCAL)
        row.update(tokens=tokens, passes=1, note=f"{B * K} pairs x {tokens} tokens, one batched call")
        return bm.Case(row=row, setup=lambda: _ames_setup(B, K, device, dtype))

    passes = passes_for(K, single_pass_limit)
    windows = passes > 1
    row["tokens"] = (1 + min(K, WINDOW) if windows else 1 + K) * TOKENS_PER_IMAGE
    row["passes"] = passes
    notes = []
    if windows:
        notes.append(f"sliding windows of {WINDOW} images, stride {STRIDE}, {ORDER}: {passes} passes of "
                     f"{row['tokens']} tokens (K > {single_pass_limit} does not fit the position table)")
    if spec.impl == "hf-longformer":
        notes.append("fp32 weights, bf16 autocast" if spec.mode == "autocast" else "fp32")
    elif spec.impl == "locore-flex":
        notes.append("attention: compiled FlexAttention (block mask, globals in front)")
    elif spec.impl == "locore-sdpa":
        notes.append("attention: dense SDPA, boolean N x N mask")
    if spec.mode == "graph":
        notes.append("CUDA graph replay")
    row["note"] = "; ".join(notes) or None

    def setup():
        if spec.impl == "hf-longformer":
            scorer = HFLongformerScorer(ctx.master(spec.model), device,
                                        torch.bfloat16 if spec.mode == "autocast" else None)
            score = scorer
        else:
            model = ctx.model(spec.model, dtype)
            if spec.impl == "locore-flex":
                model.set_attention(baselines.FlexAttentionBaseline())
            elif spec.impl == "locore-sdpa":
                model.set_attention(baselines.DenseSDPABaseline())
            graph = spec.mode == "graph"

            def score(**kw):
                return model.score(**kw, cuda_graph=graph)

        def call(x):
            if windows:
                return windowed(score, x)
            return score(**{k: v for k, v in x.items() if k != "global_sim"})

        in_dtype = torch.float32 if spec.impl == "hf-longformer" else dtype
        return call, lambda r: locore_inputs(B, K, device, in_dtype, seed=r)

    case = bm.Case(row=row, setup=setup)
    if not windows:
        case.check = _checker(ctx, spec)
    return case


def _checker(ctx: Context, spec: Spec) -> Callable[[Any], dict]:
    """Scores on input set 0 against the fp32 eager locore scores of the same size, B and K: a
    benchmark of a baseline that computes something else would be worthless."""
    key = (spec.model, spec.batch, spec.gallery)

    def check(out) -> dict:
        out = out.detach().float().cpu()
        if spec.impl == "locore" and spec.dtype == "fp32" and spec.mode != "graph":
            ctx.reference[key] = out
        ref = ctx.reference.get(key)
        if ref is None:
            return {}
        return {"max_rel_diff_vs_locore_fp32": float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))}

    return check


def _rrt_setup(B: int, K: int, device: torch.device, dtype: torch.dtype):
    model = baselines.RRT().to(device=device, dtype=dtype).eval()

    def make_input(r: int):
        g = torch.Generator(device=device).manual_seed(r)
        rn = lambda *s: torch.randn(s, generator=g, device=device).to(dtype)  # noqa: E731
        L = RRT_LOCAL
        return (rn(B, RRT_GLOBAL_DIM), rn(B, L, RRT_LOCAL_DIM),
                torch.randint(0, 7, (B, L), generator=g, device=device),
                torch.zeros(B, L, dtype=torch.bool, device=device),
                rn(B, K, RRT_GLOBAL_DIM), rn(B, K, L, RRT_LOCAL_DIM),
                torch.randint(0, 7, (B, K, L), generator=g, device=device),
                torch.zeros(B, K, L, dtype=torch.bool, device=device))

    def call(x):
        with torch.inference_mode():
            return model(*x)

    return call, make_input


def _ames_setup(B: int, K: int, device: torch.device, dtype: torch.dtype):
    model = baselines.AMES(local_dim=DESC_DIM).to(device=device, dtype=dtype).eval()

    def make_input(r: int):
        g = torch.Generator(device=device).manual_seed(r)
        rn = lambda *s: torch.randn(s, generator=g, device=device).to(dtype)  # noqa: E731
        return (rn(B, AMES_QUERY_LOCAL, DESC_DIM), torch.zeros(B, AMES_QUERY_LOCAL, dtype=torch.bool, device=device),
                rn(B, K, AMES_GALLERY_LOCAL, DESC_DIM),
                torch.zeros(B, K, AMES_GALLERY_LOCAL, dtype=torch.bool, device=device))

    def call(x):
        with torch.inference_mode():
            return model(*x)

    return call, make_input


# --------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------

def plan(models: Sequence[str], impls: Sequence[str], dtypes: Sequence[str], batches: Sequence[int],
         gallery: int, scaling: Sequence[int], scaling_models: Sequence[str], modes: Sequence[str],
         cpu: bool) -> list[Spec]:
    """Rows in priority order (what the targets need first; a --time-limit cuts from the end):
    1. B = 1 at the main K: locore in every dtype and mode (fp32 eager first: the check reference),
       hf-longformer fp32 and bf16-autocast, locore-flex / locore-sdpa in the first dtype (bf16 on
       GPU), rrt and ames in every dtype;
    2. the K scaling series (B = 1, bf16 on GPU / fp32 on CPU) for locore, locore-flex, hf-longformer;
    3. B > 1 at the main K: locore in every dtype and mode, the baselines in the first dtype only."""
    specs: list[Spec] = []
    first = dtypes[0]
    ordered_dtypes = sorted(dtypes, key=lambda d: d != "fp32")   # fp32 first: reference scores

    def family(model: str, dtype: str, batch: int, K: int, swapped: bool, hf: bool) -> list[Spec]:
        out = []
        if "locore" in impls:
            out += [Spec("locore", model, dtype, batch, K, m) for m in modes]
        if swapped:
            out += [Spec(i, model, dtype, batch, K) for i in ("locore-flex", "locore-sdpa") if i in impls]
        if hf and "hf-longformer" in impls:
            out.append(Spec("hf-longformer", model, dtype, batch, K, "eager" if dtype == "fp32" else "autocast"))
        return out

    for model in models:
        for dtype in ordered_dtypes:
            specs += family(model, dtype, 1, gallery, swapped=dtype == first, hf=True)
    for impl in ("rrt", "ames"):
        if impl in impls:
            specs += [Spec(impl, impl, dtype, 1, gallery) for dtype in dtypes]
    series_dtype = "fp32" if cpu else ("bf16" if "bf16" in dtypes else first)
    for model in scaling_models:
        for K in scaling:
            if K == gallery and model in models:
                continue  # measured above
            specs += [s for s in family(model, series_dtype, 1, K, swapped=True, hf=True) if s.impl != "locore-sdpa"]
    for batch in batches:
        if batch == 1:
            continue
        for model in models:
            for dtype in ordered_dtypes:
                specs += family(model, dtype, batch, gallery, swapped=dtype == first, hf=dtype == first)
        for impl in ("rrt", "ames"):
            if impl in impls:
                specs.append(Spec(impl, impl, first, batch, gallery))
    seen, unique = set(), []
    for s in specs:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

def _best(rows, impl, model, dtype, batch=1, gallery=MAIN_GALLERY, mode=None):
    cands = [r for r in rows if r["impl"] == impl and r["model"] == model and r["dtype"] == dtype
             and r["batch"] == batch and r["gallery"] == gallery and r.get("median_ms") is not None
             and (mode is None or r.get("mode") == mode)]
    return min(cands, key=lambda r: r["median_ms"]) if cands else None


def targets(rows: Sequence[dict], models: Sequence[str]) -> list[dict]:
    """issue 6's targets (H100, bf16, B = 1, K = 100) from the measured rows, PASS / FAIL."""
    out = []

    def add(what, value, target, ok):
        out.append({"target": what, "value": value, "goal": target,
                    "result": "-" if value is None else ("PASS" if ok(value) else "FAIL")})

    for m in models:
        ours = _best(rows, "locore", m, "bfloat16")
        mode = f" ({ours['mode']})" if ours else ""
        add(f"{m} bf16 latency{mode} [ms]", ours and ours["median_ms"], f"<= {LATENCY_TARGET_MS[m]:g}",
            lambda v, t=LATENCY_TARGET_MS[m]: v <= t)
        if m == "base":
            add("base bf16 peak [MB]", ours and ours["peak_mb"], f"<= {BASE_PEAK_TARGET_MB:g}",
                lambda v: v <= BASE_PEAK_TARGET_MB)
        hf = _best(rows, "hf-longformer", m, "float32")
        add(f"{m}: hf-longformer fp32 / locore bf16", hf and ours and hf["median_ms"] / ours["median_ms"],
            f">= {VS_HF_FP32_TARGET:g}", lambda v: v >= VS_HF_FP32_TARGET)
        flex = _best(rows, "locore-flex", m, "bfloat16")
        add(f"{m}: locore-flex bf16 / locore bf16", flex and ours and flex["median_ms"] / ours["median_ms"],
            f">= {VS_FLEX_TARGET:g}", lambda v: v >= VS_FLEX_TARGET)
    return out


def print_report(rows: Sequence[dict], models: Sequence[str], device: torch.device) -> None:
    cols = ["impl", "model", "dtype", "mode", "batch", "gallery", "passes", "tokens", "median_ms", "p10_ms",
            "p90_ms", "peak_mb", "runs", "paper_ms", "x_paper", "paper_peak_mb", "max_rel_diff_vs_locore_fp32",
            "skipped"]
    heads = ["impl", "model", "dtype", "mode", "B", "K", "passes", "tokens", "median ms", "p10", "p90",
             "peak MB", "runs", "Table5 ms", "x faster", "Table5 MB", "rel diff vs fp32", "skipped / note"]
    for r in rows:
        r["x_paper"] = (r["paper_ms"] / r["median_ms"]) if r.get("paper_ms") and r.get("median_ms") else None
    shown = [dict(r, skipped=r.get("skipped") or r.get("note")) for r in rows]
    print(bm.format_table(shown, cols, heads))
    print()
    on = bm.device_name(device)
    print(f"targets (issue 6; stated for H100, bf16, B=1, K=100; measured here on {on}):")
    if device.type == "cpu":
        print("  (CPU run: the GPU targets do not apply; the bf16 rows they read are absent)")
    print(bm.format_table(targets(rows, models), ["target", "value", "goal", "result"]))
    ours = [r for r in rows if r["impl"] == "locore" and r.get("median_ms") and r["batch"] == 1
            and r["gallery"] == MAIN_GALLERY]
    hf = {(r["model"], r["dtype"]): r["median_ms"] for r in rows
          if r["impl"] == "hf-longformer" and r.get("median_ms") and r["batch"] == 1 and r["gallery"] == MAIN_GALLERY}
    if ours and hf:
        print("\nspeed-up over transformers' Longformer (same model, same dtype, B=1, K=100):")
        for r in ours:
            other = hf.get((r["model"], r["dtype"]))
            if other:
                print(f"  {r['model']:<5} {r['dtype']:<8} {r['mode'] or '':<6} {other / r['median_ms']:7.1f}x "
                      f"({other:.1f} ms -> {r['median_ms']:.2f} ms)")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def _csv(text: Optional[str], cast=str) -> Optional[list]:
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return []
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_model.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="comma list of tiny, small, base (GPU all; CPU tiny,small)")
    p.add_argument("--impls", default=None,
                   help=f"comma list of {', '.join(IMPLS)} (GPU all; CPU locore,hf-longformer)")
    p.add_argument("--dtypes", default=None, help="comma list of bf16, fp32 (GPU both; CPU fp32)")
    p.add_argument("--batches", default=None, help="comma list of queries per call (GPU 1,8; CPU 1)")
    p.add_argument("--gallery", type=int, default=MAIN_GALLERY, help="shortlist length K of the main rows (100)")
    p.add_argument("--scaling", default=None,
                   help="K of the scaling series, or none (GPU 25,50,100,200,400; CPU 25,50,100)")
    p.add_argument("--scaling-models", default=None, help="models of the scaling series (GPU base; CPU tiny)")
    p.add_argument("--modes", default=None, help="locore modes: eager, graph (GPU both; CPU eager)")
    bm.add_common_args(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    s = bm.settings_from_args(args)
    device, cpu = args.device, args.cpu
    models = _csv(args.models) or (["tiny", "small"] if cpu else list(MODELS))
    impls = _csv(args.impls) or (["locore", "hf-longformer"] if cpu else list(IMPLS))
    dtypes = _csv(args.dtypes) or (["fp32"] if cpu else ["bf16", "fp32"])
    batches = _csv(args.batches, int) or ([1] if cpu else [1, 8])
    scaling = _csv(args.scaling, int)
    scaling = ([25, 50, 100] if cpu else [25, 50, 100, 200, 400]) if scaling is None else scaling
    scaling_models = _csv(args.scaling_models) or (["tiny"] if cpu else ["base"])
    modes = _csv(args.modes) or (["eager"] if cpu else ["eager", "graph"])
    for name, got, allowed in (("model", models + scaling_models, MODELS), ("impl", impls, IMPLS),
                               ("dtype", dtypes, tuple(DTYPES)), ("mode", modes, ("eager", "graph"))):
        bad = sorted(set(got) - set(allowed))
        if bad:
            raise SystemExit(f"unknown {name}(s) {bad}; choose from {allowed}")
    if cpu and "graph" in modes:
        raise SystemExit("--modes graph needs a CUDA device")

    specs = plan(models, impls, dtypes, batches, args.gallery, scaling, scaling_models, modes, cpu)
    single_pass_limit = max_single_pass_gallery(preset_config("base").max_position_embeddings)
    ctx = Context(device)
    for name in dict.fromkeys(spec.model for spec in specs if spec.impl not in ("rrt", "ames")):
        ctx.master(name)  # before any row: the masters' memory is in every row's baseline alike
    print(f"model benchmark on {bm.device_name(device)}: {len(specs)} rows")
    print(f"workload: 1 query (x B) + K gallery images, {LOCAL_PER_IMAGE} local + 1 global descriptors "
          f"({DESC_DIM}-d) per image, T={TOKENS_PER_IMAGE}; K <= {single_pass_limit} in one pass, larger K in "
          f"windows of {WINDOW} (stride {STRIDE}, {ORDER})")
    print(f"method: {bm.describe_settings(s)}")
    label = lambda r: (f"{r['impl']:<14} {r['model']:<5} {r['dtype']:<8} {r['mode'] or '':<8} "  # noqa: E731
                       f"B={r['batch']} K={r['gallery']:<4}")
    rows = bm.run_cases([make_case(spec, ctx, single_pass_limit) for spec in specs], s, label, args.time_limit)
    print()
    print_report(rows, models, device)

    if not args.no_write:
        path = bm.output_path(args)
        data = bm.write_results(path, bm.environment(device), rows)
        print(f"\nwrote {len(rows)} rows to {path}")
        if not args.no_plot:
            title = f"LoCoRE re-ranking, one query + 100-image shortlist, {bm.device_name(device)}"
            for png in (bm.plot_model(data["rows"], path.with_name(path.stem + "-model.png"), title),
                        bm.plot_scaling(data["rows"], path.with_name(path.stem + "-model-scaling.png"),
                                        f"latency vs shortlist length, {bm.device_name(device)}")):
                if png:
                    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
