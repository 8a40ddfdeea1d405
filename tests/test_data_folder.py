"""Locating a dataset's files: gallery shards, +1M distractors, GLDv2 (issue 10.4 / 10.5, SPEC §7 / §8)."""
import numpy as np
import pytest

from locore.data import (DataError, LocalFeatures, locate_files, open_database, read_gnd, read_neighbours,
                         split_shards, write_global, write_gnd, write_local, write_neighbours)

D, G, SLOTS = 6, 4, 5


def _images(n, seed):
    rng = np.random.default_rng(seed)
    desc = rng.standard_normal((n, SLOTS, D)).astype(np.float16).astype(np.float32)  # exact in any layout
    return desc, rng.integers(0, 3, (n, SLOTS)), rng.random((n, SLOTS)) < 0.2, \
        rng.standard_normal((n, G)).astype(np.float32)


def _dataset(folder, n_gallery=10, shards=None, nq=2):
    """An AMES folder; ``shards`` = cut points to split the gallery into ``_xaa``, ``_xab``, ... files."""
    folder.mkdir(exist_ok=True)
    q = _images(nq, 0)
    write_local(folder / "d_query_local.hdf5", *q[:3])
    write_global(folder / "d_query_global.pt", q[3])
    g = _images(n_gallery, 1)
    if shards is None:
        write_local(folder / "d_gallery_local.hdf5", *g[:3], layout="structured")
        write_global(folder / "d_gallery_global.pt", g[3])
    else:
        cuts = [0] + shards + [n_gallery]
        for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            sfx = "xa" + "abcdefgh"[k]
            write_local(folder / f"d_gallery_local_{sfx}.hdf5", *(x[a:b] for x in g[:3]))
            write_global(folder / f"d_gallery_global_{sfx}.pt", g[3][a:b])
    return q, g


def _distractors(folder, n=7):
    folder.mkdir(exist_ok=True)
    x = _images(n, 2)
    write_local(folder / "d_local.hdf5", *x[:3])
    write_global(folder / "d_global.pt", x[3])
    return x


def test_gallery_shards_are_found_in_split_order_and_read_as_one_range(tmp_path):
    data = tmp_path / "data"
    _, g = _dataset(data, n_gallery=10, shards=[3, 8])
    write_neighbours(data / "nn_d.pkl", np.ones((2, 3)), np.array([[0, 5, 9], [3, 8, 1]]))
    files = locate_files(data, "d")
    assert [p.rsplit("_", 1)[1] for p in files.database_local] == ["xaa.hdf5", "xab.hdf5", "xac.hdf5"]
    assert files.gallery_local_parts == 3 and files.distractors is None
    db = open_database(files)
    try:
        assert (db.num_gallery, db.num_distractors, db.num_images) == (10, 0, 10)
        ids = [9, 0, 3, 8, 2]
        np.testing.assert_array_equal(db.gallery_local.read(ids).desc, g[0][ids])
        np.testing.assert_array_equal(db.gallery_global.read(ids), g[3][ids])
    finally:
        db.close()


def test_explicit_gallery_shards_glob_or_list(tmp_path):
    data = tmp_path / "data"
    _, g = _dataset(data, n_gallery=9, shards=[4])
    (data / "d_gallery_global_xaa.pt").rename(data / "d_gallery_global.pt.part0")
    write_global(data / "d_gallery_global.pt", g[3])  # one global file for the sharded gallery
    # in an order other than name order: the list is taken as given
    rev = [str(data / "d_gallery_local_xab.hdf5"), str(data / "d_gallery_local_xaa.hdf5")]
    files = locate_files(data, "d", nn=str(data / "d_query_global.pt"), gallery_shards=rev)
    assert files.database_local == rev
    with LocalFeatures(files.database_local) as lf:
        np.testing.assert_array_equal(lf.read([0]).desc, g[0][[4]])  # id 0 is now xab's first row
    files = locate_files(data, "d", nn=str(data / "d_query_global.pt"), gallery_shards="d_gallery_local_xa?.hdf5")
    assert files.database_local == sorted(rev) and files.database_global == [str(data / "d_gallery_global.pt")]
    db = open_database(files)
    np.testing.assert_array_equal(db.gallery_global.read([8, 0]), g[3][[8, 0]])
    db.close()
    with pytest.raises(DataError, match="no file matches"):
        locate_files(data, "d", nn=str(data / "d_query_global.pt"), gallery_shards="nothing_*.hdf5")
    with pytest.raises(DataError, match="missing gallery shard"):
        locate_files(data, "d", nn=str(data / "d_query_global.pt"), gallery_shards=[str(data / "gone.hdf5")])


