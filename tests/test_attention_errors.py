"""Bad input through the public op (and the CPU backend / extension below it): a ValueError that names
the problem, never a crash or a silently wrong answer. Also the reference on degenerate layouts."""
from __future__ import annotations

import pytest
import torch

from locore_kernels import BACKENDS, _cpu, attention_rows, attention_with_layout, build_layout, longformer_attention
from locore_kernels import longformer_attention_reference, resolve_backend
from locore_kernels.backends import REGISTRY
from locore_kernels.layout import AttentionLayout
from locore_kernels.cpu import cpu_attention

B, N, H, D = 2, 12, 2, 16


def inputs(dtype=torch.float32, n=N, d=D, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, n, H, d, generator=g, dtype=dtype).to(device) for _ in range(6)]


def masks(n=N):
    glob = torch.zeros(B, n, dtype=torch.bool)
    glob[:, 0] = True
    pad = torch.zeros(B, n, dtype=torch.bool)
    pad[:, -2:] = True
    return glob, pad


def call(x, glob=None, pad=None, w=3, backend="cpu"):
    g, p = masks(x[0].shape[1])
    return longformer_attention(*x, is_global=g if glob is None else glob, key_padding=p if pad is None else pad,
                                one_sided_window=w, backend=backend)


# ----------------------------------------------------------------------------------------------
# projections
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", range(6))
def test_mismatched_shape(which):
    x = inputs()
    x[which] = x[which][:, :-1]
    # shapes are checked against q, so a short q is reported as k disagreeing with it
    name = ["k", "k", "v", "q_global", "k_global", "v_global"][which]
    with pytest.raises(ValueError, match=rf"{name} has shape \(2, 1[12], 2, 16\), expected \(2, 1[12], 2, 16\)"):
        call(x)


def test_mismatched_head_dim():
    x = inputs()
    x[2] = torch.randn(B, N, H, D + 1)
    with pytest.raises(ValueError, match=r"v has shape .*expected"):
        call(x)


def test_mismatched_dtype():
    x = inputs()
    x[1] = x[1].double()
    with pytest.raises(ValueError, match=r"k has dtype torch.float64 but q has torch.float32"):
        call(x)


def test_mismatched_device():
    x = inputs()
    x[4] = torch.empty(B, N, H, D, device="meta")
    with pytest.raises(ValueError, match=r"k_global is on meta but q is on cpu"):
        call(x)


def test_not_a_tensor():
    x = inputs()
    x[0] = x[0].numpy()
    with pytest.raises(ValueError, match=r"q must be a torch.Tensor"):
        call(x)


def test_wrong_rank():
    x = [t[0] for t in inputs()]
    with pytest.raises(ValueError, match=r"q must have shape \[B, N, H, D\]"):
        call(x)


def test_integer_projections():
    x = [t.to(torch.int32) for t in inputs()]
    with pytest.raises(ValueError, match=r"floating-point"):
        call(x, backend="reference")


# ----------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["is_global", "key_padding"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float32])
def test_non_bool_mask(which, dtype):
    glob, pad = masks()
    kw = {"glob": glob, "pad": pad}
    kw["glob" if which == "is_global" else "pad"] = (glob if which == "is_global" else pad).to(dtype)
    with pytest.raises(ValueError, match=rf"{which} must be a bool tensor"):
        call(inputs(), **kw)


def test_mask_wrong_length():
    glob, pad = masks(N + 1)
    with pytest.raises(ValueError, match=r"masks have shape \(2, 13\) but q is \[B=2, N=12"):
        call(inputs(), glob=glob, pad=pad)


def test_mask_wrong_rank():
    glob, pad = masks()
    with pytest.raises(ValueError, match=r"is_global must have shape \[B, N\]"):
        call(inputs(), glob=glob[0], pad=pad)


