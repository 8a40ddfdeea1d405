"""List-wise fine-tuning of a LoCoRE model (SPEC section 10), on one process or data-parallel under torchrun.

    settings = TrainSettings(data="DIR", desc="dinov2", out_dir="runs/x", checkpoint="locore_base.safetensors")
    result = train(settings)      # -> result.checkpoint: a folder from_pretrained (and the published code) loads

One sample = a query and K images of its first-stage list (the first ``topk``): at most ``max_pos`` of its
positives, the rest negatives, shuffled (the model must not learn the first-stage order). Every token of a
gallery image carries the image's label, the query's tokens are ignored; the loss is the mean 2-class
cross-entropy of the token logits. Positives come from a revisited ``gnd`` (easy + hard; junk is never
sampled), GLDv2-style ``ok`` lists, or class labels (``query_labels`` / ``db_labels`` .npy).

Which samples make step s is a pure function of (seed, s, global batch): resuming, or training on 1 or n
processes with the same global batch, sees the same samples in the same steps.

Dropout as the Longformer config during training: hidden dropout (embeddings, attention output, FFN
output). Attention-probability dropout is 0 by default: the memory-lean attention backward recomputes the
probabilities tile by tile and has no dropout mask to replay; ``attention_dropout > 0`` (the published 0.1)
trains on the dense reference attention, O(N^2) memory, which drops probabilities exactly as Longformer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from locore_kernels import AttentionLayout, longformer_attention_reference, scatter_global
from locore_kernels.autograd import attention_with_layout_trainable

from .checkpoint import save_pretrained
from .data import DataError, Database, locate_files, open_database, read_gnd, read_neighbours
from .evaluate import compute_map
from .model import LoCoRe

PRESET_PREFIX = "preset:"
IGNORE = -100           # label of the query's tokens (cross_entropy's ignore_index)
STATE_FILE = "trainer_state.pt"


class TrainError(ValueError):
    """Settings or data that cannot train; one line naming the problem."""


@dataclass
class TrainSettings:
    data: str                               # dataset folder in the AMES layout
    desc: str                               # descriptor name in the file names
    out_dir: str                            # checkpoints go to out_dir/step-NNNNNN/
    checkpoint: str = "preset:tiny"         # published-layout checkpoint (file or folder) or preset:NAME
    nn: Optional[str] = None                # first-stage lists (default DIR/nn_{desc}.pkl)
    gnd: Optional[str] = None               # revisited gnd or GLDv2 ok lists (default: the one DIR/gnd_*.pkl)
    query_labels: Optional[str] = None      # class labels instead of a gnd: .npy [num_queries]
    db_labels: Optional[str] = None         #                               and .npy [num_images]
    list_size: int = 100                    # K images per sample (N = (1 + K) * T tokens)
    topk: int = 100                         # sampled from the first topk of each first-stage list
    max_pos: int = 5                        # at most this many positives per sample
    descriptors: int = 48                   # local descriptors (leading slots) per image
    use_global: bool = True                 # feed global descriptors (global token) when the files have them
    batch_size: int = 8                     # samples per process per micro-batch
    grad_accum: int = 1                     # micro-batches per optimizer step
    lr: float = 5e-5                        # AdamW, constant schedule (published)
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0    # None / 0: no clipping
    epochs: float = 3.0                     # passes over the training queries (published: 3)
    max_steps: Optional[int] = None         # stop after this many optimizer steps (overrides epochs)
    max_seconds: Optional[float] = None     # stop (and save) after this much training time
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.0          # > 0: dense reference attention (see the module docstring)
    attention: Optional[str] = None         # trainable attention backend: None = best for the device
    holdout: int = 0                        # queries held out of training for the periodic mAP
    eval_every: int = 0                     # held-out mAP every N steps (0: at the end only, if holdout)
    save_every: int = 0                     # checkpoint every N steps (0: at the end only)
    keep: int = 2                           # step checkpoints kept
    resume: bool = True                     # continue from the last checkpoint in out_dir
    seed: int = 0
    device: Optional[str] = None
    overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)  # model overrides (heads, window, ...)
    progress: bool = True

    def validate(self) -> None:
        for name in ("list_size", "topk", "max_pos", "descriptors", "batch_size", "grad_accum", "keep"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise TrainError(f"{name} must be a positive integer, got {v!r}")
        if self.topk < self.list_size:
            raise TrainError(f"topk ({self.topk}) must be >= list_size ({self.list_size}): samples are drawn "
                             "from the first topk images of each first-stage list")
        for name in ("holdout", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise TrainError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise TrainError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.weight_decay < 0:
            raise TrainError(f"need lr > 0 and weight_decay >= 0, got lr={self.lr} weight_decay={self.weight_decay}")
        if self.max_steps is None and not self.epochs > 0:
            raise TrainError(f"epochs must be > 0 (or give max_steps), got {self.epochs}")
        if (self.query_labels is None) != (self.db_labels is None):
            raise TrainError("class labels need both query_labels and db_labels")


# ---------------------------------------------------------------------------------------------
# Samples

@dataclass
class Labels:
    """Per training query: positive ids and ids never sampled (junk)."""

    positives: List[np.ndarray]
    junk: List[np.ndarray]


def load_labels(s: TrainSettings, num_queries: int, num_images: int, gnd_path: Optional[str]) -> Labels:
    """Positives from class labels, or from a gnd: ``ok`` lists (GLDv2) or easy + hard (revisited)."""
    if s.query_labels is not None:
        ql, dl = np.load(s.query_labels, allow_pickle=False), np.load(s.db_labels, allow_pickle=False)
        for path, arr, n, what in ((s.query_labels, ql, num_queries, "queries"), (s.db_labels, dl, num_images,
                                                                                 "database images")):
            if arr.ndim != 1 or arr.shape[0] != n:
                raise DataError(f"{path}: expected one label per {what} ({n}), got shape {list(arr.shape)}")
        by_class: Dict[Any, np.ndarray] = {c: np.flatnonzero(dl == c) for c in np.unique(dl)}
        empty = np.zeros(0, np.int64)
        return Labels([by_class.get(c, empty) for c in ql], [empty] * num_queries)
    if gnd_path is None:
        raise TrainError(f"no ground truth: give a gnd file (revisited easy/hard, or GLDv2 ok lists) or class "
                         f"labels; none found in {s.data}")
    gnd = read_gnd(gnd_path, num_images)["gnd"]
    if len(gnd) != num_queries:
        raise DataError(f"{gnd_path}: {len(gnd)} gnd entries but {num_queries} queries")
    pos = [g["ok"] if "ok" in g else np.concatenate([g["easy"], g["hard"]]) for g in gnd]
    return Labels(pos, [g["junk"] for g in gnd])


def make_sample(ids: np.ndarray, positives: np.ndarray, junk: np.ndarray, K: int, max_pos: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(gallery ids [K], labels [K]) from a first-stage list ``ids``: at most ``max_pos`` positives, the
    rest negatives, junk never, shuffled. Fewer than K usable images: an error (raise topk)."""
    usable = ids[~np.isin(ids, junk)]
    is_pos = np.isin(usable, positives)
    pos, neg = usable[is_pos], usable[~is_pos]
    n_pos = min(len(pos), max_pos, K)
    if n_pos + len(neg) < K:
        raise TrainError(f"a first-stage list has only {n_pos + len(neg)} usable images (at most max_pos={max_pos} "
                         f"positives, junk left out) for list_size={K}; raise topk or lower list_size")
    chosen = np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, K - n_pos, replace=False)])
    labels = np.concatenate([np.ones(n_pos, np.int64), np.zeros(K - n_pos, np.int64)])
    order = rng.permutation(K)  # gallery shuffled per sample
    return chosen[order], labels[order]


