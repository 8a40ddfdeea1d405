#!/usr/bin/env python
"""GPU readiness without a GPU: a compiled-kernel resource report for an H100 (sm_90a), issue 15.

Every Triton kernel of the engine is compiled ahead of time for sm_90a (``triton.compile`` with
``GPUTarget("cuda", 90, 32)``; no GPU needed) in every launch config it can run with: each autotune
config of its dtype family, bf16 / fp16 / fp32, head dims 32 / 64 / 128. For each compiled kernel the
report takes, from the compiler's own output:

* registers per thread, stack frame and spill stores / loads: ``ptxas -v`` (the ptxas that ships with
  Triton, the flags Triton uses) on the kernel's PTX;
* shared memory: ptxas's static ``smem`` plus the dynamic shared memory Triton requests at launch
  (``kernel.metadata.shared``);
* the occupancy these allow on an H100 (64K registers, 228 KB shared memory, 32 CTAs, 64 warps per SM);
* the instruction mix that matters, counted in the SASS (``cuobjdump -sass`` of the cubin): tensor-core
  ops (HGMMA = wgmma, HMMA = mma.sync) for 16-bit dots, no TF32 for fp32 dots (the model's "exact" mode
  relies on IEEE fp32 products), FFMA, MUFU (exp2/erf), local-memory traffic.

A roofline line per kernel at the paper's shape (N = 5050, 150 global tokens, w = 256, H = 12, D = 64,
one image, bf16) gives its FLOPs and HBM bytes and the time floor they imply on an H100 (dense bf16
800 TFLOP/s, 3.3 TB/s): a lower bound from arithmetic, not a measurement.

Kernels are rows of ``KERNELS``: a new kernel is one ``KernelEntry``.

    python benchmarks/gpu_static.py                       # all kernels, dtypes, head dims; writes results
    python benchmarks/gpu_static.py --head-dims 64 --dtypes bf16 --no-write

Writes ``benchmarks/results/gpu-static-sm90.json`` and ``.md`` (``--out-dir`` to change). Exit status 1
when a config breaks a rule of ``problems`` (the same rules ``tests/test_gpu_static.py`` enforces).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import datetime as _dt
import json
import math
import multiprocessing as mp
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
sys.path.insert(0, str(REPO_ROOT))  # locore_kernels from this checkout when it is not installed
RESULT_NAME = "gpu-static-sm90"

# ------------------------------------------------------------------------------------------------
# The target: an H100 (sm_90). Occupancy rules of the CUDA occupancy calculator for compute 9.0.
# ------------------------------------------------------------------------------------------------

CAPABILITY = 90
WARP_SIZE = 32
REGS_PER_SM = 64 * 1024
REG_ALLOC_UNIT = 256                 # registers are allocated per warp in units of 256
MAX_REGS_PER_THREAD = 255
SMEM_PER_SM = 228 * 1024
SMEM_PER_CTA_MAX = 227 * 1024        # opt-in maximum of one CTA
SMEM_RESERVED_PER_CTA = 1024         # the driver reserves 1 KB of shared memory per resident CTA
MAX_CTAS_PER_SM = 32
MAX_WARPS_PER_SM = 64
PEAK_BF16_FLOPS = 800e12             # dense bf16 tensor-core rate used for the floor
HBM_BYTES_PER_S = 3.3e12

DTYPES = ("bf16", "fp16", "fp32")
HEAD_DIMS = (32, 64, 128)
CHECKED_HEAD_DIMS = (64, 128)        # spills fail the check only here (the model runs D = 64)


@dataclass(frozen=True)
class PaperShape:
    """The paper's workload for one attention layer: a query and 100 gallery images of 50 tokens."""
    tokens_per_image: int = 50
    images: int = 101
    window: int = 256                # one-sided w
    heads: int = 12
    head_dim: int = 64
    sms: int = 132                   # H100 SXM: sizes the global kernel's key split
    elem_bytes: int = 2              # bf16

    @property
    def n(self) -> int:
        return self.tokens_per_image * self.images

    def is_global(self) -> list[bool]:
        """Every [SEP] (position T-1 of each image) and the query block's first T-1 tokens (SPEC 2)."""
        T = self.tokens_per_image
        return [(i % T) == T - 1 or i < T - 1 for i in range(self.n)]


