"""``locore.search``: exact blocked search against brute force, the nn file, FAISS indexes, bad input, memory."""
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from locore.data import read_neighbours
from locore.data.global_desc import ConcatGlobal, GlobalFeatures, write_global
from locore.search import (SearchError, SearchSettings, brute_force_search, exact_search, index_path_for,
                           open_search_files, recall_at, run_search, search_folder)

QUIET = dict(progress=False)


def _reference(queries, database, k):
    """Independent definition: float64 inner products, ordered by (similarity desc, id asc) with lexsort.
    Exact for the integer-valued data used where ties matter."""
    sims = queries.astype(np.float64) @ database.astype(np.float64).T
    ids = np.stack([np.lexsort((np.arange(len(database)), -row))[:k] for row in sims])
    return np.take_along_axis(sims, ids, 1), ids


def _folder(tmp_path, q, g, distractors=None, fmt="raw"):
    write_global(tmp_path / "x_query_global.pt", q, format=fmt)
    write_global(tmp_path / "x_gallery_global.pt", g, format=fmt)
    if distractors is not None:
        os.makedirs(tmp_path / "1m", exist_ok=True)
        write_global(tmp_path / "1m" / "x_global.pt", distractors, format=fmt)
    return tmp_path


@pytest.mark.parametrize("block_rows", [16, 1000])
def test_exact_equals_brute_force(block_rows):
    rng = np.random.default_rng(block_rows)
    q, db = rng.standard_normal((9, 24)).astype(np.float32), rng.standard_normal((300, 24)).astype(np.float32)
    g = _in_memory(db)
    for k in (1, 17, 300):
        sims, ids = exact_search(q, g, SearchSettings(topk=k, block_rows=block_rows, **QUIET))
        bv, bi = brute_force_search(q, db, k)
        np.testing.assert_array_equal(ids, bi)
        # the same float32 products up to the last bit (BLAS may pick another kernel for a block's shape)
        np.testing.assert_allclose(sims, bv, rtol=1e-6, atol=1e-5)
        rv, ri = _reference(q, db, k)
        np.testing.assert_array_equal(ids, ri)
        np.testing.assert_allclose(sims, rv, rtol=0, atol=1e-5)


def test_ties_go_to_the_smaller_id():
    # integer values: every inner product is exact, and duplicated rows tie exactly across block borders
    rng = np.random.default_rng(3)
    base = rng.integers(-2, 3, size=(40, 6)).astype(np.float32)
    db = np.concatenate([base, base[::-1], base[:13], rng.integers(-1, 2, size=(200, 6)).astype(np.float32)])
    q = rng.integers(-2, 3, size=(11, 6)).astype(np.float32)
    for block_rows in (9, 1000):
        for k in (1, 55, len(db)):
            sims, ids = exact_search(q, _in_memory(db), SearchSettings(topk=k, block_rows=block_rows, **QUIET))
            rv, ri = _reference(q, db, k)
            np.testing.assert_array_equal(ids, ri)
            np.testing.assert_array_equal(sims, rv.astype(np.float32))
    _, ids = exact_search(q, _in_memory(np.ones((50, 6), np.float32)), SearchSettings(topk=20, block_rows=8, **QUIET))
    np.testing.assert_array_equal(ids, np.tile(np.arange(20), (11, 1)))  # all tied: ids 0..19 in order


def test_flat_matches_faiss_index_flat_ip():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(5)
    q, db = rng.standard_normal((6, 32)).astype(np.float32), rng.standard_normal((2000, 32)).astype(np.float32)
    index = faiss.IndexFlatIP(32)
    index.add(db)
    fs, fi = index.search(q, 100)
    sims, ids = exact_search(q, _in_memory(db), SearchSettings(topk=100, block_rows=300, **QUIET))
    np.testing.assert_array_equal(ids, fi)  # no ties in continuous data: the same lists
    np.testing.assert_allclose(sims, fs, rtol=0, atol=1e-5)


def _in_memory(arr, tmp=None):
    """A GlobalFeatures over ``arr`` (written to a temp raw file)."""
    import tempfile

    d = tmp or tempfile.mkdtemp()
    path = os.path.join(d, f"db{np.random.default_rng().integers(1 << 30)}.pt")
    write_global(path, arr)
    return GlobalFeatures(path, dim=arr.shape[1])


