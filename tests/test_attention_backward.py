"""The attention backward (locore_kernels.autograd): gradients of the C++ and Triton kernels.

* float64 ``torch.autograd.gradcheck`` on small layouts (padding anywhere, globals anywhere, none,
  all, w > N, a fully padded batch item) for the reference, C++ and Triton (interpreter) backends;
* float32 gradients against the float64 dense reference's autograd (1e-4 of the largest gradient);
* determinism (bitwise, run to run and across thread counts) and memory (saved state O(N), not N^2).
"""
from __future__ import annotations

import pytest
import torch

from locore_kernels import build_layout, longformer_attention as longformer_attention_inference
from locore_kernels.autograd import LongformerAttentionFunction, attention_with_layout_trainable, longformer_attention
from locore_kernels.cpu_backward import cpu_attention_with_lse
from locore_kernels.reference import longformer_attention_reference

GRAD_RTOL = 1e-4  # fp32 gradients vs float64, relative to the largest gradient magnitude


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes: one thread avoids OpenMP / intra-op start-up costs on a busy machine (the
    determinism test sets its own thread counts)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(B, N, H, D, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, H, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(6)]


def make_masks(kind: str, B: int, N: int, seed: int = 0):
    """Mask layouts named by ``kind``; padding and globals are placed anywhere (not only at the end)."""
    g = torch.Generator().manual_seed(seed + 1000)
    pad = torch.rand(B, N, generator=g) < 0.25
    if kind == "mixed":
        glob = (torch.rand(B, N, generator=g) < 0.2) & ~pad
    elif kind == "no-globals":
        glob = torch.zeros(B, N, dtype=torch.bool)
    elif kind == "all-globals":
        glob = ~pad
    elif kind == "no-padding":
        pad = torch.zeros(B, N, dtype=torch.bool)
        glob = torch.rand(B, N, generator=g) < 0.2
    elif kind == "item-all-padded":
        pad[0] = True
        glob = (torch.rand(B, N, generator=g) < 0.2) & ~pad
    else:
        raise AssertionError(kind)
    return glob, pad


# name: (mask kind, B, N, w); w > N in "window-beyond-sequence"
LAYOUTS = {
    "mixed": ("mixed", 2, 11, 2),
    "no-globals": ("no-globals", 2, 10, 2),
    "all-globals": ("all-globals", 2, 9, 2),
    "no-padding": ("no-padding", 1, 12, 3),
    "item-all-padded": ("item-all-padded", 2, 10, 2),
    "window-beyond-sequence": ("mixed", 2, 9, 50),
}


def _gradcheck(backend, kind, B, N, w, H, D, fast_mode):
    glob, pad = make_masks(kind, B, N)
    inputs = [t.requires_grad_() for t in make_inputs(B, N, H, D)]

    def fn(*xs):
        return longformer_attention(*xs, is_global=glob, key_padding=pad, one_sided_window=w, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast_mode)


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend, name):
    kind, B, N, w = LAYOUTS[name]
    # the reference's gradient is PyTorch's own autograd: the cheaper fast mode (a random projection
    # of the Jacobian) is enough there; the C++ backward gets the full Jacobian check
    _gradcheck(backend, kind, B, N, w, H=2, D=2, fast_mode=backend == "reference")


