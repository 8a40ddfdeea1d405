"""The application layer: settings, model loading, opening a dataset, a re-ranking run, writing results.

    model_settings = ModelSettings("locore_base.safetensors")
    options = RerankOptions(alpha=0.5, temp=0.5, method=Sliding("end-to-start", 400, 100, 50))
    report = rerank(model_settings, DataSettings("data/roxford5k", "dinov2"), options, out="ranks.npy")

``locore rerank`` maps its flags to these settings and calls :func:`rerank`; ``locore demo`` builds
them directly. The pieces (:func:`load_model`, :func:`open_dataset`, :func:`run`, :func:`write_results`)
are there for callers that bring their own model or data.

Outputs are all-or-nothing: :func:`write_results` writes every file of a run to a temporary file beside
its target and renames them only once all are written, so a failed or interrupted run leaves earlier
results byte-identical. Output paths are checked (:func:`check_output`) before any work starts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from . import distributed
from .data import (AmesFiles, ConcatGlobal, Database, DataError, GlobalFeatures, LocalFeatures, Neighbours, locate_files,
                   open_database, read_gnd, read_neighbours)
from .evaluate import (GLDV2_PRIVATE, GLDV2_PROTOCOLS, KAPPAS, SPLITS, gldv2_metrics, is_gldv2_gnd, protocol_first_stage,
                       protocol_runs, revisited_metrics)
from .rerank import (DatasetReranker, RerankStats, SettingsError, Sliding, TopK, check_alpha, check_count,
                     check_temp, tokens_per_image)
from .scoring import DEFAULT_MODE, MODE_NAMES

PRESET_PREFIX = "preset:"
SLIDING_DEFAULTS = {"shortlist": 400, "window": 100, "stride": 50}  # the paper's setting
PROTOCOLS = ("reference", "clean") + GLDV2_PROTOCOLS
RUN_SPLITS = ("medium", "hard", "both")
METRIC_COLUMNS = ("mAP",) + tuple(f"mP@{k}" for k in KAPPAS)  # revisited metrics, in table order

Log = Callable[[str], None]
Method = Union[TopK, Sliding]


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSettings:
    """Which model to run, where: a checkpoint path or ``preset:NAME`` (random weights), plus the config
    overrides a checkpoint cannot tell (heads, window) and the first ``num_layers`` layers to keep."""

    checkpoint: str
    device: Optional[str] = None        # None: cuda when available, else cpu
    dtype: Optional[str] = None         # None: float32
    seed: int = 0                       # seed of a preset's random weights
    num_attention_heads: Optional[int] = None
    attention_window: Optional[int] = None
    num_layers: Optional[int] = None

    def overrides(self) -> Dict[str, Any]:
        """The config overrides that are set, for ``LoCoRe.from_pretrained`` / ``LoCoRe.preset``."""
        named = {"num_attention_heads": self.num_attention_heads, "attention_window": self.attention_window,
                 "num_layers": self.num_layers}
        return {k: v for k, v in named.items() if v is not None}

    @property
    def random_weights(self) -> bool:
        return self.checkpoint.startswith(PRESET_PREFIX)


@dataclass(frozen=True)
class DataSettings:
    """A dataset in the AMES layout (``locore.data.EXPECTED_LAYOUT``)."""

    data: str                           # the folder
    desc: str                           # descriptor name in the file names, e.g. dinov2
    nn: Optional[str] = None            # first-stage pickle (default DIR/nn_{desc}.pkl)
    gnd: Optional[str] = None           # ground truth (default: the one DIR/gnd_*.pkl; none: no metrics)
    descriptors: int = 48               # local descriptors (leading slots) per image
    use_global: bool = True             # feed the global descriptors (a global token per image)
    distractors: Optional[str] = None   # folder with {desc}_local.hdf5 + {desc}_global.pt (+1M), after the gallery
    gallery_shards: Optional[Union[str, Tuple[str, ...]]] = None  # gallery local files in id order (glob or list)
    first_stage: Optional[str] = None   # no nn file: build it first (locore.search): faiss|flat, ivf, hnsw
    first_stage_topk: int = 1600        # neighbours it keeps (at most the database size)

    def __post_init__(self) -> None:
        check_count("descriptors per image", self.descriptors)


@dataclass(frozen=True)
class RerankOptions:
    """How to re-rank: fusion (alpha, temp), method (top-k or sliding windows), score mode, protocol."""

    alpha: float
    temp: float
    method: Method = TopK(100)
    mode: str = DEFAULT_MODE
    softmax: bool = False
    protocol: Optional[str] = None      # reference | clean; None: reference when a ground truth is found
    split: str = "both"                 # medium | hard | both (revisited splits to report)
    batch_size: Optional[int] = None    # queries per forward pass; None: 8 on CUDA, 1 on CPU
    cuda_graph: bool = False
    max_queries: Optional[int] = None   # re-rank only the first N queries
    progress: bool = True
    resume: bool = False                # continue from the work folder beside the output (distributed.WorkFolder)
    save_every: int = 16                # each process saves its finished queries every N queries

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        check_temp(self.temp)
        if self.mode not in MODE_NAMES:
            raise SettingsError(f"mode must be one of {', '.join(MODE_NAMES)}, got {self.mode!r}")
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise SettingsError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.split not in RUN_SPLITS:
            raise SettingsError(f"split must be one of {', '.join(RUN_SPLITS)}, got {self.split!r}")
        if self.batch_size is not None:
            check_count("batch size", self.batch_size)
        if self.max_queries is not None:
            check_count("max queries", self.max_queries)
        check_count("save every", self.save_every)
        if isinstance(self.method, TopK):
            check_count("top-k", self.method.k)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

def load_model(settings: ModelSettings, log: Log = print):
    """``LoCoRe.from_pretrained(checkpoint)``, or ``LoCoRe.preset(name)`` for ``preset:NAME`` (random
    weights, announced loudly). Returns ``(model, random_weights)``."""
    from .checkpoint import CheckpointError
    from .model import LoCoRe

    checkpoint, overrides = settings.checkpoint, settings.overrides()
    if checkpoint.startswith(PRESET_PREFIX):
        name = checkpoint[len(PRESET_PREFIX):]
        try:
            model = LoCoRe.preset(name, device=settings.device, dtype=settings.dtype, seed=settings.seed,
                                  **overrides)
        except ValueError as e:
            raise CheckpointError(f"--checkpoint {checkpoint}: {e}") from None
        bar = "!" * 100
        log(f"{bar}\n!!! RANDOM WEIGHTS: preset '{name}' (seed {settings.seed}), not a trained checkpoint. Scores, "
            f"re-ranked lists and\n!!! metrics below are meaningless; pass --checkpoint FILE for real results.\n{bar}")
        return model, True
    if not os.path.exists(checkpoint):
        raise CheckpointError(f"checkpoint not found: {checkpoint} (a .safetensors / .pt / .bin state dict, a "
                              "folder with model.safetensors + config.json, or preset:tiny|small|base)")
    try:
        model = LoCoRe.from_pretrained(checkpoint, device=settings.device, dtype=settings.dtype, **overrides)
    except CheckpointError:
        raise
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"could not load checkpoint {checkpoint}: {e}") from None
    return model, False


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------

@dataclass
class Dataset:
    """An opened, cross-checked AMES dataset: lazy descriptor readers, first-stage lists, ground truth."""

    settings: DataSettings
    files: AmesFiles
    database: Database                  # queries, and the database (gallery, then distractors) as one id range
    neighbours: Neighbours
    gnd: Optional[list]
    protocol: str                       # the resolved protocol: reference | clean | gldv2-test | gldv2-val

    @property
    def query_local(self) -> LocalFeatures:
        return self.database.query_local

    @property
    def gallery_local(self) -> LocalFeatures:
        return self.database.gallery_local

    @property
    def query_global(self) -> Optional[GlobalFeatures]:
        return self.database.query_global

    @property
    def gallery_global(self) -> Optional[ConcatGlobal]:
        return self.database.gallery_global

    def close(self) -> None:
        self.database.close()

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_dataset(data: DataSettings, options: RerankOptions) -> Dataset:
    """Open the files lazily and check them against each other and against ``options`` before anything
    big is read: descriptor dims, query counts, neighbour ids (over gallery + distractors), shortlist
    length, ground truth (gallery ids only: distractors are never positives)."""
    files = locate_files(data.data, data.desc, nn=data.nn, gnd=data.gnd, use_global=data.use_global,
                         distractors=data.distractors, gallery_shards=data.gallery_shards)
    db = open_database(files, data.descriptors)
    try:
        nn = read_neighbours(files.nn, num_images=db.num_images)
        if nn.num_queries != len(db.query_local):
            raise DataError(f"{files.nn} has lists for {nn.num_queries} queries, {files.query_local} holds "
                            f"{len(db.query_local)} query images")
        if options.method.shortlist > nn.topk:
            raise SettingsError(f"shortlist of {options.method.shortlist} images is longer than the neighbour lists "
                                f"in {files.nn} ({nn.topk} per query)")
        gnd = None
        if files.gnd is not None:
            gnd = read_gnd(files.gnd, num_images=db.num_gallery)["gnd"]
        protocol = options.protocol or _default_protocol(gnd)
        if gnd is not None:
            # gldv2-val: the gnd holds 750 trailing entries that are never evaluated; the query files and
            # lists may or may not hold them too
            expected = ((nn.num_queries, nn.num_queries + GLDV2_PRIVATE) if protocol == "gldv2-val"
                        else (nn.num_queries,))
            if len(gnd) not in expected:
                raise DataError(f"{files.gnd} has ground truth for {len(gnd)} queries, {files.nn} lists for "
                                f"{nn.num_queries}" + (f" (gldv2-val takes {nn.num_queries} or "
                                                      f"{nn.num_queries + GLDV2_PRIVATE})" if protocol == "gldv2-val"
                                                      else ""))
            if protocol == "gldv2-val" and len(gnd) - GLDV2_PRIVATE < 1:
                raise DataError(f"{files.gnd}: gldv2-val needs more than {GLDV2_PRIVATE} ground-truth entries "
                                f"(the last {GLDV2_PRIVATE} are dropped), got {len(gnd)}")
        if protocol == "reference" and gnd is None:
            raise DataError("the reference protocol needs the ground truth (it moves junk images to the end "
                            "before re-ranking): give --gnd FILE, or use --protocol clean")
        if protocol in GLDV2_PROTOCOLS and gnd is not None and any("ok" not in g for g in gnd):
            raise DataError(f"{files.gnd}: protocol {protocol} needs per-query 'ok' lists (GLDv2 ground truth)")
        return Dataset(data, files, db, nn, gnd, protocol)
    except BaseException:
        db.close()
        raise


def _default_protocol(gnd: Optional[list]) -> str:
    """reference for a revisited ground truth, gldv2-test for one with ``ok`` lists, clean without one."""
    if gnd is None:
        return "clean"
    return "gldv2-test" if is_gldv2_gnd(gnd) else "reference"


def check_model_fits(dataset: Dataset, model) -> None:
    """The model takes this dataset's descriptors: local dim, global token and its dim (and the readers
    check scale indices against the model's number of scales)."""
    cfg, files = model.config, dataset.files
    q_local = dataset.query_local
    dataset.database.set_num_scales(cfg.num_scales)  # rows are validated at read against the model's scales
    if q_local.dim != cfg.local_dim:
        raise DataError(f"local descriptors in {files.query_local} have D={q_local.dim}, but the checkpoint "
                        f"expects local_dim={cfg.local_dim}")
    if dataset.query_global is not None:
        if cfg.global_dim is None:
            raise SettingsError("this checkpoint takes no global descriptors (it has no global_to_lm / global "
                                "token); add --no-global")
        if dataset.query_global.dim != cfg.global_dim:
            raise DataError(f"global descriptors in {files.gallery_global} have dim {dataset.query_global.dim} "
                            f"(inferred from the file size and {len(dataset.gallery_local)} images), but the "
                            f"checkpoint expects global_dim={cfg.global_dim}")


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

