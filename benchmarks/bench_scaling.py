"""Scaling of ``locore rerank`` over processes under ``torchrun`` (issue 12).

CPU: the same cores used two ways on the demo-size problem: one process with C torch threads against
C processes (``torchrun --nproc-per-node=C``) with one thread each. The ratio of queries/s says what
sharding costs (target: >= 0.9). GPU: 1, 2, ... N processes, one GPU each; queries/s per GPU against
one GPU (scaling efficiency).

Every configuration runs the real command line in a subprocess (``python -m locore rerank``, or under
``python -m torch.distributed.run``); throughput is read from the JSON report it writes:

* ``rerank q/s``: queries re-ranked (all ranks, all protocol runs) over the re-ranking time of the
  slowest rank (model loading, data opening and process start-up excluded);
* ``wall q/s``: the same queries over the wall clock of the whole command (start-up included).

The median of ``--repeats`` runs is reported, with every raw run in the JSON
(``benchmarks/results/<device>-scaling.json``).

    .venv/bin/python benchmarks/bench_scaling.py            # CPU: 2 cores, ~2 minutes
    .venv/bin/python benchmarks/bench_scaling.py --gpu      # every GPU of the machine
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import torch  # noqa: E402

from harness import RESULTS_DIR, REPO_ROOT, device_slug, environment, format_table, write_results  # noqa: E402
from locore.demo import generate_problem  # noqa: E402

ROW_FIELDS = ("config", "processes", "threads", "device", "queries", "rerank_qps", "wall_qps", "ratio")


def _env(threads: int) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "python"), str(REPO_ROOT)]),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run_once(folder: str, out: str, procs: int, threads: int, device: str, args) -> Dict[str, Any]:
    cmd = ["-m", "locore", "rerank", "--checkpoint", args.checkpoint, "--data", folder, "--desc", "demo",
           "--alpha", "0.5", "--temp", "0.5", "--descriptors", str(args.descriptors), "--device", device,
           "--sliding", "end-to-start", "--shortlist", "40", "--window", "20", "--stride", "10",
           "--split", "both", "--no-progress", "--out", out]
    if procs > 1 or device.startswith("cuda"):
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *cmd]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *cmd], env=_env(threads), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    with open(out[:-4] + ".json") as f:
        summary = json.load(f)
    ranks = summary["processes"]
    queries = sum(p["queries"] for p in ranks)
    slowest = max(p["seconds"] for p in ranks)
    return {"queries": queries, "rerank_s": slowest, "wall_s": wall, "per_rank_qps": [p["queries_per_s"] for p in ranks],
            "rerank_qps": queries / slowest, "wall_qps": queries / wall}


def measure(folder: str, procs: int, threads: int, device: str, args, config: str) -> Dict[str, Any]:
    runs = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="locore-scaling-") as tmp:
            runs.append(run_once(folder, os.path.join(tmp, "ranks.npy"), procs, threads, device, args))
        print(f"  {config} run {i + 1}: {runs[-1]['rerank_qps']:.2f} q/s re-ranking, {runs[-1]['wall_qps']:.2f} "
              f"q/s wall", flush=True)
    return {"bench": "scaling", "impl": config, "config": config, "processes": procs, "threads": threads, "device": device,
            "checkpoint": args.checkpoint, "queries": runs[0]["queries"],
            "rerank_qps": statistics.median(r["rerank_qps"] for r in runs),
            "wall_qps": statistics.median(r["wall_qps"] for r in runs), "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="scale over the GPUs (1..N processes, one GPU each)")
    p.add_argument("--checkpoint", default="preset:tiny", help="model (default preset:tiny, the demo's)")
    p.add_argument("--queries", type=int, default=32, help="generated queries (default 32)")
    p.add_argument("--images", type=int, default=600, help="generated database images (default 600)")
    p.add_argument("--descriptors", type=int, default=48, help="local descriptors per image (default 48)")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; the median is reported")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args()

    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device")
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="locore-scaling-data-") as folder:
        generate_problem(folder, queries=args.queries, images=args.images, num_descriptors=args.descriptors)
        rows: List[Dict[str, Any]] = []
        if args.gpu:
            for k in range(1, torch.cuda.device_count() + 1):
                rows.append(measure(folder, k, max(1, cores // k), "cuda", args, f"{k} GPU"))
            base = rows[0]["rerank_qps"]
            for r in rows:  # per-GPU efficiency against one GPU
                r["ratio"] = r["rerank_qps"] / (r["processes"] * base)
        else:
            one = measure(folder, 1, cores, "cpu", args, f"1 process x {cores} threads")
            many = measure(folder, cores, 1, "cpu", args, f"{cores} processes x 1 thread")
            one["ratio"], many["ratio"] = 1.0, many["rerank_qps"] / one["rerank_qps"]
            rows = [one, many]
    print(format_table(rows, ROW_FIELDS, ["config", "procs", "threads", "device", "queries", "rerank q/s",
                                          "wall q/s", "ratio"]))
    if not args.gpu:
        print(f"ratio = sharded / one process (re-ranking q/s); target >= 0.9")
    else:
        print("ratio = q/s per GPU against one GPU")
    if not args.no_write:
        env = environment(device)
        env["problem"] = {"queries": args.queries, "images": args.images, "descriptors": args.descriptors,
                          "method": "sliding end-to-start L=40 W=20 S=10", "split": "both (2 protocol runs)"}
        path = RESULTS_DIR / f"{'cpu-' if device.type == 'cpu' else ''}{device_slug(device)}-scaling.json"
        write_results(path, env, rows)
        print(f"-> {path}")


if __name__ == "__main__":
    main()