class ListSamples:
    """Sample ``i`` of the stream (any i >= 0): epoch ``i // n`` of a seeded permutation of the training
    queries, its own seeded draw of the gallery. Deterministic in (seed, i), whatever process asks."""

    def __init__(self, db: Database, nn_ids: np.ndarray, labels: Labels, queries: np.ndarray, s: TrainSettings,
                 use_global: bool):
        self.db, self.nn_ids, self.labels, self.queries, self.s = db, nn_ids, labels, queries, s
        self.use_global = use_global
        self._perm: Dict[int, np.ndarray] = {}

    def query(self, i: int) -> int:
        epoch, pos = divmod(i, len(self.queries))
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.s.seed, 1, epoch]).permutation(self.queries)}
        return int(self._perm[epoch][pos])

    def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Model inputs + token-level image labels [B, K] of samples ``indices``."""
        s, qs, gal, lab = self.s, [], [], []
        for i in indices:
            q = self.query(i)
            rng = np.random.default_rng([s.seed, 2, i])
            ids, y = make_sample(self.nn_ids[q, :s.topk], self.labels.positives[q], self.labels.junk[q],
                                 s.list_size, s.max_pos, rng)
            qs.append(q)
            gal.append(ids)
            lab.append(y)
        gal_ids = np.stack(gal)
        ql = self.db.query_local.read(qs)
        gl = self.db.gallery_local.read(gal_ids.reshape(-1))
        B, K = gal_ids.shape
        out = dict(query_local=ql.desc, query_scales=ql.scales, query_mask=ql.mask,
                   gallery_local=gl.desc.reshape(B, K, *gl.desc.shape[1:]),
                   gallery_scales=gl.scales.reshape(B, K, -1), gallery_mask=gl.mask.reshape(B, K, -1),
                   labels=np.stack(lab))
        if self.use_global:
            out["query_global"] = self.db.query_global.read(qs)
            out["gallery_global"] = self.db.gallery_global.read(gal_ids.reshape(-1)).reshape(B, K, -1)
        return out


# ---------------------------------------------------------------------------------------------
# The differentiable forward

def token_labels(image_labels: Tensor, T: int) -> Tensor:
    """[B, K] image labels -> [B, (1 + K) * T] token labels: every token of a gallery image gets its
    image's label (global token, locals, padded slots, [SEP]); the query block is ignored."""
    B, K = image_labels.shape
    query = image_labels.new_full((B, 1, T), IGNORE)
    return torch.cat([query, image_labels[:, :, None].expand(B, K, T)], dim=1).reshape(B, -1)