@dataclass
class RerankReport:
    """What a re-ranking run computed: the ranks of each run, metrics, timings, the settings (as JSON)
    and, once :func:`write_results` ran, the files written."""

    runs: Dict[str, np.ndarray] = field(default_factory=dict)        # run name -> ranks [Q, n]
    first_stage: Dict[str, np.ndarray] = field(default_factory=dict)  # run name -> first-stage ids [Q, n]
    stats: Dict[str, RerankStats] = field(default_factory=dict)       # run name -> timings
    metrics: Optional[dict] = None
    protocol: str = "clean"
    summary: Dict[str, Any] = field(default_factory=dict)             # settings + metrics + throughput (JSON)
    files: Dict[str, str] = field(default_factory=dict)               # run name -> ranks file (once written)
    json_path: Optional[str] = None
    gnd: Optional[list] = None
    model: Any = None
    random_weights: bool = False
    method: Optional[Method] = None
    batch_size: int = 1                                              # queries per forward pass


def _subset_gldv2_map(ranks: np.ndarray, gnd: list) -> float:
    """GLDv2 mAP@100 over the queries given (a --max-queries run), in percent."""
    from .evaluate import gldv2_ap
    aps = np.array([gldv2_ap(ranks[i], g["ok"]) for i, g in enumerate(gnd)], dtype=float)
    aps = aps[~np.isnan(aps)]
    return 100.0 * float(aps.mean()) if aps.size else float("nan")