@pytest.mark.parametrize("fmt", ["raw", "torch"])
def test_folder_with_distractors_writes_the_ames_layout(tmp_path, fmt):
    rng = np.random.default_rng(7)
    q = rng.standard_normal((5, 16)).astype(np.float32)
    g, dis = rng.standard_normal((60, 16)).astype(np.float32), rng.standard_normal((140, 16)).astype(np.float32)
    g[3] = dis[10]  # a gallery image and a distractor tie: the gallery (smaller id) wins
    _folder(tmp_path, q, g, dis, fmt)
    res = search_folder(str(tmp_path), "x", SearchSettings(topk=50, block_rows=32, **QUIET), dim=16,
                        distractors=str(tmp_path / "1m"), log=lambda s: None)
    out = tmp_path / "nn_x.pkl"
    assert res.out == str(out) and os.path.isfile(out)
    with open(out, "rb") as f:
        raw = pickle.load(f)
    assert tuple(raw.shape) == (2, 5, 50) and str(raw.dtype) == "torch.float32"  # AMES [2, Q, M]
    nn = read_neighbours(str(out))  # the re-ranker's reader
    rv, ri = _reference(q, np.concatenate([g, dis]), 50)
    np.testing.assert_array_equal(nn.ids, ri)
    np.testing.assert_allclose(nn.sims, rv, atol=1e-5)
    assert (nn.ids >= 60).any() and (nn.ids < 60).any()  # distractors are ids 60..199
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # the temp file was renamed


def test_gallery_shards_and_distractor_shards_read_as_one_database(tmp_path):
    """Gallery globals split as ``split`` names them (_xaa, _xab, ...) and sharded distractors give the
    lists of one joined database."""
    rng = np.random.default_rng(11)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    g, dis = rng.standard_normal((30, 8)).astype(np.float32), rng.standard_normal((25, 8)).astype(np.float32)
    write_global(tmp_path / "x_query_global.pt", q)
    for name, part in zip(("xaa", "xab", "xac"), np.split(g, [7, 20])):
        write_global(tmp_path / f"x_gallery_global_{name}.pt", part)
    os.makedirs(tmp_path / "1m")
    for name, part in zip(("xaa", "xab"), np.split(dis, [12])):
        write_global(tmp_path / "1m" / f"x_global_{name}.pt", part, format="torch")
    res = search_folder(str(tmp_path), "x", SearchSettings(topk=55, **QUIET), dim=8, distractors=str(tmp_path / "1m"),
                        log=lambda s: None)
    nn = read_neighbours(res.out)
    rv, ri = _reference(q, np.concatenate([g, dis]), 55)
    np.testing.assert_array_equal(nn.ids, ri)
    np.testing.assert_allclose(nn.sims, rv, atol=1e-5)
    os.remove(tmp_path / "x_gallery_global_xab.pt")  # a missing middle shard shifts ids: never silently
    with pytest.raises(SearchError):
        search_folder(str(tmp_path), "x", SearchSettings(topk=5, overwrite=True, **QUIET), dim=8, log=lambda s: None)


def test_rerank_first_stage_over_gallery_and_distractors(tmp_path, capsys):
    """``rerank --first-stage faiss --distractors DIR`` searches the combined database (ids past the gallery
    come from the distractors) and re-ranks over it."""
    from locore import cli
    from locore.data import write_local
    from locore.demo import generate_problem

    data, dis = tmp_path / "data", tmp_path / "r1m"
    generate_problem(str(data), queries=3, images=50, slots=10, num_descriptors=8, seed=4)
    os.remove(data / "nn_demo.pkl")
    rng = np.random.default_rng(0)
    os.makedirs(dis)
    write_local(dis / "demo_local.hdf5", rng.standard_normal((20, 10, 768)).astype(np.float32),
                rng.integers(0, 3, (20, 10)), np.zeros((20, 10), bool))
    qg = GlobalFeatures(str(data / "demo_query_global.pt"), num_images=3).read(np.arange(3))
    write_global(dis / "demo_global.pt", qg[rng.integers(0, 3, 20)] + 0.01 * rng.standard_normal((20, 768)))
    assert cli.main(["rerank", "--checkpoint", "preset:tiny", "--num-layers", "2", "--descriptors", "8",
                     "--device", "cpu", "--dtype", "float32", "--no-progress", "--data", str(data), "--desc", "demo",
                     "--distractors", str(dis), "--first-stage", "faiss", "--topk", "10", "--alpha", "0.5",
                     "--temp", "0.5", "--protocol", "clean", "--out", str(tmp_path / "r.npy")]) == 0
    assert "70 database images" in capsys.readouterr().out
    nn = read_neighbours(str(data / "nn_demo.pkl"))
    assert nn.topk == 70 and (nn.ids[:, :10] >= 50).any()  # near-duplicate distractors lead the lists
    ref = search_folder(str(data), "demo", SearchSettings(topk=70, **QUIET), out=str(tmp_path / "ref.pkl"),
                        distractors=str(dis), log=lambda s: None)
    np.testing.assert_array_equal(read_neighbours(ref.out).ids, nn.ids)


