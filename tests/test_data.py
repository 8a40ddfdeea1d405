"""Readers and writers of SPEC §8 files, and the restricted unpickler against hostile pickles."""
import io
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch

from locore.data import (DataError, GlobalFeatures, LocalFeatures, UnsafePickleError, locate_files, read_gnd,
                         read_neighbours, safe_load_pickle, write_global, write_gnd, write_local, write_neighbours)


# ------------------------------------------------------------------------------------------------
# Local HDF5
# ------------------------------------------------------------------------------------------------

def _local(n=9, S=5, D=7, seed=0):
    rng = np.random.default_rng(seed)
    desc = rng.standard_normal((n, S, D)).astype(np.float32)
    scales = rng.integers(0, 3, size=(n, S))
    mask = rng.random((n, S)) < 0.3
    return desc, scales, mask


def test_local_roundtrip_first_slots_and_any_order(tmp_path):
    desc, scales, mask = _local()
    path = tmp_path / "x_gallery_local.hdf5"
    write_local(path, desc, scales, mask, slots=8)  # 3 extra padded slots, as AMES stores 100
    with LocalFeatures(path, num_descriptors=4) as lf:
        assert (len(lf), lf.slots, lf.dim, lf.num_descriptors) == (9, 8, 7, 4)
        for ids in ([3], [2, 3, 4], [7, 1, 1, 5], [8, 0]):
            b = lf.read(ids)
            np.testing.assert_array_equal(b.desc, desc[ids, :4])
            np.testing.assert_array_equal(b.scales, scales[ids, :4])
            np.testing.assert_array_equal(b.mask, mask[ids, :4])
            assert b.desc.dtype == np.float32 and b.scales.dtype == np.int64 and b.mask.dtype == bool
    with LocalFeatures(path) as lf:  # all stored slots: the padding slots read as masked
        b = lf.read([0])
        assert b.mask[0, 5:].all() and b.desc.shape == (1, 8, 7)


def test_local_reads_only_the_rows_asked_for(tmp_path):
    desc, scales, mask = _local(n=50)
    path = tmp_path / "l.hdf5"
    write_local(path, desc, scales, mask)
    lf = LocalFeatures(path, num_descriptors=3)

    class Spy:
        def __init__(self, ds):
            self.ds, self.keys, self.dtype = ds, [], ds.dtype

        def __getitem__(self, key):
            self.keys.append(key)
            return self.ds[key]

    (part,) = lf._files
    part._ds = spy = Spy(part._ds)
    b = lf.read([40, 2, 17])
    np.testing.assert_array_equal(b.desc, desc[[40, 2, 17], :3])
    # one hyperslab per run of consecutive ids: 3 single rows, first 3 slots each
    assert [k[:2] for k in spy.keys] == [(slice(2, 3), slice(None, 3)), (slice(17, 18), slice(None, 3)),
                                         (slice(40, 41), slice(None, 3))]
    spy.keys.clear()
    lf.read([12, 10, 11, 30])
    assert [k[0] for k in spy.keys] == [slice(10, 13), slice(30, 31)]
    lf.close()


def test_local_errors(tmp_path):
    desc, scales, mask = _local()
    path = tmp_path / "l.hdf5"
    write_local(path, desc, scales, mask)
    with pytest.raises(DataError, match="stores 5 slots"):
        LocalFeatures(path, num_descriptors=6)
    with LocalFeatures(path) as lf, pytest.raises(DataError, match="out of range"):
        lf.read([9])
    with pytest.raises(DataError, match="not found"):
        LocalFeatures(tmp_path / "nope.hdf5")
    import h5py

    with h5py.File(tmp_path / "bad.hdf5", "w") as f:
        f.create_dataset("feats", data=np.zeros((2, 3, 8)))
    with pytest.raises(DataError, match="no dataset 'features'"):
        LocalFeatures(tmp_path / "bad.hdf5")


# ------------------------------------------------------------------------------------------------
# Global raw float32
# ------------------------------------------------------------------------------------------------

def test_global_roundtrip_and_dim_inference(tmp_path):
    arr = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)
    path = tmp_path / "x_query_global.pt"
    write_global(path, arr)
    assert os.path.getsize(path) == arr.nbytes
    g = GlobalFeatures(path, dim=5)
    assert (len(g), g.dim) == (6, 5)
    np.testing.assert_array_equal(g.read([4, 0, 4]), arr[[4, 0, 4]])
    g2 = GlobalFeatures(path, num_images=6)
    assert g2.dim == 5
    np.testing.assert_array_equal(np.fromfile(path, np.float32).reshape(6, 5), arr)
    for bad in ([6], [-1, 0]):  # the same id check as the local reader, naming the file
        with pytest.raises(DataError, match=r"x_query_global\.pt: image id -?\d+ out of range \[0, 6\)"):
            g.read(bad)