def _format_table(metrics: dict, protocol: str) -> str:
    if protocol in GLDV2_PROTOCOLS:
        m = metrics["mAP@100"]
        cols = list(m["first_stage"])
        lines = [f"metrics (protocol: {protocol}; mAP@100 in %)", f"{'stage':<12}" + "".join(f"{c:>10}" for c in cols)]
        for stage in ("first_stage", "reranked"):
            lines.append(f"{stage.replace('_', ' '):<12}" + "".join(f"{m[stage][c]:10.2f}" for c in cols))
        return "\n".join(lines)
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


def run(dataset: Dataset, model, options: RerankOptions, *, checkpoint: str = "", random_weights: bool = False,
        log: Log = print, ctx: Optional[distributed.Context] = None,
        work: Optional[distributed.WorkFolder] = None) -> RerankReport:
    """Re-rank every run of the dataset's protocol and evaluate it; writes nothing (see :func:`write_results`).

    Under torchrun (``ctx`` from :func:`distributed.init`) this process re-ranks its block of the queries and
    rank 0 gathers them: only rank 0's report holds ranks and metrics. With ``work``, finished queries are
    saved as they come and those already saved there are skipped."""
    ctx = ctx or distributed.Context()
    check_model_fits(dataset, model)
    cfg, data, method = model.config, dataset.settings, options.method
    q_local, nn, gnd = dataset.query_local, dataset.neighbours, dataset.gnd
    use_global = dataset.query_global is not None
    report = RerankReport(protocol=dataset.protocol, gnd=gnd, model=model, random_weights=random_weights,
                          method=method)
    T = tokens_per_image(q_local.num_descriptors, use_global)
    log(f"model: {cfg.num_layers} layers, hidden {cfg.hidden}, {cfg.num_attention_heads} heads, window "
        f"{cfg.attention_window}, on {model.device} in {str(model.dtype).replace('torch.', '')}; "
        f"{q_local.num_descriptors} descriptors{' + global' if use_global else ''} per image (T = {T})")
    log(f"data: {len(q_local)} queries, {len(dataset.gallery_local)} database images, first-stage lists of "
        f"{nn.topk}; {method.describe()}; alpha {options.alpha}, temp {options.temp}, mode {options.mode}; "
        f"protocol {dataset.protocol}")

    batch_size = report.batch_size = options.batch_size or (8 if model.device.type == "cuda" else 1)
    reranker = DatasetReranker(model, q_local, dataset.gallery_local, dataset.query_global, dataset.gallery_global,
                               alpha=options.alpha, temp=options.temp, mode=options.mode, softmax=options.softmax,
                               batch_size=batch_size, cuda_graph=options.cuda_graph)
    num_queries = nn.num_queries
    if dataset.protocol == "gldv2-val" and gnd is not None:  # its trailing 750 queries are never evaluated
        num_queries = len(gnd) - GLDV2_PRIVATE
    if options.max_queries is not None:
        num_queries = min(options.max_queries, num_queries)
    queries = None if num_queries == nn.num_queries else np.arange(num_queries)
    eval_gnd = None if gnd is None else list(gnd[:num_queries])

    runs = protocol_runs(dataset.protocol, options.split)
    metrics = {} if gnd is not None else None
    for name, splits in runs:
        if name in ("clean", "gldv2"):  # the list as it is
            ids, sims = nn.ids, nn.sims
        else:
            ids, sims = protocol_first_stage(nn.ids, nn.sims, gnd, name)
        if queries is not None:
            ids, sims = ids[queries], sims[queries]
        shard = distributed.Shard(ctx, work, name, num_queries=ids.shape[0], row_len=ids.shape[1],
                                  save_every=options.save_every, progress=options.progress,
                                  desc=f"re-ranking ({name})", log=log)
        _, stats = reranker.rerank(ids, sims, method, queries=shard.todo, progress=False, on_chunk=shard.record)
        ranks = shard.finish()  # every rank's block, in query order, on rank 0
        report.stats[name] = stats
        if not ctx.is_main:
            continue
        report.runs[name], report.first_stage[name] = ranks, ids
        log(f"[{name}] {stats.summary()}; ranks {ranks.shape}")
        if metrics is not None and dataset.protocol in GLDV2_PROTOCOLS:
            evaluable = len(gnd) - GLDV2_PRIVATE if dataset.protocol == "gldv2-val" else len(gnd)
            for stage, r in (("first_stage", ids), ("reranked", ranks)):
                m = (gldv2_metrics(r, gnd, dataset.protocol) if len(eval_gnd) == evaluable
                     else {"subset": _subset_gldv2_map(r, eval_gnd)})  # --max-queries: no public/private split
                metrics.setdefault("mAP@100", {"run": name})[stage] = {k: round(v, 2) for k, v in m.items()}
        elif metrics is not None:
            before = revisited_metrics(ids, eval_gnd, splits)
            after = revisited_metrics(ranks, eval_gnd, splits)
            for s in splits:
                metrics[s] = {"run": name, "first_stage": {k: round(v, 2) for k, v in before[s].items()},
                              "reranked": {k: round(v, 2) for k, v in after[s].items()}}
    # each process's throughput (a collective: every rank takes part); the queries it computed, not resumed
    mine = RerankStats(queries=sum(s.queries for s in report.stats.values()),
                       forward_passes=sum(s.forward_passes for s in report.stats.values()),
                       seconds=sum(s.seconds for s in report.stats.values()))
    processes = ctx.gather({"rank": ctx.rank, "device": str(model.device), "threads": ctx.threads,
                            **mine.as_dict()})
    if not ctx.is_main:
        return report
    report.metrics = metrics
    if metrics is not None:
        log(_format_table(metrics, dataset.protocol))

    total_q = sum(p["queries"] for p in processes)
    total_s = max(max(p["seconds"] for p in processes), 1e-9)  # the slowest process
    total_p = sum(p["forward_passes"] for p in processes)
    log(f"throughput: {total_q / total_s:.2f} queries/s, {total_p / total_s:.2f} forward passes/s "
        f"(batch size {batch_size}, {total_p} passes over {len(runs)} run(s), {total_s:.2f} s"
        f"{f', {ctx.world_size} processes' if ctx.world_size > 1 else ''})")
    report.summary = {
        "command": "rerank", "protocol": dataset.protocol, "data": os.path.abspath(data.data), "desc": data.desc,
        "nn": dataset.files.nn, "gnd": dataset.files.gnd, "checkpoint": checkpoint, "random_weights": random_weights,
        "method": {"kind": "topk" if isinstance(method, TopK) else "sliding", **dataclasses.asdict(method)},
        "alpha": options.alpha, "temp": options.temp, "mode": options.mode, "softmax": options.softmax,
        "descriptors": q_local.num_descriptors, "global": use_global, "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""), "batch_size": batch_size,
        "queries": len(report.first_stage[runs[0][0]]) if runs else 0, "ranks": {},  # filled in by write_results
        "metrics": metrics, "throughput": {r: s.as_dict() for r, s in report.stats.items()},
        "world_size": ctx.world_size, "processes": processes,
    }
    return report