def test_ambiguous_shard_names_are_refused(tmp_path):
    for name in ("s_xaa.hdf5", "s_xab.hdf5", "s_xaaa.hdf5"):
        (tmp_path / name).touch()
    (tmp_path / "s_other.hdf5").touch()
    with pytest.raises(DataError, match="suffixes of different lengths"):
        split_shards(str(tmp_path), "s", ".hdf5")
    (tmp_path / "s_xaaa.hdf5").unlink()
    assert [p.rsplit("/", 1)[1] for p in split_shards(str(tmp_path), "s", ".hdf5")] == ["s_xaa.hdf5", "s_xab.hdf5"]


def test_distractors_follow_the_gallery_and_nothing_else_changes(tmp_path):
    data, dis = tmp_path / "roxf", tmp_path / "r1m"
    _, g = _dataset(data, n_gallery=10)
    x = _distractors(dis, n=7)
    gnd = [{"easy": [1, 2], "hard": [9], "junk": []}, {"easy": [0], "hard": [], "junk": [4]}]
    write_gnd(data / "gnd_roxf.pkl", gnd, [f"im{i}" for i in range(10)], ["q0", "q1"])
    write_neighbours(data / "nn_d.pkl", np.ones((2, 4)), np.array([[12, 1, 16, 2], [0, 10, 9, 4]]))
    files = locate_files(data, "d", distractors=dis)
    assert files.database_local[-1] == str(dis / "d_local.hdf5")
    assert files.database_global[-1] == str(dis / "d_global.pt")
    db = open_database(files, num_descriptors=4)
    try:
        assert (db.num_gallery, db.num_distractors, db.num_images) == (10, 7, 17)
        ids = [16, 0, 10, 9]  # distractor 6, gallery 0, distractor 0, gallery 9
        b = db.gallery_local.read(ids)
        np.testing.assert_array_equal(b.desc, np.concatenate([x[0][[6]], g[0][[0]], x[0][[0]], g[0][[9]]])[:, :4])
        np.testing.assert_array_equal(db.gallery_global.read(ids),
                                      np.concatenate([x[3][[6]], g[3][[0]], x[3][[0]], g[3][[9]]]))
        nn = read_neighbours(files.nn, num_images=db.num_images)  # lists over the combined database
        assert nn.ids.max() == 16
        with pytest.raises(DataError, match="out of range"):
            read_neighbours(files.nn, num_images=db.num_gallery)
        # gnd ids are the gallery's, unchanged
        assert read_gnd(files.gnd, num_images=db.num_gallery)["gnd"][0]["hard"].tolist() == [9]
        with pytest.raises(DataError, match="out of range"):
            db.gallery_local.read([17])
        db.set_num_scales(2)  # the model's: the files hold scale 2 somewhere
        with pytest.raises(DataError, match=r"scale index\): value 2\.0; expected an integer in 0\.\.1"):
            db.gallery_local.read(range(17))
    finally:
        db.close()


def test_missing_or_inconsistent_distractor_files_are_named(tmp_path):
    data, dis = tmp_path / "roxf", tmp_path / "r1m"
    _dataset(data)
    write_neighbours(data / "nn_d.pkl", np.ones((2, 1)), np.zeros((2, 1)))
    with pytest.raises(DataError, match="distractor folder not found"):
        locate_files(data, "d", distractors=dis)
    dis.mkdir()
    with pytest.raises(DataError) as e:
        locate_files(data, "d", distractors=dis)
    assert "r1m/d_local.hdf5" in str(e.value) and "r1m/d_global.pt" in str(e.value)
    x = _images(5, 3)
    write_local(dis / "d_local.hdf5", x[0][:, :, :D - 1], x[1], x[2])  # D disagrees with the gallery
    write_global(dis / "d_global.pt", x[3])
    with pytest.raises(DataError, match=r"shards disagree: .*D=6.*r1m/d_local\.hdf5 5 slots of D=5"):
        open_database(locate_files(data, "d", distractors=dis))
    write_local(dis / "d_local.hdf5", *x[:3])
    write_global(dis / "d_global.pt", x[3][:4])  # one row short
    with pytest.raises(DataError, match=r"r1m/d_global\.pt"):
        open_database(locate_files(data, "d", distractors=dis))


def test_gldv2_folder_uses_the_ames_layout_with_ok_lists(tmp_path):
    data = tmp_path / "gldv2-test"
    _dataset(data, n_gallery=12, nq=3)
    write_neighbours(data / "nn_d.pkl", np.ones((3, 2)), np.array([[0, 1], [2, 3], [4, 5]]))
    gnd = [{"ok": [0, 11]}, {"ok": []}, {"ok": [5]}]
    write_gnd(data / "gnd_gldv2-test.pkl", gnd, [f"i{k}" for k in range(12)], ["a", "b", "c"])
    files = locate_files(data, "d")
    assert files.gnd.endswith("gnd_gldv2-test.pkl")
    out = read_gnd(files.gnd)["gnd"]
    assert [g["ok"].tolist() for g in out] == [[0, 11], [], [5]]
    with open_database(files) as db:
        assert (db.num_gallery, len(db.query_local)) == (12, 3)
