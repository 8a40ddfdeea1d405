"""``locore rerank`` / ``locore eval`` on the real-data layouts: +1M-style distractors, gallery shards and the
GLDv2 protocols. Each is checked against an equivalent run on a plain folder (same ranks), not against
hand-written numbers."""
import json
import os
import shutil

import h5py
import numpy as np
import pytest

from locore import cli
from locore.data import (GlobalFeatures, LocalFeatures, read_gnd, read_neighbours, write_global, write_gnd,
                         write_local, write_neighbours)
from locore.demo import generate_problem
from locore.evaluate import GLDV2_PRIVATE, gldv2_metrics

FAST = ["--checkpoint", "preset:tiny", "--num-layers", "2", "--descriptors", "8", "--device", "cpu",
        "--dtype", "float32", "--no-progress", "--alpha", "0.5", "--temp", "0.5"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("ames")
    generate_problem(str(d), queries=3, images=50, slots=10, num_descriptors=8, seed=3)
    return d


def _run(capsys, argv):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _read_all_local(path):
    with h5py.File(path, "r") as f:
        return f["features"][...]


def _copy_queries(src, dst):
    for name in ("demo_query_local.hdf5", "demo_query_global.pt", "gnd_demo.pkl"):
        shutil.copy(src / name, dst / name)


def test_distractors_equal_a_physically_joined_gallery(folder, tmp_path, capsys):
    """The database read as gallery + --distractors (ids n..n+m-1) gives the ranks of one folder whose gallery
    file holds the same images joined, with the same first-stage list over the combined database."""
    rng = np.random.default_rng(0)
    n, m = 50, 20
    dis = tmp_path / "r1m"
    dis.mkdir()
    d_local = rng.standard_normal((m, 10, 768)).astype(np.float32)
    write_local(dis / "demo_local.hdf5", d_local, rng.integers(0, 3, (m, 10)), np.zeros((m, 10), bool))
    d_glob = rng.standard_normal((m, 768)).astype(np.float32)
    d_glob /= np.linalg.norm(d_glob, axis=1, keepdims=True)
    write_global(dis / "demo_global.pt", d_glob)
    # first stage over the combined database; put some distractors at the top of every list
    q_glob = GlobalFeatures(folder / "demo_query_global.pt", num_images=3).read(np.arange(3))
    g_glob = np.concatenate([GlobalFeatures(folder / "demo_gallery_global.pt", num_images=n).read(np.arange(n)),
                             d_glob])
    sims = q_glob @ g_glob.T
    sims[:, n:n + 3] += 2.0
    ids = np.argsort(-sims, axis=1, kind="stable")
    nn_path = tmp_path / "nn_1m.pkl"
    write_neighbours(nn_path, np.take_along_axis(sims, ids, axis=1), ids)
    assert (ids[:, :12] >= n).any()  # the shortlist holds distractors

    rc, stdout, _ = _run(capsys, ["rerank", *FAST, "--data", str(folder), "--desc", "demo", "--distractors", str(dis),
                                  "--nn", str(nn_path), "--topk", "12", "--out", str(tmp_path / "with1m.npy")])
    assert rc == 0 and f"{n + m} database images" in stdout

    joined = tmp_path / "joined"
    joined.mkdir()
    _copy_queries(folder, joined)
    g = _read_all_local(folder / "demo_gallery_local.hdf5")
    with h5py.File(joined / "demo_gallery_local.hdf5", "w") as f:
        f["features"] = np.concatenate([g, _read_all_local(dis / "demo_local.hdf5")])
    write_global(joined / "demo_gallery_global.pt", g_glob)
    rc, _, _ = _run(capsys, ["rerank", *FAST, "--data", str(joined), "--desc", "demo", "--nn", str(nn_path),
                             "--topk", "12", "--out", str(tmp_path / "joined.npy")])
    assert rc == 0
    for suffix in ("", "_hard"):
        np.testing.assert_array_equal(np.load(tmp_path / f"with1m{suffix}.npy"),
                                      np.load(tmp_path / f"joined{suffix}.npy"))


def test_gnd_ids_past_the_gallery_are_refused_with_distractors(folder, tmp_path, capsys):
    """Distractors are never positives: a gnd naming a distractor id is refused, naming the file."""
    dis = tmp_path / "r1m"
    dis.mkdir()
    write_local(dis / "demo_local.hdf5", np.zeros((4, 10, 768), np.float32))
    write_global(dis / "demo_global.pt", np.zeros((4, 768), np.float32))
    gnd = read_gnd(folder / "gnd_demo.pkl")
    bad = [dict(g) for g in gnd["gnd"]]
    bad[1]["easy"] = list(bad[1]["easy"]) + [51]
    write_gnd(tmp_path / "gnd.pkl", bad, gnd["imlist"], gnd["qimlist"])
    rc, _, err = _run(capsys, ["rerank", *FAST, "--data", str(folder), "--desc", "demo", "--distractors", str(dis),
                               "--gnd", str(tmp_path / "gnd.pkl"), "--topk", "6", "--out", str(tmp_path / "r.npy")])
    assert rc != 0 and "gnd.pkl" in err and "51" in err
    assert not os.path.exists(tmp_path / "r.npy")


@pytest.mark.parametrize("how", ["split-names", "glob", "list"])
def test_gallery_shards_equal_one_gallery_file(folder, tmp_path, capsys, how):
    base = tmp_path / "base.npy"
    rc, _, _ = _run(capsys, ["rerank", *FAST, "--data", str(folder), "--desc", "demo", "--topk", "8",
                             "--protocol", "clean", "--out", str(base)])
    assert rc == 0
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    _copy_queries(folder, sharded)
    shutil.copy(folder / "demo_gallery_global.pt", sharded / "demo_gallery_global.pt")
    shutil.copy(folder / "nn_demo.pkl", sharded / "nn_demo.pkl")
    g = _read_all_local(folder / "demo_gallery_local.hdf5")
    names = ["demo_gallery_local_xaa.hdf5", "demo_gallery_local_xab.hdf5", "demo_gallery_local_xac.hdf5"]
    for name, part in zip(names, np.split(g, [17, 33])):  # uneven shards
        with h5py.File(sharded / name, "w") as f:
            f["features"] = part
    extra = {"split-names": [], "glob": ["--gallery-shards", str(sharded / "demo_gallery_local_xa?.hdf5")],
             "list": ["--gallery-shards", *[str(sharded / n) for n in names]]}[how]
    rc, _, _ = _run(capsys, ["rerank", *FAST, "--data", str(sharded), "--desc", "demo", "--topk", "8",
                             "--protocol", "clean", *extra, "--out", str(tmp_path / "s.npy")])
    assert rc == 0
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), np.load(base))


