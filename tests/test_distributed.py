"""locore.distributed in one process (query blocks, fingerprints, work folders, shards) and its
collectives in two gloo processes under torchrun."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from locore import distributed as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def torchrun_env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), ROOT]),
               OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              D.KILL_AFTER_ENV):
        env.pop(k, None)
    return env


@pytest.mark.parametrize("Q,K", [(0, 2), (1, 2), (5, 2), (7, 3), (10, 4), (3, 5), (1129, 8)])
def test_query_blocks_are_contiguous_balanced_and_cover_everything(Q, K):
    blocks = [D.query_block(Q, r, K) for r in range(K)]
    assert [q for b in blocks for q in b] == list(range(Q))       # in rank order = query order
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_fingerprint_follows_settings_and_inputs(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"12345")
    base = D.fingerprint({"alpha": 0.5, "mode": "max-end"}, [str(f), None, "preset:tiny"])
    assert D.fingerprint({"mode": "max-end", "alpha": 0.5}, [str(f), "preset:tiny"])["hash"] == base["hash"]
    assert D.fingerprint({"alpha": 0.3, "mode": "max-end"}, [str(f), "preset:tiny"])["hash"] != base["hash"]
    assert D.fingerprint({"alpha": 0.5, "mode": "max-end"}, [str(f), "preset:small"])["hash"] != base["hash"]
    f.write_bytes(b"123456")  # another size
    assert D.fingerprint({"alpha": 0.5, "mode": "max-end"}, [str(f), "preset:tiny"])["hash"] != base["hash"]
    # content hashes: same size, same mtime, different bytes
    st = os.stat(f)
    c1 = D.fingerprint({}, [str(f)], contents=True)["hash"]
    f.write_bytes(b"654321")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert D.fingerprint({}, [str(f)], contents=True)["hash"] != c1
    # a folder (checkpoint folder): its files count
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    h1 = D.fingerprint({}, [str(d)])["hash"]
    (d / "model.safetensors").write_bytes(b"x")
    assert D.fingerprint({}, [str(d)])["hash"] != h1


def test_work_folder_stale_refused_foreign_refused_same_resumed(tmp_path):
    ctx = D.Context()
    path = str(tmp_path / "ranks.work")
    fp = D.fingerprint({"alpha": 0.5}, [])
    work = D.WorkFolder.open(ctx, path, fp, resume=False)
    work.save("medium", np.array([3, 4]), np.arange(10, dtype=np.int64).reshape(2, 5))
    # without --resume: reported, not reused
    with pytest.raises(D.DistributedError, match=r"earlier unfinished run \(1 partial.*--resume"):
        D.WorkFolder.open(ctx, path, fp, resume=False)
    # another run: refused, naming what changed
    other = D.fingerprint({"alpha": 0.3}, [])
    with pytest.raises(D.DistributedError, match=r"different run \(alpha: 0.5 then, 0.3 now\)"):
        D.WorkFolder.open(ctx, path, other, resume=True)
    # the same run: the rows come back
    again = D.WorkFolder.open(ctx, path, fp, resume=True)
    done = again.load("medium", num_queries=10, row_len=5)
    assert sorted(done) == [3, 4] and done[4].tolist() == [5, 6, 7, 8, 9]
    assert again.load("hard", 10, 5) == {}
    assert sorted(again.load("medium", num_queries=4, row_len=5)) == [3]   # fewer queries this time
    with pytest.raises(D.DistributedError, match="rows"):
        again.load("medium", 10, 6)
    # a partial file of another run slipped into the folder is refused by name
    D.WorkFolder(path, other, ctx).save("medium", np.array([7]), np.zeros((1, 5), np.int64))
    with pytest.raises(D.DistributedError, match=r"medium\.q00000007.*different run"):
        again.load("medium", 10, 5)
    again.remove()
    assert not os.path.exists(path)


def test_shard_saves_every_few_queries_and_skips_saved_ones(tmp_path):
    ctx = D.Context()
    fp = D.fingerprint({"x": 1}, [])
    work = D.WorkFolder.open(ctx, str(tmp_path / "w"), fp, resume=False)
    rows = np.arange(7 * 3, dtype=np.int64).reshape(7, 3)
    shard = D.Shard(ctx, work, "clean", num_queries=7, row_len=3, save_every=2, progress=False, log=lambda s: None)
    assert shard.todo.tolist() == list(range(7))
    for q in range(5):  # five queries done, one at a time: two files of 2, one query pending (unsaved)
        shard.record([q], rows[q:q + 1])
    assert len([n for n in os.listdir(work.path) if n.endswith(".npz")]) == 2
    logs = []
    resumed = D.Shard(ctx, D.WorkFolder.open(ctx, work.path, fp, resume=True), "clean", num_queries=7, row_len=3,
                      save_every=2, progress=False, log=logs.append)
    assert resumed.todo.tolist() == [4, 5, 6] and "4 of 7 queries already done" in logs[0]
    resumed.record(resumed.todo, rows[4:])
    np.testing.assert_array_equal(resumed.finish(), rows)
    with pytest.raises(D.DistributedError, match="not computed"):
        D.Shard(ctx, None, "clean", 2, 3, progress=False).finish()


def test_init_without_torchrun_is_one_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    ctx = D.init("cpu")
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.is_main) == (0, 1, False, True)
    assert ctx.broadcast(5) == 5 and ctx.gather("a") == ["a"] and ctx.total("x") is None
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(D.DistributedError, match="WORLD_SIZE='two'"):
        D.init("cpu")


WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import torch
    from locore import distributed as D

    ctx = D.init("cpu")
    out = sys.argv[1]
    Q, n = 7, 4
    work = D.WorkFolder.open(ctx, out + ".work", D.fingerprint({"t": 1}, []), resume=False)
    shard = D.Shard(ctx, work, "clean", Q, n, save_every=1, progress=False)
    for q in shard.todo:
        shard.record([q], np.full((1, n), 100 * q + ctx.rank, np.int64))
    full = shard.finish()
    err = None
    try:
        if ctx.rank == 1:
            raise ValueError("rank one refuses")
    except ValueError as e:
        err = e
    try:
        ctx.agree(err)
        agreed = "no error"
    except ValueError as e:
        agreed = str(e)
    info = {"rank": ctx.rank, "world": ctx.world_size, "backend": ctx.backend, "threads": ctx.threads,
            "torch_threads": torch.get_num_threads(), "block": list(shard.block), "agreed": agreed,
            "full": None if full is None else full.tolist()}
    with open(f"{out}.{ctx.rank}.json", "w") as f:
        json.dump(info, f)
    work.remove()
    ctx.close()
""")


