"""Second oracle: transformers' LongformerSelfAttention (the published chunked implementation).

The same hidden states go through HF's layer and through our projections (HF's own Linear weights);
our dense reference (float64) and the CPU kernel (fp32) must reproduce HF's output. HF computes its
softmax in float32 even for float64 inputs, so the float64 comparison is held to ~1e-5, not 1e-12.
HF's layer needs the sequence length to be a multiple of attention_window (= 2w); its
``attention_mask`` is 0 = local, > 0 = global, < 0 = padding (as LongformerModel.forward builds it).
"""
from __future__ import annotations

import pytest
import torch

from locore_kernels import build_layout, longformer_attention, longformer_attention_reference
from locore_kernels.cpu import cpu_attention

try:  # a missing test dependency is a broken set-up, not a reason to run fewer tests: fail, never skip
    import transformers  # noqa: F401
except ImportError as e:
    raise ImportError("tests/test_attention_reference.py needs transformers (the second oracle); `make test` "
                      "installs it, or pip install -e .[test]") from e
from transformers import LongformerConfig  # noqa: E402
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention  # noqa: E402

HF_ATOL = 1e-5


def hf_layer(hidden, heads, w, seed):
    torch.manual_seed(seed)
    cfg = LongformerConfig(hidden_size=hidden, num_attention_heads=heads, attention_window=[2 * w],
                           attention_probs_dropout_prob=0.0)
    layer = LongformerSelfAttention(cfg, layer_id=0).eval().double()
    with torch.no_grad():  # non-trivial biases (default init is small), so a bias mix-up would show
        for lin in (layer.query, layer.key, layer.value, layer.query_global, layer.key_global, layer.value_global):
            lin.bias.normal_(0.0, 0.5)
    return layer


def hf_forward(layer, hs, glob, pad):
    mask = torch.zeros(hs.shape[:2], dtype=hs.dtype)
    mask[glob] = 10000.0
    mask[pad] = -10000.0
    with torch.no_grad():
        out = layer(hs, attention_mask=mask, is_index_masked=pad, is_index_global_attn=glob,
                    is_global_attn=bool(glob.any()))[0]
    B, N, _ = hs.shape
    return out.view(B, N, layer.num_heads, layer.head_dim)


def projections(layer, hs):
    """q, k, v, q_global, k_global, v_global as [B, N, H, D] with HF's weights (unscaled: the op scales)."""
    B, N, _ = hs.shape
    with torch.no_grad():
        return [lin(hs).view(B, N, layer.num_heads, layer.head_dim)
                for lin in (layer.query, layer.key, layer.value,
                            layer.query_global, layer.key_global, layer.value_global)]


def compare_all(hidden, heads, w, glob, pad, seed=0):
    B, N = glob.shape
    assert N % (2 * w) == 0, "HF's layer needs N to be a multiple of attention_window"
    layer = hf_layer(hidden, heads, w, seed)
    hs = torch.randn(B, N, hidden, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    expected = hf_forward(layer, hs, glob, pad)
    x = projections(layer, hs)

    ref = longformer_attention_reference(*x, glob, pad, w)
    torch.testing.assert_close(ref, expected, atol=HF_ATOL, rtol=HF_ATOL)

    x32 = [t.float() for t in x]
    layout = build_layout(glob, pad, w)
    out = cpu_attention(x32[0], x32[1], x32[2], layout.gather_global(x32[3]), x32[4], x32[5], layout)
    torch.testing.assert_close(out.double(), expected, atol=HF_ATOL, rtol=HF_ATOL)
    assert torch.all(out[pad] == 0) and torch.all(expected[pad] == 0)

    out_op = longformer_attention(*x32, is_global=glob, key_padding=pad, one_sided_window=w, backend="cpu")
    assert torch.equal(out_op, out)


def random_masks(B, N, p_global, p_pad, seed):
    g = torch.Generator().manual_seed(seed)
    pad = torch.rand(B, N, generator=g) < p_pad
    glob = (torch.rand(B, N, generator=g) < p_global) & ~pad
    return glob, pad


def test_no_padding_no_globals():
    glob, pad = random_masks(1, 64, 0.0, 0.0, seed=0)
    compare_all(64, 2, 8, glob, pad, seed=0)


def test_globals_no_padding():
    glob, pad = random_masks(1, 96, 0.1, 0.0, seed=1)
    glob[0, 0] = True
    compare_all(96, 3, 8, glob, pad, seed=1)


def test_padding_no_globals():
    glob, pad = random_masks(1, 64, 0.0, 0.2, seed=2)
    pad[0, -10:] = True  # trailing padding as LongformerModel adds it, plus scattered padded slots
    compare_all(64, 2, 16, glob, pad, seed=2)


def test_padding_and_globals():
    glob, pad = random_masks(1, 128, 0.08, 0.2, seed=3)
    compare_all(128, 4, 16, glob, pad, seed=3)


def test_batch_of_two_with_different_layouts():
    # different numbers of global tokens per item (HF pads its compact global lists with masking)
    glob, pad = random_masks(2, 96, 0.1, 0.15, seed=4)
    glob[1] = False
    glob[1, [3, 50]] = True
    pad[1, [3, 50]] = False
    compare_all(64, 2, 8, glob, pad, seed=4)


def test_locore_layout():
    # 6 images x 10 tokens ([global, 8 local, SEP]); SEPs + the query block's first T-1 tokens global;
    # two padded local slots per gallery image; sequence padded to a multiple of attention_window (2w = 16)
    T, images, w = 10, 6, 8
    n_tokens = images * T
    N = ((n_tokens + 2 * w - 1) // (2 * w)) * 2 * w
    pos = torch.arange(N)
    glob = (((pos % T) == T - 1) | (pos < T - 1)) & (pos < n_tokens)
    pad = pos >= n_tokens
    for img in range(1, images):
        pad[img * T + 2] = pad[img * T + 5] = True
    compare_all(128, 2, w, glob[None], pad[None], seed=5)


def test_window_covers_whole_sequence():
    glob, pad = random_masks(1, 32, 0.1, 0.1, seed=6)
    compare_all(64, 2, 16, glob, pad, seed=6)
