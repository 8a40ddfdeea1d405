"""Global descriptors: raw float32 and torch.save files, block streaming, gallery + distractors as one range."""
import os

import numpy as np
import pytest
import torch

from locore.data import DataError, UnsafePickleError
from locore.data.global_desc import ConcatGlobal, GlobalFeatures, write_global


def _rand(n, d, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _blocks(g, rows):
    starts, parts = [], []
    for s, b in g.iter_blocks(rows):
        starts.append(s)
        parts.append(b.copy())  # the yielded array is a reused buffer
    return starts, np.concatenate(parts)


@pytest.mark.parametrize("fmt", ["raw", "torch"])
def test_formats_read_and_stream_the_same_rows(tmp_path, fmt):
    arr = _rand(103, 7)
    path = tmp_path / "g.pt"
    write_global(path, arr, format=fmt)
    g = GlobalFeatures(path, dim=7) if fmt == "raw" else GlobalFeatures(path)
    assert (g.format, len(g), g.dim) == (fmt, 103, 7)
    np.testing.assert_array_equal(g.read([102, 0, 5, 5]), arr[[102, 0, 5, 5]])
    starts, rows = _blocks(g, 25)
    assert starts == [0, 25, 50, 75, 100]
    np.testing.assert_array_equal(rows, arr)
    if fmt == "torch":  # a float32 zip is streamed straight from its stored bytes, like a raw file
        assert g._offset is not None and g._offset > 0


def test_torch_save_variants(tmp_path):
    arr = _rand(40, 6)
    # float16, a non-contiguous tensor and the legacy (non-zip) stream: read through torch, same values
    torch.save(torch.from_numpy(arr).half(), tmp_path / "h.pt")
    torch.save(torch.from_numpy(arr.T.copy()).T, tmp_path / "t.pt")
    torch.save(torch.from_numpy(arr), tmp_path / "l.pt", _use_new_zipfile_serialization=False)
    for name, tol in (("h.pt", 2e-3), ("t.pt", 0), ("l.pt", 0)):
        g = GlobalFeatures(tmp_path / name, num_images=40)
        assert g.dim == 6
        np.testing.assert_allclose(_blocks(g, 16)[1], arr, atol=tol, rtol=tol)
        np.testing.assert_allclose(g.read([3, 39]), arr[[3, 39]], atol=tol, rtol=tol)


def test_torch_save_errors(tmp_path):
    torch.save(torch.zeros(3, 4), tmp_path / "ok.pt")
    with pytest.raises(DataError, match=r"ok\.pt: descriptors have dim 4, expected 5"):
        GlobalFeatures(tmp_path / "ok.pt", dim=5)
    with pytest.raises(DataError, match=r"ok\.pt: holds 3 rows of dim 4, but the matching local file has 2"):
        GlobalFeatures(tmp_path / "ok.pt", num_images=2)
    torch.save(torch.zeros(3, 4, 2), tmp_path / "3d.pt")
    with pytest.raises(DataError, match=r"3d\.pt: tensor has shape \(3, 4, 2\).*expected a floating tensor"):
        GlobalFeatures(tmp_path / "3d.pt")
    torch.save(torch.zeros(3, 4, dtype=torch.int64), tmp_path / "int.pt")
    with pytest.raises(DataError, match=r"int\.pt: .*dtype torch\.int64"):
        GlobalFeatures(tmp_path / "int.pt")
    torch.save({"x": torch.zeros(3, 4)}, tmp_path / "dict.pt")
    with pytest.raises(DataError, match=r"dict\.pt: torch\.save file holds dict; expected one tensor"):
        GlobalFeatures(tmp_path / "dict.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_torch_file_is_loaded_weights_only(tmp_path):
    torch.save(_Evil(), tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError, match=r"evil\.pt: refused by torch\.load\(weights_only=True\)"):
        GlobalFeatures(tmp_path / "evil.pt")
    with open(tmp_path / "trunc.pt", "wb") as f:  # starts like a zip, is not one
        f.write(b"PK\x03\x04" + b"\0" * 60)
    with pytest.raises(DataError, match=r"trunc\.pt: starts like a torch\.save file but does not load"):
        GlobalFeatures(tmp_path / "trunc.pt")


def test_raw_size_must_match(tmp_path):
    write_global(tmp_path / "g.pt", np.zeros((6, 5), np.float32))
    with pytest.raises(DataError, match=r"g\.pt: 30 float32 values \(120 bytes\) is not a multiple of dim=4"):
        GlobalFeatures(tmp_path / "g.pt", dim=4)
    with open(tmp_path / "odd.pt", "wb") as f:
        f.write(b"\1" * 10)
    with pytest.raises(DataError, match=r"odd\.pt: size 10 bytes is not a multiple of 4"):
        GlobalFeatures(tmp_path / "odd.pt", dim=1)


def test_raw_file_truncated_while_streaming(tmp_path):
    path = tmp_path / "g.pt"
    write_global(path, _rand(100, 4))
    g = GlobalFeatures(path, dim=4)
    with open(path, "r+b") as f:
        f.truncate(50 * 16)
    with pytest.raises(DataError, match=r"g\.pt: file ended at row 50 of 100"):
        list(g.iter_blocks(30))


def test_concat_gallery_and_distractors(tmp_path):
    gallery, distractors = _rand(30, 5, 1), _rand(50, 5, 2)
    write_global(tmp_path / "gallery.pt", gallery)
    write_global(tmp_path / "d_global.pt", distractors, format="torch")
    db = ConcatGlobal([GlobalFeatures(tmp_path / "gallery.pt", dim=5), GlobalFeatures(tmp_path / "d_global.pt")])
    both = np.concatenate([gallery, distractors])
    assert (len(db), db.dim) == (80, 5)
    ids = [79, 0, 30, 29, 31, 29]
    np.testing.assert_array_equal(db.read(ids), both[ids])
    starts, rows = _blocks(db, 20)
    assert starts == [0, 20, 30, 50, 70]  # a block never spans two files
    np.testing.assert_array_equal(rows, both)
    with pytest.raises(DataError, match=r"image id 80 out of range \[0, 80\)"):
        db.read([80])
    write_global(tmp_path / "other.pt", _rand(4, 6))
    with pytest.raises(DataError, match=r"dims disagree: .*gallery\.pt has 5, .*other\.pt has 6"):
        ConcatGlobal([GlobalFeatures(tmp_path / "gallery.pt", dim=5), GlobalFeatures(tmp_path / "other.pt", dim=6)])


def test_write_global_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"must be \[n, dim\]"):
        write_global(tmp_path / "x.pt", np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="format must be"):
        write_global(tmp_path / "x.pt", np.zeros((2, 2), np.float32), format="npy")
    assert not os.path.exists(tmp_path / "x.pt")