def _gldv2_folder(folder, dst, trailing=0):
    """The demo problem with GLDv2-style ground truth: ``ok`` = easy + hard; ``trailing`` extra entries."""
    dst.mkdir()
    for name in os.listdir(folder):
        if name != "gnd_demo.pkl":
            shutil.copy(folder / name, dst / name)
    gnd = read_gnd(folder / "gnd_demo.pkl")
    ok = [{"ok": sorted(list(g["easy"]) + list(g["hard"]))} for g in gnd["gnd"]]
    ok += [{"ok": [i % 50]} for i in range(trailing)]
    write_gnd(dst / "gnd_gldv2.pkl", ok, gnd["imlist"], gnd["qimlist"] + [f"t{i}" for i in range(trailing)])
    return ok


def test_gldv2_test_protocol_rerank_and_eval_agree(folder, tmp_path, capsys):
    d = tmp_path / "gldv2"
    ok = _gldv2_folder(folder, d)
    out = tmp_path / "g.npy"
    rc, stdout, _ = _run(capsys, ["rerank", *FAST, "--data", str(d), "--desc", "demo", "--topk", "10",
                                  "--out", str(out)])
    assert rc == 0 and "protocol gldv2-test" in stdout  # chosen from the ok lists
    summary = json.loads((tmp_path / "g.json").read_text())
    ranks, nn = np.load(out), read_neighbours(d / "nn_demo.pkl")
    assert not os.path.exists(tmp_path / "g_hard.npy")  # one run, no junk moving
    m = summary["metrics"]["mAP@100"]
    want = gldv2_metrics(ranks, ok, "gldv2-test")
    assert m["reranked"]["combined"] == round(want["combined"], 2)
    assert m["first_stage"]["combined"] == round(gldv2_metrics(nn.ids, ok, "gldv2-test")["combined"], 2)
    rc, stdout, _ = _run(capsys, ["eval", "--ranks", str(out), "--gnd", str(d / "gnd_gldv2.pkl"),
                                  "--json", str(tmp_path / "e.json")])
    assert rc == 0 and "gldv2-test mAP@100" in stdout
    assert json.loads((tmp_path / "e.json").read_text())["metrics"]["mAP@100"]["combined"] == m["reranked"]["combined"]


