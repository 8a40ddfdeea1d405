"""GPU readiness without a GPU (issue 15): every Triton kernel compiled for an H100 (sm_90a).

The slow test runs ``benchmarks/gpu_static.py`` at head dims 64 and 128 (the model's and the largest
one the op supports) in a subprocess (the compiled path needs ``TRITON_INTERPRET=0``, which this
session cannot switch to) and checks, from ptxas's and the SASS's own numbers, that every config the
autotuner may pick is fit for an H100: no register spill, shared memory within the sm_90 limit, at least
one CTA per SM, tensor cores for 16-bit dots and exact IEEE FFMA (no TF32) for fp32 dots. The fast
tests pin the report's parsers and its occupancy arithmetic on hand-worked numbers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gpu_static as gs  # benchmarks/ is on sys.path (conftest)
import locore_kernels.triton_attention as ta

ROOT = Path(__file__).resolve().parents[1]
H100_REGS, H100_SMEM_SM, H100_SMEM_CTA, H100_WARPS = 65536, 228 * 1024, 227 * 1024, 64


# ------------------------------------------------------------------------------------------------
# parsers and arithmetic (fast)
# ------------------------------------------------------------------------------------------------

PTXAS_LOG = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_local_rows_kernel' for 'sm_90a'
ptxas info    : Function properties for _local_rows_kernel
    24 bytes stack frame, 20 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 48 bytes smem, 24 bytes cumulative stack size
"""

SASS = """
        /*0a30*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0a40*/              @!P0 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0a50*/                   HMMA.1684.F32.TF32 R4, R8, R12, R4 ;
        /*0a60*/                   FFMA R1, R2, R3, R4 ;
        /*0a70*/               @P1 STL [R1+0x4], R7 ;
        /*0a80*/                   HFMA2.MMA R5, -RZ, RZ, 0, 0 ;
        /*0a90*/                   MUFU.EX2 R9, R9 ;
"""


def test_parse_ptxas_reads_registers_spills_stack_and_static_smem():
    assert gs.parse_ptxas(PTXAS_LOG) == {"registers": 255, "stack_bytes": 24, "spill_store_bytes": 20,
                                         "spill_load_bytes": 12, "static_smem_bytes": 48}
    with pytest.raises(RuntimeError, match="registers"):
        gs.parse_ptxas("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n")


def test_instruction_mix_counts_tensor_core_and_tf32_ops_not_hfma2_mma():
    mix = gs.instruction_mix(SASS)
    assert (mix["hgmma"], mix["hmma"], mix["tf32_mma"]) == (2, 1, 1)  # HFMA2.MMA is an FMA, not an MMA
    assert (mix["ffma"], mix["mufu"], mix["local_ops"], mix["instructions"]) == (1, 1, 1, 7)


@pytest.mark.parametrize("regs, smem, warps, ctas, limit", [
    (255, 41216, 8, 1, "registers"),   # 255 -> 8192 regs/warp: 8 warps fit, one 8-warp CTA
    (164, 57344, 4, 3, "registers"),   # 164*32 = 5248 -> 5376/warp: 12 warps, three 4-warp CTAs
    (32, 100 * 1024, 4, 2, "shared_memory"),  # (100 K + 1 K reserved) twice in 228 K
    (16, 0, 1, 32, "ctas"),            # tiny CTAs: 32 per SM at most
    (40, 0, 4, 12, "registers"),       # 1280/warp -> 51 warps -> 12 CTAs (warps would allow 16)
    (16, 228 * 1024, 4, 0, "shared_memory"),  # above the 227 KB a CTA may have: nothing fits
])
def test_occupancy_on_h100(regs, smem, warps, ctas, limit):
    occ = gs.occupancy(regs, smem, warps)
    assert (occ["ctas_per_sm"], occ["warps_per_sm"], occ["limited_by"]) == (ctas, ctas * warps, limit)


def test_problems_flags_each_rule():
    ok = {"kernel": "k", "dtype": "bf16", "head_dim": 64, "head_dims": [64], "has_dots": True,
          "spill_store_bytes": 0, "spill_load_bytes": 0, "smem_bytes": 1024, "ctas_per_sm": 2,
          "limited_by": "registers", "sass": {"hgmma": 4, "hmma": 0, "tf32_mma": 0}}
    assert gs.problems(ok) == []
    assert "spills" in gs.problems({**ok, "spill_store_bytes": 8})[0]
    assert gs.problems({**ok, "head_dims": [32], "spill_store_bytes": 8}) == []  # D = 32: reported only
    assert "shared memory" in gs.problems({**ok, "smem_bytes": 300_000})[0]
    assert "no CTA" in gs.problems({**ok, "ctas_per_sm": 0})[0]
    assert "tensor cores" in gs.problems({**ok, "sass": {"hgmma": 0, "hmma": 0, "tf32_mma": 0}})[0]
    fp32 = {**ok, "dtype": "fp32", "sass": {"hgmma": 0, "hmma": 2, "tf32_mma": 2}}
    assert any("TF32" in p for p in gs.problems(fp32))
    assert gs.problems({**fp32, "sass": {"hgmma": 0, "hmma": 0, "tf32_mma": 0}}) == []
    assert "does not compile" in gs.problems({"error": "PTXASError: boom"})[0]


