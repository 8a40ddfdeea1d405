"""First-stage lists, ground truth and ranks files: what is read, what is refused (issues 10.3, 13.5, 13.9)."""
import pickle

import numpy as np
import pytest
import torch

from locore.data import DataError, read_gnd, read_neighbours, read_ranks


def _nn(Q=3, k=5, n=20, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(n)[:k] for _ in range(Q)])
    sims = np.sort(rng.random((Q, k)))[:, ::-1].astype(np.float32)
    return sims, ids


# ------------------------------------------------------------------------------------------------
# First-stage lists
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["numpy-float64", "numpy-float32", "tensor-float64", "tensor-float16-sims"])
def test_neighbours_as_numpy_arrays_and_tensors(tmp_path, how):
    sims, ids = _nn()
    path = tmp_path / "nn.pkl"
    if how == "numpy-float64":
        obj = np.stack([sims.astype(np.float64), ids.astype(np.float64)])
    elif how == "numpy-float32":
        obj = np.stack([sims, ids.astype(np.float32)])
    elif how == "tensor-float64":
        obj = torch.from_numpy(np.stack([sims.astype(np.float64), ids.astype(np.float64)]))
    else:
        obj = (torch.from_numpy(sims).half(), torch.from_numpy(ids))
    path.write_bytes(pickle.dumps(obj))
    nb = read_neighbours(path, num_images=20)
    np.testing.assert_array_equal(nb.ids, ids)
    assert nb.ids.dtype == np.int64 and nb.sims.dtype == np.float32
    np.testing.assert_allclose(nb.sims, sims, atol=1e-3)


@pytest.mark.parametrize("obj, expect", [
    ([[[0.9, 0.8], [0.7]], [[1, 2], [3]]], "not a rectangular array"),
    ((np.array([[0.9, 0.8]]), np.array([["a", "b"]])), "dtype <U1"),
    (np.array([[[0.9, 0.8]], [[1.0, 2.5]]]), "not whole numbers"),
    (np.array([[[0.9, 0.8]], [[1.0, np.nan]]]), "NaN or inf"),
    ((np.array([[0.9, 0.8]]), np.array([[True, False]])), "booleans"),
    (np.array([[[0.9, np.nan]], [[1.0, 2.0]]]), "query 0 has a NaN or inf similarity"),
    (np.zeros((2, 0, 5)), "empty neighbour lists"),
    (np.zeros((2, 3, 0)), "empty neighbour lists"),
    ({"ids": [1, 2]}, "rectangular|dtype"),
])
def test_malformed_neighbour_lists_are_refused(tmp_path, obj, expect):
    path = tmp_path / "nn.pkl"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(DataError, match=expect) as e:
        read_neighbours(path)
    assert "nn.pkl" in str(e.value)


def test_duplicate_and_out_of_range_ids_in_neighbour_lists_name_the_query(tmp_path):
    sims, ids = _nn(Q=4)
    ids[2, 3] = ids[2, 1]
    path = tmp_path / "nn.pkl"
    path.write_bytes(pickle.dumps(np.stack([sims, ids.astype(np.float32)])))
    with pytest.raises(DataError, match=rf"query 2 lists image id {ids[2, 1]} more than once"):
        read_neighbours(path)
    sims, ids = _nn(Q=4, n=20)
    ids[1, 4] = 25
    path.write_bytes(pickle.dumps((sims, ids)))
    read_neighbours(path)  # no database size given: any non-negative id
    read_neighbours(path, num_images=30)  # gallery + distractors: 25 is a distractor
    with pytest.raises(DataError, match=r"query 1, position 4: image id 25 out of range \[0, 20\)"):
        read_neighbours(path, num_images=20)
    ids[0, 0] = -1
    path.write_bytes(pickle.dumps((sims, ids)))
    with pytest.raises(DataError, match="query 0, position 0: image id -1"):
        read_neighbours(path)


# ------------------------------------------------------------------------------------------------
# Ground truth
# ------------------------------------------------------------------------------------------------

def _gnd_file(tmp_path, gnd, imlist=None, name="gnd_x.pkl"):
    path = tmp_path / name
    obj = {"gnd": gnd, "qimlist": ["q"] * (len(gnd) if isinstance(gnd, list) else 1)}
    if imlist is not None:
        obj["imlist"] = imlist
    path.write_bytes(pickle.dumps(obj))
    return path


@pytest.mark.parametrize("gnd, expect", [
    ({"easy": [1]}, "'gnd' is dict; expected a list"),
    ([["easy", [1]]], r"gnd\[0\] is list"),
    ([{"junk": [1]}], r"gnd\[0\] has neither easy / hard nor ok"),
    ([{"easy": "1,2"}], r"gnd\[0\]\['easy'\] is str"),
    ([{"easy": 3}], r"gnd\[0\]\['easy'\] is int"),
    ([{"easy": [1], "hard": ["a"]}], r"gnd\[0\]\['hard'\] has <U1 values"),
    ([{"easy": [[1, 2], [3]]}], r"gnd\[0\]\['easy'\] is not a flat list"),
    ([{"easy": [[1, 2], [3, 4]]}], r"shape \(2, 2\)"),
    ([{"easy": [1.5]}], "not whole numbers"),
    ([{"easy": [1]}, {"ok": [2, -1]}], r"gnd\[1\]\['ok'\]: image id -1 out of range"),
    ([{"easy": [1], "junk": [9]}], r"gnd\[0\]\['junk'\]: image id 9 out of range \[0, 5\)"),
])
def test_malformed_ground_truth_is_refused(tmp_path, gnd, expect):
    path = _gnd_file(tmp_path, gnd, imlist=list("abcde"))
    with pytest.raises(DataError, match=expect) as e:
        read_gnd(path)
    assert "gnd_x.pkl" in str(e.value)


