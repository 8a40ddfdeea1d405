"""Retrieval metrics (SPEC §7): revisited Oxford / Paris mAP and mP@k, GLDv2 mAP@100, Recall@k and MAP@R.

Conventions: ``ranks`` is ``[num_queries, n]`` database ids, best first (note: revisitop's own code
takes the transpose). A ranked list may be shorter than the database (e.g. the first-stage top-k):
positives it does not contain count as never retrieved.

Revisited protocol (Radenović et al. 2018, the revisitop ``compute_map``): per query, junk images are
skipped (each positive's position is reduced by the number of junk images ranked above it), and AP
is the trapezoid rule: for the j-th positive (0-based) at junk-free 0-based position r,
``(j / r + (j + 1) / (r + 1)) / 2`` (the first term is 1 when r = 0), summed and divided by the
number of positives. Queries without positives are left out of the mean. mP@k follows revisitop:
with 1-based positive positions p, ``kq = min(max(p), k)`` and P = #{p ≤ kq} / kq (0 for a query none
of whose positives is ranked).

GLDv2 retrieval (``gldv2-test`` / ``gldv2-val``, ground truth with per-query ``ok`` lists, no junk):
mAP@100 with the rectangular rule: AP = (sum over the positives at 0-based positions p < 100 of
precision@(p + 1)) / min(#ok, 100); queries without any ``ok`` image are left out. gldv2-test reports
public (all queries but the last 750), private (the last 750) and combined; gldv2-val public only.

Splits: Easy: ok = easy, junk = junk + hard. Medium: ok = easy + hard, junk = junk.
Hard: ok = hard, junk = junk + easy.

The reference re-ranking evaluation (the "reference" protocol) first moves, in each query's
first-stage list, its junk images (for Hard: junk and easy) to the end, keeping their relative
order, and only then re-ranks; :func:`protocol_first_stage` does that. The "clean" protocol re-ranks
the first-stage list as it is and evaluates all splits on the one ranking.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "SPLITS", "KAPPAS", "compute_ap", "compute_map", "revisited_gnd", "revisited_metrics",
    "protocol_first_stage", "protocol_runs", "recall_at_k", "map_at_r",
    "GLDV2_PROTOCOLS", "GLDV2_PRIVATE", "gldv2_ap", "gldv2_metrics",
]

SPLITS = ("easy", "medium", "hard")
KAPPAS = (1, 5, 10)


def compute_ap(pos: Sequence[int], nres: int) -> float:
    """Trapezoid-rule AP from the sorted 0-based junk-free positions ``pos`` of the retrieved positives
    out of ``nres`` positives in total (revisitop ``compute_ap``)."""
    ap = 0.0
    step = 1.0 / nres
    for j, r in enumerate(pos):
        p0 = 1.0 if r == 0 else j / r
        p1 = (j + 1) / (r + 1)
        ap += (p0 + p1) * step / 2.0
    return ap


def compute_map(ranks: np.ndarray, gnd: Sequence[Dict[str, Iterable[int]]],
                kappas: Sequence[int] = KAPPAS) -> Tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP, per-query AP, mP@kappas, per-query P@kappas for ``ranks [Q, n]`` and ``gnd`` entries with
    ``ok`` and ``junk``. Per-query values are NaN for queries without positives (left out of the means)."""
    ranks = np.asarray(ranks)
    nq, n = ranks.shape
    if len(gnd) != nq:
        raise ValueError(f"ranks has {nq} queries but the ground truth {len(gnd)}")
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for i in range(nq):
        ok = np.asarray(gnd[i]["ok"], dtype=np.int64)
        if ok.size == 0:
            continue
        junk = np.asarray(gnd[i].get("junk", []), dtype=np.int64)
        row = ranks[i]
        is_pos = np.isin(row, ok)
        is_junk = np.isin(row, junk)
        # junk-free position = position minus the number of junk images ranked before it
        junk_before = np.cumsum(is_junk) - is_junk
        pos = (np.flatnonzero(is_pos) - junk_before[is_pos]).astype(np.int64)
        # the reference divides by min(#positives, list length); identical unless the list is shorter
        aps[i] = compute_ap(pos, min(ok.size, n))
        prs[i] = 0.0
        if pos.size:
            p1 = pos + 1
            for j, k in enumerate(kappas):
                kq = min(int(p1.max()), k)
                prs[i, j] = np.count_nonzero(p1 <= kq) / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


GLDV2_PROTOCOLS = ("gldv2-test", "gldv2-val")
GLDV2_PRIVATE = 750   # the last 750 queries of gldv2-test are the private split
GLDV2_CUTOFF = 100