# ------------------------------------------------------------------------------------------------
# Kernel table
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    """One way a kernel is launched: its constexprs (besides the dtype) and Triton options."""
    label: str
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    autotuned: bool                  # one of the autotuner's configs (else the one fixed launch)


@dataclass(frozen=True)
class KernelEntry:
    name: str
    kernel: Callable[[], Any]                               # the @triton.jit function (imported lazily)
    arg_types: Callable[[str], dict[str, str]]              # tensor dtype -> Triton type of non-i32 args
    launches: Callable[[str, int], list[Launch]]            # (dtype, head dim) -> its launch configs
    has_dots: bool                                          # tl.dot inside: tensor cores below fp32
    roofline: Callable[[PaperShape], tuple[float, float]]   # (FLOPs, HBM bytes) at the paper's shape
    aligned: frozenset[str] = field(default_factory=frozenset)  # args Triton sees as multiples of 16


def _kernels_module():
    """(triton_attention, epilogues): the epilogue kernels are defined only where CUDA is visible, so
    CUDA is reported visible while the package is imported (its __init__ imports the epilogues)."""
    import torch

    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        import locore_kernels.epilogues as ep
        import locore_kernels.triton_attention as ta
    finally:
        torch.cuda.is_available = available
    return ta, ep


def _autotune_launches(configs_16bit: str, configs_fp32: str, extra: Callable[[int], dict[str, Any]]):
    """Launches of an autotuned kernel: every config of the dtype family (what the autotuner may pick)."""
    def launches(dtype: str, head_dim: int) -> list[Launch]:
        ta, _ = _kernels_module()
        configs = getattr(ta, configs_fp32 if dtype == "fp32" else configs_16bit)
        out = []
        for cfg in configs:
            label = " ".join(f"{k.replace('BLOCK_', 'B')}{v}" for k, v in cfg.kwargs.items())
            out.append(Launch(f"{label} w{cfg.num_warps} s{cfg.num_stages}", dict(cfg.kwargs, **extra(head_dim)),
                              cfg.num_warps, cfg.num_stages, autotuned=True))
        return out
    return launches


def _tensor_ptrs(dtype: str, names: Sequence[str], **others: str) -> dict[str, str]:
    return {**{n: "*" + dtype for n in names}, **others}


# -- the roofline of each kernel at the paper's shape (minimum work and minimum HBM traffic) --------

def _local_keys(shape: PaperShape) -> int:
    """Sum over valid non-global rows of |K(i)| = G + #{valid non-global j : |i - j| <= w}."""
    glob = shape.is_global()
    n, w = shape.n, shape.window
    prefix = [0]
    for g in glob:
        prefix.append(prefix[-1] + (0 if g else 1))
    total_g = sum(glob)
    return sum(total_g + prefix[min(n, i + w + 1)] - prefix[max(0, i - w)] for i in range(n) if not glob[i])


def _split_count(shape: PaperShape) -> int:
    ta, _ = _kernels_module()
    g = sum(shape.is_global())
    splits, _ = ta.plan_splits(shape.n, g, shape.heads, ta.GPU_SPLIT_ALIGN, ta.GPU_MIN_SPLIT_KEYS, 2 * shape.sms)
    return splits


def _roofline_local(s: PaperShape) -> tuple[float, float]:
    n, g, hd, e = s.n, sum(s.is_global()), s.heads * s.head_dim, s.elem_bytes
    flops = 4 * s.head_dim * _local_keys(s) * s.heads           # q.k and p.v: 2 D each per (row, key)
    rows = n - g
    bytes_ = (rows * hd + 2 * n * hd + rows * hd) * e + 3 * n + 4 * g  # q, k, v, out; 3 bool masks, global_idx
    return flops, bytes_


def _roofline_global(s: PaperShape) -> tuple[float, float]:
    n, g, hd, e = s.n, sum(s.is_global()), s.heads * s.head_dim, s.elem_bytes
    flops = 4 * s.head_dim * g * n * s.heads
    partials = _split_count(s) * g * s.heads * (s.head_dim + 2) * 4   # fp32 (acc, m, l) per split
    return flops, (g * hd + 2 * n * hd) * e + n + partials


def _roofline_combine(s: PaperShape) -> tuple[float, float]:
    g, splits = sum(s.is_global()), _split_count(s)
    flops = 2 * splits * g * s.heads * (s.head_dim + 1)               # rescale-add of acc and l per split
    return flops, splits * g * s.heads * (s.head_dim + 2) * 4 + g * s.heads * s.head_dim * s.elem_bytes + 4 * g


