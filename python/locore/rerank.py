"""Fusion, plain top-k and sliding-window re-ranking (SPEC §6), and a batched driver over a dataset.

Fused score of a shortlisted image: ``s = alpha * global_sim + (1 - alpha) * sigmoid(temp * local_score)``,
where ``global_sim`` is its first-stage similarity and ``local_score`` the model's score for it.

* Plain top-k: the first ``k`` images of the first-stage list are re-ordered by ``s`` (one forward
  pass); the rest keep their order.
* Sliding windows over a shortlist of the first ``L`` images, window ``W`` (images per forward pass),
  stride ``S``: each window re-scores positions ``[st, st + W)`` of the *current* order (a window that
  would run past ``L`` is cut at ``L``) and writes them back sorted by ``s``; every candidate keeps
  its own first-stage ``global_sim``. Window starts (:func:`window_starts`):

  - ``start-to-end``: 0, S, 2S, ... while < L - S
  - ``end-to-start``: L - W, L - W - S, ... while > -S
  - ``start-to-end-to-start``: start-to-end, then end-to-start without its first start
  - ``end-to-start-to-end``: end-to-start, then start-to-end without its first start

  Then: a start that would fall below 0 is clamped to 0 (the reference would slice from a negative
  index there and re-rank nothing useful); a start equal to the one just before it (the same window
  twice in a row, which cannot change the order) is dropped; an order that would have no window at
  all (S ≥ L, or W ≥ L + S) gets the single start 0. The final list is the re-ordered shortlist
  followed by the untouched rest of the first-stage list.

Ties in ``s`` keep the current order (stable sort). The sliding path normalises the local score as the
score mode says (``scoring.ScoreMode.sliding_normalise``: ``max-sum`` is divided by T, tokens per image,
as the reference does); plain top-k uses it as is. A non-finite score is an error naming the query and
the images, never a silent first-stage order.
"""
from __future__ import annotations

import concurrent.futures
import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError
from .scoring import score_mode

__all__ = [
    "ORDERS", "SettingsError", "NonFiniteScoreError", "check_alpha", "check_temp", "check_count", "fuse", "window_starts", "windows", "sliding_rerank", "topk_rerank",
    "Sliding", "TopK", "RerankStats", "DatasetReranker", "tokens_per_image", "check_sequence_fits",
]

ORDERS = ("start-to-end", "end-to-start", "start-to-end-to-start", "end-to-start-to-end")

ScoreFn = Callable[[np.ndarray], np.ndarray]


class SettingsError(ValueError):
    """Re-ranking settings that cannot work with this model or these files (the message says why)."""


class NonFiniteScoreError(DataError):
    """The model gave a NaN or infinite score (the message names the query and the images)."""


def check_alpha(alpha: float) -> float:
    """The fusion weight: a number in [0, 1]."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise SettingsError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def check_temp(temp: float) -> float:
    """The fusion temperature: a finite number > 0."""
    if not isinstance(temp, (int, float)) or isinstance(temp, bool) or not (math.isfinite(temp) and temp > 0):
        raise SettingsError(f"temp must be a finite number > 0, got {temp!r}")
    return float(temp)


def check_count(what: str, n: int) -> int:
    """A count that must be >= 1 (batch size, queries, k)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SettingsError(f"{what} must be an integer >= 1, got {n!r}")
    return n


def fuse(global_sim, local_score, alpha: float, temp: float):
    """``alpha * global_sim + (1 - alpha) * sigmoid(temp * local_score)`` (numpy or torch, broadcasting)."""
    if hasattr(local_score, "sigmoid"):  # torch
        return alpha * global_sim + (1.0 - alpha) * (temp * local_score).sigmoid()
    x = temp * np.asarray(local_score, dtype=np.float64)
    # numerically safe logistic: exp of a non-positive number only
    e = np.exp(-np.abs(x))
    sig = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return alpha * np.asarray(global_sim, dtype=np.float64) + (1.0 - alpha) * sig


def window_starts(order: str, shortlist: int, window: int, stride: int) -> List[int]:
    """Window start positions of a sliding-window order (see the module docstring for the rules)."""
    L, W, S = int(shortlist), int(window), int(stride)
    if L < 1 or W < 1 or S < 1:
        raise SettingsError(f"shortlist, window and stride must be ≥ 1 (got L={L}, W={W}, S={S})")
    s2e = list(range(0, L - S, S)) or [0]
    e2s = list(range(L - W, -S, -S)) or [0]
    if order == "start-to-end":
        raw = s2e
    elif order == "end-to-start":
        raw = e2s
    elif order == "start-to-end-to-start":
        raw = s2e + e2s[1:]
    elif order == "end-to-start-to-end":
        raw = e2s + s2e[1:]
    else:
        raise SettingsError(f"unknown sliding order {order!r}; expected one of {', '.join(ORDERS)}")
    starts: List[int] = []
    for st in raw:
        st = max(st, 0)
        if not starts or starts[-1] != st:
            starts.append(st)
    return starts