def test_ground_truth_ids_are_checked_against_the_gallery_size(tmp_path):
    gldv2 = [{"ok": [0, 7]}, {"ok": []}, {"ok": np.array([3])}]  # GLDv2: ok lists, a query with none
    path = _gnd_file(tmp_path, gldv2)  # no imlist: only the sign can be checked
    out = read_gnd(path)
    assert out["gnd"][0]["ok"].tolist() == [0, 7] and out["gnd"][1]["ok"].size == 0
    assert read_gnd(path, num_images=8)["gnd"][2]["ok"].tolist() == [3]
    with pytest.raises(DataError, match=r"gnd\[0\]\['ok'\]: image id 7 out of range \[0, 7\)"):
        read_gnd(path, num_images=7)
    revisited = [{"easy": [1, 2], "hard": np.array([4], np.int32), "junk": [], "bbx": [0, 0, 1, 1]}]
    assert read_gnd(_gnd_file(tmp_path, revisited, list("abcde")))["gnd"][0]["hard"].tolist() == [4]
    with pytest.raises(DataError, match=r"\['hard'\]: image id 4 out of range \[0, 4\)"):
        read_gnd(_gnd_file(tmp_path, revisited, list("abcd")))
    bad = tmp_path / "gnd_bad.pkl"
    bad.write_bytes(pickle.dumps({"gnd": [{"easy": [1]}], "imlist": "abc"}))
    with pytest.raises(DataError, match="'imlist' is str"):
        read_gnd(bad)


# ------------------------------------------------------------------------------------------------
# Ranks files for evaluation
# ------------------------------------------------------------------------------------------------

def test_ranks_roundtrip(tmp_path):
    ranks = np.stack([np.random.default_rng(i).permutation(10) for i in range(3)]).astype(np.int32)
    np.save(tmp_path / "r.npy", ranks)
    out = read_ranks(tmp_path / "r.npy", num_images=10, num_queries=3)
    np.testing.assert_array_equal(out, ranks)
    assert out.dtype == np.int64
    np.save(tmp_path / "f.npy", np.asfortranarray(ranks.astype(np.uint16)))
    np.testing.assert_array_equal(read_ranks(tmp_path / "f.npy"), ranks)


def _huge_header(path, shape):
    """An .npy header claiming ``shape`` int64 followed by a few bytes of data."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": shape})
        f.write(np.arange(4, dtype=np.int64).tobytes())


@pytest.mark.parametrize("make, expect", [
    (lambda p: np.save(p, np.array([[0.0, 1.0]])), "dtype float64; expected integer"),
    (lambda p: np.save(p, np.array([[True, False]])), "dtype bool"),
    (lambda p: np.save(p, np.array([[0, "a"]], dtype=object), allow_pickle=True), "dtype object"),
    (lambda p: np.save(p, np.array([0, 1, 2])), r"shape \(3,\)"),
    (lambda p: np.save(p, np.zeros((4, 0), np.int64)), r"shape \(4, 0\) rank nothing"),
    (lambda p: np.save(p, np.zeros((0, 4), np.int64)), r"shape \(0, 4\) rank nothing"),
    (lambda p: np.save(p, np.array([[0, 1], [2, -3]])), "query 1, position 1: image id -3"),
    (lambda p: np.save(p, np.array([[0, 1], [2, 10]])), r"query 1, position 1: image id 10 out of range \[0, 10\)"),
    (lambda p: np.save(p, np.array([[0, 1, 2], [4, 2, 4]])), "query 1 lists image id 4 more than once"),
    (lambda p: _huge_header(p, (100000, 100000)), r"says \(100000, 100000\) int64 \(80000000000 bytes\)"),
    (lambda p: p.write_bytes(b"not numpy at all"), "not a readable .npy"),
    (lambda p: p.write_bytes(pickle.dumps(np.zeros((2, 2), np.int64))), "not a readable .npy"),
])
def test_malformed_ranks_are_refused(tmp_path, make, expect):
    path = tmp_path / "ranks.npy"
    make(path)
    with pytest.raises(DataError, match=expect) as e:
        read_ranks(path, num_images=10)
    assert "ranks.npy" in str(e.value)


def test_ranks_query_count_must_match(tmp_path):
    np.save(tmp_path / "r.npy", np.zeros((3, 1), np.int64))
    with pytest.raises(DataError, match="ranks 3 queries, the ground truth has 4"):
        read_ranks(tmp_path / "r.npy", num_queries=4)
    with pytest.raises(DataError, match="not found"):
        read_ranks(tmp_path / "none.npy")