def dense_attention_with_dropout(p: float) -> Callable[..., Tensor]:
    """The dense reference attention with dropout on the probabilities (Longformer's attention dropout
    in training); O(N^2) memory."""

    def attend(q, k, v, q_global_gathered, k_global, v_global, layout: AttentionLayout) -> Tensor:
        return longformer_attention_reference(q, k, v, scatter_global(layout, q_global_gathered), k_global, v_global,
                                              layout.is_global, layout.key_padding, layout.one_sided_window,
                                              dropout_p=p)
    return attend


def trainable_attention(backend: Optional[str]) -> Callable[..., Tensor]:
    """The differentiable attention op: the flash-style kernel backward (C++ on CPU, Triton on CUDA; saved
    state O(N), probabilities recomputed tile by tile) for backend None / "cpu" / "triton", the dense
    reference's autograd for "reference"."""
    return functools.partial(attention_with_layout_trainable, backend=backend)


class TokenClassifier(nn.Module):
    """The training graph of a ``LoCoRe`` model: token logits [B, N, 2] with dropout where the Longformer
    config has it (after the embedding LayerNorm, the attention out-projection and the FFN), same
    parameters and same math as the model's inference path (a test holds them together at p = 0).
    The module DDP wraps."""

    def __init__(self, model: LoCoRe, attend: Callable[..., Tensor], hidden_dropout: float):
        super().__init__()
        self.model, self.attend, self.p = model, attend, hidden_dropout

    def forward(self, inputs: dict[str, np.ndarray]) -> tuple[Tensor, Tensor]:
        m = self.model
        batch = m.prepare(*(inputs[k] for k in ("query_local", "query_scales", "query_mask", "gallery_local",
                                                "gallery_scales", "gallery_mask")),
                          inputs.get("query_global"), inputs.get("gallery_global"))
        layout = m.build_layout(batch)
        x = F.dropout(m.embed(batch), self.p, self.training)
        for layer in m.layers:
            x = self.layer(layer, x, layout)
        logits = F.linear(x, m.classifier.weight, m.classifier.bias)
        labels = token_labels(torch.as_tensor(inputs["labels"], device=logits.device), batch.T)
        return logits, labels

    def layer(self, layer: nn.Module, x: Tensor, layout: AttentionLayout) -> Tensor:
        B, N, C = x.shape
        heads = layer.heads
        q, k, v, kg, vg = F.linear(x, layer.qkv.weight, layer.qkv.bias).view(B, N, 5, heads, -1).unbind(2)
        qg = F.linear(layout.gather_global(x), layer.query_global.weight, layer.query_global.bias)
        a = self.attend(q, k, v, qg.view(B, -1, heads, C // heads), kg, vg, layout).reshape(B, N, C)
        h = F.dropout(F.linear(a, layer.out.weight, layer.out.bias), self.p, self.training)
        h1 = F.layer_norm(h + x, (C,), layer.ln1.weight, layer.ln1.bias, layer.ln1.eps)
        u = F.gelu(F.linear(h1, layer.ff1.weight, layer.ff1.bias))
        h = F.dropout(F.linear(u, layer.ff2.weight, layer.ff2.bias), self.p, self.training)
        return F.layer_norm(h + h1, (C,), layer.ln2.weight, layer.ln2.bias, layer.ln2.eps)


def token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean 2-class cross-entropy over the labelled tokens (in fp32 for bf16/fp16 logits)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), ignore_index=IGNORE)


