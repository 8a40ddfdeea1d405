"""The application layer: settings refused up front, all-or-nothing outputs, Ctrl-C, non-finite scores.

Small generated folders, the tiny preset cut to 2 layers, fp32 on CPU.
"""
import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from locore import cli, pipeline
from locore.data import read_gnd, read_neighbours
from locore.demo import generate_problem
from locore.evaluate import protocol_first_stage
from locore.pipeline import DataSettings, ModelSettings, RerankOptions
from locore.rerank import DatasetReranker, NonFiniteScoreError, SettingsError, Sliding, TopK

FAST = ["--checkpoint", "preset:tiny", "--num-layers", "2", "--descriptors", "8", "--device", "cpu",
        "--dtype", "float32", "--no-progress"]
SLIDE = ["--sliding", "end-to-start", "--shortlist", "12", "--window", "5", "--stride", "3"]
L = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("ames")
    generate_problem(str(d), queries=3, images=50, slots=10, num_descriptors=8, seed=1)
    return d


def _rerank(folder, out, *extra):
    return ["rerank", *FAST, "--data", str(folder), "--desc", "demo", "--alpha", "0.5", "--temp", "0.5",
            *SLIDE, "--out", str(out), *extra]


def _run(capsys, argv):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _snapshot(folder):
    """The output files (the work folder RANKS.work of a failed run is kept on purpose, for --resume)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix != ".work"}


@pytest.fixture()
def earlier_results(folder, tmp_path, capsys):
    """A successful run's RANKS.npy, RANKS_hard.npy and RANKS.json in tmp_path/res."""
    out = tmp_path / "res" / "ranks.npy"
    rc, _, _ = _run(capsys, _rerank(folder, out))
    assert rc == 0
    assert {p.name for p in out.parent.iterdir()} == {"ranks.npy", "ranks_hard.npy", "ranks.json"}
    return out, _snapshot(out.parent)


# ------------------------------------------------------------------------------------------------
# 13.1 all-or-nothing outputs
# ------------------------------------------------------------------------------------------------

def test_bad_data_in_the_hard_shortlist_leaves_earlier_results_byte_identical(folder, tmp_path, capsys,
                                                                              earlier_results):
    out, before = earlier_results
    nn = read_neighbours(folder / "nn_demo.pkl")
    gnd = read_gnd(folder / "gnd_demo.pkl")["gnd"]
    medium, _ = protocol_first_stage(nn.ids, nn.sims, gnd, "medium")
    hard, _ = protocol_first_stage(nn.ids, nn.sims, gnd, "hard")
    only_hard = sorted(set(hard[:, :L].ravel()) - set(medium[:, :L].ravel()))
    assert only_hard, "the generated problem must have an image shortlisted only in the hard run"
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    with h5py.File(bad / "demo_gallery_local.hdf5", "r+") as f:
        rows = f["features"][only_hard[0]]
        rows[:, 5:] = 1e30  # finite, but the scores it gives are not
        f["features"][only_hard[0]] = rows
    rc, stdout, err = _run(capsys, _rerank(bad, out, "--batch-size", "3"))
    assert rc == 2 and "[medium]" in stdout  # the medium run finished before the hard one failed
    assert len(err.strip().splitlines()) == 1 and str(only_hard[0]) in err, err
    assert _snapshot(out.parent) == before  # nothing replaced, no temporary file left behind
    saved = sorted(p.name.split(".")[0] for p in (out.parent / "ranks.work").glob("*.npz"))
    assert saved and set(saved) == {"medium"}  # the finished run is kept for --resume, nothing of the failed one


def test_ctrl_c_mid_run_leaves_earlier_results_and_prints_one_line(folder, capsys, monkeypatch, earlier_results):
    out, before = earlier_results
    real = DatasetReranker.rerank
    calls = []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the hard run, after the medium one finished
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(DatasetReranker, "rerank", interrupted)
    rc, _, err = _run(capsys, _rerank(folder, out, "--alpha", "0.9"))
    assert rc == 130 and len(calls) == 2
    assert err.strip() == "locore rerank: interrupted; no results written (earlier output files are unchanged)"
    assert _snapshot(out.parent) == before


def test_ctrl_c_while_writing_removes_the_temporary_files(folder, tmp_path, monkeypatch, earlier_results):
    out, before = earlier_results
    real_save = np.save
    saved = []

    def save_then_interrupt(f, a, **k):
        saved.append(1)
        real_save(f, a, **k)
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", save_then_interrupt)
    data = DataSettings(str(folder), "demo", descriptors=8)
    options = RerankOptions(alpha=0.2, temp=0.5, method=Sliding("end-to-start", L, 5, 3), progress=False)
    with pytest.raises(KeyboardInterrupt):
        pipeline.rerank(ModelSettings("preset:tiny", device="cpu", num_layers=2), data, options, str(out),
                        log=lambda s: None)
    assert _snapshot(out.parent) == before


@pytest.mark.parametrize("where", ["folder", "parent-is-a-file", "json-is-a-folder", "hard-is-a-folder"])
def test_output_paths_refused_before_any_work(folder, tmp_path, capsys, monkeypatch, where):
    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    (tmp_path / "afile").write_text("x")
    out = {"folder": tmp_path, "parent-is-a-file": tmp_path / "afile" / "sub" / "r.npy",
           "json-is-a-folder": tmp_path / "j.npy", "hard-is-a-folder": tmp_path / "h.npy"}[where]
    if where == "json-is-a-folder":
        (tmp_path / "j.json").mkdir()
    if where == "hard-is-a-folder":
        (tmp_path / "h_hard.npy").mkdir()
    rc, _, err = _run(capsys, _rerank(folder, out))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert ("is a folder" in err) if where != "parent-is-a-file" else ("afile is a file, not a folder" in err)


