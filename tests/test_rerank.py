"""Fusion, plain top-k and sliding-window re-ranking (SPEC §6), on stand-in scorers."""
import math

import numpy as np
import pytest

from locore.rerank import (ORDERS, SettingsError, check_sequence_fits, fuse, sliding_rerank, topk_rerank,
                           window_starts, windows)


# ------------------------------------------------------------------------------------------------
# Window starts, worked by hand from SPEC §6
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order, L, W, S, expected", [
    # L=7, W=3, S=2: start-to-end 0, 2, 4 (< 5); end-to-start 4, 2, 0 (> -2)
    ("start-to-end", 7, 3, 2, [0, 2, 4]),
    ("end-to-start", 7, 3, 2, [4, 2, 0]),
    ("start-to-end-to-start", 7, 3, 2, [0, 2, 4, 2, 0]),
    ("end-to-start-to-end", 7, 3, 2, [4, 2, 0, 2, 4]),
    # the paper's setting: L=400, W=100, S=50
    ("end-to-start", 400, 100, 50, [300, 250, 200, 150, 100, 50, 0]),
    ("start-to-end", 400, 100, 50, [0, 50, 100, 150, 200, 250, 300]),
    # L=400, W=100, S=25: start-to-end runs past L - W (windows cut at L)
    ("start-to-end", 400, 100, 25, list(range(0, 375, 25))),
    # L=8, W=3, S=2: end-to-start 5, 3, 1, -1 -> the last start clamped to 0
    ("end-to-start", 8, 3, 2, [5, 3, 1, 0]),
    ("end-to-start-to-end", 8, 3, 2, [5, 3, 1, 0, 2, 4]),
    # L=4, W=3, S=3: start-to-end [0]; end-to-start [1, -2]; combined [0, -2] -> [0, 0] -> [0]
    ("start-to-end-to-start", 4, 3, 3, [0]),
    ("end-to-start-to-end", 4, 3, 3, [1, 0]),
    # window longer than the shortlist: one window from 0
    ("end-to-start", 5, 8, 2, [0]),
    ("start-to-end", 5, 8, 2, [0, 2]),
    # stride >= shortlist: start-to-end would be empty -> [0]
    ("start-to-end", 5, 3, 9, [0]),
])
def test_window_starts_by_hand(order, L, W, S, expected):
    assert window_starts(order, L, W, S) == expected


def test_windows_are_cut_at_the_shortlist_end():
    assert windows("start-to-end", 8, 3, 2) == [(0, 3), (2, 5), (4, 7)]
    assert windows("start-to-end", 5, 8, 2) == [(0, 5), (2, 5)]
    assert windows("end-to-start", 8, 3, 2) == [(5, 8), (3, 6), (1, 4), (0, 3)]


def test_window_starts_match_the_reference_ranges_when_nothing_is_clamped():
    # the reference: range(0, L - S, S) and range(L - W, -S, -S), combined by dropping the first start
    for L, W, S in [(400, 100, 50), (400, 100, 25), (200, 100, 50), (100, 50, 10), (37, 10, 9)]:
        s2e = list(range(0, L - S, S))
        e2s = list(range(L - W, -S, -S))
        if min(e2s) < 0:
            continue
        assert window_starts("start-to-end", L, W, S) == s2e
        assert window_starts("end-to-start", L, W, S) == e2s
        assert window_starts("start-to-end-to-start", L, W, S) == s2e + e2s[1:]
        assert window_starts("end-to-start-to-end", L, W, S) == e2s + s2e[1:]


def test_bad_orders_and_sizes_are_refused():
    with pytest.raises(SettingsError, match="unknown sliding order"):
        window_starts("middle-out", 10, 3, 2)
    with pytest.raises(SettingsError, match="≥ 1"):
        window_starts("end-to-start", 10, 3, 0)


# ------------------------------------------------------------------------------------------------
# Final orders, worked by hand
# ------------------------------------------------------------------------------------------------