def windows(order: str, shortlist: int, window: int, stride: int) -> List[Tuple[int, int]]:
    """``(start, end)`` of every window, ``end = min(start + W, L)``."""
    return [(st, min(st + window, shortlist)) for st in window_starts(order, shortlist, window, stride)]


def _rerank_span(current: np.ndarray, st: int, ed: int, local: np.ndarray, global_sim: np.ndarray,
                 alpha: float, temp: float) -> None:
    """Sort positions [st, ed) of ``current [B, L]`` (shortlist indices) by the fused score, in place."""
    cand = current[:, st:ed]
    g = np.take_along_axis(global_sim, cand, axis=1)
    s = fuse(g, np.asarray(local, dtype=np.float64).reshape(cand.shape), alpha, temp)
    order = np.argsort(-s, axis=1, kind="stable")
    current[:, st:ed] = np.take_along_axis(cand, order, axis=1)


def sliding_rerank(score_fn: ScoreFn, global_sim: np.ndarray, order: str, window: int, stride: int,
                   alpha: float, temp: float) -> np.ndarray:
    """Sliding-window re-ranking of B shortlists at once.

    ``global_sim [B, L]``: first-stage similarities of the shortlist in first-stage order.
    ``score_fn(cand [B, w]) -> [B, w]``: local scores of shortlist positions ``cand`` (row b for query b),
    called once per window with all B queries (same w for all). Returns ``[B, L]``: the new order as
    indices into the shortlist.
    """
    global_sim = np.atleast_2d(np.asarray(global_sim, dtype=np.float64))
    B, L = global_sim.shape
    current = np.tile(np.arange(L), (B, 1))
    for st, ed in windows(order, L, window, stride):
        _rerank_span(current, st, ed, score_fn(current[:, st:ed].copy()), global_sim, alpha, temp)
    return current


def topk_rerank(score_fn: ScoreFn, global_sim: np.ndarray, k: int, alpha: float, temp: float) -> np.ndarray:
    """Plain re-ranking of the first ``k`` positions (one ``score_fn`` call); returns ``[B, k]`` indices."""
    global_sim = np.atleast_2d(np.asarray(global_sim, dtype=np.float64))[:, :k]
    current = np.tile(np.arange(global_sim.shape[1]), (global_sim.shape[0], 1))
    _rerank_span(current, 0, current.shape[1], score_fn(current.copy()), global_sim, alpha, temp)
    return current


# --------------------------------------------------------------------------------------------------
# Settings checks
# --------------------------------------------------------------------------------------------------

def tokens_per_image(num_descriptors: int, use_global: bool) -> int:
    """T = S local tokens + [SEP] (+ the global token)."""
    return int(num_descriptors) + 1 + int(bool(use_global))


def check_sequence_fits(images_per_pass: int, tokens: int, max_position_embeddings: int, what: str) -> None:
    """Raise :class:`SettingsError` when (1 + images) * T tokens exceed the position table."""
    n = (1 + images_per_pass) * tokens
    limit = max_position_embeddings - 2
    if n > limit:
        fit = limit // tokens - 1
        raise SettingsError(
            f"{what} of {images_per_pass} images needs (1 + {images_per_pass}) x {tokens} = {n} tokens, but the "
            f"model's position table allows {limit} (max_position_embeddings {max_position_embeddings} - 2); "
            f"use at most {fit} images per forward pass (e.g. --sliding with --window {fit})")


# --------------------------------------------------------------------------------------------------
# Driver over a dataset
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TopK:
    """Plain re-ranking of the first ``k`` images."""

    k: int

    @property
    def shortlist(self) -> int:
        return self.k

    def describe(self) -> str:
        return f"top-{self.k}"


@dataclass(frozen=True)
class Sliding:
    """Sliding-window re-ranking of the first ``shortlist`` images."""

    order: str
    shortlist: int
    window: int
    stride: int

    def describe(self) -> str:
        return f"sliding {self.order}, L={self.shortlist}, W={self.window}, S={self.stride}"


