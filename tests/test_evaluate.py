"""Revisited mAP / mP@k, the two protocols, Recall@k and MAP@R against values computed by hand."""
import numpy as np
import pytest

from locore.evaluate import (compute_ap, compute_map, map_at_r, protocol_first_stage, protocol_runs,
                             recall_at_k, revisited_gnd, revisited_metrics)


def test_trapezoid_ap_by_hand():
    # positives at junk-free 0-based positions 1 and 3 of 2:
    # j=0, r=1: (0/1 + 1/2) / 2 * 1/2 = 0.125 ; j=1, r=3: (1/3 + 2/4) / 2 * 1/2 = 0.208333
    assert compute_ap([1, 3], 2) == pytest.approx(0.125 + (1 / 3 + 0.5) / 4)
    assert compute_ap([0, 1, 2], 3) == pytest.approx(1.0)
    assert compute_ap([], 4) == 0.0


def test_junk_is_skipped_before_the_first_positive():
    # list 5, 7(junk), 1(+), 9, 3(+), 2 -> junk-free positions of the positives: 1 and 3
    ranks = np.array([[5, 7, 1, 9, 3, 2]])
    m, aps, pr, prs = compute_map(ranks, [{"ok": [1, 3], "junk": [7]}], kappas=(1, 5, 10))
    assert m == pytest.approx(0.125 + (1 / 3 + 0.5) / 4)
    # mP@k (revisitop): 1-based positions 2, 4; k=1: kq=1 -> 0; k=5: kq=min(4,5)=4 -> 2/4; k=10 -> 2/4
    np.testing.assert_allclose(pr, [0.0, 0.5, 0.5])


def test_junk_between_positives_is_skipped():
    # 1(+), 7(junk), 3(+): the junk image does not count, AP = 1
    ranks = np.array([[1, 7, 3, 8, 9]])
    m, aps, pr, _ = compute_map(ranks, [{"ok": [1, 3], "junk": [7]}])
    assert m == pytest.approx(1.0)
    np.testing.assert_allclose(pr, [1.0, 1.0, 1.0])  # positions 1, 2: kq = min(2, k)
    # without the junk declaration, image 7 is a plain negative: (1+1)/2/2 + (1/2 + 2/3)/2/2
    m2, _, _, _ = compute_map(ranks, [{"ok": [1, 3], "junk": []}])
    assert m2 == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)


def test_unretrieved_positive_and_several_junk():
    # ok {1, 3, 4}, 4 never ranked; junk 7 and 8 both before 3:
    # 1 at 0 -> 0; 3 at 4 -> 4 - 2 = 2. AP = [(1 + 1)/2 + (1/2 + 2/3)/2] / 3
    ranks = np.array([[1, 7, 8, 6, 3, 2]])
    m, _, pr, _ = compute_map(ranks, [{"ok": [1, 3, 4], "junk": [7, 8]}])
    assert m == pytest.approx((1.0 + (0.5 + 2 / 3) / 2) / 3)
    # 1-based positions 1, 3: k=1 -> 1/1; k=5 -> kq=3 -> 2/3; k=10 -> 2/3
    np.testing.assert_allclose(pr, [1.0, 2 / 3, 2 / 3])


def test_queries_without_positives_are_left_out_and_missing_positives_score_zero():
    ranks = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    gnd = [{"ok": [1], "junk": []}, {"ok": [], "junk": [4]}, {"ok": [42], "junk": []}]
    m, aps, pr, prs = compute_map(ranks, gnd)
    assert np.isnan(aps[1]) and aps[0] == 1.0 and aps[2] == 0.0
    assert m == pytest.approx(0.5)
    np.testing.assert_allclose(pr, [0.5, 0.5, 0.5])