def run_fingerprint(model: ModelSettings, dataset: Dataset, options: RerankOptions, batch_size: int,
                    device_type: str) -> Dict[str, Any]:
    """What a saved partial result depends on (:func:`distributed.fingerprint`): the settings that change
    ranks and the input files. Not the number of processes, --max-queries or --split: a query's row is the
    same in every run that computes it."""
    settings = {
        "checkpoint": model.checkpoint, "seed": model.seed, **model.overrides(), "dtype": model.dtype,
        "device": device_type, "alpha": options.alpha, "temp": options.temp, "mode": options.mode,
        "softmax": options.softmax, "protocol": dataset.protocol, "batch_size": batch_size,
        "method": {"kind": type(options.method).__name__, **dataclasses.asdict(options.method)},
        "descriptors": dataset.settings.descriptors, "global": dataset.settings.use_global,
    }
    files = dataset.files
    inputs = [files.query_local, *files.database_local, files.query_global, *files.database_global, files.nn,
              files.gnd, None if model.random_weights else model.checkpoint]
    return distributed.fingerprint(settings, inputs)


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------

def output_paths(out: str, runs: List[str]) -> Tuple[Dict[str, str], str]:
    """``({run: ranks file}, json file)``: RANKS.npy for the first run, RANKS_{run}.npy for the next,
    RANKS.json for the settings and metrics (``.npy`` is appended to ``out`` when missing)."""
    out = out if out.endswith(".npy") else out + ".npy"
    ranks = {run: out if i == 0 else f"{out[:-4]}_{run}.npy" for i, run in enumerate(runs)}
    return ranks, out[:-4] + ".json"


