"""``locore rerank | eval | bench | demo`` end to end on small generated folders (fp32, CPU, preset tiny)."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from locore import cli, pipeline
from locore.data import read_gnd, read_neighbours, write_local
from locore.demo import generate_problem
from locore.evaluate import protocol_first_stage, revisited_metrics

# a small, fast model: the tiny preset cut to 2 layers; 8 descriptors per image (T = 10 with the global)
FAST = ["--checkpoint", "preset:tiny", "--num-layers", "2", "--descriptors", "8", "--device", "cpu",
        "--dtype", "float32", "--no-progress"]
SLIDE = ["--sliding", "end-to-start", "--shortlist", "12", "--window", "5", "--stride", "3"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("ames")
    generate_problem(str(d), queries=3, images=50, slots=10, num_descriptors=8, seed=1)
    return d


def _run(capsys, argv):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _check_ranks(ranks, first_stage, L):
    assert ranks.dtype == np.int64 and ranks.shape == first_stage.shape
    for q in range(ranks.shape[0]):
        assert sorted(ranks[q, :L]) == sorted(first_stage[q, :L])      # a permutation of the shortlist
        np.testing.assert_array_equal(ranks[q, L:], first_stage[q, L:])  # the rest untouched


def test_rerank_reference_protocol_end_to_end(folder, tmp_path, capsys):
    out = tmp_path / "res" / "ranks.npy"
    rc, stdout, _ = _run(capsys, ["rerank", *FAST, "--data", str(folder), "--desc", "demo", "--alpha", "0.5",
                                  "--temp", "0.5", *SLIDE, "--out", str(out)])
    assert rc == 0
    assert "RANDOM WEIGHTS" in stdout and "throughput:" in stdout and "queries/s" in stdout
    assert "forward passes/s" in stdout
    nn = read_neighbours(folder / "nn_demo.pkl")
    gnd = read_gnd(folder / "gnd_demo.pkl")["gnd"]
    medium, hard = np.load(out), np.load(tmp_path / "res" / "ranks_hard.npy")
    first_m, _ = protocol_first_stage(nn.ids, nn.sims, gnd, "medium")
    first_h, _ = protocol_first_stage(nn.ids, nn.sims, gnd, "hard")
    _check_ranks(medium, first_m, 12)
    _check_ranks(hard, first_h, 12)
    assert medium.shape == (3, 50)

    summary = json.loads((tmp_path / "res" / "ranks.json").read_text())
    assert summary["protocol"] == "reference" and summary["random_weights"] is True
    assert summary["method"] == {"kind": "sliding", "order": "end-to-start", "shortlist": 12, "window": 5,
                                 "stride": 3}
    m = summary["metrics"]
    assert set(m) == {"easy", "medium", "hard"} and m["hard"]["run"] == "hard" and m["easy"]["run"] == "medium"
    expect = {"medium": revisited_metrics(medium, gnd, ("easy", "medium")),
              "hard": revisited_metrics(hard, gnd, ("hard",))}
    for split, run in (("easy", "medium"), ("medium", "medium"), ("hard", "hard")):
        for key, value in expect[run][split].items():
            assert m[split]["reranked"][key] == pytest.approx(round(value, 2))
        assert m[split]["first_stage"]["mAP"] == pytest.approx(
            round(revisited_metrics(first_m if run == "medium" else first_h, gnd, (split,))[split]["mAP"], 2))
        assert 0 <= m[split]["reranked"]["mAP"] <= 100
    # end-to-start, L=12, W=5, S=3: starts 7, 4, 1, 0 -> 4 passes per query and run
    assert summary["throughput"]["medium"]["forward_passes"] == 4 * 3
    assert f"{m['medium']['reranked']['mAP']:8.2f}" in stdout  # the printed table has the same numbers


def test_rerank_clean_topk_batched_and_eval(folder, tmp_path, capsys):
    out = tmp_path / "clean.npy"
    rc, stdout, _ = _run(capsys, ["rerank", *FAST, "--data", str(folder), "--desc", "demo", "--alpha", "0.3",
                                  "--temp", "0.1", "--topk", "10", "--protocol", "clean", "--batch-size", "2",
                                  "--out", str(out)])
    assert rc == 0
    nn = read_neighbours(folder / "nn_demo.pkl")
    ranks = np.load(out)
    _check_ranks(ranks, nn.ids, 10)
    summary = json.loads((tmp_path / "clean.json").read_text())
    assert summary["throughput"]["clean"]["forward_passes"] == 2  # 3 queries in batches of 2
    assert not os.path.exists(tmp_path / "clean_hard.npy")
    # batched and one-at-a-time give the same ranks
    rc, _, _ = _run(capsys, ["rerank", *FAST, "--data", str(folder), "--desc", "demo", "--alpha", "0.3",
                             "--temp", "0.1", "--topk", "10", "--protocol", "clean", "--batch-size", "1",
                             "--out", str(tmp_path / "one.npy")])
    np.testing.assert_array_equal(np.load(tmp_path / "one.npy"), ranks)
    # locore eval on the same ranks reports the same numbers
    rc, stdout, _ = _run(capsys, ["eval", "--ranks", str(out), "--gnd", str(folder / "gnd_demo.pkl"),
                                  "--json", str(tmp_path / "eval.json")])
    assert rc == 0
    ev = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    for split in ("easy", "medium", "hard"):
        assert ev[split] == summary["metrics"][split]["reranked"]
        assert f"{ev[split]['mAP']:8.2f}" in stdout


def test_rerank_without_global_descriptors(folder, tmp_path, capsys):
    rc, stdout, _ = _run(capsys, ["rerank", *FAST, "--data", str(folder), "--desc", "demo", "--alpha", "0.5",
                                  "--temp", "0.5", "--topk", "6", "--no-global", "--split", "hard",
                                  "--out", str(tmp_path / "ng.npy")])
    assert rc == 0 and "(T = 9)" in stdout
    assert json.loads((tmp_path / "ng.json").read_text())["metrics"].keys() == {"hard"}


def test_eval_class_level(tmp_path, capsys):
    np.save(tmp_path / "r.npy", np.array([[3, 1, 2], [0, 4, 5]]))
    np.save(tmp_path / "q.npy", np.array([0, 1]))
    np.save(tmp_path / "d.npy", np.array([0, 1, 1, 0, 2, 1]))
    rc, stdout, _ = _run(capsys, ["eval", "--ranks", str(tmp_path / "r.npy"), "--query-labels",
                                  str(tmp_path / "q.npy"), "--db-labels", str(tmp_path / "d.npy"),
                                  "--recall-k", "1,3"])
    assert rc == 0
    assert "R@1 50.00" in stdout and "R@3 100.00" in stdout and "MAP@R 30.56" in stdout


# ------------------------------------------------------------------------------------------------
# Friendly errors
# ------------------------------------------------------------------------------------------------

def _rerank_args(folder, tmp_path, *extra):
    return ["rerank", *FAST, "--data", str(folder), "--desc", "demo", "--alpha", "0.5", "--temp", "0.5",
            "--out", str(tmp_path / "r.npy"), *extra]


def test_missing_files_are_named(tmp_path, capsys):
    (tmp_path / "demo_query_local.hdf5").touch()
    rc, _, err = _run(capsys, _rerank_args(tmp_path, tmp_path))
    assert rc == 2
    assert "missing input file(s)" in err and "demo_gallery_local.hdf5" in err and "nn_demo.pkl" in err
    assert "expected layout" in err
    rc, _, err = _run(capsys, _rerank_args(tmp_path / "nowhere", tmp_path))
    assert rc == 2 and "data folder not found" in err


def test_shortlist_longer_than_the_neighbour_lists(folder, tmp_path, capsys):
    rc, _, err = _run(capsys, _rerank_args(folder, tmp_path, "--sliding", "end-to-start", "--shortlist", "80",
                                           "--window", "5", "--stride", "3"))
    assert rc == 2 and "shortlist of 80 images is longer than the neighbour lists" in err and "(50 per query)" in err


def test_descriptor_dim_differs_from_the_checkpoint(tmp_path, capsys):
    generate_problem(str(tmp_path), queries=2, images=30, slots=8, num_descriptors=8, local_dim=64, global_dim=768)
    rc, _, err = _run(capsys, _rerank_args(tmp_path, tmp_path, "--topk", "5"))
    assert rc == 2 and "have D=64" in err and "expects local_dim=768" in err


def test_window_larger_than_the_position_table(folder, tmp_path, capsys, monkeypatch):
    from locore.model import LoCoRe

    small = LoCoRe.preset("tiny", num_layers=1, max_position_embeddings=52)  # 50 tokens: (1 + W) * 10 <= 50
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: (small, True))
    rc, _, err = _run(capsys, _rerank_args(folder, tmp_path, "--sliding", "end-to-start", "--shortlist", "12",
                                           "--window", "5", "--stride", "3"))
    assert rc == 2
    assert "a window of 5 images needs (1 + 5) x 10 = 60 tokens" in err and "allows 50" in err
    assert "at most 4 images" in err
    rc, _, _ = _run(capsys, _rerank_args(folder, tmp_path, "--sliding", "end-to-start", "--shortlist", "12",
                                         "--window", "4", "--stride", "2"))
    assert rc == 0


def test_hostile_neighbour_file_is_refused(folder, tmp_path, capsys):
    import shutil

    d = tmp_path / "evil"
    shutil.copytree(folder, d)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (d / "nn_demo.pkl").write_bytes(pickle.dumps(Evil()))
    rc, _, err = _run(capsys, _rerank_args(d, tmp_path, "--topk", "5"))
    assert rc == 2 and "refusing to load global" in err and "system" in err
    assert not marker.exists()


def test_conflicting_method_flags(folder, tmp_path, capsys):
    rc, _, err = _run(capsys, _rerank_args(folder, tmp_path, "--topk", "5", "--sliding", "end-to-start"))
    assert rc == 2 and "not both" in err
    rc, _, err = _run(capsys, _rerank_args(folder, tmp_path, "--window", "5"))
    assert rc == 2 and "go with --sliding" in err


def test_missing_checkpoint(folder, tmp_path, capsys):
    argv = _rerank_args(folder, tmp_path, "--topk", "5")
    argv[argv.index("preset:tiny")] = str(tmp_path / "nope.safetensors")
    rc, _, err = _run(capsys, argv)
    assert rc == 2 and "checkpoint not found" in err


def test_real_checkpoint_file(folder, tmp_path, capsys):
    from safetensors.torch import save_file

    from locore.checkpoint import state_dict_to_reference
    from locore.model import LoCoRe

    model = LoCoRe.preset("tiny", num_layers=2, seed=3)
    save_file(state_dict_to_reference(model), str(tmp_path / "m.safetensors"))
    argv = _rerank_args(folder, tmp_path, "--topk", "6", "--protocol", "clean", "--num-attention-heads", "8")
    argv[argv.index("preset:tiny")] = str(tmp_path / "m.safetensors")
    argv.remove("--num-layers"), argv.remove("2")
    rc, stdout, _ = _run(capsys, argv)
    assert rc == 0 and "RANDOM WEIGHTS" not in stdout and "2 layers, hidden 256, 8 heads" in stdout
    assert json.loads((tmp_path / "r.json").read_text())["random_weights"] is False


# ------------------------------------------------------------------------------------------------
# Help, bench, demo
# ------------------------------------------------------------------------------------------------

def test_every_flag_is_documented():
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(subs.choices) == {"rerank", "search", "eval", "bench", "demo", "train"}
    for name in ("rerank", "search", "eval", "demo", "train"):
        for action in subs.choices[name]._actions:
            assert action.help, f"locore {name} {action.option_strings} has no help text"
    help_text = subs.choices["rerank"].format_help()
    for flag in ("--checkpoint", "--data", "--desc", "--nn", "--gnd", "--num-attention-heads", "--attention-window",
                 "--descriptors", "--no-global", "--alpha", "--temp", "--mode", "--topk", "--sliding", "--shortlist",
                 "--window", "--stride", "--protocol", "--split", "--device", "--dtype", "--batch-size", "--out",
                 "--first-stage", "--first-stage-topk"):
        assert flag in help_text


def test_console_script_help():
    exe = os.path.join(os.path.dirname(sys.executable), "locore")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "locore.cli"]
    res = subprocess.run(cmd + ["rerank", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--sliding ORDER" in res.stdout and "preset:tiny|small|base" in res.stdout


def test_bench_runs_the_checkout_script_with_its_arguments(monkeypatch):
    seen = {}

    def fake_run(cmd, *a, **k):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert cli.main(["bench", "attention", "--cpu", "--runs", "3"]) == 0
    assert seen["cmd"][0] == sys.executable and seen["cmd"][1].endswith("benchmarks/bench_attention.py")
    assert seen["cmd"][2:] == ["--cpu", "--runs", "3"]
    assert cli.main(["bench", "--cpu"]) == 0 and seen["cmd"][1].endswith("benchmarks/bench_model.py")


def test_bench_without_a_checkout_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "find_benchmarks", lambda: None)
    assert cli.main(["bench"]) == 2
    assert "benchmarks/ folder" in capsys.readouterr().err


def test_demo_runs_and_prints_the_agreement(tmp_path, capsys):
    rc, stdout, _ = _run(capsys, ["demo", "--queries", "2", "--images", "40", "--num-layers", "2",
                                  "--descriptors", "8", "--shortlist", "12", "--window", "5", "--stride", "3",
                                  "--no-progress", "--out-dir", str(tmp_path / "demo")])
    assert rc == 0
    assert "RANDOM WEIGHTS" in stdout and "weights" in stdout.split("NOTE:")[-1]
    assert "latency per shortlist of 12" in stdout and "peak memory:" in stdout
    line = next(l for l in stdout.splitlines() if l.startswith("agreement:"))
    rel = float(line.split("relative to the largest score")[1].split()[0])
    assert rel <= 1e-4
    assert (tmp_path / "demo" / "ranks.json").exists() and (tmp_path / "demo" / "nn_demo.pkl").exists()


def test_cli_name_lists_match_the_model():
    """--mode offers the score-mode table's names (the model reads the same table); every --dtype parses."""
    from locore.model import MODES, as_dtype
    from locore.scoring import SCORE_MODES

    actions = cli.build_parser()._subparsers._group_actions[0].choices["rerank"]._actions
    mode = next(a for a in actions if a.dest == "mode")
    assert tuple(mode.choices) == tuple(SCORE_MODES) == tuple(MODES)
    dtype = next(a for a in actions if a.dest == "dtype")
    for name in dtype.choices:
        as_dtype(name)  # every accepted --dtype is a name the model parses
