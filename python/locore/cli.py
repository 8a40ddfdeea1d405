"""Command-line interface: ``locore rerank | eval | bench | demo``.

``locore rerank`` re-ranks first-stage neighbour lists of a dataset in the AMES layout with a LoCoRE
model and evaluates them; ``locore eval`` evaluates a ranks file; ``locore bench`` runs the
benchmarks; ``locore demo`` runs the whole pipeline on a generated problem.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .data import (EXPECTED_LAYOUT, DataError, GlobalFeatures, LocalFeatures, UnsafePickleError, locate_files,
                   read_gnd, read_neighbours)
from .evaluate import KAPPAS, SPLITS, map_at_r, protocol_first_stage, protocol_runs, recall_at_k, revisited_metrics
from .rerank import ORDERS, DatasetReranker, SettingsError, Sliding, TopK, tokens_per_image

PRESET_PREFIX = "preset:"
DEMO_SLIDING = {"order": "end-to-start", "shortlist": 40, "window": 20, "stride": 10}
SCORE_MODES = ("max-start", "max-end", "max-sum", "max-prod")
METRIC_COLUMNS = ("mAP",) + tuple(f"mP@{k}" for k in KAPPAS)  # revisited metrics, in table order

# Errors a user can fix: printed as one message, no traceback (LOCORE_DEBUG=1 shows it); plus
# locore.checkpoint.CheckpointError (imported lazily: it pulls in torch).
USER_ERRORS = (DataError, SettingsError, UnsafePickleError, FileNotFoundError)


def _is_user_error(e: BaseException) -> bool:
    if isinstance(e, USER_ERRORS):
        return True
    ckpt = sys.modules.get("locore.checkpoint")
    return ckpt is not None and isinstance(e, ckpt.CheckpointError)


# --------------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------------

def load_model(checkpoint: str, device: Optional[str] = None, dtype: Optional[str] = None, seed: int = 0,
               overrides: Optional[Dict[str, Any]] = None, log: Callable[[str], None] = print):
    """``LoCoRe.from_pretrained(checkpoint)``, or ``LoCoRe.preset(name)`` for ``preset:NAME`` (random
    weights, announced loudly). Returns ``(model, random_weights)``."""
    from .checkpoint import CheckpointError
    from .model import LoCoRe

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if checkpoint.startswith(PRESET_PREFIX):
        name = checkpoint[len(PRESET_PREFIX):]
        try:
            model = LoCoRe.preset(name, device=device, dtype=dtype, seed=seed, **overrides)
        except ValueError as e:
            raise CheckpointError(f"--checkpoint {checkpoint}: {e}") from None
        bar = "!" * 100
        log(f"{bar}\n!!! RANDOM WEIGHTS: preset '{name}' (seed {seed}), not a trained checkpoint. Scores, re-ranked"
            f" lists and\n!!! metrics below are meaningless; pass --checkpoint FILE for real results.\n{bar}")
        return model, True
    if not os.path.exists(checkpoint):
        raise CheckpointError(f"checkpoint not found: {checkpoint} (a .safetensors / .pt / .bin state dict, a "
                              "folder with model.safetensors + config.json, or preset:tiny|small|base)")
    try:
        model = LoCoRe.from_pretrained(checkpoint, device=device, dtype=dtype, **overrides)
    except CheckpointError:
        raise
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"could not load checkpoint {checkpoint}: {e}") from None
    return model, False


def model_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """The config overrides of the model options (see :func:`add_model_args`), for :func:`load_model`."""
    return {"num_attention_heads": args.num_attention_heads, "attention_window": args.attention_window,
            "num_layers": args.num_layers}


# --------------------------------------------------------------------------------------------------
# locore rerank
# --------------------------------------------------------------------------------------------------

@dataclass
class RerankReport:
    """What ``locore rerank`` computed: the ranks of each run, metrics, timings and the files written."""

    runs: Dict[str, np.ndarray] = field(default_factory=dict)        # run name -> ranks [Q, n]
    first_stage: Dict[str, np.ndarray] = field(default_factory=dict)  # run name -> first-stage ids [Q, n]
    stats: Dict[str, Any] = field(default_factory=dict)               # run name -> RerankStats
    metrics: Optional[dict] = None
    files: Dict[str, str] = field(default_factory=dict)               # run name -> ranks file
    json_path: Optional[str] = None
    gnd: Optional[list] = None
    model: Any = None
    random_weights: bool = False
    method: Any = None
    batch_size: int = 1                                              # queries per forward pass


SLIDING_DEFAULTS = {"shortlist": 400, "window": 100, "stride": 50}  # the paper's setting


def _method(args) -> Any:
    if args.sliding is not None:
        if args.topk is not None:
            raise SettingsError("give either --topk K or --sliding ORDER (with --shortlist/--window/--stride), not both")
        L, W, S = (getattr(args, k) if getattr(args, k) is not None else v for k, v in SLIDING_DEFAULTS.items())
        return Sliding(args.sliding, L, W, S)
    if any(v is not None for v in (args.shortlist, args.window, args.stride)):
        raise SettingsError("--shortlist, --window and --stride go with --sliding ORDER")
    k = args.topk if args.topk is not None else 100
    if k < 1:
        raise SettingsError(f"--topk must be ≥ 1 (got {k})")
    return TopK(k)


def _ranks_path(out: str, run: str, first: bool) -> str:
    """RANKS.npy for the first run, RANKS_{run}.npy for the next (``out`` ends with .npy)."""
    return out if first else f"{out[:-4]}_{run}.npy"


def _format_table(metrics: dict, protocol: str) -> str:
    lines = [f"metrics (protocol: {protocol}; in %)",
             f"{'split':<8} {'run':<8} {'stage':<12}" + "".join(f"{c:>8}" for c in METRIC_COLUMNS)]
    for split in SPLITS:
        if split not in metrics:
            continue
        m = metrics[split]
        for stage in ("first_stage", "reranked"):
            vals = "".join(f"{m[stage][c]:8.2f}" for c in METRIC_COLUMNS)
            lines.append(f"{split.capitalize():<8} {m['run']:<8} {stage.replace('_', ' '):<12}{vals}")
    return "\n".join(lines)


def execute_rerank(args: argparse.Namespace, model=None, log: Callable[[str], None] = print) -> RerankReport:
    """The body of ``locore rerank``; ``model`` skips loading one (the demo passes its own)."""
    opened: list = []
    try:
        return _execute_rerank(args, model, log, opened)
    finally:
        for reader in opened:
            reader.close()


def _execute_rerank(args, model, log, opened: list) -> RerankReport:
    report = RerankReport(method=_method(args))
    method = report.method
    use_global = not args.no_global
    files = locate_files(args.data, args.desc, nn=args.nn, gnd=args.gnd, use_global=use_global)

    # --- files: open lazily, check consistency before loading anything big -----------------------
    q_local = LocalFeatures(files.query_local, args.descriptors)
    opened.append(q_local)
    g_local = LocalFeatures(files.gallery_local, args.descriptors)
    opened.append(g_local)
    if q_local.dim != g_local.dim:
        raise DataError(f"query descriptors have D={q_local.dim} ({files.query_local}) but gallery descriptors "
                        f"D={g_local.dim} ({files.gallery_local})")
    q_global = g_global = None
    if use_global:
        q_global = GlobalFeatures(files.query_global, num_images=len(q_local))
        g_global = GlobalFeatures(files.gallery_global, num_images=len(g_local))
        if q_global.dim != g_global.dim:
            raise DataError(f"query global descriptors have dim {q_global.dim}, gallery ones {g_global.dim}")
    nn = read_neighbours(files.nn)
    if nn.num_queries != len(q_local):
        raise DataError(f"{files.nn} has lists for {nn.num_queries} queries, {files.query_local} holds "
                        f"{len(q_local)} query images")
    if nn.ids.size and nn.ids.max() >= len(g_local):
        raise DataError(f"{files.nn} refers to image id {nn.ids.max()}, but {files.gallery_local} holds only "
                        f"{len(g_local)} images")
    if method.shortlist > nn.topk:
        raise SettingsError(f"shortlist of {method.shortlist} images is longer than the neighbour lists in "
                            f"{files.nn} ({nn.topk} per query)")
    gnd = None
    if files.gnd is not None:
        gnd = read_gnd(files.gnd)["gnd"]
        if len(gnd) != nn.num_queries:
            raise DataError(f"{files.gnd} has ground truth for {len(gnd)} queries, {files.nn} lists for "
                            f"{nn.num_queries}")
    protocol = args.protocol or ("reference" if gnd is not None else "clean")
    if protocol == "reference" and gnd is None:
        raise DataError("the reference protocol needs the ground truth (it moves junk images to the end "
                        "before re-ranking): give --gnd FILE, or use --protocol clean")
    report.gnd = gnd

    # --- model --------------------------------------------------------------------------------------
    if model is None:
        model, report.random_weights = load_model(args.checkpoint, args.device, args.dtype, args.seed,
                                                  model_overrides(args), log=log)
    else:
        report.random_weights = args.checkpoint.startswith(PRESET_PREFIX)
    report.model = model
    cfg = model.config
    if q_local.dim != cfg.local_dim:
        raise DataError(f"local descriptors in {files.query_local} have D={q_local.dim}, but the checkpoint "
                        f"expects local_dim={cfg.local_dim}")
    if use_global:
        if cfg.global_dim is None:
            raise SettingsError("this checkpoint takes no global descriptors (it has no global_to_lm / global "
                                "token); add --no-global")
        if q_global.dim != cfg.global_dim:
            raise DataError(f"global descriptors in {files.gallery_global} have dim {q_global.dim} (inferred from "
                            f"the file size and {len(g_local)} images), but the checkpoint expects "
                            f"global_dim={cfg.global_dim}")
    T = tokens_per_image(q_local.num_descriptors, use_global)
    log(f"model: {cfg.num_layers} layers, hidden {cfg.hidden}, {cfg.num_attention_heads} heads, window "
        f"{cfg.attention_window}, on {model.device} in {str(model.dtype).replace('torch.', '')}; "
        f"{q_local.num_descriptors} descriptors{' + global' if use_global else ''} per image (T = {T})")
    log(f"data: {len(q_local)} queries, {len(g_local)} database images, first-stage lists of {nn.topk}; "
        f"{method.describe()}; alpha {args.alpha}, temp {args.temp}, mode {args.mode}; protocol {protocol}")

    batch_size = report.batch_size = args.batch_size or (8 if model.device.type == "cuda" else 1)
    reranker = DatasetReranker(model, q_local, g_local, q_global, g_global, alpha=args.alpha, temp=args.temp,
                               mode=args.mode, softmax=args.softmax, batch_size=batch_size,
                               cuda_graph=args.cuda_graph)
    queries = None if args.max_queries is None else np.arange(min(args.max_queries, nn.num_queries))
    eval_gnd = gnd if queries is None or gnd is None else [gnd[i] for i in queries]

    # --- runs -----------------------------------------------------------------------------------------
    runs = protocol_runs(protocol, args.split)
    metrics = {} if gnd is not None else None
    out = args.out if args.out.endswith(".npy") else args.out + ".npy"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for i, (run, splits) in enumerate(runs):
        if run == "clean":
            ids, sims = nn.ids, nn.sims
        else:
            ids, sims = protocol_first_stage(nn.ids, nn.sims, gnd, run)
        if queries is not None:
            ids, sims = ids[queries], sims[queries]
        ranks, stats = reranker.rerank(ids, sims, method, progress=not args.no_progress,
                                       desc=f"re-ranking ({run})")
        report.runs[run], report.first_stage[run], report.stats[run] = ranks, ids, stats
        path = _ranks_path(out, run, first=(i == 0))
        np.save(path, ranks.astype(np.int64))
        report.files[run] = path
        log(f"[{run}] {stats.summary()}; ranks {ranks.shape} -> {path}")
        if metrics is not None:
            before = revisited_metrics(ids, eval_gnd, splits)
            after = revisited_metrics(ranks, eval_gnd, splits)
            for s in splits:
                metrics[s] = {"run": run, "first_stage": {k: round(v, 2) for k, v in before[s].items()},
                              "reranked": {k: round(v, 2) for k, v in after[s].items()}}
    report.metrics = metrics
    if metrics is not None:
        log(_format_table(metrics, protocol))

    total_q = sum(s.queries for s in report.stats.values())
    total_s = max(sum(s.seconds for s in report.stats.values()), 1e-9)
    total_p = sum(s.forward_passes for s in report.stats.values())
    log(f"throughput: {total_q / total_s:.2f} queries/s, {total_p / total_s:.2f} forward passes/s "
        f"(batch size {batch_size}, {total_p} passes over {len(runs)} run(s), {total_s:.2f} s)")

    summary = {
        "command": "rerank", "protocol": protocol, "data": os.path.abspath(args.data), "desc": args.desc,
        "nn": files.nn, "gnd": files.gnd, "checkpoint": args.checkpoint, "random_weights": report.random_weights,
        "method": {"kind": "topk" if isinstance(method, TopK) else "sliding", **dataclasses.asdict(method)},
        "alpha": args.alpha, "temp": args.temp, "mode": args.mode, "softmax": args.softmax,
        "descriptors": q_local.num_descriptors, "global": use_global, "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""), "batch_size": batch_size,
        "queries": total_q // max(len(runs), 1), "ranks": {r: os.path.abspath(p) for r, p in report.files.items()},
        "metrics": metrics, "throughput": {r: s.as_dict() for r, s in report.stats.items()},
    }
    report.json_path = out[:-4] + ".json"
    with open(report.json_path, "w") as f:
        json.dump(summary, f, indent=2)
    log(f"metrics and settings -> {report.json_path}")
    return report


def _cmd_rerank(args: argparse.Namespace) -> int:
    execute_rerank(args)
    return 0


# --------------------------------------------------------------------------------------------------
# locore eval
# --------------------------------------------------------------------------------------------------

def _int_list(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _cmd_eval(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.ranks):
        raise DataError(f"ranks file not found: {args.ranks}")
    ranks = np.load(args.ranks, allow_pickle=False)
    if ranks.ndim != 2:
        raise DataError(f"{args.ranks}: expected ranks [num_queries, n], got shape {ranks.shape}")
    result: Dict[str, Any] = {"command": "eval", "ranks": os.path.abspath(args.ranks)}
    if args.gnd is not None:
        gnd = read_gnd(args.gnd)["gnd"]
        if len(gnd) != ranks.shape[0]:
            raise DataError(f"{args.ranks} ranks {ranks.shape[0]} queries, {args.gnd} has {len(gnd)}")
        splits = SPLITS if args.split == "all" else tuple(args.split.split(","))
        m = revisited_metrics(ranks, gnd, splits)
        result.update(gnd=os.path.abspath(args.gnd), metrics={s: {k: round(v, 2) for k, v in m[s].items()}
                                                                for s in splits})
        print(f"{'split':<8}" + "".join(f"{c:>8}" for c in METRIC_COLUMNS))
        for s in splits:
            print(f"{s.capitalize():<8}" + "".join(f"{m[s][c]:8.2f}" for c in METRIC_COLUMNS))
    elif args.query_labels is not None and args.db_labels is not None:
        ql, dl = np.load(args.query_labels), np.load(args.db_labels)
        if len(ql) != ranks.shape[0]:
            raise DataError(f"{args.query_labels} has {len(ql)} labels for {ranks.shape[0]} ranked queries")
        qids = np.load(args.query_db_ids) if args.query_db_ids else None
        rec = recall_at_k(ranks, ql, dl, args.recall_k, qids)
        mapr = map_at_r(ranks, ql, dl, qids)
        result["metrics"] = {**{f"R@{k}": round(100 * v, 2) for k, v in rec.items()}, "MAP@R": round(100 * mapr, 2)}
        print("  ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items()) + "   (in %)")
    else:
        raise SettingsError("give --gnd FILE (revisited Oxford/Paris) or --query-labels and --db-labels "
                            "(class-level sets)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"-> {args.json}")
    return 0


# --------------------------------------------------------------------------------------------------
# locore bench / demo
# --------------------------------------------------------------------------------------------------

BENCH_SCRIPTS = {"model": "bench_model.py", "attention": "bench_attention.py"}


def find_benchmarks() -> Optional[str]:
    """The ``benchmarks/`` folder of a source checkout: the current directory's, else the one beside an
    editable install of this package; None for a plain install (the benchmarks are not packaged)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.getcwd(), os.path.dirname(os.path.dirname(here))):
        folder = os.path.join(root, "benchmarks")
        if os.path.isfile(os.path.join(folder, BENCH_SCRIPTS["model"])):
            return folder
    return None


