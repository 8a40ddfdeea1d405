"""``torchrun --nproc-per-node=2 -m locore rerank`` (CPU, gloo) writes the ranks a single process writes;
killed runs resume to the same files; a resume with other settings is refused."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from locore import cli
from locore.demo import generate_problem
from locore.distributed import KILL_AFTER_ENV

from test_distributed import TORCHRUN, torchrun_env

FAST = ["--checkpoint", "preset:tiny", "--num-layers", "1", "--descriptors", "8", "--device", "cpu",
        "--dtype", "float32"]
SLIDE = ["--sliding", "end-to-start", "--shortlist", "12", "--window", "5", "--stride", "3"]
Q = 5  # 2 processes: blocks of 3 and 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("ames")
    generate_problem(str(d), queries=Q, images=80, slots=10, num_descriptors=8, seed=3)
    return str(d)


def _argv(folder, out, *extra):
    return ["rerank", *FAST, "--data", folder, "--desc", "demo", "--alpha", "0.5", "--temp", "0.5", *SLIDE,
            "--split", "both", "--out", str(out), *extra]


def _torchrun(argv, logs=None, env=None, timeout=150):
    cmd = [*TORCHRUN, "--nproc-per-node=2"]
    if logs is not None:  # one stdout / stderr file per rank
        cmd += ["--log-dir", str(logs), "--redirects", "3"]
    return subprocess.run([*cmd, "-m", "locore", *argv], env=env or torchrun_env(), capture_output=True, text=True,
                          timeout=timeout)


def _rank_log(logs, rank, stream):
    found = glob.glob(os.path.join(str(logs), "**", str(rank), f"{stream}.log"), recursive=True)
    assert len(found) == 1, found
    return open(found[0]).read()


def _single(capsys, folder, out, *extra):
    assert cli.main(_argv(folder, out, "--no-progress", *extra)) == 0
    capsys.readouterr()


def _same_files(a, b, names=("ranks.npy", "ranks_hard.npy")):
    for name in names:
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read(), name


@pytest.mark.parametrize("max_queries", [None, 3])  # 5 and 3 queries over 2 processes
def test_two_processes_write_the_single_process_files(folder, tmp_path, capsys, max_queries):
    extra = [] if max_queries is None else ["--max-queries", str(max_queries)]
    one, two = tmp_path / "one", tmp_path / "two"
    _single(capsys, folder, one / "ranks.npy", *extra)
    r = _torchrun(_argv(folder, two / "ranks.npy", *extra), logs=tmp_path / "logs")
    assert r.returncode == 0, r.stderr[-3000:]
    _same_files(one, two)   # byte for byte, both protocol runs
    nq = Q if max_queries is None else max_queries
    assert np.load(two / "ranks.npy").shape == (nq, 80)
    s1, s2 = (json.loads((d / "ranks.json").read_text()) for d in (one, two))
    assert s2["metrics"] == s1["metrics"] and s2["world_size"] == 2 and s1["world_size"] == 1
    # each rank's throughput: blocks of ceil(nq/2) and floor(nq/2) queries, over the two runs
    assert [p["rank"] for p in s2["processes"]] == [0, 1]
    assert [p["queries"] for p in s2["processes"]] == [2 * ((nq + 1) // 2), 2 * (nq // 2)]
    assert all(p["queries_per_s"] > 0 and p["threads"] >= 1 for p in s2["processes"])
    assert not os.path.exists(two / "ranks.work")   # cleaned up after success
    # one progress bar, on rank 0, counting every rank's queries; metrics printed once
    err0, err1 = _rank_log(tmp_path / "logs", 0, "stderr"), _rank_log(tmp_path / "logs", 1, "stderr")
    assert f"re-ranking (medium): 100%" in err0 and f"{nq}/{nq}" in err0
    assert "re-ranking" not in err1
    out0, out1 = _rank_log(tmp_path / "logs", 0, "stdout"), _rank_log(tmp_path / "logs", 1, "stdout")
    assert "metrics (protocol: reference" in out0 and "metrics" not in out1 and out1.strip() == ""


def test_killed_run_resumes_to_the_same_files_and_other_settings_are_refused(folder, tmp_path, capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    _single(capsys, folder, ref / "ranks.npy")
    # each process SIGKILLs itself once it has saved 2 queries (medium run: rank 0 has 3, rank 1 has 2)
    argv = _argv(folder, run / "ranks.npy", "--save-every", "1", "--no-progress")
    r = _torchrun(argv, env=dict(torchrun_env(), **{KILL_AFTER_ENV: "2"}))
    assert r.returncode != 0
    assert not os.path.exists(run / "ranks.npy")
    saved = glob.glob(str(run / "ranks.work" / "medium.q*.npz"))
    assert 2 <= len(saved) < Q

    # the same command without --resume: the stale folder is reported, nothing runs
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "ranks.work of an earlier unfinished run" in err and "--resume" in err
    # --resume with another alpha, another model depth: refused, naming the change
    rc = cli.main(_argv(folder, run / "ranks.npy", "--resume", "--alpha", "0.3"))
    err = capsys.readouterr().err
    assert rc == 2 and "different run" in err and "alpha: 0.5 then, 0.3 now" in err
    rc = cli.main([*_argv(folder, run / "ranks.npy", "--resume"), "--num-layers", "2"])
    assert rc == 2 and "num_layers: 1 then, 2 now" in capsys.readouterr().err
    assert len(glob.glob(str(run / "ranks.work" / "medium.q*.npz"))) == len(saved)  # untouched

    # the same command with --resume, under torchrun again: finished queries skipped, same files
    r = _torchrun([*argv, "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"[medium] resuming: {len(saved)} of {Q} queries already done" in r.stdout
    _same_files(ref, run)
    summary = json.loads((run / "ranks.json").read_text())
    assert sum(p["queries"] for p in summary["processes"]) == 2 * Q - len(saved)  # only the rest computed
    assert not os.path.exists(run / "ranks.work")


def test_two_nodes_through_the_c10d_rendezvous_on_one_machine(folder, tmp_path, capsys):
    """Multi-node as documented: two torchrun agents (one process each) meet at --rdzv-endpoint."""
    import socket

    one, two = tmp_path / "one", tmp_path / "two"
    _single(capsys, folder, one / "ranks.npy", "--max-queries", "3")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=locore-test", "-m", "locore",
           *_argv(folder, two / "ranks.npy", "--max-queries", "3", "--no-progress")]
    nodes = [subprocess.Popen(cmd, env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=150) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), [o[1][-2000:] for o in outs]
    _same_files(one, two)
    summary = json.loads((two / "ranks.json").read_text())
    assert summary["world_size"] == 2 and [p["queries"] for p in summary["processes"]] == [4, 2]


def test_search_sharded_over_two_processes_equals_one_search(folder, tmp_path, capsys):
    from locore.data import read_neighbours

    one, two = tmp_path / "one.pkl", tmp_path / "two.pkl"
    # top 50 of 80 images: more than one process's block of 40, so the merge must take from both
    args = ["search", "--data", folder, "--desc", "demo", "--topk", "50", "--device", "cpu", "--no-progress"]
    assert cli.main([*args, "--out", str(one)]) == 0
    capsys.readouterr()
    r = subprocess.run([*TORCHRUN, "--nproc-per-node=2", "-m", "locore", *args, "--out", str(two)],
                       env=torchrun_env(), capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "flat search over 2 processes" in r.stdout
    a, b = read_neighbours(str(one)), read_neighbours(str(two))
    np.testing.assert_array_equal(b.ids, a.ids)
    # the merge is exact; the similarities themselves may differ in the last float32 bit, since a GEMM's
    # reduction order depends on the block shape and the thread count
    np.testing.assert_allclose(b.sims, a.sims, rtol=0, atol=1e-6)
    assert {int(i) >= 40 for i in b.ids[0]} == {False, True}  # both blocks contribute