def test_revisited_splits():
    g = [{"easy": np.array([1]), "hard": np.array([3]), "junk": np.array([7])}]
    e, m, h = (revisited_gnd(g, s)[0] for s in ("easy", "medium", "hard"))
    assert sorted(e["ok"]) == [1] and sorted(e["junk"]) == [3, 7]
    assert sorted(m["ok"]) == [1, 3] and sorted(m["junk"]) == [7]
    assert sorted(h["ok"]) == [3] and sorted(h["junk"]) == [1, 7]
    # list 5, 7, 1, 9, 3, 2
    # Easy: ok {1}, junk {7, 3}: 1 at 2 -> 1 => AP = (0 + 1/2)/2 = 0.25
    # Medium: ok {1, 3}, junk {7}: 0.125 + 0.208333 (see above)
    # Hard: ok {3}, junk {7, 1}: 3 at 4 -> 2 => AP = (0 + 1/3)/2 = 1/6
    out = revisited_metrics(np.array([[5, 7, 1, 9, 3, 2]]), g)
    assert out["easy"]["mAP"] == pytest.approx(25.0)
    assert out["medium"]["mAP"] == pytest.approx(100 * (0.125 + (1 / 3 + 0.5) / 4))
    assert out["hard"]["mAP"] == pytest.approx(100 / 6)
    assert out["hard"]["mP@1"] == 0.0 and out["hard"]["mP@5"] == pytest.approx(100 / 3)


def test_reference_protocol_moves_junk_and_easy_to_the_end():
    ids = np.array([[5, 7, 1, 9, 3, 2]])
    sims = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    gnd = [{"easy": np.array([1]), "hard": np.array([3]), "junk": np.array([7])}]
    mi, ms = protocol_first_stage(ids, sims, gnd, "medium")
    assert mi.tolist() == [[5, 1, 9, 3, 2, 7]]
    np.testing.assert_allclose(ms, [[0.9, 0.7, 0.6, 0.5, 0.4, 0.8]])
    hi, hs = protocol_first_stage(ids, sims, gnd, "hard")
    assert hi.tolist() == [[5, 9, 3, 2, 7, 1]]
    np.testing.assert_allclose(hs, [[0.9, 0.6, 0.5, 0.4, 0.8, 0.7]])
    assert ids.tolist() == [[5, 7, 1, 9, 3, 2]]  # input untouched


def test_protocol_runs():
    assert protocol_runs("reference", "both") == [("medium", ("easy", "medium")), ("hard", ("hard",))]
    assert protocol_runs("reference", "hard") == [("hard", ("hard",))]
    assert protocol_runs("clean", "both") == [("clean", ("easy", "medium", "hard"))]
    with pytest.raises(ValueError):
        protocol_runs("fancy", "both")


def test_recall_and_map_at_r_by_hand():
    db = np.array([0, 1, 1, 0, 2, 1])
    q = np.array([0, 1])
    ranks = np.array([[3, 1, 2], [0, 4, 5]])
    # q0: first result has class 0; q1: first class-1 result at position 3
    assert recall_at_k(ranks, q, db, ks=(1, 2, 3)) == {1: 0.5, 2: 0.5, 3: 1.0}
    # q0: R=2, top-2 rel [1, 0] -> (1)/2 = 0.5; q1: R=3, top-3 rel [0, 0, 1] -> (1/3)/3
    assert map_at_r(ranks, q, db) == pytest.approx((0.5 + 1 / 9) / 2)


def test_recall_and_map_at_r_exclude_the_query_itself():
    db = np.array([0, 0, 1, 1, 1])
    q = np.array([0, 1])
    qids = np.array([0, 2])
    ranks = np.array([[0, 3, 1, 2, 4], [2, 3, 0, 4, 1]])
    # q0 without itself: [3, 1, 2, 4], R = 1, top-1 class 1 -> 0; q1: [3, 0, 4, 1], R = 2, rel [1, 0] -> 1/2
    assert map_at_r(ranks, q, db, query_db_ids=qids) == pytest.approx(0.25)
    assert recall_at_k(ranks, q, db, ks=(1, 2), query_db_ids=qids) == {1: 0.5, 2: 1.0}


def _revisitop_map(ranks_t, gnd, kappas):
    """revisitop's compute_map as published (ranks transposed: [n, Q]), kept as plain loops."""
    nq = len(gnd)
    aps, prs, nempty, mp = np.zeros(nq), np.zeros((nq, len(kappas))), 0, 0.0
    pr = np.zeros(len(kappas))
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = np.nan
            nempty += 1
            continue
        qgndj = np.array(gnd[i]["junk"])
        pos = np.arange(ranks_t.shape[0])[np.isin(ranks_t[:, i], qgnd)]
        junk = np.arange(ranks_t.shape[0])[np.isin(ranks_t[:, i], qgndj)]
        k = ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = compute_ap(pos, min(len(qgnd), ranks_t.shape[0]))
        mp += ap
        aps[i] = ap
        if len(pos):
            pos = pos + 1
            for j, kap in enumerate(kappas):
                kq = min(max(pos), kap)
                prs[i, j] = (pos <= kq).sum() / kq
            pr = pr + prs[i]
    return mp / (nq - nempty), pr / (nq - nempty)