# ------------------------------------------------------------------------------------------------
# 13.7 nonsense settings refused at parse time; 13.9 the demo's
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,message", [
    ("--alpha", "1.5", "alpha must be a number in [0, 1]"), ("--alpha", "-0.1", "alpha must be"),
    ("--alpha", "nan", "alpha must be"), ("--temp", "0", "temp must be a finite number > 0"),
    ("--temp", "-1", "temp must be"), ("--temp", "nan", "temp must be"), ("--temp", "inf", "temp must be"),
    ("--batch-size", "0", "--batch-size must be an integer >= 1"), ("--max-queries", "0", "--max-queries must be"),
    ("--alpha", "abc", "expected a number"),
])
def test_nonsense_rerank_settings_are_refused_at_parse_time(folder, tmp_path, capsys, flag, value, message):
    argv = _rerank(folder, tmp_path / "r.npy")
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {message}" in err
    assert not (tmp_path / "r.npy").exists()


@pytest.mark.parametrize("value", ["0", "-1", "1,0", ""])
def test_recall_k_below_one_is_refused(tmp_path, capsys, value):
    np.save(tmp_path / "r.npy", np.array([[0, 1]]))
    with pytest.raises(SystemExit):
        cli.main(["eval", "--ranks", str(tmp_path / "r.npy"), "--recall-k", value])
    assert "argument --recall-k: expected comma-separated integers >= 1" in capsys.readouterr().err


def test_settings_dataclasses_check_themselves():
    for bad in (dict(alpha=float("nan")), dict(temp=0.0), dict(batch_size=0), dict(max_queries=0),
                dict(mode="max-min"), dict(method=TopK(0)), dict(protocol="fancy")):
        with pytest.raises(SettingsError):
            RerankOptions(**{"alpha": 0.5, "temp": 0.5, **bad})
    with pytest.raises(SettingsError):
        DatasetReranker(object(), type("R", (), {"num_descriptors": 4})(), None, alpha=0.5, temp=float("inf"))


@pytest.mark.parametrize("extra,message", [
    (["--images", "10"], "--images 10 is too few for 8 queries"),
    (["--queries", "0"], "argument --queries: --queries must be an integer >= 1"),
    (["--out-dir", "FILE"], "is a file, not a folder"),
])
def test_demo_refuses_impossible_problems_in_one_line(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model must not be loaded"))
    (tmp_path / "FILE").write_text("x")
    extra = [str(tmp_path / "FILE") if x == "FILE" else x for x in extra]
    try:
        rc = cli.main(["demo", "--no-progress", *extra])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err
    assert len([line for line in err.splitlines() if line.startswith("locore")]) == 1


# ------------------------------------------------------------------------------------------------
# 13.2 a non-finite score is an error naming the query and the images
# ------------------------------------------------------------------------------------------------

class _Reader:
    def __init__(self, n, S=3, D=4):
        self.num_descriptors, self.n, self.S, self.D = S, n, S, D

    def __len__(self):
        return self.n

    def read(self, ids):
        from locore.data import LocalBatch

        ids = np.asarray(ids).reshape(-1)
        return LocalBatch(desc=np.zeros((len(ids), self.S, self.D), np.float32),
                          scales=np.zeros((len(ids), self.S), np.int64), mask=np.zeros((len(ids), self.S), bool))


class _NaNForImage:
    """Scores = the gallery image's first descriptor value; image 7 carries NaN."""

    device = torch.device("cpu")

    def __init__(self, reader):
        self.reader = reader

    def score(self, ql, qs, qm, gl, gs, gm, query_global=None, gallery_global=None, mode="max-end", softmax=False):
        return gl[..., 0, 0].clone()


def test_non_finite_scores_name_the_query_and_images():
    q, g = _Reader(3), _Reader(20)
    orig = g.read

    def read(ids):
        batch = orig(ids)
        batch.desc[np.asarray(ids).reshape(-1) == 7] = np.nan
        return batch

    g.read = read
    ids = np.array([[1, 2, 3, 4], [5, 6, 8, 9], [10, 11, 7, 12]])
    for method, batch_size in ((TopK(4), 2), (Sliding("start-to-end", 4, 2, 1), 1)):
        reranker = DatasetReranker(_NaNForImage(g), q, g, alpha=0.5, temp=0.5, batch_size=batch_size)
        with pytest.raises(NonFiniteScoreError, match=r"query 2 .*database ids \[7\]"):
            reranker.rerank(ids, np.ones(ids.shape), method, progress=False)
    reranker = DatasetReranker(_NaNForImage(g), q, g, alpha=0.5, temp=0.5)
    ranks, _ = reranker.rerank(ids[:2], np.ones((2, 4)), TopK(4), progress=False)  # no image 7: fine
    assert sorted(ranks[0]) == [1, 2, 3, 4]


def test_report_and_settings_round_trip_through_the_pipeline(folder, tmp_path):
    """pipeline.rerank without the CLI: same files, the report carries what the JSON says."""
    data = DataSettings(str(folder), "demo", descriptors=8)
    options = RerankOptions(alpha=0.5, temp=0.5, method=TopK(6), protocol="clean", progress=False)
    report = pipeline.rerank(ModelSettings("preset:tiny", device="cpu", num_layers=2), data, options,
                             str(tmp_path / "p"), log=lambda s: None)
    assert report.files == {"clean": str(tmp_path / "p.npy")} and report.json_path == str(tmp_path / "p.json")
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), report.runs["clean"])
    summary = json.loads((tmp_path / "p.json").read_text())
    assert summary == json.loads(json.dumps(report.summary))
    assert summary["method"] == {"kind": "topk", "k": 6} and summary["random_weights"] is True
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
