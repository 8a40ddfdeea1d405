"""patch_longformer: transformers' Longformer models on LoCoRE's kernels give the library's outputs.

Every head class with random weights (scaled so attention is far from uniform), per-layer windows
that differ, sequences the library pads to a window multiple, padding inside the batch, global tokens
anywhere (first, last valid, adjacent, inside each other's band, none in one item), batch 3. fp32 on
the C++ kernel within 1e-5 of the largest output magnitude; float64 on the dense reference (the
library's softmax kept in float64) within 1e-10; fp32 on Triton under the interpreter on a tiny model.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (LongformerConfig, LongformerForMaskedLM, LongformerForQuestionAnswering,  # noqa: E402
                          LongformerForSequenceClassification, LongformerForTokenClassification,
                          LongformerModel)
from transformers.utils import logging as hf_logging  # noqa: E402

import locore.integrations.longformer as integration  # noqa: E402
from locore import LoCoReConfig  # noqa: E402
from locore.integrations import patch_longformer, patched_modules, unpatch_longformer  # noqa: E402
from hf_baseline import (_softmax_keeps_float64, build_hf_longformer, hf_logits, random_reference_state_dict,  # noqa: E402
                         scores_from_logits)

hf_logging.set_verbosity_error()  # the library's padding notice is expected

HEADS = {
    "LongformerModel": (LongformerModel, ("last_hidden_state", "pooler_output")),
    "ForSequenceClassification": (LongformerForSequenceClassification, ("logits",)),
    "ForQuestionAnswering": (LongformerForQuestionAnswering, ("start_logits", "end_logits")),
    "ForTokenClassification": (LongformerForTokenClassification, ("logits",)),
    "ForMaskedLM": (LongformerForMaskedLM, ("logits",)),
}
VOCAB, PAD_ID = 40, 1
B, N = 3, 37                      # the library pads 37 to 40 (largest window 8)
WINDOWS = [4, 8, 4]               # per-layer attention_window (one-sided 2, 4, 2)


def make_config(hidden: int = 32, heads: int = 2, windows=WINDOWS, **kw) -> LongformerConfig:
    return LongformerConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=len(windows),
                            num_attention_heads=heads, intermediate_size=2 * hidden, attention_window=list(windows),
                            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            pad_token_id=PAD_ID, num_labels=2, **kw)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Weights ~ N(0, 1/fan_in) (queries and keys x2: peaked attention), biases ~ N(0, 0.05^2),
    LayerNorm ~ 1 + N(0, 0.1^2), embeddings ~ N(0, 0.5^2): the library's 0.02 init is nearly uniform attention."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            elif "embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.dim() == 2:
                gain = 2.0 if any(f".{n}." in name for n in ("query", "key", "query_global", "key_global")) else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * gain * p.shape[1] ** -0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def make_inputs(seed: int = 0, batch: int = B, length: int = N):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    global_mask = torch.zeros(batch, length, dtype=torch.long)
    global_mask[0, [0, 1, 17, length - 1]] = 1        # first, adjacent, middle, last
    if batch > 1:
        attention_mask[1, 29:] = 0                     # padded tail; its last valid token is global
        global_mask[1, [3, 5, 28]] = 1                 # inside each other's band
        global_mask[1, 33] = 1                         # global flag on a padded token: padding wins
    if batch > 2:
        attention_mask[2, 20:] = 0                     # no global token in this item
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD_ID)
    return dict(input_ids=input_ids, attention_mask=attention_mask, global_attention_mask=global_mask)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def run(model: nn.Module, inputs: dict, names) -> list[torch.Tensor]:
    with torch.inference_mode():
        out = model(**inputs)
    return [getattr(out, n) for n in names]


@pytest.fixture
def count_kernel_calls(monkeypatch):
    """Counts the patched forward's calls into the kernels (so a silent library fallback fails)."""
    calls = []
    real = integration.attention_with_layout

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(integration, "attention_with_layout", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32-cpu", "fp64-reference"])
@pytest.mark.parametrize("head", list(HEADS))
def test_every_head_matches_the_library(head, dtype, count_kernel_calls):
    cls, names = HEADS[head]
    model = randomize(cls(make_config()), seed=list(HEADS).index(head)).to(dtype).eval()
    inputs = make_inputs()
    with _softmax_keeps_float64() if dtype == torch.float64 else contextlib.nullcontext():
        ref = run(model, inputs, names)
        patch_longformer(model, backend=None if dtype == torch.float32 else "reference")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning: the fast path ran
            ours = run(model, inputs, names)
    assert count_kernel_calls == [("cpu" if dtype == torch.float32 else "reference")] * len(WINDOWS)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for name, a, b in zip(names, ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        err = rel_err(a, b)
        assert err <= tol, f"{head} {name}: relative error {err:.2e}"


def test_triton_backend_matches_the_library(count_kernel_calls):
    device = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: TRITON_INTERPRET=1 (conftest)
    model = randomize(LongformerModel(make_config(hidden=32, heads=2, windows=[4, 8])), seed=5).to(device).eval()
    inputs = {k: v[:2, :21].to(device) for k, v in make_inputs(length=37).items()}
    ref = run(model, inputs, ["last_hidden_state"])[0]
    patch_longformer(model, backend="triton")
    ours = run(model, inputs, ["last_hidden_state"])[0]
    assert count_kernel_calls == ["triton"] * 2
    assert rel_err(ours, ref) <= 1e-5


def test_no_global_tokens_and_no_masks():
    model = randomize(LongformerForTokenClassification(make_config()), seed=3).eval()
    ids = make_inputs()["input_ids"]
    ref = run(model, dict(input_ids=ids), ["logits"])[0]
    patch_longformer(model)
    assert rel_err(run(model, dict(input_ids=ids), ["logits"])[0], ref) <= 1e-5


def test_locore_wrapper_scores_unchanged():
    """The published LoCoRE object: a transformers Longformer inside a wrapper (language_model.longformer),
    built from LoCoRE's config with random reference-layout weights, scored as SPEC 2/4 say."""
    cfg = LoCoReConfig(hidden=64, num_layers=2, num_attention_heads=4, intermediate=128, attention_window=8,
                       local_dim=64, global_dim=64, max_position_embeddings=256)
    sd = random_reference_state_dict(cfg, seed=2)
    g = torch.Generator().manual_seed(0)
    Bq, K, S = 2, 5, 6
    inputs = [torch.randn(Bq, S, 64, generator=g), torch.randint(0, 3, (Bq, S), generator=g), torch.zeros(Bq, S),
              torch.randn(Bq, K, S, 64, generator=g), torch.randint(0, 3, (Bq, K, S), generator=g),
              (torch.rand(Bq, K, S, generator=g) < 0.3).float(),
              torch.randn(Bq, 64, generator=g), torch.randn(Bq, K, 64, generator=g)]
    inputs[2][1, :2] = 1
    for dtype, backend, tol in ((torch.float32, None, 1e-5), (torch.float64, "reference", 1e-10)):
        wrapper = nn.Module()
        wrapper.language_model = nn.Module()
        wrapper.language_model.longformer = build_hf_longformer(sd, cfg, dtype)
        wrapper.scale_encoder = nn.Embedding(cfg.num_scales, cfg.hidden)
        ref = hf_logits(wrapper.language_model.longformer, sd, cfg, *inputs)
        patch_longformer(wrapper, backend=backend)
        assert len(patched_modules(wrapper)) == cfg.num_layers
        ours = hf_logits(wrapper.language_model.longformer, sd, cfg, *inputs)
        for mode in ("max-start", "max-end", "max-sum"):
            err = rel_err(scores_from_logits(ours, K, S + 2, mode), scores_from_logits(ref, K, S + 2, mode))
            assert err <= tol, f"{dtype} {mode}: relative error {err:.2e}"


def test_unpatch_restores_exactly():
    model = randomize(LongformerForMaskedLM(make_config()), seed=7).eval()
    attn = [m for m in model.modules() if type(m).__name__ == "LongformerSelfAttention"]
    hooked = attn[1]
    sentinel = hooked.forward                       # a forward already set on the instance (as hooks do)
    hooked.forward = sentinel
    before_dicts = [dict(m.__dict__) for m in attn]
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = make_inputs()
    ref = run(model, inputs, ["logits"])[0]

    patch_longformer(model)
    patch_longformer(model, backend="reference")    # patching again only changes the backend
    assert [m.__dict__["_locore_patch"].backend for m in attn] == ["reference"] * len(attn)
    assert set(model.state_dict()) == set(before_sd)
    unpatch_longformer(model)

    assert patched_modules(model) == []
    for m, d in zip(attn, before_dicts):
        assert set(m.__dict__) == set(d)
    assert "forward" not in attn[0].__dict__ and hooked.__dict__["forward"] is sentinel
    assert all(torch.equal(v, before_sd[k]) for k, v in model.state_dict().items())
    assert torch.equal(run(model, inputs, ["logits"])[0], ref)
    assert unpatch_longformer(model) is model       # unpatching an unpatched model changes nothing


def test_fallbacks_warn_once_and_match_the_library(monkeypatch, count_kernel_calls):
    monkeypatch.setattr(integration, "_warned", set())
    model = randomize(LongformerForSequenceClassification(make_config()), seed=11).eval()
    inputs = make_inputs()
    ref = model(**inputs).logits                                  # grad enabled: the library path
    patch_longformer(model)
    with pytest.warns(RuntimeWarning, match="autograd is recording"):
        logits = model(**inputs).logits
    assert torch.equal(logits, ref) and count_kernel_calls == []
    logits.sum().backward()                                       # gradients flow through the fallback
    assert model.longformer.encoder.layer[0].attention.self.query.weight.grad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # the same reason warns only once
        model(**inputs)

    with torch.no_grad(), pytest.warns(RuntimeWarning, match="output_attentions"):
        out = model(**inputs, output_attentions=True)
    assert len(out.attentions) == len(WINDOWS) and len(out.global_attentions) == len(WINDOWS)
    assert count_kernel_calls == []

    model.train()
    model.longformer.encoder.layer[0].attention.self.dropout = 0.1
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="training mode"):
        model(**inputs)
    assert count_kernel_calls == ["cpu", "cpu"]                   # layers 1, 2 have no dropout: fast path
    count_kernel_calls.clear()
    model.eval()

    model64 = randomize(LongformerModel(make_config()), seed=1).double().eval()
    patch_longformer(model64)                                     # backend=None: no fast kernel for float64
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="no fast kernel for torch.float64"):
        model64(**inputs)
    assert count_kernel_calls == []