def _fp32_vs_reference(backend, kind, B, N, H, D, w, seed=0):
    """Our fp32 forward + backward against the float64 dense reference's autograd."""
    glob, pad = make_masks(kind, B, N, seed)
    x64 = [t.requires_grad_() for t in make_inputs(B, N, H, D, seed)]
    ref = longformer_attention_reference(*x64, glob, pad, w)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, x64, grad_out, allow_unused=True, materialize_grads=True)

    x32 = [t.detach().float().requires_grad_() for t in x64]
    out = longformer_attention(*x32, is_global=glob, key_padding=pad, one_sided_window=w, backend=backend)
    grads = torch.autograd.grad(out, x32, grad_out.float(), allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(out.double(), ref.detach(), atol=1e-5, rtol=0)
    for name, g, r in zip(("q", "k", "v", "q_global", "k_global", "v_global"), grads, ref_grads):
        assert g.dtype == torch.float32
        err = (g.double() - r).abs().max().item()
        scale = r.abs().max().item()
        assert err <= GRAD_RTOL * max(scale, 1.0), f"{backend} d{name}: max error {err:.3g} vs |grad| {scale:.3g}"
    return grads


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_gradcheck_float64_triton(name):
    """Triton under the interpreter (slow): fast-mode gradcheck of one packed input, i.e. v^T J u for
    random u over all six projections at once (2 forward evaluations instead of 2 per element)."""
    kind, B, N, w = LAYOUTS[name]
    glob, pad = make_masks(kind, B, N)
    packed = torch.stack(make_inputs(B, N, 1, 16)).requires_grad_()

    def fn(x):
        return longformer_attention(*x.unbind(0), is_global=glob, key_padding=pad, one_sided_window=w,
                                    backend="triton")

    assert torch.autograd.gradcheck(fn, (packed,), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("kind,N,w", [("mixed", 70, 5), ("all-globals", 50, 3)])
def test_triton_fp32_gradients_match_float64_reference(kind, N, w):
    # several row tiles (BLOCK_M 16) and key tiles (BLOCK_N 32); all-globals: G > BLOCK_N
    _fp32_vs_reference("triton", kind, B=2, N=N, H=1, D=16, w=w)


@pytest.mark.parametrize("kind", ["mixed", "no-globals", "all-globals", "item-all-padded"])
def test_cpu_fp32_gradients_match_float64_reference(kind):
    # several row blocks (32 rows) and key tiles (64 keys), a band crossing block edges
    grads = _fp32_vs_reference("cpu", kind, B=2, N=150, H=2, D=64, w=40)
    if kind != "all-globals":
        assert any(g.abs().sum() > 0 for g in grads[:3])


def test_gradients_vanish_where_never_read():
    """dq only at non-global valid rows, dq_global only at global rows, nothing into padded tokens."""
    glob, pad = make_masks("mixed", 2, 40)
    xs = [t.float().requires_grad_() for t in make_inputs(2, 40, 2, 8)]
    out = longformer_attention(*xs, is_global=glob, key_padding=pad, one_sided_window=3, backend="cpu")
    out.square().sum().backward()
    dq, dk, dv, dqg, dkg, dvg = (t.grad for t in xs)
    assert torch.all(dq[glob | pad] == 0) and torch.all(dqg[~glob] == 0)
    for g in (dk, dv, dkg, dvg):
        assert torch.all(g[pad] == 0)
    assert dq[~glob & ~pad].abs().sum() > 0 and dqg[glob].abs().sum() > 0


def test_forward_with_lse_matches_inference_forward_and_dense_lse():
    B, N, H, D, w = 2, 90, 2, 16, 6
    glob, pad = make_masks("mixed", B, N)
    x = make_inputs(B, N, H, D)
    layout = build_layout(glob, pad, w)
    x32 = [t.float() for t in x]
    out, lse = cpu_attention_with_lse(*x32[:3], layout.gather_global(x32[3]), *x32[4:], layout)
    inference = longformer_attention_inference(*x32, is_global=glob, key_padding=pad, one_sided_window=w,
                                               backend="cpu")
    assert torch.equal(out, inference), "the LSE variant must compute the very same output"
    out64, lse64 = cpu_attention_with_lse(*x[:3], layout.gather_global(x[3]), *x[4:], layout)
    # independent dense log-sum-exp (float64)
    pos = torch.arange(N)
    band = (pos[:, None] - pos[None, :]).abs() <= w
    local_allowed = (band[None] & (~pad & ~glob)[:, None, :]) | glob[:, None, :]
    s_loc = torch.einsum("bihd,bjhd->bhij", x[0], x[1]) / D ** 0.5
    s_glb = torch.einsum("bihd,bjhd->bhij", x[3], x[4]) / D ** 0.5
    lse_loc = s_loc.masked_fill(~local_allowed[:, None], float("-inf")).logsumexp(-1)
    lse_glb = s_glb.masked_fill(pad[:, None, None, :], float("-inf")).logsumexp(-1)
    expected = torch.where(glob[:, None, :], lse_glb, lse_loc).masked_fill(pad[:, None, :], 0.0)
    torch.testing.assert_close(lse64, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse.double(), expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out64, longformer_attention_reference(*x, glob, pad, w), atol=1e-12, rtol=0)


def _cpu_grads(xs, glob, pad, w, grad_out):
    xs = [t.detach().clone().requires_grad_() for t in xs]
    out = longformer_attention(*xs, is_global=glob, key_padding=pad, one_sided_window=w, backend="cpu")
    return [out.detach(), *torch.autograd.grad(out, xs, grad_out)]


def test_cpu_backward_is_deterministic_across_runs_and_thread_counts():
    B, N, H, D, w = 1, 300, 3, 32, 20
    glob, pad = make_masks("mixed", B, N)
    xs = [t.float() for t in make_inputs(B, N, H, D)]
    grad_out = torch.randn(B, N, H, D, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (threads, threads, 1, 3):
            torch.set_num_threads(n)
            runs.append(_cpu_grads(xs, glob, pad, w, grad_out))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves while running fn()."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_saved_state_is_linear_in_sequence_length():
    """Doubling N doubles what our autograd saves and quadruples the dense reference's."""
    H, D, w = 2, 16, 32

    def saved(n, backend):
        glob, pad = make_masks("mixed", 1, n)
        xs = [t.float().requires_grad_() for t in make_inputs(1, n, H, D)]
        if backend == "reference":
            return _saved_bytes(lambda: longformer_attention_reference(*xs, glob, pad, w))
        return _saved_bytes(lambda: longformer_attention(*xs, is_global=glob, key_padding=pad,
                                                         one_sided_window=w, backend=backend))

    n = 800
    ours, ours2 = saved(n, "cpu"), saved(2 * n, "cpu")
    dense, dense2 = saved(n, "reference"), saved(2 * n, "reference")
    assert ours2 <= 2.1 * ours, (ours, ours2)
    assert ours <= 8 * n * H * D * 4  # the six inputs, the output and lse [B, H, N]
    assert dense2 >= 3.8 * dense, (dense, dense2)
    assert dense >= n * n * H * 4  # [B, H, N, N] probabilities
    assert dense > 20 * ours


def test_trainable_layout_entry_and_errors():
    B, N, H, D, w = 1, 30, 2, 8, 4
    glob, pad = make_masks("mixed", B, N)
    layout = build_layout(glob, pad, w)
    xs = [t.float().requires_grad_() for t in make_inputs(B, N, H, D)]
    out = attention_with_layout_trainable(xs[0], xs[1], xs[2], layout.gather_global(xs[3]), xs[4], xs[5],
                                          layout, backend="cpu")
    assert out.grad_fn is not None and "LongformerAttentionFunction" in type(out.grad_fn).__name__
    with pytest.raises(ValueError, match="float32 or float64"):
        longformer_attention(*(t.detach().half() for t in xs), is_global=glob, key_padding=pad,
                             one_sided_window=w, backend="cpu")
    with pytest.raises(ValueError, match="q_global"):
        attention_with_layout_trainable(xs[0], xs[1], xs[2], xs[3], xs[4], xs[5], layout, backend="cpu")


@torch.library.custom_op("locore_test::attention", mutates_args=())
def _test_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_global_gathered: torch.Tensor,
                       k_global: torch.Tensor, v_global: torch.Tensor, is_global: torch.Tensor,
                       key_padding: torch.Tensor, band_key: torch.Tensor, global_idx: torch.Tensor,
                       num_global: torch.Tensor, one_sided_window: int, backend: str) -> torch.Tensor:
    """A stand-in with the signature of the locore::attention custom op (inference kernel inside)."""
    from locore_kernels import attention_with_layout
    from locore_kernels.layout import AttentionLayout
    layout = AttentionLayout(is_global=is_global, key_padding=key_padding, band_key=band_key,
                             global_idx=global_idx, num_global=num_global, max_global=global_idx.shape[1],
                             one_sided_window=one_sided_window)
    return attention_with_layout(q, k, v, q_global_gathered, k_global, v_global, layout,
                                 backend=backend).contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_register_custom_op_autograd(dtype):
    from locore_kernels.autograd import register_custom_op_autograd
    register_custom_op_autograd("locore_test::attention")
    B, N, H, D, w = 2, 40, 2, 8, 4
    glob, pad = make_masks("mixed", B, N)
    layout = build_layout(glob, pad, w)
    xs = [t.to(dtype).requires_grad_() for t in make_inputs(B, N, H, D)]
    qg = layout.gather_global(xs[3])
    backend = "cpu" if dtype == torch.float32 else "reference"
    out = _test_attention_op(xs[0], xs[1], xs[2], qg, xs[4], xs[5], layout.is_global, layout.key_padding,
                             layout.band_key, layout.global_idx, layout.num_global, w, backend)
    grad_out = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, xs, grad_out)
    expected = torch.autograd.grad(longformer_attention(*xs, is_global=glob, key_padding=pad, one_sided_window=w,
                                                        backend="cpu"), xs, grad_out)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_public_op_is_differentiable_through_the_registered_backward(backend):
    """locore_kernels.longformer_attention with inputs that need grad runs the locore::attention custom op,
    whose registered backward gives the float64 reference autograd's gradients (fp32 to 1e-4 relative)."""
    from locore_kernels import longformer_attention as public_attention
    B, N, H, D, w = 2, 37, 2, 8, 5
    glob, pad = make_masks("mixed", B, N)
    xs = [t.float().requires_grad_() for t in make_inputs(B, N, H, D)]
    out = public_attention(*xs, is_global=glob, key_padding=pad, one_sided_window=w, backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, xs, grad_out)
    x64 = [t.detach().double().requires_grad_() for t in xs]
    ref = longformer_attention_reference(*x64, glob, pad, w)
    expected = torch.autograd.grad(ref, x64, grad_out.double())
    for name, g, e in zip(("q", "k", "v", "q_global", "k_global", "v_global"), grads, expected):
        scale = e.abs().max().clamp_min(1e-12)
        assert ((g.double() - e).abs().max() / scale) < 1e-4, name