def test_roofline_at_the_paper_shape():
    shape = gs.PaperShape()
    assert (shape.n, sum(shape.is_global())) == (5050, 150)
    # a non-global row away from the query block and the sequence ends sees the 150 globals plus the
    # 2w + 1 = 513 positions around it minus the [SEP]s among them (one every 50 tokens: 10 or 11)
    keys = gs._local_keys(shape)
    assert 4900 * (150 + 513 - 11) - 4900 * 256 < keys < 4900 * (150 + 513 - 10)
    roof = {r["kernel"]: r for r in gs.roofline_rows(shape)}
    assert roof["local_rows"]["flops"] == 4 * 64 * keys * 12
    assert roof["global_split"]["flops"] == 4 * 64 * 150 * 5050 * 12
    for r in roof.values():  # the floor is the larger of the compute and the memory time
        assert r["floor_us"] == pytest.approx(max(r["flops"] / 800e12, r["bytes"] / 3.3e12) * 1e6, abs=0.01)
    assert roof["local_rows"]["bound"] == "compute" and roof["bias_gelu"]["bound"] == "memory"


# ------------------------------------------------------------------------------------------------
# the compiled kernels (slow: about one compile per config)
# ------------------------------------------------------------------------------------------------

def _expected_launches() -> set[tuple[str, str, int, str]]:
    """(kernel, dtype, head dim, config) of every autotune config the autotuner may pick per dtype family."""
    out = set()
    for name, c16, c32 in (("local_rows", ta._LOCAL_CONFIGS_16BIT, ta._LOCAL_CONFIGS_FP32),
                           ("global_split", ta._GLOBAL_CONFIGS_16BIT, ta._GLOBAL_CONFIGS_FP32)):
        for dtype in ("bf16", "fp16", "fp32"):
            for d in gs.CHECKED_HEAD_DIMS:
                for cfg in (c32 if dtype == "fp32" else c16):
                    out.add((name, dtype, d, (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps,
                                              cfg.num_stages)))
    for dtype in ("bf16", "fp16", "fp32"):  # the rows op's kernel: one fixed config per dtype family
        cfg = ta.ROWS_CONFIG_FP32 if dtype == "fp32" else ta.ROWS_CONFIG_16BIT
        for d in gs.CHECKED_HEAD_DIMS:
            out.add(("rows", dtype, d, (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])))
    return out


@pytest.mark.slow
def test_every_kernel_config_fits_an_h100(tmp_path):
    t0 = time.perf_counter()
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_static.py"), "--head-dims", *map(str, gs.CHECKED_HEAD_DIMS),
         "--out-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    report_path = tmp_path / "gpu-static-sm90.json"
    assert report_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    rows = report["kernels"]
    assert (tmp_path / "gpu-static-sm90.md").read_text().count("\n| ") >= len(rows)

    # coverage: every autotune config of both attention kernels (and the rows kernel's fixed one), all dtypes,
    # D = 64 and 128; the
    # combine kernel and the epilogues in each dtype
    seen = {(r["kernel"], r["dtype"], r["head_dim"], (r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_N"],
             r["num_warps"], r["num_stages"])) for r in rows if r["kernel"] in ("local_rows", "global_split", "rows")
            and "error" not in r}
    assert seen == _expected_launches()
    for name in ("combine", "bias_gelu", "bias_residual_layernorm"):
        assert {r["dtype"] for r in rows if r["kernel"] == name} == {"bf16", "fp16", "fp32"}, name

    for r in rows:
        where = f"{r['kernel']} {r['dtype']} D={r['head_dim']} {r['config']}"
        assert "error" not in r, f"{where}: {r.get('error')}"
        assert r["arch"] == "sm_90a"
        # the same rules, written out here from the compiler's raw numbers
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, f"{where}: register spills"
        assert r["smem_bytes"] == r["static_smem_bytes"] + r["dynamic_smem_bytes"] <= H100_SMEM_CTA, where
        threads = 32 * r["num_warps"]
        assert r["registers"] * threads <= H100_REGS and r["num_warps"] <= H100_WARPS, f"{where}: no CTA fits"
        assert r["smem_bytes"] + 1024 <= H100_SMEM_SM and r["ctas_per_sm"] >= 1, f"{where}: no CTA fits"
        mix = r["sass"]
        if r["kernel"] in ("local_rows", "global_split", "rows"):  # the kernels with tl.dot
            if r["dtype"] == "fp32":  # exact mode: IEEE fp32 products on the FMA units, never TF32
                assert mix["hgmma"] == mix["hmma"] == mix["tf32_mma"] == 0 and mix["ffma"] > 0, where
            else:                     # Hopper warpgroup MMAs
                assert mix["hgmma"] > 0 and mix["tf32_mma"] == 0, where
        else:
            assert mix["hgmma"] == mix["hmma"] == 0, where
        assert gs.problems(r) == [], where
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert len(report["roofline"]) == len(gs.KERNELS)
    print(f"compiled {len(rows)} kernels for sm_90a in {time.perf_counter() - t0:.0f} s")