def check_output(paths: List[str]) -> None:
    """Refuse, before any work, an output path that is a folder or whose parent (or an ancestor) is a file."""
    for path in paths:
        if os.path.isdir(path):
            raise SettingsError(f"output {path} is a folder; give a file name (e.g. {os.path.join(path, 'ranks.npy')})")
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise SettingsError(f"cannot write {path}: {parent} is a file, not a folder")


def write_results(report: RerankReport, out: str, log: Log = print) -> RerankReport:
    """Write the ranks of every run (int64) and the JSON summary, all or nothing: each goes to a temporary
    file beside its target, and the targets are replaced only once every file is written."""
    ranks_paths, json_path = output_paths(out, list(report.runs))
    check_output([*ranks_paths.values(), json_path])
    summary = dict(report.summary, ranks={r: os.path.abspath(p) for r, p in ranks_paths.items()})
    writers: List[Tuple[str, Callable[[Any], None]]] = [
        (ranks_paths[r], lambda f, a=ranks: np.save(f, a, allow_pickle=False)) for r, ranks in report.runs.items()]
    writers.append((json_path, lambda f: f.write(json.dumps(summary, indent=2).encode())))
    atomic_write_all(writers)
    report.files, report.json_path, report.summary = dict(ranks_paths), json_path, summary
    for r, p in ranks_paths.items():
        log(f"[{r}] ranks {report.runs[r].shape} -> {p}")
    log(f"metrics and settings -> {json_path}")
    return report