def test_two_gloo_processes_gather_in_query_order(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = str(tmp_path / "res")
    r = subprocess.run([*TORCHRUN, "--nproc-per-node=2", str(script), out], env=torchrun_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    info = [json.loads(open(f"{out}.{k}.json").read()) for k in range(2)]
    assert [i["block"] for i in info] == [[0, 1, 2, 3], [4, 5, 6]]
    assert all(i["world"] == 2 and i["backend"] == "gloo" for i in info)
    cores = len(os.sched_getaffinity(0))
    assert all(i["threads"] == i["torch_threads"] == max(1, cores // 2) for i in info)
    expect = [[100 * q + (0 if q < 4 else 1)] * 4 for q in range(7)]
    assert info[0]["full"] == expect and info[1]["full"] is None
    # a failure on rank 1 reaches rank 0 (named) instead of leaving it waiting
    assert info[0]["agreed"] == "rank one refuses (on rank 1)" and info[1]["agreed"] == "rank one refuses"
    assert not os.path.exists(out + ".work")


@pytest.mark.parametrize("K", [1, 2, 3, 7])
def test_merge_topk_of_database_blocks_equals_the_whole_search(K):
    rng = np.random.default_rng(K)
    Q, N, m = 4, 50, 8
    scores = rng.integers(0, 6, size=(Q, N)).astype(np.float32)  # many ties: the id breaks them
    whole = np.lexsort((np.tile(np.arange(N), (Q, 1)), -scores), axis=1)[:, :m]
    parts = []
    for r in range(K):
        b = D.query_block(N, r, K)
        ids = np.tile(np.arange(b.start, b.stop), (Q, 1))
        s = scores[:, b.start:b.stop]
        top = np.lexsort((ids, -s), axis=1)[:, :m]   # each rank's own top-m, ties by id
        parts.append((np.take_along_axis(s, top, 1), np.take_along_axis(ids, top, 1)))
    got_s, got_i = D.merge_topk(parts, m)
    np.testing.assert_array_equal(got_i, whole)
    np.testing.assert_array_equal(got_s, np.take_along_axis(scores, whole, 1))