def test_refuses_to_overwrite_and_writes_all_or_nothing(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    _folder(tmp_path, rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((30, 8)).astype(np.float32))
    out = tmp_path / "nn_x.pkl"
    out.write_bytes(b"keep me")
    with pytest.raises(SearchError, match=r"nn_x\.pkl exists; pass --overwrite"):
        search_folder(str(tmp_path), "x", SearchSettings(topk=5, **QUIET), dim=8, log=lambda s: None)
    assert out.read_bytes() == b"keep me"

    def broken_dump(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pickle, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        search_folder(str(tmp_path), "x", SearchSettings(topk=5, overwrite=True, **QUIET), dim=8, log=lambda s: None)
    assert out.read_bytes() == b"keep me" and sorted(os.listdir(tmp_path)) == [
        "nn_x.pkl", "x_gallery_global.pt", "x_query_global.pt"]
    monkeypatch.undo()
    search_folder(str(tmp_path), "x", SearchSettings(topk=5, overwrite=True, **QUIET), dim=8, log=lambda s: None)
    assert read_neighbours(str(out)).ids.shape == (3, 5)


def test_rerank_reads_the_search_output(tmp_path, capsys):
    """The demo folder's nn file is an exact first stage: the search rebuilds the same lists, the
    re-ranker reads them (its ranks: the top 10 re-ordered, the rest the first stage), and
    ``rerank --first-stage faiss`` makes the same file itself when it is missing."""
    from locore import cli
    from locore.data import read_gnd
    from locore.demo import generate_problem
    from locore.evaluate import protocol_first_stage

    data = tmp_path / "data"
    generate_problem(str(data), queries=3, images=50, slots=10, num_descriptors=8,
                     seed=2)
    ours = tmp_path / "nn_search.pkl"
    search_folder(str(data), "demo", SearchSettings(topk=50, block_rows=16, **QUIET), out=str(ours),
                  log=lambda s: None)
    given, built = read_neighbours(str(data / "nn_demo.pkl")), read_neighbours(str(ours))
    np.testing.assert_array_equal(built.ids, given.ids)
    np.testing.assert_allclose(built.sims, given.sims, atol=1e-5)
    common = ["rerank", "--checkpoint", "preset:tiny", "--num-layers", "2", "--descriptors", "8", "--device",
              "cpu", "--dtype", "float32", "--no-progress", "--data", str(data), "--desc", "demo",
              "--topk", "10", "--alpha", "0.5", "--temp", "0.5"]
    assert cli.main([*common, "--nn", str(ours), "--out", str(tmp_path / "r.npy")]) == 0
    assert "first-stage lists of 50" in capsys.readouterr().out
    ranks = np.load(tmp_path / "r.npy")
    assert ranks.shape == (3, 50)
    first, _ = protocol_first_stage(built.ids, built.sims, read_gnd(str(data / "gnd_demo.pkl"))["gnd"], "medium")
    for q in range(3):  # the shortlist re-ordered, the rest as the (protocol-filtered) first stage
        assert sorted(ranks[q, :10]) == sorted(first[q, :10])
        np.testing.assert_array_equal(ranks[q, 10:], first[q, 10:])
    # one command from descriptors: without an nn file, --first-stage faiss builds it, then re-ranks
    os.remove(data / "nn_demo.pkl")
    assert cli.main([*common, "--first-stage", "faiss", "--out", str(tmp_path / "f" / "r.npy")]) == 0
    assert "flat search: 3 queries x 50 images" in capsys.readouterr().out
    np.testing.assert_array_equal(read_neighbours(str(data / "nn_demo.pkl")).ids, given.ids)
    np.testing.assert_array_equal(np.load(tmp_path / "f" / "r.npy"), ranks)


def _clustered(n, d, clusters, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32) * 3
    x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall_reuse_and_refusal(tmp_path, kind):
    pytest.importorskip("faiss")
    db = _clustered(3000, 16, 30, seed=1)
    q = _clustered(8, 16, 30, seed=2)
    _folder(tmp_path, q, db)
    logs = []
    settings = SearchSettings(topk=50, index=kind, nprobe=16, **QUIET)
    res = search_folder(str(tmp_path), "x", settings, dim=16, log=logs.append)
    index_file = index_path_for(str(tmp_path / "nn_x.pkl"), kind)
    assert res.index_path == index_file and os.path.isfile(index_file) and not res.index_reused
    assert res.recall is not None and res.recall > 0.9
    assert any(f"recall@50 against exact search: {res.recall:.4f}" in line for line in logs)
    _, exact_ids = exact_search(q, GlobalFeatures(tmp_path / "x_gallery_global.pt", dim=16),
                                SearchSettings(topk=50, **QUIET))
    assert recall_at(res.ids, exact_ids) == pytest.approx(res.recall)

    again = search_folder(str(tmp_path), "x", SearchSettings(topk=50, index=kind, nprobe=16, overwrite=True,
                                                             **QUIET), dim=16, log=logs.append)
    assert again.index_reused and any("reusing" in line for line in logs)
    np.testing.assert_array_equal(again.ids, res.ids)

    # other build parameters, then other data: refused, never silently used; --overwrite rebuilds
    other = dict(nlist=20) if kind == "ivf" else dict(hnsw_m=8)
    os.remove(tmp_path / "nn_x.pkl")  # (so that the existing output is not what gets refused)
    with pytest.raises(SearchError, match=r"nn_x\.%s\.faiss was built for other data \(its parameters differ\); "
                                          r"delete it or pass --overwrite" % kind):
        search_folder(str(tmp_path), "x", SearchSettings(topk=50, index=kind, **other, **QUIET), dim=16,
                      log=logs.append)
    write_global(tmp_path / "x_gallery_global.pt", db[::-1])
    with pytest.raises(SearchError, match=r"built for other data \(its database differs\)"):
        search_folder(str(tmp_path), "x", SearchSettings(topk=50, index=kind, **QUIET), dim=16, log=logs.append)
    assert not os.path.exists(tmp_path / "nn_x.pkl")
    rebuilt = search_folder(str(tmp_path), "x", SearchSettings(topk=50, index=kind, nprobe=16, overwrite=True,
                                                               **QUIET), dim=16, log=logs.append)
    assert not rebuilt.index_reused and rebuilt.recall > 0.9
    assert any("rebuilding" in line for line in logs)


def test_missing_faiss_names_the_extra(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    _folder(tmp_path, rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((40, 8)).astype(np.float32))
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(SearchError, match=r"--index ivf needs FAISS, which is not installed: pip install \.\[search\]"):
        search_folder(str(tmp_path), "x", SearchSettings(topk=5, index="ivf", **QUIET), dim=8, log=lambda s: None)
    assert not os.path.exists(tmp_path / "nn_x.pkl")
    search_folder(str(tmp_path), "x", SearchSettings(topk=5, **QUIET), dim=8, log=lambda s: None)  # flat needs none


def test_bad_input_one_line_errors(tmp_path):
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal((30, 8)).astype(np.float32)

    def err(match, dim=8, **kw):
        with pytest.raises(SearchError, match=match) as e:
            search_folder(str(tmp_path), "x", SearchSettings(**{"topk": 5, "overwrite": True, **kw, **QUIET}),
                          dim=dim, log=lambda s: None)
        assert "\n" not in str(e.value)

    err(r"missing global descriptor file\(s\): .*x_query_global\.pt, .*x_gallery_global\.pt")
    _folder(tmp_path, q, g)
    err(r"topk=31 is larger than the database \(30 images in .*x_gallery_global\.pt\)", topk=31)
    err(r"x_query_global\.pt: raw float32 files carry no shape; pass --dim D", dim=None)
    write_global(tmp_path / "x_query_global.pt", q, format="torch")  # a torch file gives the dim
    res = search_folder(str(tmp_path), "x", SearchSettings(topk=5, overwrite=True, **QUIET), log=lambda s: None)
    assert res.ids.shape == (4, 5)
    write_global(tmp_path / "x_query_global.pt", rng.standard_normal((4, 7)).astype(np.float32), format="torch")
    err(r"x_gallery_global\.pt: 240 float32 values \(960 bytes\) is not a multiple of dim=7", dim=None)
    write_global(tmp_path / "x_gallery_global.pt", g, format="torch")
    err(r"x_gallery_global\.pt: descriptors have dim 8 but the queries \(.*x_query_global\.pt\) have dim 7",
        dim=None)
    write_global(tmp_path / "x_gallery_global.pt", g)
    with open(tmp_path / "x_query_global.pt", "wb") as f:  # a raw query file of the wrong size
        f.write(b"\0" * (4 * 8 * 4 + 4))
    err(r"x_query_global\.pt: 33 float32 values \(132 bytes\) is not a multiple of dim=8")
    write_global(tmp_path / "x_query_global.pt", q)
    write_global(tmp_path / "x_gallery_global.pt", np.zeros((0, 8), np.float32))
    err(r"x_gallery_global\.pt: the database is empty \(0 images\)")
    g[17, 3] = np.nan
    write_global(tmp_path / "x_gallery_global.pt", g)
    err(r"x_gallery_global\.pt: database image 17 has a NaN or infinite value", block_rows=8)
    q[2, 0] = np.inf
    write_global(tmp_path / "x_query_global.pt", q)
    err(r"x_query_global\.pt: query 2 has a NaN or infinite value")
    for bad in (dict(index="annoy"), dict(topk=0), dict(block_rows=0), dict(device="tpu")):
        with pytest.raises(SearchError):
            SearchSettings(**bad)


def test_memory_stays_bounded_on_a_large_memmapped_db(tmp_path):
    """A 128 MiB database searched with 4 MiB blocks: the peak RSS grows by about one block, not the file.

    Peak = the kernel's high-water mark VmHWM, reset after warm-up (``clear_refs`` 5). Not ru_maxrss: after
    fork + exec it still holds the parent's (pytest's) peak."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("peak RSS reset needs Linux /proc/self/clear_refs")
    n, d = 262144, 128
    path = tmp_path / "big_gallery_global.pt"
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:  # written in pieces so the test process itself stays small
        for _ in range(8):
            rng.standard_normal((n // 8, d), dtype=np.float32).tofile(f)
    script = textwrap.dedent(f"""
        import numpy as np
        from locore.data.global_desc import GlobalFeatures
        from locore.search import SearchSettings, exact_search, brute_force_search

        def status(key):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

        db = GlobalFeatures({str(path)!r}, dim={d})
        q = np.random.default_rng(1).standard_normal((16, {d})).astype(np.float32)
        small = np.random.default_rng(2).standard_normal((4096, {d})).astype(np.float32)
        brute_force_search(q, small, 100)                      # warm up torch's allocator and threads
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                       # peak RSS := current RSS
        base = status("VmRSS")
        sims, ids = exact_search(q, db, SearchSettings(topk=100, block_mb=4, progress=False))
        peak = status("VmHWM")
        # spot check: the 100th similarity is the 100th largest over the answer and a sample of rows
        sample = np.unique(np.concatenate([ids.ravel(), np.arange(0, {n}, 997)]))
        v = q @ db.read(sample).T
        assert np.isclose(sims[:, -1:], np.sort(v, 1)[:, -100:-99], atol=1e-4).all()
        print(base / 2**20, peak / 2**20)
        print((peak - base) / 2**20)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    growth_mb = float(out.stdout.strip().splitlines()[-1])
    assert growth_mb < 48, f"peak RSS grew by {growth_mb:.1f} MiB searching a 128 MiB file with 4 MiB blocks"


def test_cli_search(tmp_path, capsys):
    from locore import cli

    rng = np.random.default_rng(4)
    q, g = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((40, 8)).astype(np.float32)
    _folder(tmp_path, q, g, distractors=rng.standard_normal((20, 8)).astype(np.float32))
    argv = ["search", "--data", str(tmp_path), "--desc", "x", "--topk", "10", "--dim", "8",
            "--distractors", str(tmp_path / "1m"), "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "flat search: 3 queries x 60 images (dim 8), top 10" in out and "queries/s" in out
    _, ri = _reference(q, np.concatenate([g, read_global_rows(tmp_path / "1m" / "x_global.pt", 8)]), 10)
    np.testing.assert_array_equal(read_neighbours(str(tmp_path / "nn_x.pkl")).ids, ri)
    assert cli.main(argv) == 2  # refuses to overwrite: one line, no traceback
    err = capsys.readouterr().err.strip()
    assert err.startswith("locore search: error: ") and "nn_x.pkl exists; pass --overwrite" in err
    assert "\n" not in err
    assert cli.main(argv + ["--overwrite", "--topk", "61"]) == 2
    assert "topk=61 is larger than the database (60 images" in capsys.readouterr().err


def read_global_rows(path, dim):
    return np.fromfile(path, np.float32).reshape(-1, dim)