def atomic_write_all(writers: List[Tuple[str, Callable[[Any], None]]]) -> None:
    """Each ``(path, write(binary file))`` into ``path.tmp-*`` beside ``path``; then every temporary file is
    renamed over its target. On any error (Ctrl-C included) the temporary files are removed and no target
    is touched."""
    temps: List[Tuple[str, str]] = []
    try:
        for path, write in writers:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            temps.append((tmp, path))
            with open(tmp, "xb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def build_first_stage(data: DataSettings, progress: bool = True, log: Log = print) -> str:
    """The nn file of ``data``, made with :func:`locore.search.run_search` when it does not exist yet
    (an existing one is used as is, never replaced). Returns its path."""
    from .search import SearchSettings, open_search_files, run_search

    nn_path = data.nn or os.path.join(data.data, f"nn_{data.desc}.pkl")
    if os.path.exists(nn_path):
        log(f"first stage: using the existing {nn_path}")
        return nn_path
    query, db = open_search_files(data.data, data.desc, distractors=data.distractors)
    index = "flat" if data.first_stage in ("faiss", "flat") else data.first_stage
    settings = SearchSettings(topk=min(data.first_stage_topk, len(db)), index=index, progress=progress)
    run_search(query, db, settings, out=nn_path, log=log)
    return nn_path


def rerank(model: ModelSettings, data: DataSettings, options: RerankOptions, out: str, *, log: Log = print,
           loaded_model=None) -> RerankReport:
    """The whole job: check the outputs, open and cross-check the data, load the model, re-rank every run,
    evaluate, then write every output at once. ``loaded_model`` skips loading (the demo passes its own).

    Under torchrun every process runs this: each re-ranks its block of the queries on its own device, and
    rank 0 writes the files (the other ranks return a report without ranks). Finished queries are saved
    in the work folder beside ``out`` as they come (:class:`distributed.WorkFolder`); with
    ``options.resume`` a run continues from there; the folder is removed once the outputs are written."""
    ranks_paths, json_path = output_paths(out, ["first"])
    check_output([out, *ranks_paths.values(), json_path])
    ctx = distributed.init(model.device)
    try:
        if ctx.device is not None and loaded_model is None:
            model = dataclasses.replace(model, device=ctx.device)  # cuda:LOCAL_RANK
        if not ctx.is_main:
            log = _silent
        if data.first_stage is not None:  # rank 0 builds the nn file, the others wait for it
            error: Optional[BaseException] = None
            if ctx.is_main:
                try:
                    build_first_stage(data, progress=options.progress, log=log)
                except Exception as e:  # noqa: BLE001 - handed to every rank by agree
                    error = e
            ctx.agree(error)
        with open_dataset(data, options) as dataset:
            runs = [name for name, _ in protocol_runs(dataset.protocol, options.split)]
            check_output(list(output_paths(out, runs)[0].values()))
            if loaded_model is None:
                loaded_model, random_weights = load_model(model, log=log)
            else:
                random_weights = model.random_weights
            if ctx.world_size > 1:
                log(f"torchrun: {ctx.world_size} processes ({ctx.backend}), rank 0 on {loaded_model.device}"
                    f"{f' with {ctx.threads} threads' if ctx.threads else ''}; queries split in contiguous blocks")
            device_type = loaded_model.device.type
            batch_size = options.batch_size or (8 if device_type == "cuda" else 1)
            work = distributed.WorkFolder.open(ctx, distributed.work_folder_for(ranks_paths["first"]),
                                               run_fingerprint(model, dataset, options, batch_size, device_type),
                                               resume=options.resume)
            report = run(dataset, loaded_model, options, checkpoint=model.checkpoint, random_weights=random_weights,
                         log=log, ctx=ctx, work=work)
        if ctx.is_main:
            write_results(report, out, log=log)
        work.remove()  # a collective: the other ranks wait for rank 0's files
        return report
    finally:
        ctx.close()


def _silent(_: str) -> None:
    """The log of ranks other than 0 (rank 0 speaks for the run)."""



# --------------------------------------------------------------------------------------------------
# locore search under torchrun: the database split between the processes
# --------------------------------------------------------------------------------------------------

class DatabaseBlock:
    """Rows ``[start, stop)`` of a global-descriptor database, keeping their global ids (one process's
    share of a sharded search). Reads only those rows, from one file or from a concatenation of parts."""

    def __init__(self, db, start: int, stop: int):
        self.db, self.start, self.stop = db, int(start), int(stop)
        self.path, self.dim, self.num_images = db.path, db.dim, self.stop - self.start

    def __len__(self) -> int:
        return self.num_images

    def iter_blocks(self, block_rows: int):
        parts, starts = getattr(self.db, "parts", None), getattr(self.db, "starts", None)
        if parts is None:
            yield from self.db.iter_blocks(block_rows, self.start, self.stop)
            return
        for part, offset in zip(parts, starts):
            lo, hi = max(self.start - int(offset), 0), min(self.stop - int(offset), len(part))
            if lo < hi:
                for s, rows in part.iter_blocks(block_rows, lo, hi):
                    yield int(offset) + s, rows


def sharded_search(data_dir: str, desc: str, settings, out: Optional[str] = None, distractors: Optional[str] = None,
                   dim: Optional[int] = None, log: Log = print):
    """``locore search`` under torchrun (exact flat search): rank r searches the contiguous block r of the
    database for every query's top M, rank 0 merges the blocks' lists (:func:`distributed.merge_topk`: the
    same (similarity descending, id ascending) order as one search over everything) and writes the file.
    Returns the ``[2, Q, M]`` tensor on rank 0, None on the others."""
    from .search import SearchError, _check_queries, exact_search, nn_tensor, open_search_files, write_nn

    if settings.index != "flat":
        raise SearchError(f"--index {settings.index} is not sharded under torchrun (each process would build "
                          "the whole index); run it in one process, or use --index flat")
    ctx = distributed.init(None if settings.device == "auto" else settings.device)
    try:
        log = log if ctx.is_main else _silent
        out = out if out is not None else os.path.join(data_dir, f"nn_{desc}.pkl")
        if os.path.exists(out) and not settings.overwrite:
            raise SearchError(f"{out} exists; pass --overwrite to replace it (or choose another --out)")
        query, db = open_search_files(data_dir, desc, distractors, dim)
        queries = _check_queries(query.read(np.arange(len(query))), db, settings.topk, query.path)
        block = distributed.query_block(len(db), ctx.rank, ctx.world_size)
        mine = DatabaseBlock(db, block.start, block.stop)
        if len(mine):
            local = dataclasses.replace(settings, topk=min(settings.topk, len(mine)),
                                        progress=settings.progress and ctx.is_main)
            sims, ids = exact_search(queries, mine, local)
        else:  # more processes than images
            sims, ids = np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        parts = ctx.gather((sims, ids))
        nn = None
        if ctx.is_main:
            sims, ids = distributed.merge_topk(parts, settings.topk)
            nn = nn_tensor(sims, ids)
            write_nn(out, nn, overwrite=settings.overwrite)
            log(f"flat search over {ctx.world_size} processes: {len(queries)} queries x {len(db)} images "
                f"(blocks of {len(block)}), top {settings.topk}; wrote {out} [2, {len(queries)}, {settings.topk}]")
        ctx.barrier()
        return nn
    finally:
        ctx.close()