def test_masks_differ_in_shape():
    glob, pad = masks()
    with pytest.raises(ValueError, match=r"is_global .* and key_padding .* differ in shape"):
        call(inputs(), glob=glob, pad=pad[:, :-1])


def test_padded_token_cannot_be_global():
    glob, pad = masks()
    glob[1, -1] = True  # also padded
    with pytest.raises(ValueError, match=r"padded token cannot be global"):
        call(inputs(), glob=glob, pad=pad)


def test_mask_not_a_tensor():
    glob, pad = masks()
    with pytest.raises(ValueError, match=r"key_padding must be a torch.Tensor"):
        call(inputs(), glob=glob, pad=pad.tolist())


# ----------------------------------------------------------------------------------------------
# window
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w", [2.5, 3.0, "3", None, True, False])
def test_window_not_an_int(w):
    with pytest.raises(ValueError, match=r"one_sided_window must be a positive int"):
        call(inputs(), w=w)


@pytest.mark.parametrize("w", [0, -1, -256])
def test_window_not_positive(w):
    with pytest.raises(ValueError, match=r"one_sided_window must be >= 1"):
        call(inputs(), w=w)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
def test_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown attention backend 'cuda'"):
        call(inputs(), backend="cuda")


@pytest.mark.parametrize("d", [8, 24, 256])
def test_triton_unsupported_head_dim(d, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so the check is reached with CPU tensors
    with pytest.raises(ValueError, match=rf"backend='triton' supports head dim D in .* got D={d}"):
        call(inputs(d=d), backend="triton")


def test_triton_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors"):
        call(inputs(), backend="triton")


def test_cpu_backend_refuses_float64():
    with pytest.raises(ValueError,
                       match=r"backend='cpu' computes in float32 \(inputs float32/float16/bfloat16\), got torch.float64"):
        call(inputs(dtype=torch.float64), backend="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA tensor")
def test_cpu_backend_needs_cpu_tensors_cuda():
    x = inputs(device="cuda")
    glob, pad = (m.cuda() for m in masks())
    with pytest.raises(ValueError, match=r"backend='cpu' needs CPU tensors, got device cuda"):
        call(x, glob=glob, pad=pad, backend="cpu")


def test_cpu_backend_needs_cpu_tensors():
    # below the public op (CUDA is not needed to reach the check): meta tensors, CPU layout
    glob, pad = masks()
    layout = build_layout(glob, pad, 3)
    x = [torch.empty(B, N, H, D, device="meta") for _ in range(6)]
    x[3] = torch.empty(B, layout.max_global, H, D, device="meta")
    with pytest.raises(ValueError, match=r"backend='cpu' needs CPU tensors, but q is on meta"):
        cpu_attention(*x, layout)


# ----------------------------------------------------------------------------------------------
# the registry: one error listing every backend's reasons; explicit backends raise their own
# ----------------------------------------------------------------------------------------------
def test_no_backend_fits_lists_every_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError) as info:
        resolve_backend(None, torch.device("meta"), torch.float32, 64)
    msg = str(info.value)
    assert msg.startswith("no attention backend runs torch.float32 tensors on meta")
    for name in BACKENDS:
        assert f"backend={name!r}" in msg


def test_interpreter_is_never_picked_automatically(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(None, torch.device("cpu"), torch.float32, 64) == "cpu"
    assert resolve_backend("triton", torch.device("cpu"), torch.float32, 64) == "triton"


@pytest.mark.parametrize("dtype, expected", [(torch.float32, "cpu"), (torch.float16, "cpu"), (torch.bfloat16, "cpu"),
                                             (torch.float64, "reference")])
def test_cpu_dispatch_by_dtype(dtype, expected):
    assert resolve_backend(None, torch.device("cpu"), dtype, 64) == expected


def test_explicit_backend_reports_all_its_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"needs CUDA tensors.*; backend='triton' supports head dim D in .* got D=24"):
        call(inputs(d=24), backend="triton")


