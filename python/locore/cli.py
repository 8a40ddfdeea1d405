"""Command-line interface: ``locore rerank | search | eval | bench | demo``.

``locore rerank`` re-ranks first-stage neighbour lists of a dataset in the AMES layout with a LoCoRE
model and evaluates them; ``locore eval`` evaluates a ranks file; ``locore bench`` runs the
benchmarks; ``locore demo`` runs the whole pipeline on a generated problem.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from . import distributed, pipeline
from .data import EXPECTED_LAYOUT, DataError, UnsafePickleError, read_gnd, read_ranks
from .evaluate import GLDV2_PROTOCOLS, SPLITS, gldv2_metrics, is_gldv2_gnd, map_at_r, recall_at_k, revisited_metrics
from .pipeline import (METRIC_COLUMNS, PROTOCOLS, SLIDING_DEFAULTS, DataSettings, ModelSettings, RerankOptions,
                       atomic_write_all, check_output)
from .rerank import ORDERS, SettingsError, Sliding, TopK, check_alpha, check_count, check_temp
from .scoring import DEFAULT_MODE, MODE_NAMES

DEMO_SLIDING = {"order": "end-to-start", "shortlist": 40, "window": 20, "stride": 10}

# Errors a user can fix: printed as one message, no traceback (LOCORE_DEBUG=1 shows it); plus
# locore.checkpoint.CheckpointError (imported lazily: it pulls in torch).
USER_ERRORS = (DataError, SettingsError, UnsafePickleError, FileNotFoundError, distributed.DistributedError)


def _is_user_error(e: BaseException) -> bool:
    if isinstance(e, USER_ERRORS):
        return True
    ckpt, train = sys.modules.get("locore.checkpoint"), sys.modules.get("locore.train")
    return (ckpt is not None and isinstance(e, ckpt.CheckpointError)) or (train is not None
                                                                          and isinstance(e, train.TrainError))


# --------------------------------------------------------------------------------------------------
# Flags -> settings (argparse types refuse nonsense values at parse time, with the settings' own checks)
# --------------------------------------------------------------------------------------------------

def _checked(convert: Callable[[str], Any], check: Callable[[Any], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return check(convert(text))
        except ValueError as e:  # SettingsError included
            raise argparse.ArgumentTypeError(str(e) if isinstance(e, SettingsError) else
                                             f"expected a number, got {text!r}") from None
    parse.__name__ = getattr(check, "__name__", "value")
    return parse


def _count(what: str) -> Callable[[str], int]:
    return _checked(int, lambda n: check_count(what, n))


def _count_list(text: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def model_settings(args: argparse.Namespace) -> ModelSettings:
    return ModelSettings(args.checkpoint, device=args.device, dtype=args.dtype, seed=args.seed,
                         num_attention_heads=args.num_attention_heads, attention_window=args.attention_window,
                         num_layers=args.num_layers)


def _method(args: argparse.Namespace, defaults: Dict[str, Any], default_sliding: Optional[str]) -> Any:
    if args.sliding is not None and args.topk is not None:
        raise SettingsError("give either --topk K or --sliding ORDER (with --shortlist/--window/--stride), not both")
    order = args.sliding if args.topk is None else None
    order = order or (default_sliding if args.topk is None else None)
    if order is not None:
        L, W, S = (getattr(args, k) if getattr(args, k) is not None else defaults[k]
                   for k in ("shortlist", "window", "stride"))
        return Sliding(order, L, W, S)
    if any(v is not None for v in (args.shortlist, args.window, args.stride)):
        raise SettingsError("--shortlist, --window and --stride go with --sliding ORDER")
    return TopK(args.topk if args.topk is not None else 100)


def rerank_options(args: argparse.Namespace, demo: bool = False) -> RerankOptions:
    method = _method(args, DEMO_SLIDING if demo else SLIDING_DEFAULTS, DEMO_SLIDING["order"] if demo else None)
    return RerankOptions(alpha=args.alpha, temp=args.temp, method=method, mode=args.mode, softmax=args.softmax,
                         protocol=args.protocol, split=args.split, batch_size=args.batch_size,
                         cuda_graph=args.cuda_graph, max_queries=getattr(args, "max_queries", None),
                         progress=not args.no_progress, resume=getattr(args, "resume", False),
                         save_every=getattr(args, "save_every", 16))


# --------------------------------------------------------------------------------------------------
# locore rerank
# --------------------------------------------------------------------------------------------------

def _cmd_rerank(args: argparse.Namespace) -> int:
    shards = args.gallery_shards
    data = DataSettings(args.data, args.desc, nn=args.nn, gnd=args.gnd, descriptors=args.descriptors,
                        use_global=not args.no_global, distractors=args.distractors,
                        gallery_shards=None if shards is None else shards[0] if len(shards) == 1 else tuple(shards),
                        first_stage=args.first_stage, first_stage_topk=args.first_stage_topk)
    pipeline.rerank(model_settings(args), data, rerank_options(args), args.out)
    return 0


# --------------------------------------------------------------------------------------------------
# locore eval
# --------------------------------------------------------------------------------------------------

def _cmd_eval(args: argparse.Namespace) -> int:
    if args.json:
        check_output([args.json])
    result: Dict[str, Any] = {"command": "eval", "ranks": os.path.abspath(args.ranks)}
    if args.gnd is not None:
        data = read_gnd(args.gnd)
        gnd = data["gnd"]
        protocol = args.protocol or ("gldv2-test" if is_gldv2_gnd(gnd) else "revisited")
        # gldv2-val ranks cover the gnd without its 750 trailing entries (or all of it)
        ranks = read_ranks(args.ranks, num_images=args.num_images or len(data["imlist"]) or None,
                           num_queries=None if protocol == "gldv2-val" else len(gnd))
        result["gnd"] = os.path.abspath(args.gnd)
    else:
        ranks = read_ranks(args.ranks, num_images=args.num_images)
    if args.gnd is not None and protocol in GLDV2_PROTOCOLS:
        try:
            m = gldv2_metrics(ranks, gnd, protocol)
        except ValueError as e:
            raise DataError(f"{args.ranks} / {args.gnd}: {e}") from None
        result.update(protocol=protocol, metrics={"mAP@100": {k: round(v, 2) for k, v in m.items()}})
        print(f"{protocol} mAP@100 (in %): " + "  ".join(f"{k} {v:.2f}" for k, v in m.items()))
    elif args.gnd is not None:
        splits = SPLITS if args.split == "all" else tuple(args.split.split(","))
        m = revisited_metrics(ranks, gnd, splits)
        result.update(metrics={s: {k: round(v, 2) for k, v in m[s].items()} for s in splits})
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
        atomic_write_all([(args.json, lambda f: f.write(json.dumps(result, indent=2).encode()))])
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
    from .demo import DemoSettings, run_demo

    settings = DemoSettings(model=model_settings(args), options=rerank_options(args, demo=True),
                            descriptors=args.descriptors, use_global=not args.no_global, queries=args.queries,
                            images=args.images, data_seed=args.data_seed, out_dir=args.out_dir)
    return run_demo(settings)


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
        g.add_argument("--distractors", metavar="DIR1M",
                       help="+1M: folder with {desc}_local.hdf5 and {desc}_global.pt appended after the gallery "
                            "(ids n..n+1M-1; nothing copied; --nn must list ids over the combined database)")
        g.add_argument("--gallery-shards", nargs="+", metavar="FILE",
                       help="gallery local descriptors as shard files in id order: one glob "
                            "(e.g. 'DIR/dinov2_gallery_local_xa?.hdf5') or the files (default: DIR/{desc}_gallery_local"
                            ".hdf5, else its _xaa, _xab, ... shards)")
        g.add_argument("--max-queries", type=_count("--max-queries"), metavar="N", help="re-rank only the first N queries (quick looks)")
        g.add_argument("--first-stage", choices=("faiss", "flat", "ivf", "hnsw"), metavar="{faiss,ivf,hnsw}",
                       help="without the nn file, build it first with locore search: faiss (= flat) exact "
                            "inner product, or the ivf / hnsw approximate index; an existing file is used as is")
        g.add_argument("--first-stage-topk", type=_count("--first-stage-topk"), default=1600, metavar="M",
                       help="neighbours kept by --first-stage (default 1600, at most the database size)")
        g = p.add_argument_group("many processes (torchrun -m locore rerank ...) and resumable runs")
        g.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from its work folder RANKS.work beside --out (same command "
                            "and inputs; another run's folder is refused); without it an existing work folder is "
                            "reported and nothing runs")
        g.add_argument("--save-every", type=_count("--save-every"), default=16, metavar="N",
                       help="each process saves its finished queries to the work folder every N queries (default 16)")
    g = p.add_argument_group("re-ranking")
    g.add_argument("--descriptors", type=int, default=48, metavar="S",
                   help="local descriptors (leading slots) per image (default 48, the released model)")
    g.add_argument("--no-global", action="store_true",
                   help="feed no global descriptors (no global token; for checkpoints trained without them)")
    g.add_argument("--alpha", type=_checked(float, check_alpha), required=not demo, default=0.5 if demo else None, metavar="A",
                   help="fusion weight of the first-stage similarity: s = A*global_sim + (1-A)*sigmoid(T*local)"
                        + (" (default 0.5)" if demo else " (released: 0.5)"))
    g.add_argument("--temp", type=_checked(float, check_temp), required=not demo, default=0.5 if demo else None, metavar="T",
                   help="temperature T of the local score in the fusion" + (" (default 0.5)" if demo else
                                                                              " (released: 0.5 or 0.1)"))
    g.add_argument("--mode", choices=MODE_NAMES, default=DEFAULT_MODE,
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
    g.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="reference: per split, move junk (Hard: junk + easy) images to the end of the first-stage "
                        "list before re-ranking, as the paper's code does; clean: re-rank the list as it is; "
                        "gldv2-test / gldv2-val: GLDv2 mAP@100 (public / private / combined; gldv2-val re-ranks "
                        "all but the gnd's last 750 queries) (default: reference for a revisited ground truth, "
                        "gldv2-test for one with 'ok' lists, clean without one)")
    g.add_argument("--split", choices=("medium", "hard", "both"), default="both",
                   help="revisited splits to report (default both; Easy is reported with medium / clean)")
    g.add_argument("--batch-size", type=_count("--batch-size"), metavar="B",
                   help="queries whose windows share one forward pass (default 8 on CUDA, 1 on CPU)")
    g.add_argument("--cuda-graph", action="store_true",
                   help="replay a captured CUDA graph per window shape (CUDA only)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


# --- locore train (issue 16): argparse -> locore.train.TrainSettings ------------------------------

def add_train_parser(sub: Any) -> None:
    # defaults live in locore.train.TrainSettings (torch is imported only when the command runs)
    keep_default = argparse.SUPPRESS
    p = sub.add_parser("train", help="fine-tune a LoCoRE model list-wise on first-stage lists (SPEC section 10)",
                       description="List-wise fine-tuning: samples = a query + K images of its first-stage list "
                                   "(at most --max-pos positives, shuffled), token labels, mean 2-class "
                                   "cross-entropy; AdamW, constant lr. Checkpoints (published key layout + "
                                   "config.json + optimizer state) go to OUT/step-NNNNNN/; a rerun resumes from "
                                   "the last one. Under torchrun it trains data-parallel (DDP).\n\n" + EXPECTED_LAYOUT,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="preset:tiny", metavar="CKPT",
                   help="start from a published-layout checkpoint (file or folder) or preset:tiny|small|base "
                        "(random init; default preset:tiny)")
    p.add_argument("--num-attention-heads", type=int, metavar="H", help="override (see locore rerank)")
    p.add_argument("--attention-window", type=int, metavar="W", help="override (see locore rerank)")
    p.add_argument("--num-layers", type=int, metavar="N", help="keep only the first N encoder layers")
    p.add_argument("--data", required=True, metavar="DIR", help="training dataset folder (AMES layout)")
    p.add_argument("--desc", required=True, metavar="NAME", help="descriptor name in the file names")
    p.add_argument("--nn", metavar="FILE", help="first-stage lists (default DIR/nn_{desc}.pkl)")
    p.add_argument("--gnd", metavar="FILE", help="ground truth: revisited easy/hard/junk or GLDv2 ok lists "
                                                 "(default: the one DIR/gnd_*.pkl)")
    p.add_argument("--query-labels", metavar="Q.npy", help="class labels of the queries (instead of a gnd)")
    p.add_argument("--db-labels", metavar="D.npy", help="class labels of the database images")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder (resumed from when it has one)")
    p.add_argument("--no-resume", action="store_true", help="start over even if DIR holds checkpoints")
    for flag, typ, help_ in (
            ("--list-size", int, "K gallery images per sample (default 100)"),
            ("--topk", int, "sample from the first topk of each list (default 100)"),
            ("--max-pos", int, "positives per sample at most (default 5)"),
            ("--descriptors", int, "local descriptors per image (default 48)"),
            ("--batch-size", int, "samples per process per micro-batch (default 8)"),
            ("--grad-accum", int, "micro-batches per optimizer step (default 1)"),
            ("--lr", float, "AdamW learning rate, constant (default 5e-5, published)"),
            ("--weight-decay", float, "AdamW weight decay (default 0, published)"),
            ("--max-grad-norm", float, "gradient clipping, 0 = off (default 1.0)"),
            ("--epochs", float, "passes over the training queries (default 3, published)"),
            ("--max-steps", int, "stop after N optimizer steps (overrides --epochs)"),
            ("--max-seconds", float, "training time budget; saves when reached"),
            ("--hidden-dropout", float, "dropout of the hidden states (default 0.1)"),
            ("--attention-dropout", float, "dropout of the attention probabilities (default 0; > 0 trains on the "
                                           "dense O(N^2) reference attention)"),
            ("--holdout", int, "queries held out for the held-out mAP (default 0)"),
            ("--eval-every", int, "held-out mAP every N steps (default: at the end)"),
            ("--save-every", int, "checkpoint every N steps (default: at the end)"),
            ("--keep", int, "step checkpoints kept (default 2)"),
            ("--seed", int, "seed of samples, dropout and preset weights (default 0)")):
        p.add_argument(flag, type=typ, default=keep_default, metavar="X", help=help_)
    p.add_argument("--attention", choices=("cpu", "triton", "reference"), default=keep_default,
                   help="trainable attention backend (default: the memory-lean backward for the device)")
    p.add_argument("--no-global", action="store_true", help="no global descriptors (no global token)")
    p.add_argument("--device", metavar="D", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from .train import TrainSettings, train

    overrides = {k: getattr(args, k) for k in ("num_attention_heads", "attention_window", "num_layers")
                 if getattr(args, k) is not None}
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    given = {k: v for k, v in vars(args).items() if k in names and k not in ("device",)}
    s = TrainSettings(**given, out_dir=args.out, device=args.device, overrides=overrides,
                      resume=not args.no_resume, use_global=not args.no_global, progress=not args.no_progress)
    result = train(s)
    print(f"checkpoint: {result.checkpoint} (step {result.steps}; use it as --checkpoint)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="locore", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="LOCORE_DEBUG=1 shows tracebacks for input errors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{rerank,search,eval,bench,demo,train}")

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
    p.add_argument("--protocol", choices=("revisited",) + GLDV2_PROTOCOLS, default=None,
                   help="with --gnd: revisited (mAP / mP@k per split) or GLDv2 mAP@100 (default: gldv2-test for a "
                        "ground truth with 'ok' lists, else revisited)")
    p.add_argument("--num-images", type=_count("--num-images"), metavar="N",
                   help="database size: ids must lie in [0, N) (default: the gnd's imlist length; give the "
                        "gallery + distractors size for +1M ranks)")
    p.add_argument("--query-labels", metavar="Q.npy", help="class-level sets: class of each query")
    p.add_argument("--db-labels", metavar="D.npy", help="class-level sets: class of each database image")
    p.add_argument("--query-db-ids", metavar="IDS.npy",
                   help="class-level sets: each query's own database id, removed from its list (queries in the db)")
    p.add_argument("--recall-k", type=_count_list, default=[1, 10], metavar="K1,K2",
                   help="Recall@k cut-offs (default 1,10; SOP 1,10; CUB 1,2,4,8; In-Shop 1,10,20,30)")
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    p.set_defaults(func=_cmd_eval)

    from .search import add_search_args  # torch-only; FAISS imported only for ivf / hnsw

    p = sub.add_parser("search", help="first stage: top-M inner-product search over the global descriptors",
                       description="Search the gallery (and --distractors) global descriptors with the query "
                                   "ones and write the first-stage lists [2, Q, M] (similarities, ids) that "
                                   "locore rerank reads. flat is exact (ties to the smaller id).")
    add_search_args(p)
    p.set_defaults(func=_cmd_search)

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
    g.add_argument("--queries", type=_count("--queries"), default=8, help="queries (default 8)")
    g.add_argument("--images", type=_count("--images"), default=300,
                   help="database images (default 300; at least 14 per query: the planted matches)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the generated data (default 0)")
    p.set_defaults(func=_cmd_demo)
    add_train_parser(sub)
    return parser


def _cmd_search(args: argparse.Namespace) -> int:
    """``locore search``; under torchrun the flat search splits the database between the processes."""
    from .search import SearchSettings, cmd_search

    if not distributed.launched_by_torchrun():
        return cmd_search(args)
    settings = SearchSettings(topk=args.topk, index=args.index, block_mb=args.block_mb, device=args.device,
                              overwrite=args.overwrite, progress=not args.no_progress)
    pipeline.sharded_search(args.data, args.desc, settings, out=args.out, distractors=args.distractors, dim=args.dim)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"locore {args.command}: interrupted; no results written (earlier output files are unchanged)",
              file=sys.stderr)
        return 130
    except Exception as e:
        if not _is_user_error(e) or os.environ.get("LOCORE_DEBUG"):
            raise
        if os.environ.get("RANK", "0") == "0" or not isinstance(e, distributed.DistributedError):
            print(f"locore {args.command}: error: {e}", file=sys.stderr)  # an agreed error once, not K times
        return 2


if __name__ == "__main__":
    sys.exit(main())
