"""Local descriptor files in every layout users have (issue 10), validated at read (issue 13.2 / 13.3 / 13.8 / 13.9)."""
import os

import h5py
import numpy as np
import pytest
import torch

from locore.data import DataError, LocalFeatures, structured_dtype, write_local, write_virtual_local
from locore.rerank import DatasetReranker, TopK


def _local(n=12, S=6, D=8, seed=0):
    """Values exactly representable in float16, so every layout holds the very same numbers."""
    rng = np.random.default_rng(seed)
    desc = rng.standard_normal((n, S, D)).astype(np.float16).astype(np.float32)
    scales = rng.integers(0, 3, size=(n, S))
    mask = rng.random((n, S)) < 0.3
    return desc, scales, mask


def _write_all_layouts(tmp_path, desc, scales, mask, slots=8):
    """The same images as flat float32 (the baseline), flat float16, structured, a virtual dataset over
    structured shards, and a list of flat shards."""
    n = len(desc)
    paths = {}
    for name, kw in {"flat32": dict(layout="flat"), "flat16": dict(layout="flat", dtype=np.float16),
                     "structured": dict(layout="structured")}.items():
        paths[name] = tmp_path / f"{name}.hdf5"
        write_local(paths[name], desc, scales, mask, slots=slots, **kw)
    cuts = [0, 5, 9, n]
    shards = []
    for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        p = tmp_path / "shards" / f"d_gallery_local_xa{'abc'[k]}.hdf5"
        p.parent.mkdir(exist_ok=True)
        write_local(p, desc[a:b], scales[a:b], mask[a:b], slots=slots,
                    layout="structured" if k != 1 else "flat")  # shards may mix layouts
        shards.append(p)
    structured_shards = []
    for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        p = tmp_path / "vsrc" / f"part{k}.hdf5"
        p.parent.mkdir(exist_ok=True)
        write_local(p, desc[a:b], scales[a:b], mask[a:b], slots=slots, layout="structured")
        structured_shards.append(p)
    paths["virtual"] = tmp_path / "virtual.hdf5"
    write_virtual_local(paths["virtual"], structured_shards)
    paths["shard-list"] = shards
    return paths


def test_every_layout_reads_the_same_values_as_flat_float32(tmp_path):
    desc, scales, mask = _local()
    paths = _write_all_layouts(tmp_path, desc, scales, mask)
    ids = [11, 0, 4, 5, 5, 9, 8, 3]  # across shard boundaries, repeated, unordered
    with LocalFeatures(paths["flat32"], num_descriptors=4) as base:
        ref = base.read(ids)
    np.testing.assert_array_equal(ref.desc, desc[ids, :4])
    for name in ("flat16", "structured", "virtual", "shard-list"):
        with LocalFeatures(paths[name], num_descriptors=4) as lf:
            assert (len(lf), lf.slots, lf.dim) == (12, 8, 8), name
            b = lf.read(ids)
            np.testing.assert_array_equal(b.desc, ref.desc, err_msg=name)
            np.testing.assert_array_equal(b.scales, ref.scales, err_msg=name)
            np.testing.assert_array_equal(b.mask, ref.mask, err_msg=name)
    with LocalFeatures(paths["shard-list"]) as lf:
        assert lf.layouts == ["structured", "flat", "structured"] and lf.part_sizes == [5, 4, 3]
        assert lf.read([]).desc.shape == (0, 8, 8)
    with LocalFeatures(paths["structured"]) as lf:
        assert lf.layouts == ["structured"]
        assert h5py.File(paths["structured"])["features"].dtype == structured_dtype(8, 8)


class _StandIn:
    """A scorer whose output depends on every input the model reads (descriptors, scales, mask)."""
    device = torch.device("cpu")

    def score(self, q, qs, qm, g, gs, gm, query_global=None, gallery_global=None, mode=None, softmax=False):
        qv = (q * (~qm)[..., None]).sum(-2) + qs.sum(-1, keepdim=True)  # [B, D]
        gv = (g * (~gm)[..., None]).sum(-2) + gs.sum(-1, keepdim=True)  # [B, L, D]
        return torch.einsum("bd,bld->bl", qv, gv)