def test_registry_reasons_are_empty_when_supported():
    cpu = REGISTRY["cpu"]
    assert cpu.not_supported_reasons(torch.device("cpu"), torch.float16, 48) == []
    assert REGISTRY["reference"].not_supported_reasons(torch.device("cpu"), torch.float64, 7) == []
    assert REGISTRY["triton"].not_supported_reasons(torch.device("cuda"), torch.bfloat16, 64) == []
    assert REGISTRY["triton"].not_supported_reasons(torch.device("cuda"), torch.bfloat16, 48) != []


def test_layout_entry_checks_gathered_global_rows():
    x = inputs()
    glob, pad = masks()
    layout = build_layout(glob, pad, 3)
    with pytest.raises(ValueError, match=r"q_global has shape \(2, 12, 2, 16\), expected \(2, 1, 2, 16\)"):
        attention_with_layout(*x, layout, backend="cpu")  # full-length q_global instead of gathered


def test_cpu_attention_bad_out():
    x = inputs()
    glob, pad = masks()
    layout = build_layout(glob, pad, 3)
    qg = layout.gather_global(x[3])
    for out in (torch.empty(B, N, H, D, dtype=torch.float64), torch.empty(B, N, H, D + 1),
                torch.empty(B, H, N, D).transpose(1, 2)):
        with pytest.raises(ValueError, match=r"out must be a contiguous float32 CPU tensor"):
            cpu_attention(x[0], x[1], x[2], qg, x[4], x[5], layout, out=out)
    with pytest.raises(ValueError, match=r"out must not overlap an input"):
        cpu_attention(x[0], x[1], x[2], qg, x[4], x[5], layout, out=x[2])


# ----------------------------------------------------------------------------------------------
# the extension validates on its own (never crashes on inconsistent arrays)
# ----------------------------------------------------------------------------------------------
def ext_args(**override):
    x = inputs()
    glob, pad = masks()
    layout = build_layout(glob, pad, 3)
    args = dict(
        q=x[0].numpy(), k=x[1].numpy(), v=x[2].numpy(), q_global=layout.gather_global(x[3]).numpy(),
        k_global=x[4].numpy(), v_global=x[5].numpy(), out=torch.empty(B, N, H, D).numpy(),
        global_idx=layout.global_idx.numpy(), num_global=layout.num_global.numpy(),
        band_key=layout.band_key.view(torch.uint8).numpy(), key_padding=layout.key_padding.view(torch.uint8).numpy(),
        is_global=layout.is_global.view(torch.uint8).numpy(), one_sided_window=3)
    args.update(override)
    return args


def test_extension_accepts_consistent_arrays():
    args = ext_args()
    _cpu.longformer_attention_fp32(**args)
    assert not torch.isnan(torch.from_numpy(args["out"])).any()


@pytest.mark.parametrize("override, message", [
    (lambda a: {"q": a["q"].astype("float64")}, r"q must be a float32 array"),
    (lambda a: {"k": a["k"][:, :-1].copy()}, r"k has shape \(2, 11, 2, 16\), expected \(2, 12, 2, 16\)"),
    (lambda a: {"v": a["v"].transpose(0, 2, 1, 3).copy().transpose(0, 2, 1, 3)}, r"v must be C-contiguous"),
    (lambda a: {"q": a["q"][0]}, r"q must have 4 dimensions"),
    (lambda a: {"out": a["out"][:1]}, r"out has shape"),
    (lambda a: {"global_idx": a["global_idx"].astype("int64")}, r"global_idx must be a int32 array"),
    (lambda a: {"band_key": a["band_key"].astype(bool)}, r"band_key must be a uint8 array"),
    (lambda a: {"global_idx": a["global_idx"] + 100}, r"global_idx out of range"),
    (lambda a: {"global_idx": a["global_idx"] + 1}, r"global_idx points at a non-global token"),
    (lambda a: {"num_global": a["num_global"] * 0 + 5}, r"num_global\[0\]=5 is outside \[0, G=1\]"),
    (lambda a: {"num_global": a["num_global"] * 0}, r"num_global\[0\] does not match is_global"),
    (lambda a: {"band_key": a["band_key"] * 0}, r"band_key must equal ~key_padding & ~is_global"),
    (lambda a: {"key_padding": a["key_padding"] | a["is_global"]}, r"both padded and global"),
    (lambda a: {"one_sided_window": 0}, r"one_sided_window must be >= 1"),
])
def test_extension_rejects_inconsistent_arrays(override, message):
    args = ext_args()
    args.update(override(args))
    with pytest.raises(ValueError, match=message):
        _cpu.longformer_attention_fp32(**args)