def test_gldv2_val_reranks_all_but_the_trailing_750(folder, tmp_path, capsys):
    d = tmp_path / "val"
    ok = _gldv2_folder(folder, d, trailing=GLDV2_PRIVATE)
    out = tmp_path / "v.npy"
    rc, stdout, _ = _run(capsys, ["rerank", *FAST, "--data", str(d), "--desc", "demo", "--topk", "10",
                                  "--protocol", "gldv2-val", "--out", str(out)])
    assert rc == 0
    ranks = np.load(out)
    assert ranks.shape[0] == 3
    m = json.loads((tmp_path / "v.json").read_text())["metrics"]["mAP@100"]
    assert set(m["reranked"]) == {"public"}
    assert m["reranked"]["public"] == round(gldv2_metrics(ranks, ok, "gldv2-val")["public"], 2)
    rc, stdout, _ = _run(capsys, ["eval", "--ranks", str(out), "--gnd", str(d / "gnd_gldv2.pkl"),
                                  "--protocol", "gldv2-val"])
    assert rc == 0 and f"public {m['reranked']['public']:.2f}" in stdout


def test_gldv2_val_needs_the_trailing_entries(folder, tmp_path, capsys):
    d = tmp_path / "val"
    _gldv2_folder(folder, d, trailing=5)
    rc, _, err = _run(capsys, ["rerank", *FAST, "--data", str(d), "--desc", "demo", "--topk", "10",
                               "--protocol", "gldv2-val", "--out", str(tmp_path / "v.npy")])
    assert rc != 0 and "gnd_gldv2.pkl" in err and "gldv2-val" in err


def test_eval_bounds_ranks_by_the_database(folder, tmp_path, capsys):
    nn = read_neighbours(folder / "nn_demo.pkl")
    ranks = nn.ids.copy()
    ranks[1, 4] = 60  # a distractor id past the 50 gallery images
    np.save(tmp_path / "r.npy", ranks)
    gnd = str(folder / "gnd_demo.pkl")
    rc, _, err = _run(capsys, ["eval", "--ranks", str(tmp_path / "r.npy"), "--gnd", gnd])
    assert rc != 0 and "r.npy" in err and "60" in err
    rc, _, _ = _run(capsys, ["eval", "--ranks", str(tmp_path / "r.npy"), "--gnd", gnd, "--num-images", "70"])
    assert rc == 0
    ranks[1, 5] = ranks[1, 6]  # a repeated id inflates AP: refused, naming the query
    np.save(tmp_path / "d.npy", ranks)
    rc, _, err = _run(capsys, ["eval", "--ranks", str(tmp_path / "d.npy"), "--gnd", gnd, "--num-images", "70"])
    assert rc != 0 and "d.npy" in err and "1" in err