def gldv2_ap(row: np.ndarray, ok: np.ndarray, cutoff: int = GLDV2_CUTOFF) -> float:
    """AP@cutoff of one ranked list ``row`` with positives ``ok`` (rectangular rule, no junk):
    sum of precision@(p + 1) over the positives at 0-based positions p < cutoff, over min(#ok, cutoff).
    NaN when ``ok`` is empty."""
    ok = np.asarray(ok, dtype=np.int64).reshape(-1)
    if ok.size == 0:
        return float("nan")
    pos = np.flatnonzero(np.isin(np.asarray(row)[:cutoff], ok))
    precision = np.arange(1, pos.size + 1) / (pos + 1.0)   # the j-th positive at p: (j + 1) / (p + 1)
    return float(precision.sum() / min(ok.size, cutoff))


def is_gldv2_gnd(gnd: Sequence[Dict[str, Any]]) -> bool:
    """A GLDv2-style ground truth: every query has an ``ok`` list (a revisited one has easy / hard / junk)."""
    return bool(gnd) and all("ok" in g for g in gnd)


def gldv2_metrics(ranks: np.ndarray, gnd: Sequence[Dict[str, Iterable[int]]], protocol: str = "gldv2-test",
                  cutoff: int = GLDV2_CUTOFF) -> Dict[str, float]:
    """GLDv2 mAP@100 in percent (unrounded): ``{"public", "private", "combined"}`` for ``gldv2-test``,
    ``{"public"}`` for ``gldv2-val``. ``gnd`` entries need ``ok``; ``ranks [Q, n]`` row i belongs to
    ``gnd[i]`` (for gldv2-val the gnd may hold the 750 trailing entries beyond the ranked queries,
    which are dropped). The public split is every query but the last 750 of the test set."""
    ranks = np.asarray(ranks)
    if protocol not in GLDV2_PROTOCOLS:
        raise ValueError(f"unknown GLDv2 protocol {protocol!r}; expected one of {GLDV2_PROTOCOLS}")
    nq = ranks.shape[0]
    if protocol == "gldv2-val":  # public = the gnd without its 750 trailing entries
        public = len(gnd) - GLDV2_PRIVATE
        if public < 1 or nq not in (public, len(gnd)):
            raise ValueError(f"ranks has {nq} queries but the gldv2-val ground truth has {len(gnd)} entries "
                             f"(expected ranks for its first {max(public, 0)} or all {len(gnd)})")
        nq = public
    elif len(gnd) != nq:
        raise ValueError(f"ranks has {nq} queries but the ground truth {len(gnd)}")
    for i, g in enumerate(gnd[:nq]):
        if "ok" not in g:
            raise ValueError(f"gnd[{i}] has no 'ok' list: GLDv2 protocols need per-query ok lists")
    aps = np.array([gldv2_ap(ranks[i], gnd[i]["ok"], cutoff) for i in range(nq)])

    def mean(sel: np.ndarray) -> float:
        sel = sel[~np.isnan(sel)]
        return 100.0 * float(sel.mean()) if sel.size else float("nan")

    if protocol == "gldv2-val":
        return {"public": mean(aps)}
    split = max(nq - GLDV2_PRIVATE, 0)
    return {"public": mean(aps[:split]), "private": mean(aps[split:]), "combined": mean(aps)}


def revisited_gnd(gnd: Sequence[Dict[str, np.ndarray]], split: str) -> List[Dict[str, np.ndarray]]:
    """ok / junk lists of one revisited split (easy | medium | hard) from easy / hard / junk entries."""
    out = []
    for g in gnd:
        if "easy" not in g and "hard" not in g and "ok" in g:  # already in ok / junk form
            out.append({"ok": np.asarray(g["ok"]), "junk": np.asarray(g.get("junk", []))})
            continue
        easy, hard, junk = (np.asarray(g.get(k, []), dtype=np.int64) for k in ("easy", "hard", "junk"))
        if split == "easy":
            out.append({"ok": easy, "junk": np.concatenate([junk, hard])})
        elif split == "medium":
            out.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        elif split == "hard":
            out.append({"ok": hard, "junk": np.concatenate([junk, easy])})
        else:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return out


def revisited_metrics(ranks: np.ndarray, gnd: Sequence[Dict[str, np.ndarray]],
                      splits: Sequence[str] = SPLITS, kappas: Sequence[int] = KAPPAS) -> Dict[str, Dict[str, float]]:
    """``{split: {"mAP": %, "mP@1": %, ...}}`` in percent (unrounded)."""
    out = {}
    for split in splits:
        m, _, pr, _ = compute_map(ranks, revisited_gnd(gnd, split), kappas)
        out[split] = {"mAP": 100.0 * m, **{f"mP@{k}": 100.0 * float(p) for k, p in zip(kappas, pr)}}
    return out