def test_global_size_errors(tmp_path):
    path = tmp_path / "g.pt"
    write_global(path, np.zeros((6, 5), np.float32))
    with pytest.raises(DataError, match="not a multiple of dim=4"):
        GlobalFeatures(path, dim=4)
    with pytest.raises(DataError, match="do not split into 7 rows"):
        GlobalFeatures(path, num_images=7)
    with pytest.raises(DataError, match="holds 3 rows of dim 10, but the matching local file has 4"):
        GlobalFeatures(path, dim=10, num_images=4)
    with open(tmp_path / "odd.pt", "wb") as f:
        f.write(b"\0" * 10)
    with pytest.raises(DataError, match="not a multiple of 4"):
        GlobalFeatures(tmp_path / "odd.pt", dim=1)
    torch.save(torch.zeros(3, 4), tmp_path / "saved.pt")  # a torch.save tensor is read (tests/test_global_desc.py)
    assert GlobalFeatures(tmp_path / "saved.pt", dim=4).format == "torch"


# ------------------------------------------------------------------------------------------------
# Neighbours and ground truth
# ------------------------------------------------------------------------------------------------

def _nn(Q=3, k=6, seed=2):
    rng = np.random.default_rng(seed)
    sims = np.sort(rng.random((Q, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    ids = np.stack([rng.permutation(100)[:k] for _ in range(Q)])
    return sims, ids


def _check_nn(nb, sims, ids):
    np.testing.assert_allclose(nb.sims, sims, rtol=1e-6)
    np.testing.assert_array_equal(nb.ids, ids)
    assert nb.ids.dtype == np.int64 and nb.sims.dtype == np.float32
    assert (nb.num_queries, nb.topk) == sims.shape


def test_neighbours_as_the_reference_writes_them(tmp_path):
    sims, ids = _nn()
    write_neighbours(tmp_path / "nn.pkl", sims, ids)  # pickle.dump of a float64 torch tensor
    _check_nn(read_neighbours(tmp_path / "nn.pkl"), sims, ids)


@pytest.mark.parametrize("how", ["numpy-pickle", "numpy-pickle-p2", "tensor-pickle-p5", "torch.save",
                                 "torch.save-legacy", "tuple"])
def test_neighbours_in_other_containers(tmp_path, how):
    sims, ids = _nn()
    arr = np.stack([sims.astype(np.float64), ids.astype(np.float64)])
    path = tmp_path / "nn.pkl"
    if how == "numpy-pickle":
        path.write_bytes(pickle.dumps(arr))
    elif how == "numpy-pickle-p2":
        path.write_bytes(pickle.dumps(arr, protocol=2))
    elif how == "tensor-pickle-p5":
        path.write_bytes(pickle.dumps(torch.from_numpy(arr).float(), protocol=5))
    elif how == "torch.save":
        torch.save(torch.from_numpy(arr), path)
    elif how == "torch.save-legacy":
        torch.save(torch.from_numpy(arr), path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps((torch.from_numpy(sims), ids)))
    _check_nn(read_neighbours(path), sims, ids)


def test_neighbours_shape_errors(tmp_path):
    (tmp_path / "a.pkl").write_bytes(pickle.dumps(np.zeros((3, 4, 5))))
    with pytest.raises(DataError, match=r"\[2, num_queries, topk\]"):
        read_neighbours(tmp_path / "a.pkl")
    (tmp_path / "b.pkl").write_bytes(pickle.dumps(np.full((2, 1, 2), 0.5)))
    with pytest.raises(DataError, match="not whole numbers"):
        read_neighbours(tmp_path / "b.pkl")


def test_gnd_roundtrip_lists_and_numpy(tmp_path):
    gnd = [{"easy": [1, 2], "hard": [5], "junk": [], "bbx": [1.0, 2.0, 30.5, 40.0]},
           {"easy": np.array([0]), "hard": np.array([], dtype=np.int64), "junk": np.array([3, 4]),
            "bbx": np.array([0.0, 0.0, 9.0, 9.0])}]
    imlist = [f"im{i}" for i in range(6)]
    write_gnd(tmp_path / "gnd_x.pkl", gnd, imlist, ["q0", "q1"])
    out = read_gnd(tmp_path / "gnd_x.pkl")
    assert out["imlist"] == imlist and out["qimlist"] == ["q0", "q1"]
    assert out["gnd"][0]["easy"].tolist() == [1, 2] and out["gnd"][1]["junk"].tolist() == [3, 4]
    assert out["gnd"][1]["hard"].dtype == np.int64 and out["gnd"][0]["bbx"] == [1.0, 2.0, 30.5, 40.0]
    # numpy values straight in the pickle (protocol 2, as Python-2-era files are)
    raw = {"gnd": [{"easy": np.array([7]), "hard": np.array([8]), "junk": np.array([9]),
                    "bbx": np.array([1.0, 2, 3, 4])}], "imlist": list("abcdefghij"), "qimlist": ["b"]}
    (tmp_path / "gnd_np.pkl").write_bytes(pickle.dumps(raw, protocol=2))
    assert read_gnd(tmp_path / "gnd_np.pkl")["gnd"][0]["hard"].tolist() == [8]
    (tmp_path / "gnd_bad.pkl").write_bytes(pickle.dumps({"imlist": []}))
    with pytest.raises(DataError, match="key 'gnd'"):
        read_gnd(tmp_path / "gnd_bad.pkl")


# ------------------------------------------------------------------------------------------------
# Hostile pickles
# ------------------------------------------------------------------------------------------------

class _Touch:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _Popen:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (subprocess.Popen, (["touch", self.path],))


class _Eval:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (eval, (f"open({self.path!r}, 'w').close()",))


@pytest.mark.parametrize("payload, name", [(_Touch, "system"), (_Popen, "subprocess.Popen"),
                                           (_Eval, "builtins.eval")])
@pytest.mark.parametrize("protocol", [2, 5])
def test_hostile_pickle_is_refused_and_nothing_runs(tmp_path, payload, name, protocol):
    marker = tmp_path / "pwned"
    data = pickle.dumps({"gnd": [{"easy": [1]}], "x": [payload(marker)]}, protocol=protocol)
    for fname in ("nn_evil.pkl", "gnd_evil.pkl"):
        (tmp_path / fname).write_bytes(data)
    with pytest.raises(UnsafePickleError, match=name):
        safe_load_pickle(tmp_path / "nn_evil.pkl")
    with pytest.raises(UnsafePickleError, match="refusing to load global"):
        read_neighbours(tmp_path / "nn_evil.pkl")
    with pytest.raises(UnsafePickleError):
        read_gnd(tmp_path / "gnd_evil.pkl")
    assert not marker.exists()
    # the payload really is live: a plain pickle.load would have created the file
    pickle.loads(data)
    for _ in range(50):
        if marker.exists():
            break
        import time

        time.sleep(0.05)
    assert marker.exists()


def test_hostile_torch_save_archive_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"t": torch.zeros(2), "x": _Touch(marker)}, tmp_path / "nn.pkl")
    with pytest.raises(UnsafePickleError, match="weights_only"):
        read_neighbours(tmp_path / "nn.pkl")
    assert not marker.exists()


def test_hostile_payload_inside_an_embedded_tensor_storage_is_refused(tmp_path):
    # pickle.dump of a tensor embeds a legacy torch.save stream that torch itself would load with
    # weights_only=False; a crafted file can hide code there.
    marker = tmp_path / "pwned"
    inner = pickle.dumps(_Touch(marker), protocol=2)

    class _Storage:
        def __reduce__(self):
            import torch.storage

            return (torch.storage._load_from_bytes, (inner,))

    (tmp_path / "nn.pkl").write_bytes(pickle.dumps(_Storage()))
    with pytest.raises(UnsafePickleError):
        safe_load_pickle(tmp_path / "nn.pkl")
    assert not marker.exists()


def test_truncated_pickle_is_a_data_error(tmp_path):
    sims, ids = _nn()
    data = pickle.dumps(np.stack([sims, ids]))
    (tmp_path / "nn.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable pickle"):
        read_neighbours(tmp_path / "nn.pkl")


# ------------------------------------------------------------------------------------------------
# A dataset folder
# ------------------------------------------------------------------------------------------------

def test_locate_files_names_what_is_missing(tmp_path):
    (tmp_path / "d_query_local.hdf5").touch()
    (tmp_path / "nn_d.pkl").touch()
    with pytest.raises(DataError) as e:
        locate_files(tmp_path, "d")
    msg = str(e.value)
    assert "d_gallery_local.hdf5" in msg and "d_query_global.pt" in msg and "d_gallery_global.pt" in msg
    assert "d_query_local.hdf5" not in msg.split("expected layout")[0]
    assert "expected layout" in msg
    for name in ("d_gallery_local.hdf5", "d_query_global.pt", "d_gallery_global.pt"):
        (tmp_path / name).touch()
    files = locate_files(tmp_path, "d")
    assert files.gnd is None and files.nn.endswith("nn_d.pkl")
    (tmp_path / "gnd_a.pkl").touch()
    assert locate_files(tmp_path, "d").gnd.endswith("gnd_a.pkl")
    (tmp_path / "gnd_b.pkl").touch()
    with pytest.raises(DataError, match="several ground-truth files"):
        locate_files(tmp_path, "d")
    assert locate_files(tmp_path, "d", gnd=str(tmp_path / "gnd_b.pkl"), use_global=False).query_global is None
    with pytest.raises(DataError, match="data folder not found"):
        locate_files(tmp_path / "nope", "d")