# ---------------------------------------------------------------------------------------------
# Loop

@dataclass
class TrainResult:
    checkpoint: Optional[str]           # last saved folder (model.safetensors + config.json + trainer_state.pt)
    steps: int
    losses: List[float]                 # mean loss of each optimizer step run in this call
    evals: List[dict]                   # {"step", "first_stage_mAP", "reranked_mAP"} (held-out queries)
    seconds: float


def load_start_model(s: TrainSettings, device: torch.device) -> LoCoRe:
    if s.checkpoint.startswith(PRESET_PREFIX):
        # preset overrides may name any config field; a saved folder's config.json states the rest
        return LoCoRe.preset(s.checkpoint[len(PRESET_PREFIX):], device=device, seed=s.seed, **s.overrides)
    return LoCoRe.from_pretrained(s.checkpoint, device=device, **s.overrides)


def step_checkpoints(out_dir: str) -> List[str]:
    """Complete step checkpoints in ``out_dir``, oldest first (a half-written one is never renamed in)."""
    found = [p for p in glob.glob(os.path.join(out_dir, "step-*")) if re.fullmatch(r"step-\d+", os.path.basename(p))
             and os.path.isfile(os.path.join(p, STATE_FILE))]
    return sorted(found, key=lambda p: int(os.path.basename(p)[5:]))