def _cmd_bench(argv: Sequence[str]) -> int:
    """``locore bench [model|attention] ARGS``: run a checkout's benchmark script with ARGS."""
    import subprocess

    argv = list(argv)
    which = argv.pop(0) if argv and argv[0] in BENCH_SCRIPTS else "model"
    folder = find_benchmarks()
    if folder is None:
        print("locore bench: no benchmarks/ folder found (neither in the current directory nor beside this "
              "package): the benchmarks ship with the source checkout, not with the installed package; run "
              "`locore bench` from the repository root", file=sys.stderr)
        return 2
    return subprocess.run([sys.executable, os.path.join(folder, BENCH_SCRIPTS[which]), *argv]).returncode


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser, checkpoint_required: bool) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=checkpoint_required, default=None if checkpoint_required else "preset:tiny",
                   metavar="CKPT",
                   help="LoCoRE checkpoint: a .safetensors / .pt / .bin state dict in the reference layout, or a "
                        "folder with model.safetensors + config.json; 'preset:tiny|small|base' builds a model with "
                        "RANDOM weights (for trying the pipeline; results are meaningless)"
                        + ("" if checkpoint_required else " (default: preset:tiny)"))
    g.add_argument("--num-attention-heads", type=int, metavar="H",
                   help="attention heads (not recoverable from weights; default: config.json beside the "
                        "checkpoint, else hidden/64)")
    g.add_argument("--attention-window", type=int, metavar="W",
                   help="Longformer attention window, even (one-sided window W/2; default: config.json, else 512)")
    g.add_argument("--num-layers", type=int, metavar="N",
                   help="keep only the first N encoder layers (LoCoRE small = base with 6)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights of a preset: checkpoint (default 0)")
    g.add_argument("--device", metavar="D",
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    g.add_argument("--dtype", metavar="T", choices=("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
                   help="model precision: float32 (default; exact, no TF32) | bfloat16 | float16")


def add_rerank_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    if not demo:
        g = p.add_argument_group("data (AMES layout)")
        g.add_argument("--data", required=True, metavar="DIR",
                       help="dataset folder with {desc}_query_local.hdf5, {desc}_gallery_local.hdf5, "
                            "{desc}_query_global.pt, {desc}_gallery_global.pt, nn_{desc}.pkl, gnd_*.pkl")
        g.add_argument("--desc", required=True, metavar="NAME", help="descriptor name in the file names, e.g. dinov2")
        g.add_argument("--nn", metavar="FILE", help="first-stage neighbour pickle [2, Q, topk] (default DIR/nn_{desc}.pkl)")
        g.add_argument("--gnd", metavar="FILE",
                       help="ground-truth pickle (default: the one DIR/gnd_*.pkl; without one, no metrics)")
        g.add_argument("--max-queries", type=int, metavar="N", help="re-rank only the first N queries (quick looks)")
    g = p.add_argument_group("re-ranking")
    g.add_argument("--descriptors", type=int, default=48, metavar="S",
                   help="local descriptors (leading slots) per image (default 48, the released model)")
    g.add_argument("--no-global", action="store_true",
                   help="feed no global descriptors (no global token; for checkpoints trained without them)")
    g.add_argument("--alpha", type=float, required=not demo, default=0.5 if demo else None, metavar="A",
                   help="fusion weight of the first-stage similarity: s = A*global_sim + (1-A)*sigmoid(T*local)"
                        + (" (default 0.5)" if demo else " (released: 0.5)"))
    g.add_argument("--temp", type=float, required=not demo, default=0.5 if demo else None, metavar="T",
                   help="temperature T of the local score in the fusion" + (" (default 0.5)" if demo else
                                                                              " (released: 0.5 or 0.1)"))
    g.add_argument("--mode", choices=SCORE_MODES, default="max-end",
                   help="image score read from the token logits (default max-end, as the sliding path uses)")
    g.add_argument("--softmax", action="store_true", help="score with softmax(logits)[1] instead of the raw logit")
    dflt = DEMO_SLIDING if demo else SLIDING_DEFAULTS
    g.add_argument("--topk", type=int, metavar="K",
                   help="plain re-ranking of the first K images in one forward pass"
                        + (" (instead of the default sliding windows)" if demo else " (default 100 unless --sliding)"))
    g.add_argument("--sliding", choices=ORDERS, metavar="ORDER",
                   help="sliding-window re-ranking, ORDER one of: " + ", ".join(ORDERS)
                        + (f" (default {DEMO_SLIDING['order']} unless --topk)" if demo else ""))
    g.add_argument("--shortlist", type=int, metavar="L",
                   help=f"images re-ranked with --sliding (default {dflt['shortlist']})")
    g.add_argument("--window", type=int, metavar="W",
                   help=f"images per forward pass with --sliding (default {dflt['window']}); "
                        "(1 + W) * T tokens must fit in the position table")
    g.add_argument("--stride", type=int, metavar="S",
                   help=f"window stride with --sliding (default {dflt['stride']}); a start below 0 is "
                        "clamped to 0, a repeated window dropped")
    g.add_argument("--protocol", choices=("reference", "clean"), default=None,
                   help="reference: per split, move junk (Hard: junk + easy) images to the end of the first-stage "
                        "list before re-ranking, as the paper's code does; clean: re-rank the list as it is "
                        "(default: reference when a ground truth is found, else clean)")
    g.add_argument("--split", choices=("medium", "hard", "both"), default="both",
                   help="revisited splits to report (default both; Easy is reported with medium / clean)")
    g.add_argument("--batch-size", type=int, metavar="B",
                   help="queries whose windows share one forward pass (default 8 on CUDA, 1 on CPU)")
    g.add_argument("--cuda-graph", action="store_true",
                   help="replay a captured CUDA graph per window shape (CUDA only)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="locore", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="LOCORE_DEBUG=1 shows tracebacks for input errors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{rerank,eval,bench,demo}")

    p = sub.add_parser("rerank", help="re-rank first-stage lists of an AMES-layout dataset and evaluate them",
                       description="Re-rank the first-stage neighbour lists of a dataset with LoCoRE, write the "
                                   "ranks (int64 [num_queries, n] database ids, best first: the re-ordered "
                                   "shortlist, then the untouched rest) and a metrics table as JSON beside them.\n\n"
                                   + EXPECTED_LAYOUT,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, checkpoint_required=True)
    add_rerank_args(p)
    p.add_argument("--out", required=True, metavar="RANKS.npy",
                   help="ranks file; with --protocol reference --split both the hard run goes to RANKS_hard.npy; "
                        "metrics and settings to RANKS.json")
    p.set_defaults(func=_cmd_rerank)

    p = sub.add_parser("eval", help="evaluate a ranks file (revisited mAP / mP@k, or Recall@k and MAP@R)",
                       description="Evaluate ranks [num_queries, n] (database ids, best first).")
    p.add_argument("--ranks", required=True, metavar="RANKS.npy", help="int ranks [num_queries, n]")
    p.add_argument("--gnd", metavar="FILE", help="revisited ground-truth pickle (easy / hard / junk per query)")
    p.add_argument("--split", default="all", metavar="SPLITS",
                   help="with --gnd: comma-separated among easy, medium, hard (default all)")
    p.add_argument("--query-labels", metavar="Q.npy", help="class-level sets: class of each query")
    p.add_argument("--db-labels", metavar="D.npy", help="class-level sets: class of each database image")
    p.add_argument("--query-db-ids", metavar="IDS.npy",
                   help="class-level sets: each query's own database id, removed from its list (queries in the db)")
    p.add_argument("--recall-k", type=_int_list, default=[1, 10], metavar="K1,K2",
                   help="Recall@k cut-offs (default 1,10; SOP 1,10; CUB 1,2,4,8; In-Shop 1,10,20,30)")
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    p.set_defaults(func=_cmd_eval)

    sub.add_parser("bench", add_help=False,
                   help="run the checkout's benchmarks: locore bench [model|attention] ARGS (see benchmarks/README.md)")

    p = sub.add_parser("demo", help="generate a small retrieval problem and run the whole pipeline on it",
                       description="Generate (seeded) a small retrieval problem in the AMES layout, re-rank it, "
                                   "evaluate it, and print a re-ranked list, latency per shortlist, peak memory and "
                                   "the fp32 agreement with the float64 reference path. The weights are random "
                                   "unless --checkpoint FILE is given.")
    add_model_args(p, checkpoint_required=False)
    add_rerank_args(p, demo=True)
    g = p.add_argument_group("generated problem")
    g.add_argument("--out-dir", metavar="DIR", help="write the dataset and results here (default: a temporary folder, "
                                                    "removed afterwards)")
    g.add_argument("--queries", type=int, default=8, help="queries (default 8)")
    g.add_argument("--images", type=int, default=300, help="database images (default 300)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the generated data (default 0)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        if not _is_user_error(e) or os.environ.get("LOCORE_DEBUG"):
            raise
        print(f"locore {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