@dataclass
class RerankStats:
    queries: int = 0
    forward_passes: int = 0          # model.score calls
    windows: int = 0                 # per-query windows scored (a pass scores up to batch_size of them)
    seconds: float = 0.0             # wall clock of the whole run (reading included)
    model_seconds: float = 0.0       # inside model.score, synchronised
    per_chunk_seconds: List[float] = field(default_factory=list)

    @property
    def queries_per_s(self) -> float:
        return self.queries / self.seconds if self.seconds > 0 else float("nan")

    @property
    def passes_per_s(self) -> float:
        return self.forward_passes / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        return {"queries": self.queries, "forward_passes": self.forward_passes, "windows": self.windows,
                "seconds": round(self.seconds, 4), "model_seconds": round(self.model_seconds, 4),
                "queries_per_s": round(self.queries_per_s, 3), "forward_passes_per_s": round(self.passes_per_s, 3)}

    def summary(self) -> str:
        return (f"{self.queries} queries in {self.seconds:.2f} s: {self.queries_per_s:.2f} queries/s, "
                f"{self.forward_passes} forward passes ({self.passes_per_s:.2f}/s, {self.windows} windows), "
                f"{self.model_seconds:.2f} s in the model")


def _model_device(model):
    dev = getattr(model, "device", None)
    if dev is not None:
        return dev
    import torch

    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@dataclass
class _Chunk:
    queries: np.ndarray              # [B] query indices
    q_local: object                  # tensors on the model's device
    q_scales: object
    q_mask: object
    q_global: object
    g_local: object                  # [B, L, S, D]
    g_scales: object
    g_mask: object
    g_global: object                 # [B, L, Dg] or None
    ids: np.ndarray                  # [B, L] database ids of the shortlist (error messages)


def _check_finite(scores: np.ndarray, cand: np.ndarray, chunk: _Chunk) -> None:
    """Raise :class:`NonFiniteScoreError` naming the first query whose window got a NaN / inf score."""
    bad = ~np.isfinite(scores)
    if not bad.any():
        return
    b = int(np.flatnonzero(bad.any(axis=1))[0])
    ids = chunk.ids[b, cand[b][bad[b]]].tolist()
    raise NonFiniteScoreError(
        f"the model gave non-finite scores ({scores[b][bad[b]][0]}) for query {int(chunk.queries[b])} and "
        f"{len(ids)} of the {cand.shape[1]} images of its window, database ids {ids[:10]}"
        f"{' ...' if len(ids) > 10 else ''}; check their descriptors (e.g. huge or corrupt values)")