def _save(model: LoCoRe, optimizer: torch.optim.Optimizer, step: int, s: TrainSettings, world: int) -> str:
    folder = os.path.join(s.out_dir, f"step-{step:06d}")
    tmp_state = os.path.join(s.out_dir, f".{STATE_FILE}.tmp-{os.getpid()}")
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "world_size": world,
                "global_batch": s.batch_size * s.grad_accum * world, "settings": dataclasses.asdict(s)}, tmp_state)
    save_pretrained(model, folder)           # atomic: model.safetensors + config.json
    os.replace(tmp_state, os.path.join(folder, STATE_FILE))  # the folder counts as complete from here on
    for old in step_checkpoints(s.out_dir)[:-s.keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun (gloo on CPU, nccl on CUDA)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


@torch.no_grad()
def held_out_map(model: LoCoRe, samples: ListSamples, queries: np.ndarray, gnd_ok: List[np.ndarray],
                 junk: List[np.ndarray], K: int) -> tuple[float, float]:
    """(first-stage mAP, mAP with the first K images ordered by the model's score), percent, held-out queries."""
    first, reranked = [], []
    for q in queries:
        ids = samples.nn_ids[q]
        ql, gl = samples.db.query_local.read([q]), samples.db.gallery_local.read(ids[:K])
        kw = {}
        if samples.use_global:
            kw = dict(query_global=samples.db.query_global.read([q]),
                      gallery_global=samples.db.gallery_global.read(ids[:K])[None])
        score = model.score(ql.desc, ql.scales, ql.mask, gl.desc[None], gl.scales[None], gl.mask[None],
                            **kw)[0].float().cpu().numpy()
        first.append(ids)
        reranked.append(np.concatenate([ids[:K][np.argsort(-score, kind="stable")], ids[K:]]))
    gnd = [{"ok": gnd_ok[q], "junk": junk[q]} for q in queries]
    return 100 * compute_map(np.stack(first), gnd)[0], 100 * compute_map(np.stack(reranked), gnd)[0]


def train(s: TrainSettings, log: Callable[[str], None] = print) -> TrainResult:
    """Fine-tune per ``s``; returns the last checkpoint folder and the per-step losses."""
    s.validate()
    t_start = time.perf_counter()
    rank, world = _distributed()
    log = log if rank == 0 else (lambda _msg: None)
    device = torch.device(s.device) if s.device else torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    files = locate_files(s.data, s.desc, nn=s.nn, gnd=s.gnd)
    resume_from = step_checkpoints(s.out_dir)[-1] if s.resume and os.path.isdir(s.out_dir) else None
    start = s if resume_from is None else dataclasses.replace(s, checkpoint=resume_from, overrides={})
    model = load_start_model(start, device).float()
    cfg = model.config
    use_global = s.use_global and cfg.global_dim is not None and files.query_global is not None
    if not use_global:
        files = dataclasses.replace(files, query_global=None, gallery_global=None, database_global=[])
    db = open_database(files, s.descriptors, cfg.num_scales)
    try:
        nn_ids = read_neighbours(files.nn, db.num_images).ids
        if nn_ids.shape[0] != len(db.query_local):
            raise DataError(f"{files.nn}: {nn_ids.shape[0]} first-stage lists but {len(db.query_local)} queries")
        if nn_ids.shape[1] < s.topk:
            raise TrainError(f"{files.nn}: first-stage lists hold {nn_ids.shape[1]} images, topk={s.topk} asked")
        labels = load_labels(s, nn_ids.shape[0], db.num_gallery, files.gnd)
        all_q = np.random.default_rng([s.seed, 0]).permutation(nn_ids.shape[0])
        held, train_q = np.sort(all_q[:s.holdout]), np.sort(all_q[s.holdout:])
        if len(train_q) == 0:
            raise TrainError(f"holdout={s.holdout} leaves no training query (the dataset has {nn_ids.shape[0]})")
        samples = ListSamples(db, nn_ids, labels, train_q, s, use_global)
        return _loop(s, model, samples, held, resume_from, rank, world, device, log, t_start)
    finally:
        db.close()


def _loop(s: TrainSettings, model: LoCoRe, samples: ListSamples, held: np.ndarray, resume_from: Optional[str],
          rank: int, world: int, device: torch.device, log: Callable[[str], None], t_start: float) -> TrainResult:
    model.requires_grad_(True)
    if s.attention_dropout > 0:
        attend = dense_attention_with_dropout(s.attention_dropout)
    else:
        attend = trainable_attention(s.attention)
    net: nn.Module = TokenClassifier(model, attend, s.hidden_dropout)
    if world > 1:
        # no global descriptors: global_to_lm gets no gradient
        net = nn.parallel.DistributedDataParallel(net, find_unused_parameters=not samples.use_global)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr,
                                  weight_decay=s.weight_decay)
    step = 0
    if resume_from is not None:
        state = torch.load(os.path.join(resume_from, STATE_FILE), map_location=device, weights_only=True)
        global_batch = s.batch_size * s.grad_accum * world
        if state["global_batch"] != global_batch:
            log(f"warning: {resume_from} was trained with global batch {state['global_batch']}, now {global_batch}")
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        log(f"resuming from {resume_from} (step {step})")
    per_step = s.batch_size * s.grad_accum * world
    total = s.max_steps if s.max_steps is not None else max(1, math.ceil(s.epochs * len(samples.queries) / per_step))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    bar = None
    if s.progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
    losses: List[float] = []
    evals: List[dict] = []
    last = resume_from
    t_loop = time.perf_counter()

    def evaluate_now() -> None:
        if len(held) and rank == 0:
            model.eval()
            first, reranked = held_out_map(model, samples, held, samples.labels.positives, samples.labels.junk,
                                           s.list_size)
            evals.append({"step": step, "first_stage_mAP": first, "reranked_mAP": reranked})
            log(f"step {step}: held-out mAP {reranked:.2f} (first stage {first:.2f}, {len(held)} queries)")

    while step < total:
        if s.max_seconds is not None and time.perf_counter() - t_loop > s.max_seconds:
            log(f"time budget of {s.max_seconds:.0f} s reached at step {step}")
            break
        net.train()
        torch.manual_seed(s.seed * 1_000_003 + step * 1009 + rank)  # dropout masks: a function of (seed, step, rank)
        step_loss = 0.0
        for micro in range(s.grad_accum):
            first = step * per_step + (micro * world + rank) * s.batch_size
            inputs = samples.batch(range(first, first + s.batch_size))
            sync = micro == s.grad_accum - 1 or world == 1
            with (contextlib.nullcontext() if sync else net.no_sync()), autocast:
                logits, labels = net(inputs)
                loss = token_loss(logits, labels) / s.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
        if s.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if world > 1:
            t = torch.tensor([step_loss], device=device)
            dist.all_reduce(t)
            step_loss = float(t) / world
        if not math.isfinite(step_loss):
            raise TrainError(f"loss is {step_loss} at step {step}; lower lr (now {s.lr})")
        losses.append(step_loss)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
        if s.eval_every and step % s.eval_every == 0 and step < total:
            evaluate_now()
        if s.save_every and step % s.save_every == 0 and step < total:
            last = _save_all(model, optimizer, step, s, rank, world) or last
    if bar is not None:
        bar.close()
    if not losses and last is not None:
        return TrainResult(last, step, losses, evals, time.perf_counter() - t_start)
    evaluate_now()
    last = _save_all(model, optimizer, step, s, rank, world) or last
    model.requires_grad_(False).eval()
    return TrainResult(last, step, losses, evals, time.perf_counter() - t_start)


def _save_all(model: LoCoRe, optimizer: torch.optim.Optimizer, step: int, s: TrainSettings, rank: int,
              world: int) -> Optional[str]:
    folder = None
    if rank == 0:
        os.makedirs(s.out_dir, exist_ok=True)
        folder = _save(model, optimizer, step, s, world)
    if world > 1:
        dist.barrier()
    return folder or os.path.join(s.out_dir, f"step-{step:06d}")


def settings_json(s: TrainSettings) -> str:
    return json.dumps(dataclasses.asdict(s), indent=1)