def test_compute_map_matches_revisitop_loops_on_random_lists():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n_db, nq = 60, 6
        ranks = np.stack([rng.permutation(n_db)[:40] for _ in range(nq)])
        gnd = []
        for _ in range(nq):
            ids = rng.permutation(n_db)
            gnd.append({"easy": ids[:rng.integers(0, 6)], "hard": ids[6:6 + rng.integers(0, 6)],
                        "junk": ids[12:12 + rng.integers(0, 8)]})
        for split in ("easy", "medium", "hard"):
            g = revisited_gnd(gnd, split)
            if all(len(x["ok"]) == 0 for x in g):
                continue
            m, _, pr, _ = compute_map(ranks, g, (1, 5, 10))
            m_ref, pr_ref = _revisitop_map(ranks.T.copy(), g, (1, 5, 10))
            assert m == pytest.approx(m_ref, abs=1e-12)
            np.testing.assert_allclose(pr, pr_ref, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# GLDv2 mAP@100 (rectangular rule, SPEC §7)
# --------------------------------------------------------------------------------------------------

from locore.evaluate import GLDV2_PRIVATE, gldv2_ap, gldv2_metrics  # noqa: E402


def test_gldv2_ap_by_hand():
    row = np.array([5, 1, 7, 2, 9])
    # positives 1 (position 1) and 2 (position 3): (1/2 + 2/4) / min(2, 100)
    assert gldv2_ap(row, [1, 2]) == pytest.approx((1 / 2 + 2 / 4) / 2)
    # a positive that is never ranked still counts in the denominator (nres = #ok)
    assert gldv2_ap(row, [1, 2, 42]) == pytest.approx((1 / 2 + 2 / 4) / 3)
    assert np.isnan(gldv2_ap(row, []))


def test_gldv2_ap_cuts_at_100_and_caps_the_denominator():
    row = np.arange(300)
    ok = [0, 150, 250]                       # only position 0 lies within the first 100
    assert gldv2_ap(row, ok) == pytest.approx(1.0 / 3)
    many = np.arange(0, 300, 2)              # 150 positives: nres = min(150, 100) = 100
    expected = sum((j + 1) / (p + 1) for j, p in enumerate(range(0, 100, 2))) / 100
    assert gldv2_ap(row, many) == pytest.approx(expected)
    # no junk skipping: an image listed as junk is just a miss
    assert gldv2_ap(np.array([3, 4]), [4]) == pytest.approx(0.5)


def test_gldv2_splits_public_private_combined_and_leaves_out_queries_without_positives():
    nq = GLDV2_PRIVATE + 3
    ranks = np.tile(np.arange(10), (nq, 1))
    gnd = [{"ok": [0]} for _ in range(nq)]        # AP 1 everywhere ...
    gnd[0] = {"ok": [1]}                           # ... but 0.5 for the first public query
    gnd[1] = {"ok": []}                            # left out
    gnd[-1] = {"ok": [9]}                          # 0.1 for the last private query
    m = gldv2_metrics(ranks, gnd, "gldv2-test")
    assert m["public"] == pytest.approx(100 * (0.5 + 1.0) / 2)
    assert m["private"] == pytest.approx(100 * (GLDV2_PRIVATE - 1 + 0.1) / GLDV2_PRIVATE)
    assert m["combined"] == pytest.approx(100 * (0.5 + 1.0 + GLDV2_PRIVATE - 1 + 0.1) / (nq - 1))
    val = gldv2_metrics(ranks, gnd, "gldv2-val")   # public only: the trailing 750 entries are dropped
    assert set(val) == {"public"} and val["public"] == pytest.approx(m["public"])
    assert gldv2_metrics(ranks[:3], gnd, "gldv2-val") == val


def test_gldv2_refuses_mismatched_ground_truth():
    with pytest.raises(ValueError, match="ground truth"):
        gldv2_metrics(np.zeros((3, 5), np.int64), [{"ok": [1]}] * 4, "gldv2-test")
    with pytest.raises(ValueError, match="'ok'"):
        gldv2_metrics(np.zeros((1, 5), np.int64), [{"easy": [1]}], "gldv2-test")
    with pytest.raises(ValueError, match="gldv2-val"):
        gldv2_metrics(np.zeros((5, 5), np.int64), [{"ok": [1]}] * 10, "gldv2-val")