def test_every_layout_gives_the_same_ranks(tmp_path):
    desc, scales, mask = _local(n=12)
    paths = _write_all_layouts(tmp_path, desc, scales, mask)
    qpath = tmp_path / "q.hdf5"
    write_local(qpath, *_local(n=3, seed=1))
    rng = np.random.default_rng(2)
    ids = np.stack([rng.permutation(12)[:10] for _ in range(3)])
    sims = np.sort(rng.random((3, 10)))[:, ::-1].copy()
    ranks = {}
    for name in ("flat32", "flat16", "structured", "virtual", "shard-list"):
        with LocalFeatures(qpath, 5) as ql, LocalFeatures(paths[name], 5) as gl:
            rr = DatasetReranker(_StandIn(), ql, gl, alpha=0.1, temp=0.01, batch_size=2)
            ranks[name], _ = rr.rerank(ids, sims, TopK(8), progress=False)
    assert not np.array_equal(ranks["flat32"], ids)  # the stand-in re-orders something
    for name, r in ranks.items():
        np.testing.assert_array_equal(r, ranks["flat32"], err_msg=name)


# ------------------------------------------------------------------------------------------------
# Values refused at read, naming file, image id and column
# ------------------------------------------------------------------------------------------------

def _flat(tmp_path, name="f.hdf5", n=6, S=4, D=5, layout="flat"):
    desc, scales, mask = _local(n=n, S=S, D=D)
    path = tmp_path / name
    write_local(path, desc, scales, mask, layout=layout)
    return path


def _poke(path, row, slot, col, value):
    with h5py.File(path, "r+") as f:
        ds = f["features"]
        if ds.dtype.names:  # structured: metadata columns 0-4, descriptor columns 5+
            rec = ds[row]
            if col < 5:
                rec["metadata"][slot, col] = value
            else:
                rec["descriptor"][slot, col - 5] = value
            ds[row] = rec
        else:
            ds[row, slot, col] = value


@pytest.mark.parametrize("layout", ["flat", "structured"])
@pytest.mark.parametrize("col, value, expect", [
    (6, np.nan, "descriptor column 6"), (7, np.inf, "descriptor column 7"), (5, -np.inf, "descriptor column 5"),
    (8, 1e30, "descriptor column 8"), (6, -2e4, "descriptor column 6"),
    (2, 1.5, r"column 2 \(scale index\): value 1.5"), (2, 3, r"column 2 \(scale index\): value 3.0"),
    (2, -1, r"column 2 \(scale index\): value -1.0"), (2, np.nan, r"column 2 \(scale index\): value nan"),
    (3, 0.5, r"column 3 \(mask\): value 0.5"), (3, 2, r"column 3 \(mask\)"), (3, -1, r"column 3 \(mask\): value -1.0"),
    (3, np.nan, r"column 3 \(mask\): value nan"),
])
def test_bad_values_are_refused_naming_file_image_and_column(tmp_path, layout, col, value, expect):
    if layout == "structured" and col == 8 and value == 1e30:
        value = np.inf  # float16 holds no 1e30: it is inf there
        expect = "descriptor column 8"
    path = _flat(tmp_path, layout=layout)
    _poke(path, 4, 2, col, value)
    with LocalFeatures(path) as lf:
        lf.read([0, 1, 2])  # rows without the bad value read fine
        with pytest.raises(DataError, match=f"{path.name}: image 4, slot 2, {expect}"):
            lf.read([1, 4])


def test_scale_bound_follows_num_scales_and_only_leading_slots_are_checked(tmp_path):
    path = _flat(tmp_path, S=4)
    _poke(path, 1, 0, 2, 4)  # scale 4: valid for a 5-scale model only
    _poke(path, 2, 3, 3, 0.5)  # a bad mask in slot 3, beyond the 2 slots read below
    with LocalFeatures(path, num_descriptors=2) as lf:
        with pytest.raises(DataError, match=r"expected an integer in 0\.\.2"):
            lf.read([1])
        lf.num_scales = 5
        assert lf.read([1]).scales[0, 0] == 4
        lf.read([2])
    with LocalFeatures(path, num_descriptors=4) as lf, pytest.raises(DataError, match="image 2, slot 3"):
        lf.read([2])


