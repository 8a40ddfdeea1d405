"""The benchmark harness itself, at tiny sizes: statistics, rows, results file, device slug, plots,
and that every baseline computes what it claims to (a benchmark of a wrong baseline is worthless).

Timings are never asserted: targets are printed by the benchmarks as PASS / FAIL, not tested.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import locore_kernels
import baselines
import harness as bm

CPU = torch.device("cpu")

# The correctness tests run FlexAttention eagerly (compiling takes ~30 s per shape on CPU); the
# library warns that eager flex is slow, which is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def settings(**kw) -> bm.MeasureSettings:
    base = dict(device=CPU, warmup=1, runs=5, min_runs=2, rotate=2, commit="0" * 40)
    base.update(kw)
    return bm.MeasureSettings(**base)


# --------------------------------------------------------------------------------------------------
# Statistics and timing
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [[3.0], [5.0, 1.0], [1.0, 2.0, 3.0, 4.0, 100.0], list(np.random.default_rng(0).exponential(size=57))])
def test_percentile_matches_numpy_and_summary_is_ordered(values):
    for q in (0, 10, 50, 90, 100):
        assert bm.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    t = bm.summarize(values)
    assert t.min_ms <= t.p10_ms <= t.median_ms <= t.p90_ms <= max(values)
    assert t.runs == len(values)


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        bm.percentile([], 50)


def test_time_runs_times_each_call_with_its_index():
    seen = []
    times = bm.time_runs(lambda i: seen.append(i), 4, CPU)
    assert seen == [0, 1, 2, 3]
    assert len(times) == 4 and all(t >= 0 for t in times)
    with pytest.raises(ValueError):
        bm.time_runs(lambda i: None, 0, CPU)


# --------------------------------------------------------------------------------------------------
# Environment, slug, results file
# --------------------------------------------------------------------------------------------------

def test_device_slug_and_results_path():
    slug = bm.device_slug(CPU)
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug), slug
    assert slug.endswith(f"-{bm._cpu_count()}c")
    assert bm._slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bm._slugify("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz") == "intel-xeon-platinum-8375c"
    path = bm.results_path(CPU, "/tmp/x")
    assert path == Path("/tmp/x") / f"cpu-{slug}.json"
    assert bm.results_path(CPU).parent == bm.RESULTS_DIR


def test_environment_has_the_top_level_fields():
    env = bm.environment(CPU)
    for key in ("device", "device_slug", "commit", "dirty", "date", "torch", "triton", "python"):
        assert key in env
    if env["commit"] is not None:  # a source checkout
        assert re.fullmatch(r"[0-9a-f]{40}", env["commit"])
        assert isinstance(env["dirty"], bool)
    assert env["torch"] == torch.__version__


def _row(**kw):
    row = {"bench": "model", "impl": "locore", "model": "tiny", "dtype": "float32", "batch": 1,
           "gallery": 100, "tokens": 5050, "mode": "eager", "median_ms": 1.0, "p10_ms": 0.9,
           "p90_ms": 1.2, "peak_mb": 10.0}
    row.update(kw)
    return row


def test_write_results_schema_and_merge(tmp_path):
    path = tmp_path / "sub" / "dev.json"
    env = bm.environment(CPU)
    bm.write_results(path, env, [_row(), _row(impl="hf-longformer", median_ms=50.0)])
    bm.write_results(path, env, [_row(median_ms=2.0), _row(bench="attention", impl="flex", model=None, mode=None)])
    data = json.loads(path.read_text())
    for key in ("device", "commit", "date", "torch", "triton", "python", "rows"):
        assert key in data
    rows = data["rows"]
    assert len(rows) == 3  # the locore row was replaced, the others kept
    assert [r["median_ms"] for r in rows if r["impl"] == "locore"] == [2.0]
    assert {r["bench"] for r in rows} == {"model", "attention"}
    for r in rows:
        for f in bm.ROW_FIELDS:
            assert f in r


def test_format_table_aligns_columns():
    text = bm.format_table([{"a": 1.23456, "b": None}, {"a": 1234.5, "b": "x"}], ["a", "b"], ["A", "B"])
    lines = text.splitlines()
    assert lines[0].startswith("A") and len(lines) == 4
    assert "1.23" in lines[2] and "1234" in lines[3] and "-" in lines[2]


# --------------------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------------------

def test_measure_case_fills_every_field():
    made, calls = [], []

    def setup():
        def make_input(r):
            made.append(r)
            return torch.full((64, 64), float(r))

        def call(x):
            calls.append(float(x[0, 0]))
            return x @ x

        return call, make_input

    case = bm.Case(row={"bench": "model", "impl": "toy", "model": "m", "dtype": "float32", "batch": 1,
                        "gallery": 3, "tokens": 64, "mode": None},
                   setup=setup, check=lambda out: {"checked": tuple(out.shape)})
    row = bm.measure_case(case, settings())
    for f in bm.ROW_FIELDS:
        assert f in row
    assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
    assert row["runs"] == 5 and row["rotation"] == 2 and made == [0, 1]
    assert len(row["times_ms"]) == row["runs"] and min(row["times_ms"]) == pytest.approx(row["min_ms"], abs=1e-3)
    assert row["checked"] == (64, 64)
    assert row["peak_mb"] is not None and row["peak_method"]
    assert row["commit"] == "0" * 40
    assert set(calls[-5:]) == {0.0, 1.0}  # the timed runs rotate over both input sets


def test_measure_case_reports_skips_and_errors_without_raising():
    row = bm.measure_case(bm.Case(row={"impl": "x"}, setup=None, skip_reason="too big"), settings())
    assert row["skipped"] == "too big" and row["median_ms"] is None

    def broken():
        raise RuntimeError("kernel exploded")

    row = bm.measure_case(bm.Case(row={"impl": "y"}, setup=broken), settings(), log=lambda s: None)
    assert "kernel exploded" in row["skipped"] and row["median_ms"] is None


def test_row_budget_cuts_runs_but_not_below_min_runs():
    import time as _time

    def setup():
        return (lambda x: _time.sleep(0.01)), (lambda r: r)

    row = bm.measure_case(bm.Case(row={"impl": "slow"}, setup=setup),
                          settings(runs=50, min_runs=3, max_row_seconds=0.01))
    assert row["runs"] == 3


def test_run_cases_honours_the_time_limit():
    cases = [bm.Case(row={"impl": str(i)}, setup=lambda: ((lambda x: None), (lambda r: r))) for i in range(3)]
    rows = bm.run_cases(cases, settings(runs=2), lambda r: r["impl"], time_limit=-1.0, log=lambda s: None)
    assert all("time limit" in r["skipped"] for r in rows)


def test_cpu_peak_memory_sees_a_large_allocation():
    mem = bm.PeakMemory(CPU)
    mem.start()
    peak = mem.measure(lambda: torch.ones(64 * 2**20 // 4).sum())  # 64 MB, freed at once
    if "could not be reset" in mem.method or mem.method.startswith("unavailable"):
        pytest.skip(f"this kernel does not let a process reset its RSS peak: {mem.method}")
    assert peak > 50


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------

def test_plots_are_written(tmp_path):
    rows = [_row(gallery=k, median_ms=float(k), impl=i) for k in (25, 100, 200) for i in ("locore", "hf-longformer")]
    rows += [_row(bench="attention", impl=i, model=None, tokens=n, median_ms=n / 100) for n in (1300, 5050)
             for i in ("locore", "flex")]
    rows += [_row(impl="rrt", model="rrt", median_ms=None, skipped="x")]
    assert bm.plot_model(rows, tmp_path / "m.png", "t").stat().st_size > 1000
    assert bm.plot_scaling(rows, tmp_path / "s.png", "t").stat().st_size > 1000
    assert bm.plot_attention(rows, tmp_path / "a.png", "t").stat().st_size > 1000
    assert bm.plot_model([], tmp_path / "none.png", "t") is None


# --------------------------------------------------------------------------------------------------
# Baselines compute the reference attention
# --------------------------------------------------------------------------------------------------

def _layout_case(seed=0, B=2, N=93, H=2, D=16, w=6, T=10):
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(N)
    is_global = (((pos % T) == T - 1) | (pos < T - 1))[None].repeat(B, 1)
    key_padding = torch.rand(B, N, generator=g) < 0.15
    key_padding[1, 70:] = True                        # item 1: a padded tail, fewer globals
    is_global[1, 40:50] = False
    is_global &= ~key_padding
    layout = locore_kernels.build_layout(is_global, key_padding, w)
    qkv = [torch.randn(B, N, H, D, generator=g, dtype=torch.float64) for _ in range(6)]
    ref = locore_kernels.longformer_attention_reference(*qkv, is_global, key_padding, w)
    return layout, qkv, ref


@pytest.mark.parametrize("name", baselines.ATTENTION_BASELINES)
@pytest.mark.parametrize("seed", [0, 1])
def test_attention_baselines_match_the_reference(name, seed):
    layout, qkv, ref = _layout_case(seed)
    H, D = qkv[0].shape[2:]
    fn = baselines.make_attention_baseline(name, num_heads=H, head_dim=D,
                                           one_sided_window=layout.one_sided_window, compile=False)
    q, k, v, qg, kg, vg = (t.float() for t in qkv)
    out = fn(q, k, v, layout.gather_global(qg), kg, vg, layout)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out.double() - ref).abs().max().item() < 1e-5
    assert (out[layout.key_padding] == 0).all()
    # the same layout again (cached masks) and a new one (masks rebuilt) still match
    out2 = fn(q, k, v, layout.gather_global(qg), kg, vg, layout)
    assert torch.equal(out, out2)
    layout3, qkv3, ref3 = _layout_case(seed + 10)
    q, k, v, qg, kg, vg = (t.float() for t in qkv3)
    out3 = fn(q, k, v, layout3.gather_global(qg), kg, vg, layout3)
    assert (out3.double() - ref3).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", baselines.ATTENTION_BASELINES)
def test_attention_baselines_without_globals_and_with_a_window_wider_than_n(name):
    B, N, H, D = 1, 40, 2, 8
    g = torch.Generator().manual_seed(3)
    for is_global, w in ((torch.zeros(B, N, dtype=torch.bool), 4), (torch.arange(N)[None] % 7 == 0, 64)):
        key_padding = torch.zeros(B, N, dtype=torch.bool)
        layout = locore_kernels.build_layout(is_global, key_padding, w)
        qkv = [torch.randn(B, N, H, D, generator=g) for _ in range(6)]
        ref = locore_kernels.longformer_attention_reference(*[t.double() for t in qkv], is_global, key_padding, w)
        fn = baselines.make_attention_baseline(name, num_heads=H, head_dim=D, one_sided_window=w, compile=False)
        out = fn(qkv[0], qkv[1], qkv[2], layout.gather_global(qkv[3]), qkv[4], qkv[5], layout)
        assert (out.double() - ref).abs().max().item() < 1e-5


def test_overwrite_global_rows_ignores_slots_past_num_global():
    is_global = torch.tensor([[True, False, True, False], [False, False, False, True]])
    layout = locore_kernels.build_layout(is_global, torch.zeros_like(is_global), 2)
    out = torch.zeros(2, 4, 1, 1)
    rows = torch.tensor([[1.0, 2.0], [3.0, 99.0]]).view(2, 2, 1, 1)  # item 1 has one global: 99 is garbage
    got = baselines.overwrite_global_rows(out, rows, layout).view(2, 4)
    assert got.tolist() == [[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]]


def test_unknown_baseline_is_an_error():
    with pytest.raises(ValueError, match="unknown attention baseline"):
        baselines.make_attention_baseline("nope")


# --------------------------------------------------------------------------------------------------
# RRT and AMES
# --------------------------------------------------------------------------------------------------

def test_rrt_scores_every_pair():
    B, K, L = 2, 3, 7
    model = baselines.RRT(layers=2).eval()
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(B, K, L, generator=g) < 0.3
    with torch.no_grad():
        out = model(torch.randn(B, 2048), torch.randn(B, L, 128), torch.randint(0, 7, (B, L)),
                    torch.zeros(B, L, dtype=torch.bool), torch.randn(B, K, 2048), torch.randn(B, K, L, 128),
                    torch.randint(0, 7, (B, K, L)), mask)
    assert out.shape == (B, K) and torch.isfinite(out).all()
    assert baselines.RRT.tokens_per_pair(500) == 1004
    assert sum(p.numel() for p in baselines.RRT().parameters()) > 1e6


def test_ames_scores_every_pair_even_with_a_fully_padded_gallery_image():
    B, K, Q, T = 2, 3, 9, 4
    model = baselines.AMES(layers=2, local_dim=32).eval()
    gallery_mask = torch.zeros(B, K, T, dtype=torch.bool)
    gallery_mask[0, 1] = True
    with torch.no_grad():
        out = model(torch.randn(B, Q, 32), torch.zeros(B, Q, dtype=torch.bool), torch.randn(B, K, T, 32), gallery_mask)
    assert out.shape == (B, K) and torch.isfinite(out).all()
    assert baselines.AMES.tokens_per_pair(600, 50) == 651


# --------------------------------------------------------------------------------------------------
# The scripts, end to end at tiny sizes
# --------------------------------------------------------------------------------------------------

def _load(name):
    import importlib

    return importlib.import_module(name)


def test_bench_attention_end_to_end(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    rc = _load("bench_attention").main(["--cpu", "--images", "3", "--impls", "locore,sdpa-dense,hf-longformer",
                  "--runs", "2", "--warmup", "1", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["impl"] for r in rows} == {"locore", "sdpa-dense", "hf-longformer"}
    for r in rows:
        assert r["bench"] == "attention" and r["tokens"] == 150 and r["dtype"] == "float32"
        assert r["median_ms"] is not None and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
    assert (tmp_path / "cpu-attention.png").exists()
    text = capsys.readouterr().out
    assert "targets" in text


def test_bench_model_end_to_end(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    rc = _load("bench_model").main(["--cpu", "--models", "tiny", "--impls", "locore,locore-sdpa,hf-longformer", "--gallery", "2",
                  "--scaling", "none", "--runs", "2", "--warmup", "1", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["impl"] for r in rows} == {"locore", "locore-sdpa", "hf-longformer"}
    for r in rows:
        for f in bm.ROW_FIELDS:
            assert f in r
        assert r["bench"] == "model" and r["gallery"] == 2 and r["tokens"] == 150 and r["batch"] == 1
        assert r["median_ms"] is not None
        # every implementation scores like our fp32 engine: the baselines are the same model
        assert r["max_rel_diff_vs_locore_fp32"] < 1e-4
    assert "Table5" in capsys.readouterr().out


def test_bench_model_windows_beyond_the_position_table():
    bench_model = _load("bench_model")
    limit = bench_model.max_single_pass_gallery(5122)
    assert limit == 101
    assert bench_model.passes_for(100, limit) == 1
    assert bench_model.passes_for(200, limit) == 3
    assert bench_model.passes_for(400, limit) == 7
    x = bench_model.locore_inputs(1, 200, CPU, torch.float32, seed=0)
    calls = []

    def score(**kw):
        calls.append(kw["gallery_local"].shape[1])
        return kw["gallery_local"][..., 0, 0]  # any per-image score

    order = bench_model.windowed(score, x)
    assert calls == [100, 100, 100]
    assert sorted(order[0].tolist()) == list(range(200))


def test_bench_model_plan_orders_targets_first():
    bench_model = _load("bench_model")
    specs = bench_model.plan(["tiny", "base"], list(bench_model.IMPLS), ["bf16", "fp32"], [1, 8], 100,
                             [25, 100, 400], ["base"], ["eager", "graph"], cpu=False)
    assert specs[0] == bench_model.Spec("locore", "tiny", "fp32", 1, 100, "eager")  # the check reference
    assert len(set(specs)) == len(specs)
    first_b8 = next(i for i, s in enumerate(specs) if s.batch == 8)
    assert all(s.batch == 1 for s in specs[:first_b8])
    assert {s.gallery for s in specs if s.impl == "hf-longformer"} == {25, 100, 400}
    assert all(s.dtype == "bf16" for s in specs if s.batch == 8 and s.impl != "locore")


def test_cuda_peak_counts_the_memory_a_captured_graph_holds(monkeypatch):
    """A CUDA-graph replay allocates nothing, so max_memory_allocated alone would report a graph row's
    activations as free: the idle part of the graph's private pool is added (simulated allocator)."""
    import harness as bm

    state = {"allocated": 100 << 20, "peak": 100 << 20, "segments": []}
    seg = lambda pool, total, used: {"device": 0, "segment_pool_id": pool, "total_size": total,  # noqa: E731
                                     "allocated_size": used}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: state["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: state.update(peak=state["allocated"]))
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda *a, **k: state["segments"])
    state["segments"] = [seg((0, 0), 64 << 20, 0)]                 # the default pool's cache: not counted
    mem = bm.PeakMemory(torch.device("cuda", 0))
    mem.start()
    state["allocated"] = 130 << 20                                   # the row's weights and inputs
    state["segments"].append(seg((1, 0), 48 << 20, 1 << 20))        # a captured graph's pool, output kept
    assert mem.measure(lambda: None) == pytest.approx(30 + 47)
    state["segments"].pop()                                          # an eager row: no pool
    assert mem.measure(lambda: state.update(peak=state["allocated"] + (5 << 20))) == pytest.approx(35)


def test_a_broken_device_skips_rows_but_never_stops_the_run(monkeypatch):
    """After a sticky CUDA error every synchronize raises; the run must still return (and so write) its rows."""
    import harness as bm

    calls = {"n": 0}

    def release(device):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bm, "release_memory", release)
    cases = [bm.Case(row={"impl": f"r{i}"}, setup=lambda: (lambda x: x, lambda r: r)) for i in range(3)]
    s = bm.MeasureSettings(device=torch.device("cpu"), warmup=1, runs=2, min_runs=1, rotate=1)
    rows = bm.run_cases(cases, s, label=lambda r: r["impl"], log=lambda msg: None)
    assert [r["impl"] for r in rows] == ["r0", "r1", "r2"]
    assert rows[0]["median_ms"] is not None
    assert rows[2]["median_ms"] is None and "illegal memory access" in rows[2]["skipped"]
