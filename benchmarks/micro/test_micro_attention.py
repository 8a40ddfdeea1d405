"""pytest-benchmark micro-benchmarks: the attention op and one encoder layer at tiny sizes.

Not part of ``make test`` (they live outside ``tests/``, and the project's pytest options skip
benchmarks). Run them with the project's ``--benchmark-skip`` cleared:

    .venv/bin/python -m pytest -o addopts="" benchmarks/micro            # all backends this machine has
    .venv/bin/python -m pytest -o addopts="" benchmarks/micro --benchmark-json out.json

Sizes: one query + 25 gallery images (N = 1300 tokens, 50 per image), LoCoRE's global tokens,
w = 256; the op at H = 12, D = 64; the layer is the first encoder layer of the ``tiny`` preset.
GPU: bf16 and the Triton kernels; CPU: fp32 and the C++ kernel (plus the dense reference, for scale).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import locore_kernels  # noqa: E402
from bench_attention import locore_layout  # noqa: E402  (LoCoRE's global-token layout)

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
IMAGES, H, D = 26, 12, 64
BACKENDS = ["triton"] if HAS_CUDA else ["cpu", "reference"]
if not HAS_CUDA and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    BACKENDS.append("triton")  # the interpreter: correctness speed only, but it runs


def _synced(fn):
    if DEVICE.type == "cuda":
        def run():
            out = fn()
            torch.cuda.synchronize()
            return out
        return run
    return fn


@pytest.fixture(scope="module")
def layout():
    return locore_layout(1, IMAGES, DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_op(benchmark, layout, backend):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    N = layout.seq_len
    q, k, v, kg, vg = (torch.randn(1, N, H, D, generator=g, device=DEVICE, dtype=DTYPE) for _ in range(5))
    qg = torch.randn(1, layout.max_global, H, D, generator=g, device=DEVICE, dtype=DTYPE)

    def op():
        with torch.inference_mode():
            return locore_kernels.attention_with_layout(q, k, v, qg, kg, vg, layout, backend=backend,
                                                        validate=False)

    benchmark.extra_info.update(tokens=N, heads=H, head_dim=D, dtype=str(DTYPE), device=str(DEVICE))
    out = benchmark(_synced(op))
    assert out.shape == (1, N, H, D)


@pytest.mark.parametrize("attention", ["engine", "sdpa-dense"])
def test_encoder_layer(benchmark, layout, attention):
    from baselines import DenseSDPABaseline
    from locore.model import LoCoRe

    model = LoCoRe.preset("tiny", device=DEVICE, dtype=DTYPE, num_layers=1)
    if attention == "sdpa-dense":
        model.set_attention(DenseSDPABaseline())
    layer = model.layers[0]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(1, layout.seq_len, model.config.hidden, generator=g, device=DEVICE, dtype=DTYPE)

    def run():
        with torch.inference_mode():
            return layer(x, layout, model._attend)

    benchmark.extra_info.update(tokens=layout.seq_len, hidden=model.config.hidden, dtype=str(DTYPE))
    out = benchmark(_synced(run))
    assert out.shape == x.shape