def _roofline_bias_gelu(s: PaperShape) -> tuple[float, float]:
    elems = s.n * 4 * s.heads * s.head_dim                            # the FFN's intermediate [N, 4 d_model]
    return 6 * elems, 2 * elems * s.elem_bytes                         # ~6 ops/element; read + write y


def _roofline_layernorm(s: PaperShape) -> tuple[float, float]:
    elems = s.n * s.heads * s.head_dim
    return 9 * elems, 3 * elems * s.elem_bytes                         # ~9 ops/element; y, residual in, y out


def _roofline_rows(s: PaperShape) -> tuple[float, float]:
    """The pruned last layer's rows op at the paper's shape: the K = 100 rows a max-end score reads
    (each attends to the global tokens and its band); k and v of every token are read once."""
    rows, g, hd, e = 100, sum(s.is_global()), s.heads * s.head_dim, s.elem_bytes
    keys = g + 2 * s.window + 1
    flops = 4 * s.head_dim * rows * keys * s.heads
    return flops, (2 * rows * hd + 2 * s.n * hd) * e + 2 * s.n + 4 * g + 8 * rows


def _fixed_launch(config: str, extra: Callable[[int], dict[str, Any]]):
    """The one launch of a kernel with a fixed config per dtype family (a dict of triton_attention)."""
    def launches(dtype: str, head_dim: int) -> list[Launch]:
        ta, _ = _kernels_module()
        cfg = getattr(ta, config + ("_FP32" if dtype == "fp32" else "_16BIT"))
        label = f"BM{cfg['BLOCK_M']} BN{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}"
        return [Launch(label, {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], **extra(head_dim)},
                       cfg["num_warps"], cfg["num_stages"], autotuned=False)]
    return launches


def _epilogue_launches(block: Callable[[int], int], warps: Callable[[int], int]):
    """The fixed launch of an epilogue at d_model = 12 * head dim (the launch rules of epilogues.py)."""
    def launches(dtype: str, head_dim: int) -> list[Launch]:
        b = block(12 * head_dim)
        return [Launch(f"BLOCK{b} w{warps(b)}", {"BLOCK": b}, warps(b), 3, autotuned=False)]
    return launches


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


_ATTN_STRIDES = frozenset(f"stride_{t}{a}" for t in "qkvo" for a in "bnh")

KERNELS: list[KernelEntry] = [
    KernelEntry(
        "local_rows", lambda: _kernels_module()[0]._local_rows_kernel,
        lambda dt: _tensor_ptrs(dt, ("Q", "K", "V", "Out"), IsGlobal="*i1", KeyPad="*i1", BandKey="*i1",
                                GIdx="*i32", NumGlobal="*i32", qk_scale="fp32"),
        _autotune_launches("_LOCAL_CONFIGS_16BIT", "_LOCAL_CONFIGS_FP32",
                           lambda d: {"HEAD_DIM": d, "UPCAST": False}),
        has_dots=True, roofline=_roofline_local,
        aligned=frozenset({"Q", "K", "V", "Out"}) | _ATTN_STRIDES),
    KernelEntry(
        "global_split", lambda: _kernels_module()[0]._global_rows_split_kernel,
        lambda dt: _tensor_ptrs(dt, ("QG", "KG", "VG"), KeyPad="*i1", NumGlobal="*i32", MPart="*fp32",
                                LPart="*fp32", AccPart="*fp32", qk_scale="fp32"),
        _autotune_launches("_GLOBAL_CONFIGS_16BIT", "_GLOBAL_CONFIGS_FP32",
                           lambda d: {"HEAD_DIM": d, "UPCAST": False}),
        has_dots=True, roofline=_roofline_global,
        aligned=frozenset({"QG", "KG", "VG", "MPart", "LPart", "AccPart"}) | _ATTN_STRIDES),
    KernelEntry(
        "rows", lambda: _kernels_module()[0]._row_list_kernel,
        lambda dt: _tensor_ptrs(dt, ("Q", "K", "V", "Out"), KeyPad="*i1", BandKey="*i1", GIdx="*i32",
                                NumGlobal="*i32", RowPos="*i32", RowDest="*i32", qk_scale="fp32"),
        _fixed_launch("ROWS_CONFIG", lambda d: {"HEAD_DIM": d, "UPCAST": False}),
        has_dots=True, roofline=_roofline_rows,
        aligned=frozenset({"Q", "K", "V", "Out", "stride_qr", "stride_or"}) | _ATTN_STRIDES),
    KernelEntry(
        "combine", lambda: _kernels_module()[0]._global_rows_combine_kernel,
        lambda dt: _tensor_ptrs(dt, ("Out",), MPart="*fp32", LPart="*fp32", AccPart="*fp32", GIdx="*i32",
                                NumGlobal="*i32"),
        lambda dt, d: [Launch(f"BG{_kernels_module()[0].COMBINE_BLOCK_G} w4", {
            "HEAD_DIM": d, "BLOCK_G": _kernels_module()[0].COMBINE_BLOCK_G}, 4, 3, autotuned=False)],
        has_dots=False, roofline=_roofline_combine,
        aligned=frozenset({"MPart", "LPart", "AccPart", "Out", "stride_ob", "stride_on", "stride_oh"})),
    KernelEntry(
        "bias_gelu", lambda: _kernels_module()[1]._bias_gelu_kernel,
        lambda dt: _tensor_ptrs(dt, ("Y", "Bias")),
        _epilogue_launches(lambda d_model: min(1024, _next_pow2(4 * d_model)), lambda b: 4),
        has_dots=False, roofline=_roofline_bias_gelu, aligned=frozenset({"Y", "Bias", "stride_y"})),
    KernelEntry(
        "bias_residual_layernorm", lambda: _kernels_module()[1]._bias_residual_layernorm_kernel,
        lambda dt: _tensor_ptrs(dt, ("Y", "Bias", "Res", "W", "B"), eps="fp32"),
        _epilogue_launches(_next_pow2, lambda b: 4 if b <= 2048 else 8),
        has_dots=False, roofline=_roofline_layernorm,
        aligned=frozenset({"Y", "Bias", "Res", "W", "B", "stride_y", "stride_r"})),
]