def test_bad_value_in_a_shard_names_the_shard_and_the_database_id(tmp_path):
    a, b = _flat(tmp_path, "a.hdf5", n=6), _flat(tmp_path, "b.hdf5", n=6, layout="structured")
    _poke(b, 1, 0, 5, np.nan)
    with LocalFeatures([a, b]) as lf:
        with pytest.raises(DataError, match=r"b\.hdf5: image 7, slot 0, descriptor column 5"):
            lf.read([3, 7])
    v = tmp_path / "v.hdf5"
    write_virtual_local(v, [a, a, a])
    _poke(a, 2, 1, 3, 2)  # seen through the virtual dataset at ids 2, 8, 14
    with LocalFeatures(v) as lf, pytest.raises(DataError, match=r"v\.hdf5: image 14, slot 1, column 3"):
        lf.read([14])


# ------------------------------------------------------------------------------------------------
# Files refused at open
# ------------------------------------------------------------------------------------------------

def _h5(path, fill):
    with h5py.File(path, "w") as f:
        fill(f)
    return path


@pytest.mark.parametrize("fill, expect", [
    (lambda f: f.create_group("features"), "'features' is a Group, expected a dataset"),
    (lambda f: f.create_dataset("features", data=np.zeros((0, 4, 9), np.float32)), "holds 0 images"),
    (lambda f: f.create_dataset("features", data=np.zeros((3, 9), np.float32)), r"shape \(3, 9\)"),
    (lambda f: f.create_dataset("features", data=np.zeros((3, 4, 5), np.float32)), r"shape \(3, 4, 5\)"),
    (lambda f: f.create_dataset("features", data=np.zeros((3, 4, 9), np.int32)), "dtype int32; expected float"),
    (lambda f: f.create_dataset("features", data=np.zeros(3, np.dtype([("meta", "<f4", (4, 5)),
                                                                        ("descriptor", "<f2", (4, 8))]))),
     "compound fields"),
    (lambda f: f.create_dataset("features", data=np.zeros(3, np.dtype([("metadata", "<f4", (4, 6)),
                                                                        ("descriptor", "<f2", (4, 8))]))),
     r"metadata \(4, 6\)"),
    (lambda f: f.create_dataset("features", data=np.zeros(3, np.dtype([("metadata", "<f4", (4, 5)),
                                                                        ("descriptor", "<i2", (4, 8))]))),
     "field 'descriptor' has dtype int16"),
    (lambda f: f.create_dataset("feats", data=np.zeros((3, 4, 9), np.float32)), "no dataset 'features'"),
])
def test_malformed_files_are_refused_at_open(tmp_path, fill, expect):
    path = _h5(tmp_path / "bad.hdf5", fill)
    with pytest.raises(DataError, match=expect) as e:
        LocalFeatures(path)
    assert "bad.hdf5" in str(e.value)


def test_links_and_virtual_sources_to_missing_files_are_refused(tmp_path):
    path = _h5(tmp_path / "ext.hdf5", lambda f: f.__setitem__("features", h5py.ExternalLink("gone.hdf5", "/features")))
    with pytest.raises(DataError, match=r"ext\.hdf5: 'features' is an external link to gone\.hdf5"):
        LocalFeatures(path)
    src = _flat(tmp_path, "src.hdf5")
    ok = _h5(tmp_path / "ext_ok.hdf5", lambda f: f.__setitem__("features", h5py.ExternalLink("src.hdf5", "/features")))
    with LocalFeatures(ok) as lf:
        assert len(lf) == 6
    v = tmp_path / "v.hdf5"
    write_virtual_local(v, [src, src])
    with LocalFeatures(v) as lf:
        assert len(lf) == 12
    os.rename(src, tmp_path / "moved.hdf5")
    with pytest.raises(DataError, match=r"v\.hdf5: virtual dataset 'features' maps rows to src\.hdf5, which does not"):
        LocalFeatures(v)