class DatasetReranker:
    """Re-rank many queries' first-stage lists with a LoCoRE model, reading descriptors lazily.

    ``model`` needs ``score(query_local, query_scales, query_mask, gallery_local, gallery_scales,
    gallery_mask, query_global=None, gallery_global=None, mode=..., softmax=...) -> [B, K]``.
    Readers come from :mod:`locore.data`; pass ``query_global=None`` to run without global tokens.
    ``batch_size`` queries go through the model together: their windows (same shape, since all use the
    same L, W, S) are stacked into one forward pass. ``cuda_graph`` replays one captured CUDA graph
    per window shape (``model.score(..., cuda_graph=True)``). Descriptors of the next batch are read in a
    background thread while the current one is scored.
    """

    def __init__(self, model, query_local, gallery_local, query_global=None, gallery_global=None, *,
                 alpha: float, temp: float, mode: str = "max-end", softmax: bool = False, batch_size: int = 1,
                 cuda_graph: bool = False):
        if (query_global is None) != (gallery_global is None):
            raise SettingsError("give both query and gallery global descriptors, or neither")
        check_count("batch size", batch_size)
        self.model = model
        self.query_local, self.gallery_local = query_local, gallery_local
        self.query_global, self.gallery_global = query_global, gallery_global
        self.alpha, self.temp, self.softmax = check_alpha(alpha), check_temp(temp), bool(softmax)
        self.mode, self.score_mode = mode, score_mode(mode)
        self.batch_size = int(batch_size)
        self.device = _model_device(model)
        self.cuda_graph = bool(cuda_graph)
        if self.cuda_graph and getattr(self.device, "type", "") != "cuda":
            raise SettingsError("CUDA graphs need a model on a CUDA device")
        self.tokens = tokens_per_image(query_local.num_descriptors, query_global is not None)

    # -- descriptors ---------------------------------------------------------------------------------
    def _load_chunk(self, queries: np.ndarray, shortlist_ids: np.ndarray) -> _Chunk:
        import torch

        B, L = shortlist_ids.shape
        dev = self.device
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
        q = self.query_local.read(queries)
        g = self.gallery_local.read(shortlist_ids.reshape(-1))
        S, D = g.desc.shape[1], g.desc.shape[2]
        chunk = _Chunk(queries=queries, q_local=to(q.desc), q_scales=to(q.scales), q_mask=to(q.mask),
                       q_global=None, g_local=to(g.desc.reshape(B, L, S, D)),
                       g_scales=to(g.scales.reshape(B, L, S)), g_mask=to(g.mask.reshape(B, L, S)), g_global=None,
                       ids=shortlist_ids)
        if self.query_global is not None:
            chunk.q_global = to(self.query_global.read(queries))
            chunk.g_global = to(self.gallery_global.read(shortlist_ids.reshape(-1)).reshape(B, L, -1))
        return chunk

    def _score_fn(self, chunk: _Chunk, stats: RerankStats, divide_by_tokens: bool) -> ScoreFn:
        import torch

        rows = torch.arange(len(chunk.queries), device=self.device)[:, None]

        def score(cand: np.ndarray) -> np.ndarray:
            c = torch.from_numpy(cand).to(self.device)
            gg = chunk.g_global[rows, c] if chunk.g_global is not None else None
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model.score(chunk.q_local, chunk.q_scales, chunk.q_mask,
                                       chunk.g_local[rows, c], chunk.g_scales[rows, c], chunk.g_mask[rows, c],
                                       query_global=chunk.q_global, gallery_global=gg,
                                       mode=self.mode, softmax=self.softmax,
                                       **({"cuda_graph": True} if self.cuda_graph else {}))
            out = out.detach().to("cpu", torch.float64).numpy()
            stats.model_seconds += time.perf_counter() - t0  # .to("cpu") synchronises
            stats.forward_passes += 1
            stats.windows += cand.shape[0]
            _check_finite(out, cand, chunk)
            return self.score_mode.sliding_normalise(out, self.tokens) if divide_by_tokens else out

        return score

    # -- the run -------------------------------------------------------------------------------------
    def rerank(self, ids: np.ndarray, sims: np.ndarray, method, queries: Optional[Sequence[int]] = None,
               progress: bool = True, desc: str = "re-ranking",
               on_chunk: Optional[Callable[[np.ndarray, np.ndarray], None]] = None) -> Tuple[np.ndarray, RerankStats]:
        """Re-rank the first-stage lists ``ids [Q, n]`` (with similarities ``sims [Q, n]``).

        ``method``: :class:`TopK` or :class:`Sliding`. ``queries``: row indices of ``ids`` to process
        (default all; each must also be the query's row in the query descriptor files).
        ``on_chunk(queries, rows)`` is called with each finished batch of queries and their final rows
        (the distributed runner saves them as they come, for resumable runs).
        Returns ``(ranks [len(queries), n] int64, stats)``: the re-ordered shortlist, then the rest.
        """
        from tqdm.auto import tqdm

        ids = np.asarray(ids, dtype=np.int64)
        sims = np.asarray(sims, dtype=np.float64)
        Q, n = ids.shape
        L = method.shortlist
        if L > n:
            raise SettingsError(f"shortlist of {L} images is longer than the first-stage neighbour lists "
                                f"({n} per query)")
        per_pass = L if isinstance(method, TopK) else min(method.window, L)
        max_pos = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if max_pos is not None:
            check_sequence_fits(per_pass, self.tokens, int(max_pos),
                                "a top-k pass" if isinstance(method, TopK) else "a window")
        if isinstance(method, Sliding):
            window_starts(method.order, L, method.window, method.stride)  # validates the order early
        queries = np.arange(Q) if queries is None else np.asarray(queries, dtype=np.int64)
        ranks = ids[queries].copy()
        stats = RerankStats(queries=len(queries))
        chunks = [queries[i:i + self.batch_size] for i in range(0, len(queries), self.batch_size)]
        t_start = time.perf_counter()
        bar = tqdm(total=len(queries), desc=desc, unit="query", disable=not progress, leave=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._load_chunk, chunks[0], ids[chunks[0], :L]) if chunks else None
            done = 0
            for ci, qs in enumerate(chunks):
                t0 = time.perf_counter()
                chunk = pending.result()
                if ci + 1 < len(chunks):
                    nxt = chunks[ci + 1]
                    pending = pool.submit(self._load_chunk, nxt, ids[nxt, :L])
                gs = sims[qs, :L]
                if isinstance(method, TopK):
                    perm = topk_rerank(self._score_fn(chunk, stats, False), gs, L, self.alpha, self.temp)
                else:
                    perm = sliding_rerank(self._score_fn(chunk, stats, True), gs, method.order, method.window,
                                          method.stride, self.alpha, self.temp)
                ranks[done:done + len(qs), :L] = np.take_along_axis(ids[qs, :L], perm, axis=1)
                if on_chunk is not None:
                    on_chunk(qs, ranks[done:done + len(qs)])
                done += len(qs)
                stats.per_chunk_seconds.append(time.perf_counter() - t0)
                bar.update(len(qs))
        bar.close()
        stats.seconds = time.perf_counter() - t_start
        return ranks, stats