# ------------------------------------------------------------------------------------------------
# Compile one launch and read the compiler's output
# ------------------------------------------------------------------------------------------------

_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
    "static_smem_bytes": re.compile(r"(\d+) bytes smem"),
}
# one SASS instruction: "/*0a30*/  @!P0 HGMMA.64x64x16.F32.BF16 R24, ..." -> opcode with modifiers
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.knobs.nvidia.ptxas.path).with_name(name))


def parse_ptxas(log: str) -> dict[str, int]:
    """Registers, stack, spills and static shared memory of the one kernel in a ``ptxas -v`` log."""
    out = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.search(log)
        if m is None and key in ("registers", "spill_store_bytes", "spill_load_bytes"):
            raise RuntimeError(f"ptxas -v output has no '{rx.pattern}':\n{log}")
        out[key] = int(m.group(1)) if m else 0
    return out


def instruction_mix(sass: str) -> dict[str, int]:
    """Counts of the SASS opcodes that tell how the kernel computes (tensor cores or not, TF32 or not)."""
    ops = collections.Counter(_SASS_OP.findall(sass))
    base = collections.Counter()
    for op, n in ops.items():
        base[op.split(".")[0]] += n
    tf32 = sum(n for op, n in ops.items() if op.split(".")[0] in ("HGMMA", "HMMA") and ".TF32" in op)
    return {
        "instructions": sum(ops.values()),
        "hgmma": base["HGMMA"],          # Hopper warpgroup MMA (wgmma)
        "hmma": base["HMMA"],            # warp-level mma.sync
        "tf32_mma": tf32,
        "ffma": base["FFMA"],
        "mufu": base["MUFU"],            # exp2 / erf / rsqrt
        "global_loads": base["LDG"] + base["LDGSTS"],
        "shared_ops": base["LDS"] + base["STS"] + base["LDSM"],
        "local_ops": base["LDL"] + base["STL"],  # spills (and stack arrays) go to local memory
    }