def test_extension_rejects_read_only_out():
    args = ext_args()
    args["out"].setflags(write=False)
    with pytest.raises(ValueError, match=r"out must be writeable"):
        _cpu.longformer_attention_fp32(**args)


# ----------------------------------------------------------------------------------------------
# the reference on degenerate layouts
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_single_token(dtype):
    x = [torch.randn(1, 1, 2, 8, dtype=dtype) for _ in range(6)]
    no = torch.zeros(1, 1, dtype=torch.bool)
    yes = torch.ones(1, 1, dtype=torch.bool)
    # a lone valid token attends to itself: its value; with global attention its global value
    torch.testing.assert_close(longformer_attention_reference(*x, no, no, 1), x[2])
    torch.testing.assert_close(longformer_attention_reference(*x, yes, no, 1), x[5])
    padded = longformer_attention_reference(*x, no, yes, 1)
    assert torch.equal(padded, torch.zeros_like(padded))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_all_padded_gives_zeros_without_nan(backend):
    x = inputs()
    glob = torch.zeros(B, N, dtype=torch.bool)
    pad = torch.ones(B, N, dtype=torch.bool)
    out = call(x, glob=glob, pad=pad, backend=backend)
    assert not torch.isnan(out).any()
    assert torch.equal(out, torch.zeros_like(out))


# ----------------------------------------------------------------------------------------------
# windows (issue 13.9): huge integer windows cover the sequence everywhere; nonsense is refused
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_huge_integer_window_covers_the_sequence(backend):
    x = inputs()
    assert torch.allclose(call(x, w=int(1e30), backend=backend), call(x, w=N, backend="reference"), atol=1e-6)


def test_float_window_is_refused():
    with pytest.raises(ValueError, match=r"one_sided_window must be a positive int, got 1e\+30"):
        call(inputs(), w=1e30, backend="reference")


def test_reference_direct_call_checks_the_window():
    x = inputs()
    glob, pad = masks()
    with pytest.raises(ValueError, match=r"one_sided_window must be >= 1, got -2"):
        longformer_attention_reference(*x, glob, pad, -2)


@pytest.mark.parametrize("w", [-1, 0, 2.5, True])
def test_hand_built_layout_with_bad_window(w):
    glob, pad = masks()
    good = build_layout(glob, pad, 3)
    fields = {f: getattr(good, f) for f in ("is_global", "key_padding", "band_key", "global_idx", "num_global",
                                           "max_global")}
    with pytest.raises(ValueError, match=r"AttentionLayout.one_sided_window must be"):
        AttentionLayout(**fields, one_sided_window=w)
    # a layout whose window was changed after construction is caught at the op's boundary
    bad = build_layout(glob, pad, 3)
    object.__setattr__(bad, "one_sided_window", w)
    x = inputs()
    with pytest.raises(ValueError, match=r"layout.one_sided_window must be"):
        attention_with_layout(x[0], x[1], x[2], good.gather_global(x[3]), x[4], x[5], bad, backend="reference")
    with pytest.raises(ValueError, match=r"layout.one_sided_window must be"):
        attention_rows(x[0], x[1], x[2], torch.arange(N), bad, backend="cpu")