def _by_value(values):
    values = np.asarray(values, dtype=np.float64)

    def score(cand):
        return values[cand]

    return score


def test_end_to_start_final_order_by_hand():
    # alpha = 0: rank by the local score only; the local score of shortlist position c is c.
    # windows [4,7), [2,5), [0,3) of the current order:
    #   [0,1,2,3,4,5,6] -> {4,5,6} sorted -> [0,1,2,3,6,5,4] -> {2,3,6} -> [0,1,6,3,2,5,4]
    #   -> {0,1,6} -> [6,1,0,3,2,5,4]
    g = np.zeros((1, 7))
    perm = sliding_rerank(_by_value(range(7)), g, "end-to-start", 3, 2, alpha=0.0, temp=1.0)
    assert perm.tolist() == [[6, 1, 0, 3, 2, 5, 4]]


def test_start_to_end_final_order_by_hand():
    #   [0,1,2,3,4,5,6] -> {0,1,2} -> [2,1,0,3,4,5,6] -> {0,3,4} -> [2,1,4,3,0,5,6]
    #   -> {0,5,6} -> [2,1,4,3,6,5,0]
    g = np.zeros((1, 7))
    perm = sliding_rerank(_by_value(range(7)), g, "start-to-end", 3, 2, alpha=0.0, temp=1.0)
    assert perm.tolist() == [[2, 1, 4, 3, 6, 5, 0]]


def test_each_candidate_keeps_its_own_global_similarity():
    # alpha = 0.5, temp = 1. Local score 0 for all but position 6 (score 2, sigmoid 0.8808).
    # global sims 0.95, 0.85, ..., 0.35 -> fused: c0 .725, c1 .675, c2 .625, c3 .575, c4 .525, c5 .475,
    # c6 = 0.175 + 0.5 * 0.8808 = 0.6154.
    # end-to-start, W=3, S=2: [4,7): c6 > c4 > c5 -> [0,1,2,3,6,4,5]; [2,5): c2 > c6 > c3 ->
    # [0,1,2,6,3,4,5]; [0,3): unchanged.
    g = np.array([[0.95, 0.85, 0.75, 0.65, 0.55, 0.45, 0.35]])
    local = np.zeros(7)
    local[6] = 2.0
    s6 = 0.5 * 0.35 + 0.5 / (1 + math.exp(-2.0))
    assert 0.575 < s6 < 0.625
    perm = sliding_rerank(_by_value(local), g, "end-to-start", 3, 2, alpha=0.5, temp=1.0)
    assert perm.tolist() == [[0, 1, 2, 6, 3, 4, 5]]


def test_topk_rerank_sorts_by_the_fused_score():
    g = np.array([[0.9, 0.8, 0.7, 0.6]])
    local = np.array([-5.0, 0.0, 5.0, 1.0])
    s = 0.3 * g[0] + 0.7 / (1 + np.exp(-0.5 * local))
    perm = topk_rerank(_by_value(local), g, 4, alpha=0.3, temp=0.5)
    assert perm.tolist() == [list(np.argsort(-s, kind="stable"))]
    # k shorter than the list: only the first k are scored
    perm = topk_rerank(_by_value(local), g, 2, alpha=0.0, temp=1.0)
    assert perm.tolist() == [[1, 0]]


def test_fuse_matches_the_formula_and_torch():
    import torch

    g = np.array([0.2, 0.9, -0.1])
    loc = np.array([-800.0, 3.0, 800.0])  # extreme logits: no overflow warnings, exact limits
    expected = 0.4 * g + 0.6 / (1 + np.exp(-np.clip(0.1 * loc, -700, 700)))
    with np.errstate(over="raise"):
        np.testing.assert_allclose(fuse(g, loc, 0.4, 0.1), expected, rtol=1e-12)
    t = fuse(torch.tensor(g), torch.tensor(loc), 0.4, 0.1)
    np.testing.assert_allclose(t.numpy(), expected, rtol=1e-12)