def test_partly_mapped_virtual_dataset_is_refused(tmp_path):
    src = _flat(tmp_path, "src.hdf5", n=6, S=4, D=5)
    layout = h5py.VirtualLayout(shape=(10, 4, 10), dtype=np.float32)
    layout[0:6] = h5py.VirtualSource("src.hdf5", "features", shape=(6, 4, 10))  # rows 6..9 map nowhere
    with h5py.File(tmp_path / "half.hdf5", "w") as f:
        f.create_virtual_dataset("features", layout)
    with pytest.raises(DataError, match="maps only 240 of its 400 elements"):
        LocalFeatures(tmp_path / "half.hdf5")


def test_shards_of_different_slot_counts_are_refused(tmp_path):
    a = _flat(tmp_path, "a.hdf5", S=4)
    b = _flat(tmp_path, "b.hdf5", S=5)
    with pytest.raises(DataError, match=r"shards disagree: .*a\.hdf5 stores 4 slots.*b\.hdf5 5 slots"):
        LocalFeatures([a, b])
    with pytest.raises(DataError, match="no local descriptor file"):
        LocalFeatures([])


# ------------------------------------------------------------------------------------------------
# Memory: a shortlist read touches only its rows
# ------------------------------------------------------------------------------------------------

def test_reading_from_a_large_virtual_gallery_costs_the_memory_of_a_small_one(tmp_path):
    psutil = pytest.importorskip("psutil")
    n_src, slots, D = 1000, 16, 64  # one row = 16 * 69 * 4 B = 4.4 kB
    desc, scales, mask = _local(n=n_src, S=slots, D=D)
    src = tmp_path / "src.hdf5"
    write_local(src, desc, scales, mask)
    small, large = tmp_path / "small.hdf5", tmp_path / "large.hdf5"
    write_virtual_local(small, [src])
    write_virtual_local(large, [src] * 200)  # 200k images: 880 MB if it were read whole
    rng = np.random.default_rng(0)
    proc = psutil.Process()

    def peak_growth(path, num_images):
        ids = rng.integers(0, num_images, size=(20, 100))
        before = proc.memory_info().rss
        grown = 0
        with LocalFeatures(path, num_descriptors=8) as lf:
            assert len(lf) == num_images
            for row in ids:
                b = lf.read(row)
                grown = max(grown, proc.memory_info().rss - before)
            np.testing.assert_array_equal(b.desc, desc[row % n_src, :8])
        return grown

    peak_growth(small, n_src)  # warm up h5py / numpy allocations
    g_small = peak_growth(small, n_src)
    g_large = peak_growth(large, 200 * n_src)
    assert g_large - g_small < 100 * 2 ** 20, (g_small, g_large)


# ------------------------------------------------------------------------------------------------
# Random byte corruption: a DataError or a clean read, never a traceback or a hang
# ------------------------------------------------------------------------------------------------

def test_corrupted_hdf5_bytes_never_escape_as_other_errors(tmp_path):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings, strategies as st

    good = {}
    for layout in ("flat", "structured"):
        p = _flat(tmp_path, f"good_{layout}.hdf5", n=5, S=3, D=4, layout=layout)
        good[layout] = p.read_bytes()
    out = tmp_path / "corrupt.hdf5"

    @settings(max_examples=60, deadline=5000, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(layout=st.sampled_from(["flat", "structured"]),
           edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
           cut=st.one_of(st.none(), st.floats(0, 1)))
    def check(layout, edits, cut):
        data = bytearray(good[layout])
        for where, byte in edits:
            data[int(where * len(data))] = byte
        if cut is not None:
            data = data[:int(cut * len(data))]
        out.write_bytes(bytes(data))
        try:
            with LocalFeatures(out) as lf:
                lf.read(list(range(len(lf)))[:50])
        except DataError:
            pass

    check()