def occupancy(registers: int, smem_bytes: int, num_warps: int) -> dict[str, Any]:
    """Resident CTAs and warps per SM on an H100 for one kernel's resources, and what limits them."""
    regs_per_warp = math.ceil(max(registers, 1) * WARP_SIZE / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {
        "registers": (REGS_PER_SM // regs_per_warp) // num_warps,
        "shared_memory": SMEM_PER_SM // (smem_bytes + SMEM_RESERVED_PER_CTA) if smem_bytes <= SMEM_PER_CTA_MAX else 0,
        "warps": MAX_WARPS_PER_SM // num_warps,
        "ctas": MAX_CTAS_PER_SM,
    }
    ctas = min(limits.values())
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * num_warps,
            # on a tie name the hardware cap (warps, CTAs) rather than a resource the kernel could spend
            "limited_by": min(limits, key=lambda k: (limits[k], ("warps", "ctas", "registers", "shared_memory").index(k))),
            "limits": limits}


def compile_launch(entry_name: str, dtype: str, head_dim: int, launch: Launch) -> dict[str, Any]:
    """Compile one launch for sm_90a and return its resource record (run in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    from triton.compiler import ASTSource

    entry = next(e for e in KERNELS if e.name == entry_name)
    fn = entry.kernel()
    if not hasattr(fn, "arg_names") or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("gpu_static compiles kernels: run it as a script (it sets TRITON_INTERPRET=0 "
                           "before triton is imported), not from an interpreter session")
    types = entry.arg_types(dtype)
    signature = {name: "constexpr" if name in launch.constexprs else types.get(name, "i32")
                 for name in fn.arg_names}
    # in argument order: Triton's cache key is str(attrs), so a set's per-process order would miss the cache
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in entry.aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(launch.constexprs), attrs=attrs)
    t0 = time.perf_counter()
    kernel = triton.compile(src, target=GPUTarget("cuda", CAPABILITY, WARP_SIZE),
                            options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    compile_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(kernel.asm["ptx"])
        cubin.write_bytes(kernel.asm["cubin"])
        arch = sm_arch_from_capability(CAPABILITY)
        # the flags Triton's make_cubin passes (-lineinfo -v), output discarded: we want the report
        log = subprocess.run([triton.knobs.nvidia.ptxas.path, "-lineinfo", "-v", f"--gpu-name={arch}", str(ptx),
                              "-o", str(Path(tmp) / "v.o")], capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    res = parse_ptxas(log)
    smem = res["static_smem_bytes"] + int(kernel.metadata.shared)
    return {
        "kernel": entry_name, "dtype": dtype, "head_dim": head_dim, "config": launch.label,
        "autotuned": launch.autotuned, "has_dots": entry.has_dots,
        "num_warps": launch.num_warps, "num_stages": launch.num_stages,
        "constexprs": {k: v for k, v in launch.constexprs.items()},
        "arch": arch,
        **res,
        "dynamic_smem_bytes": int(kernel.metadata.shared),
        "smem_bytes": smem,
        **occupancy(res["registers"], smem, launch.num_warps),
        "sass": instruction_mix(sass),
        "compile_s": round(compile_s, 2),
    }


def _compile_task(task: tuple[str, str, int, Launch]) -> dict[str, Any]:
    try:
        return compile_launch(*task)
    except Exception as exc:  # a config that does not compile is a finding, reported as a row
        name, dtype, d, launch = task
        return {"kernel": name, "dtype": dtype, "head_dim": d, "config": launch.label,
                "autotuned": launch.autotuned, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}


# ------------------------------------------------------------------------------------------------
# The rules (tests/test_gpu_static.py enforces the same) and the report
# ------------------------------------------------------------------------------------------------

def problems(row: dict[str, Any]) -> list[str]:
    """Why a compiled config is unfit for an H100 (empty when it is fit)."""
    if "error" in row:
        return [f"does not compile: {row['error'].splitlines()[0]}"]
    out = []
    if set(row["head_dims"]) & set(CHECKED_HEAD_DIMS) and (row["spill_store_bytes"] or row["spill_load_bytes"]):
        out.append(f"spills {row['spill_store_bytes']} B stores / {row['spill_load_bytes']} B loads")
    if row["smem_bytes"] > SMEM_PER_CTA_MAX:
        out.append(f"shared memory {row['smem_bytes']} B > sm_90 limit {SMEM_PER_CTA_MAX} B")
    if row["ctas_per_sm"] < 1:
        out.append(f"no CTA fits on an SM (limited by {row['limited_by']})")
    mix = row["sass"]
    if row["has_dots"] and row["dtype"] != "fp32" and mix["hgmma"] + mix["hmma"] == 0:
        out.append("16-bit dots do not use tensor cores (no HGMMA/HMMA)")
    if row["dtype"] == "fp32" and mix["tf32_mma"]:
        out.append("fp32 dots use TF32 tensor cores")
    if row["has_dots"] and row["dtype"] == "fp32" and mix["hgmma"] + mix["hmma"]:
        out.append("fp32 dots run on tensor cores (expected exact IEEE FFMA)")
    return out


def roofline_rows(shape: PaperShape, kernels: Sequence[KernelEntry] = KERNELS) -> list[dict[str, Any]]:
    rows = []
    for e in kernels:
        flops, bytes_ = e.roofline(shape)
        t_compute, t_memory = flops / PEAK_BF16_FLOPS, bytes_ / HBM_BYTES_PER_S
        rows.append({"kernel": e.name, "flops": int(flops), "bytes": int(bytes_),
                     "intensity_flop_per_byte": round(flops / bytes_, 2),
                     "floor_us": round(max(t_compute, t_memory) * 1e6, 2),
                     "bound": "compute" if t_compute >= t_memory else "memory"})
    return rows


def _fmt_bytes(b: int) -> str:
    return f"{b / 1024:.1f}K"


def resource_table(rows: list[dict[str, Any]], head_dims: Optional[Sequence[int]] = None,
                   dtypes: Optional[Sequence[str]] = None) -> str:
    """One line per compiled config (optionally only those covering some head dims / dtypes)."""
    lines = [
        "| kernel | dtype | D | config | regs | spill st/ld (B) | smem | CTAs/SM | warps/SM | limit | "
        "HGMMA | HMMA | TF32 | FFMA | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if head_dims is not None and not set(r["head_dims"]) & set(head_dims):
            continue
        if dtypes is not None and r["dtype"] not in dtypes:
            continue
        d = "/".join(str(x) for x in r["head_dims"])
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['dtype']} | {d} | {r['config']} | "
                         + " | ".join(["-"] * 10) + " | compile error |")
            continue
        p, mix = problems(r), r["sass"]
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {d} | {r['config']} | {r['registers']} | "
            f"{r['spill_store_bytes']}/{r['spill_load_bytes']} | {_fmt_bytes(r['smem_bytes'])} | "
            f"{r['ctas_per_sm']} | {r['warps_per_sm']} | {r['limited_by']} | {mix['hgmma']} | {mix['hmma']} | "
            f"{mix['tf32_mma']} | {mix['ffma']} | {'yes' if not p else 'NO: ' + '; '.join(p)} |")
    return "\n".join(lines) + "\n"


def roofline_table(roof: list[dict[str, Any]], shape: PaperShape) -> str:
    lines = [
        f"Roofline floor at the paper's shape (N = {shape.n}, {sum(shape.is_global())} globals, "
        f"w = {shape.window}, H = {shape.heads}, D = {shape.head_dim}, one image, bf16) on an H100 "
        f"({PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s dense bf16, {HBM_BYTES_PER_S / 1e12:.1f} TB/s): "
        "a lower bound from FLOPs and HBM bytes, not a measurement.",
        "",
        "| kernel | GFLOP | MB | FLOP/byte | floor (us) | bound |",
        "|---|---|---|---|---|---|",
    ]
    for r in roof:
        lines.append(f"| {r['kernel']} | {r['flops'] / 1e9:.3f} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['intensity_flop_per_byte']} | {r['floor_us']} | {r['bound']} |")
    return "\n".join(lines) + "\n"


def report_markdown(report: dict[str, Any], shape: PaperShape) -> str:
    rows = report["kernels"]
    return (
        "# Triton kernels compiled for an H100 (sm_90a) without a GPU\n\n"
        f"Written by `benchmarks/gpu_static.py` (commit {report['commit']}, triton {report['triton']}, "
        f"{report['ptxas']}, {report['seconds']} s). Registers and spills from `ptxas -v`; shared memory = "
        "ptxas's static + Triton's dynamic request; occupancy on an H100 (64K registers, 228 KB shared "
        "memory, 32 CTAs, 64 warps per SM; limit = what caps it); HGMMA / HMMA / TF32 / FFMA: counts in the "
        "SASS. ok = no spill (at D = 64 and 128), shared memory within 227 KB, one CTA fits, tensor cores "
        "for 16-bit dots, no TF32.\n\n"
        "## The model's head dim (D = 64), bf16 and fp32\n\n"
        + resource_table(rows, head_dims=[64], dtypes=["bf16", "fp32"])
        + "\n## Roofline\n\n" + roofline_table(report["roofline"], shape)
        + "\n## Every config\n\n" + resource_table(rows))


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _environment() -> dict[str, Any]:
    import torch
    import triton

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import git_commit

    commit, dirty = git_commit()
    ptxas = subprocess.run([triton.knobs.nvidia.ptxas.path, "--version"], capture_output=True, text=True).stdout
    return {
        "target": "H100 (sm_90a), compiled ahead of time without a GPU",
        "commit": commit, "dirty": dirty,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "ptxas": ptxas.strip().splitlines()[-1] if ptxas.strip() else None,
        "limits": {"regs_per_sm": REGS_PER_SM, "smem_per_sm": SMEM_PER_SM, "smem_per_cta_max": SMEM_PER_CTA_MAX,
                   "smem_reserved_per_cta": SMEM_RESERVED_PER_CTA, "max_ctas_per_sm": MAX_CTAS_PER_SM,
                   "max_warps_per_sm": MAX_WARPS_PER_SM, "reg_alloc_unit": REG_ALLOC_UNIT},
    }


def run(kernels: Sequence[str], dtypes: Sequence[str], head_dims: Sequence[int], jobs: int,
        log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Compile every (kernel, dtype, head dim, launch); identical compiles (a launch that does not depend
    on the head dim) are done once and listed under every head dim."""
    tasks, covers = [], {}
    for e in KERNELS:
        if e.name not in kernels:
            continue
        for dtype in dtypes:
            for d in head_dims:
                for launch in e.launches(dtype, d):
                    key = (e.name, dtype, launch.label, json.dumps(launch.constexprs, sort_keys=True))
                    if key not in covers:
                        covers[key] = []
                        tasks.append((e.name, dtype, d, launch))
                    covers[key].append(d)
    head_dims_of = [covers[(n, dt, la.label, json.dumps(la.constexprs, sort_keys=True))] for n, dt, _, la in tasks]
    log(f"compiling {len(tasks)} kernels for sm_90a with {jobs} worker(s)")
    t0 = time.perf_counter()
    ctx = mp.get_context("fork")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        rows = []
        for row, ds in zip(pool.map(_compile_task, tasks), head_dims_of):
            row["head_dims"] = ds  # every head dim this one compile stands for
            rows.append(row)
            status = row.get("error", "").splitlines()[0] if "error" in row else \
                f"{row['registers']} regs, spills {row['spill_store_bytes']}/{row['spill_load_bytes']}, " \
                f"smem {row['smem_bytes']}, {row['ctas_per_sm']} CTA/SM, {row['compile_s']} s"
            log(f"  {row['kernel']:<24} {row['dtype']} D={row['head_dim']:<3} {row['config']:<22} {status}")
    log(f"compiled in {time.perf_counter() - t0:.1f} s")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", nargs="+", default=[e.name for e in KERNELS], choices=[e.name for e in KERNELS])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--head-dims", nargs="+", type=int, default=list(HEAD_DIMS), choices=HEAD_DIMS)
    p.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8), help="compile processes")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    # compiled kernels, never the interpreter: set before locore_kernels (and triton.jit) is imported
    os.environ["TRITON_INTERPRET"] = "0"

    shape = PaperShape()
    t0 = time.perf_counter()
    rows = run(args.kernels, args.dtypes, args.head_dims, max(1, args.jobs))
    roof = roofline_rows(shape, [e for e in KERNELS if e.name in args.kernels])
    print()
    print(resource_table(rows))
    print(roofline_table(roof, shape))
    bad = [(r, problems(r)) for r in rows if problems(r)]
    for r, p_ in bad:
        print(f"UNFIT {r['kernel']} {r['dtype']} D={'/'.join(map(str, r['head_dims']))} {r['config']}: {'; '.join(p_)}")
    if not args.no_write:
        report = {**_environment(), "seconds": round(time.perf_counter() - t0, 1),
                  "paper_shape": {**asdict(shape), "n": shape.n, "globals": sum(shape.is_global())},
                  "roofline_note": "time floor from FLOPs / 800 TFLOP/s and bytes / 3.3 TB/s: not a measurement",
                  "kernels": rows, "roofline": roof}
        _write_atomic(args.out_dir / f"{RESULT_NAME}.json", json.dumps(report, indent=1) + "\n")
        _write_atomic(args.out_dir / f"{RESULT_NAME}.md", report_markdown(report, shape))
        print(f"wrote {args.out_dir / (RESULT_NAME + '.json')} and .md")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