def protocol_first_stage(ids: np.ndarray, sims: np.ndarray, gnd: Sequence[Dict[str, np.ndarray]],
                         split: str) -> Tuple[np.ndarray, np.ndarray]:
    """The reference protocol's first-stage lists for ``split``: per query, its junk images (for
    ``hard`` also its easy ones) moved to the end of ``ids [Q, n]`` / ``sims [Q, n]``, both in order."""
    ids = np.asarray(ids)
    sims = np.asarray(sims)
    if len(gnd) != ids.shape[0]:
        raise ValueError(f"neighbour list has {ids.shape[0]} queries but the ground truth {len(gnd)}")
    out_ids, out_sims = ids.copy(), sims.copy()
    for i, g in enumerate(gnd):
        moved = np.asarray(g.get("junk", []), dtype=np.int64)
        if split == "hard":
            moved = np.concatenate([moved, np.asarray(g.get("easy", []), dtype=np.int64)])
        elif split not in ("easy", "medium"):
            raise ValueError(f"unknown split {split!r}")
        is_moved = np.isin(ids[i], moved)
        order = np.concatenate([np.flatnonzero(~is_moved), np.flatnonzero(is_moved)])
        out_ids[i], out_sims[i] = ids[i, order], sims[i, order]
    return out_ids, out_sims


def protocol_runs(protocol: str, split: str) -> List[Tuple[str, Tuple[str, ...]]]:
    """Which re-ranking runs a protocol needs and which splits each run reports.

    ``reference``: one run per requested split on its own junk-moved list; the medium run also
    reports Easy (as the reference does). ``clean``: one run on the untouched list, reporting all
    requested splits (and Easy)."""
    if protocol in GLDV2_PROTOCOLS:  # the list as it is (no junk), scored with mAP@100
        return [("gldv2", ())]
    wanted = ("medium", "hard") if split == "both" else (split,)
    if protocol == "clean":
        return [("clean", ("easy",) + wanted)]
    if protocol == "reference":
        return [(s, ("easy", "medium") if s == "medium" else (s,)) for s in wanted]
    raise ValueError(f"unknown protocol {protocol!r}; expected reference, clean, gldv2-test or gldv2-val")


def _exclude_self(ranks: np.ndarray, query_db_ids: Optional[np.ndarray]) -> List[np.ndarray]:
    rows = [np.asarray(r) for r in np.asarray(ranks)]
    if query_db_ids is None:
        return rows
    return [r[r != q] for r, q in zip(rows, np.asarray(query_db_ids))]


def recall_at_k(ranks: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray,
                ks: Sequence[int] = (1, 10), query_db_ids: Optional[np.ndarray] = None) -> Dict[int, float]:
    """Recall@k for class-level sets: the fraction of queries with at least one image of their class
    among the first k. ``query_db_ids`` (the query's own database id, when queries are part of the
    database) removes the query from its own list first. Fractions in [0, 1]."""
    rows = _exclude_self(ranks, query_db_ids)
    qlab = np.asarray(query_labels)
    dlab = np.asarray(db_labels)
    out = {}
    for k in ks:
        hits = [np.any(dlab[r[:k]] == q) for r, q in zip(rows, qlab)]
        out[int(k)] = float(np.mean(hits)) if hits else float("nan")
    return out


def map_at_r(ranks: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray,
             query_db_ids: Optional[np.ndarray] = None) -> float:
    """MAP@R (Musgrave et al. 2020): R = number of database images of the query's class (the query
    itself excluded when ``query_db_ids`` is given); AP@R = (1/R) Σ_{i≤R} P@i · rel_i over the first R
    results. Queries with R = 0 are left out of the mean. A fraction in [0, 1]."""
    rows = _exclude_self(ranks, query_db_ids)
    qlab = np.asarray(query_labels)
    dlab = np.asarray(db_labels)
    qids = None if query_db_ids is None else np.asarray(query_db_ids)
    counts = {}
    aps = []
    for i, (r, q) in enumerate(zip(rows, qlab)):
        if q not in counts:
            counts[q] = int(np.count_nonzero(dlab == q))
        R = counts[q] - (1 if qids is not None and dlab[int(qids[i])] == q else 0)
        if R <= 0:
            continue
        rel = (dlab[r[:R]] == q).astype(np.float64)
        prec = np.cumsum(rel) / np.arange(1, rel.size + 1)
        aps.append(float((prec * rel).sum() / R))
    return float(np.mean(aps)) if aps else float("nan")