def test_bad_use_raises_clear_errors():
    with pytest.raises(ValueError, match="no LongformerSelfAttention module found in Sequential"):
        patch_longformer(nn.Sequential(nn.Linear(2, 2)))
    model = randomize(LongformerModel(make_config()), seed=1).eval()
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        patch_longformer(model, backend="cuda")
    patch_longformer(model.double(), backend="cpu")               # explicit backend: no silent fallback
    with torch.no_grad(), pytest.raises(ValueError, match="backend='cpu' computes in float32"):
        model(**make_inputs())
    attn = model.encoder.layer[0].attention.self
    with torch.no_grad(), pytest.raises(ValueError, match="called without attention_mask"):
        attn(torch.randn(1, 8, 32, dtype=torch.float64))


def test_direct_call_with_the_layers_mask_only():
    """Called on its own with just the layers' float mask (< 0 padding, 0 local, > 0 global)."""
    attn = randomize(LongformerModel(make_config()), seed=4).encoder.layer[1].attention.self.eval()
    hidden = torch.randn(2, 16, 32)
    mask = torch.zeros(2, 16)
    mask[0, 12:] = -10000.0
    mask[1, [0, 9]] = 10000.0
    args = dict(attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0, is_global_attn=True)
    with torch.no_grad():
        ref = attn(hidden, **args)[0]
        patch_longformer(attn)
        ours = attn(hidden, attention_mask=mask)[0]
    assert rel_err(ours, ref) <= 1e-5


def test_product_module_never_imports_transformers():
    root = Path(__file__).resolve().parents[1]
    code = ("import sys; import locore.integrations; "
            "assert 'transformers' not in sys.modules, 'locore.integrations imported transformers'")
    env = {"PYTHONPATH": f"{root / 'python'}:{root}", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)