def test_ties_keep_the_current_order():
    perm = sliding_rerank(_by_value(np.zeros(6)), np.zeros((1, 6)), "end-to-start", 3, 1, 0.5, 1.0)
    assert perm.tolist() == [list(range(6))]


# ------------------------------------------------------------------------------------------------
# Against a plain re-implementation, with a scorer that depends on the window's content
# ------------------------------------------------------------------------------------------------

def _plain_starts(order, L, W, S):
    s2e, st = [], 0
    while st < L - S:
        s2e.append(st)
        st += S
    e2s, st = [], L - W
    while st > -S:
        e2s.append(st)
        st -= S
    s2e, e2s = s2e or [0], e2s or [0]
    raw = {"start-to-end": s2e, "end-to-start": e2s, "start-to-end-to-start": s2e + e2s[1:],
           "end-to-start-to-end": e2s + s2e[1:]}[order]
    out = []
    for st in raw:
        st = max(0, st)
        if not out or out[-1] != st:
            out.append(st)
    return out


def _plain_rerank(local_of_window, gsim, order, L, W, S, alpha, temp):
    cur = list(range(L))
    for st in _plain_starts(order, L, W, S):
        cand = cur[st:st + W]
        loc = local_of_window(cand)
        s = [alpha * gsim[c] + (1 - alpha) / (1 + math.exp(-temp * x)) for c, x in zip(cand, loc)]
        ranked = sorted(range(len(cand)), key=lambda i: -s[i])  # Python's sort is stable
        cur[st:st + W] = [cand[i] for i in ranked]
    return cur


def _contextual(b, cand):
    # depends on the candidate, the query and the rest of the window (like a list-wise model)
    cand = np.asarray(cand, dtype=np.float64)
    return np.sin(1.7 * cand + b) * 3.0 + 0.05 * cand.mean() - 0.3 * np.cos(cand * cand.sum())


@pytest.mark.parametrize("order", ORDERS)
def test_sliding_matches_a_plain_reimplementation(order):
    rng = np.random.default_rng(7)
    for _ in range(25):
        L = int(rng.integers(1, 40))
        W = int(rng.integers(1, 15))
        S = int(rng.integers(1, 12))
        B = int(rng.integers(1, 4))
        alpha = float(rng.uniform(0, 1))
        temp = float(rng.uniform(0.05, 2))
        gsim = np.sort(rng.uniform(-1, 1, size=(B, L)), axis=1)[:, ::-1].copy()
        calls = []

        def score(cand):
            calls.append(cand.shape)
            return np.stack([_contextual(b, cand[b]) for b in range(cand.shape[0])])

        perm = sliding_rerank(score, gsim, order, W, S, alpha, temp)
        assert len(calls) == len(_plain_starts(order, L, W, S))
        for b in range(B):
            expected = _plain_rerank(lambda c: _contextual(b, c), gsim[b], order, L, W, S, alpha, temp)
            assert perm[b].tolist() == expected, (order, L, W, S, b)
            assert sorted(perm[b].tolist()) == list(range(L))


def test_batched_queries_give_the_same_orders_as_one_at_a_time():
    rng = np.random.default_rng(3)
    gsim = rng.uniform(size=(5, 30))

    def score(cand):
        return np.stack([_contextual(b, cand[b]) for b in range(cand.shape[0])])

    together = sliding_rerank(score, gsim, "end-to-start-to-end", 8, 3, 0.5, 0.5)
    for b in range(5):
        alone = sliding_rerank(lambda c: _contextual(b, c[0])[None], gsim[b:b + 1], "end-to-start-to-end",
                               8, 3, 0.5, 0.5)
        assert together[b].tolist() == alone[0].tolist()


def test_sequence_length_check_names_the_limit():
    check_sequence_fits(100, 50, 5122, "a window")  # (1 + 100) * 50 = 5050 <= 5120
    with pytest.raises(SettingsError, match=r"\(1 \+ 102\) x 50 = 5150 tokens.*allows 5120.*at most 101"):
        check_sequence_fits(102, 50, 5122, "a window")
