"""The build works: the C++ extension imports with OpenMP, the Triton interpreter runs on CPU."""
import os

import pytest
import torch


def test_cpu_extension_reports_openmp():
    from locore_kernels import _cpu

    assert _cpu.openmp_enabled(), "extension was built without OpenMP (LOCORE_NO_OPENMP set?)"
    assert _cpu.max_threads() >= 1
    assert _cpu.max_threads() <= max(os.cpu_count() or 1, 1) * 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter path used on CPU-only machines")
def test_triton_interpreter_runs_a_kernel_on_cpu():
    import triton
    import triton.language as tl

    assert os.environ.get("TRITON_INTERPRET") == "1"

    @triton.jit
    def axpy(x_ptr, y_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n  # the last block runs past n
        x = tl.load(x_ptr + offs, mask=mask)
        y = tl.load(y_ptr + offs, mask=mask)
        tl.store(out_ptr + offs, alpha * x + y, mask=mask)

    n = 37
    x, y = torch.randn(n), torch.randn(n)
    out = torch.full((n,), float("nan"))
    axpy[(triton.cdiv(n, 16),)](x, y, out, 2.5, n, BLOCK=16)
    torch.testing.assert_close(out, 2.5 * x + y)


def test_packages_import_without_network():
    import locore_kernels

    assert callable(locore_kernels.longformer_attention)
