"""LoCoRe against the float64 oracle: transformers' LongformerModel + an independent SPEC 2/4 assembly.

Random reference-layout weights (scaled like trained ones) are saved as safetensors with the SPEC key
names, loaded through ``LoCoRe.from_pretrained``, and compared to the oracle: fp32 per-token logits and
every score mode (softmax off and on) within 1e-4 of the largest magnitude; float64 on the dense
reference attention within 1e-10. Small widths and short windows keep the module fast on a CPU while
the band still cuts through the sequence (N >> window).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from locore import LoCoRe, LoCoReConfig
from locore.config import ProjectionConfig
from hf_baseline import (build_hf_longformer, hf_logits, hf_score, random_reference_state_dict,
                                scores_from_logits)

MODES = ("max-start", "max-end", "max-sum", "max-prod")
FP32_TOL = 1e-4


def make_inputs(cfg: LoCoReConfig, B: int, K: int, S: int, with_global: bool, seed: int = 0):
    """AMES-style inputs: random descriptors, scale indices, 1 = padding; every batch item padded
    differently, the last slot padded in some gallery images (max-end then reads a padded token)."""
    g = torch.Generator().manual_seed(seed)
    ql = torch.randn(B, S, cfg.local_dim, generator=g)
    gl = torch.randn(B, K, S, cfg.local_dim, generator=g)
    qs = torch.randint(0, cfg.num_scales, (B, S), generator=g)
    gs = torch.randint(0, cfg.num_scales, (B, K, S), generator=g)
    qm = torch.zeros(B, S)
    gm = (torch.rand(B, K, S, generator=g) < 0.25).float()
    qm[0, -1] = 1                      # item 0: last query slot padded
    if B > 1:
        qm[1, : S // 2] = 1            # item 1: a different query mask (fewer global tokens)
    gm[0, 0, -1] = 1                   # a padded last slot
    gm[0, -1, :] = 1                   # a fully padded gallery image, the last one
    gm[:, -1, -1] = 1
    out = [ql, qs, qm, gl, gs, gm]
    if with_global:
        out += [torch.randn(B, cfg.global_dim, generator=g), torch.randn(B, K, cfg.global_dim, generator=g)]
    return out


def save_checkpoint(tmp_path, cfg: LoCoReConfig, seed: int = 0):
    sd = random_reference_state_dict(cfg, seed)
    path = tmp_path / "locore.safetensors"
    save_file(sd, str(path))
    return sd, path


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def check_against_oracle(model: LoCoRe, sd, inputs, tol: float = FP32_TOL, oracle_cfg=None):
    oracle_cfg = oracle_cfg or model.config
    hf = build_hf_longformer(sd, oracle_cfg, torch.float64)
    ref_logits = hf_logits(hf, sd, oracle_cfg, *inputs)
    logits = model(*inputs)
    assert logits.shape == ref_logits.shape
    assert rel_err(logits, ref_logits) <= tol, "per-token logits"
    B, K, S = inputs[5].shape
    T = S + 1 + (len(inputs) > 6)
    assert torch.equal(hf_score(hf, sd, oracle_cfg, *inputs, mode="max-sum"),
                       scores_from_logits(ref_logits, K, T, "max-sum"))
    for mode in MODES:
        for softmax in (False, True):
            ref = scores_from_logits(ref_logits, K, T, mode, softmax)
            ours = model.score(*inputs, mode=mode, softmax=softmax)
            assert ours.shape == (B, K)
            err = rel_err(ours, ref)
            assert err <= tol, f"{mode} softmax={softmax}: relative error {err:.2e}"


SMALL = dict(hidden=64, num_attention_heads=4, intermediate=128, attention_window=8)
CASES = {
    # name: (config, B, K, S, with_global)
    "linear-global-2layers": (LoCoReConfig(**SMALL, num_layers=2, local_dim=32, global_dim=48,
                                           local_projection=ProjectionConfig("linear"),
                                           global_projection=ProjectionConfig("linear")), 2, 7, 5, True),
    "bottleneck-gelu-noglobal-3layers": (LoCoReConfig(**SMALL, num_layers=3, local_dim=40, global_dim=None,
                                                      local_projection=ProjectionConfig("bottleneck", 24, "gelu")),
                                         2, 7, 5, False),
    "bottleneck-plain-K1-1layer": (LoCoReConfig(**SMALL, num_layers=1, local_dim=40, global_dim=24,
                                                local_projection=ProjectionConfig("bottleneck", 16),
                                                global_projection=ProjectionConfig("bottleneck", 16, "tanh")),
                                   2, 1, 6, True),
    "identity-K100": (LoCoReConfig(hidden=64, num_attention_heads=2, intermediate=128, attention_window=32,
                                   num_layers=1, local_dim=64, global_dim=64), 1, 100, 3, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_float64_oracle(tmp_path, case):
    cfg, B, K, S, with_global = CASES[case]
    act = cfg.local_projection.activation or cfg.global_projection.activation
    sd, path = save_checkpoint(tmp_path, cfg)
    overrides = dict(num_attention_heads=cfg.num_attention_heads, attention_window=cfg.attention_window)
    if act:
        overrides["projection_activation"] = act
    model = LoCoRe.from_pretrained(path, device="cpu", **overrides)
    # shapes cannot tell "no global token" from an identity global projection: it reads as the latter
    assert model.config == (cfg if cfg.global_dim else cfg.replace(global_dim=cfg.hidden))
    check_against_oracle(model, sd, make_inputs(cfg, B, K, S, with_global))


def test_float64_reference_backend_matches_oracle_to_1e10(tmp_path):
    cfg = CASES["linear-global-2layers"][0]
    sd, path = save_checkpoint(tmp_path, cfg)
    model = LoCoRe.from_pretrained(path, device="cpu", dtype="float64", num_attention_heads=4, attention_window=8)
    model.set_attention("reference")
    check_against_oracle(model, sd, make_inputs(cfg, 2, 7, 5, True), tol=1e-10)


def test_num_layers_and_window_overrides(tmp_path):
    cfg = LoCoReConfig(**SMALL, num_layers=3, local_dim=64, global_dim=64)
    sd, path = save_checkpoint(tmp_path, cfg)
    inputs = make_inputs(cfg, 2, 7, 5, True)
    model = LoCoRe.from_pretrained(path, device="cpu", num_layers=2, num_attention_heads=4, attention_window=12,
                                   layer_norm_eps=1e-6)
    assert len(model.layers) == 2 and model.config.one_sided_window == 6
    check_against_oracle(model, sd, inputs, oracle_cfg=cfg.replace(num_layers=2, attention_window=12,
                                                                  layer_norm_eps=1e-6))


def test_query_global_attention_off(tmp_path):
    cfg = LoCoReConfig(**SMALL, num_layers=2, local_dim=64, global_dim=64, query_global_attention=False)
    sd, path = save_checkpoint(tmp_path, cfg)
    model = LoCoRe.from_pretrained(path, device="cpu", num_attention_heads=4, attention_window=8,
                                   query_global_attention=False)
    check_against_oracle(model, sd, make_inputs(cfg, 2, 7, 5, False))


def test_backends_pruning_and_input_types_agree():
    """cpu vs reference attention, last-layer pruning on/off, numpy + float scales (AMES files) vs tensors."""
    model = LoCoRe.preset("tiny", device="cpu", num_layers=2, attention_window=16)
    inputs = make_inputs(model.config, 2, 9, 6, True, seed=3)
    model.set_attention("reference")
    ref = {m: model.score(*inputs, mode=m) for m in MODES}
    ref_logits = model(*inputs)
    model.set_attention("cpu")
    assert rel_err(model(*inputs), ref_logits) <= 1e-5
    as_numpy = [t.numpy() for t in inputs]
    as_numpy[1], as_numpy[4] = as_numpy[1].astype(np.float32), as_numpy[4].astype(np.float32)
    for mode in MODES:
        assert rel_err(model.score(*inputs, mode=mode), ref[mode]) <= 1e-5
        assert torch.equal(model.score(*as_numpy, mode=mode), model.score(*inputs, mode=mode))
        model.prune_last_layer = False
        assert rel_err(model.score(*inputs, mode=mode), ref[mode]) <= 1e-5
        model.prune_last_layer = True


def test_set_attention_callable_is_used_by_every_layer():
    model = LoCoRe.preset("tiny", device="cpu", num_layers=3, attention_window=16)
    inputs = make_inputs(model.config, 1, 4, 5, True)
    calls = []

    def attend(q, k, v, qg, kg, vg, layout):
        calls.append(q.shape)
        from locore_kernels import attention_with_layout
        return attention_with_layout(q, k, v, qg, kg, vg, layout, backend="reference")

    model.set_attention(attend)
    model(*inputs)
    assert len(calls) == 3
    calls.clear()
    model.score(*inputs, mode="max-end")  # the pruned last layer calls it too, on the whole sequence
    assert len(calls) == 3
    with pytest.raises(ValueError, match="attention must be"):
        model.set_attention("gpu")


def test_set_attention_backend_governs_the_pruned_rows_layer(monkeypatch):
    """A backend name reaches the pruned last layer through locore_kernels.attention_rows."""
    import locore.model as model_module

    seen = []
    real = model_module.attention_rows

    def rows_op(q_rows, k, v, rows, layout, *, backend=None):
        seen.append((backend, q_rows.shape[1]))
        return real(q_rows, k, v, rows, layout, backend=backend)

    monkeypatch.setattr(model_module, "attention_rows", rows_op)
    model = LoCoRe.preset("tiny", device="cpu", num_layers=2, attention_window=16)
    inputs = make_inputs(model.config, 1, 4, 5, True)
    model.set_attention("reference")
    pruned = model.score(*inputs, mode="max-end")
    assert seen == [("reference", 4)]  # one call, the last layer, K = 4 rows
    model.prune_last_layer = False
    assert rel_err(model.score(*inputs, mode="max-end"), pruned) <= 1e-5
    assert len(seen) == 1
    model.prune_last_layer = True
    seen.clear()
    model.score(*inputs, mode="max-sum")  # reads every column: never pruned
    assert seen == []


def test_meta_device_inputs_are_refused():
    model = LoCoRe.preset("tiny", device="cpu", num_layers=1)
    inputs = make_inputs(model.config, 1, 3, 4, True)
    inputs[3] = inputs[3].to("meta")
    with pytest.raises(ValueError, match="gallery_local is a meta-device tensor"):
        model.score(*inputs)


def test_input_validation_messages():
    model = LoCoRe.preset("tiny", device="cpu", num_layers=1)
    ql, qs, qm, gl, gs, gm, qg, gg = make_inputs(model.config, 1, 3, 4, True)
    bad = {
        "query_local must have shape": (ql[..., :10], qs, qm, gl, gs, gm),
        "gallery_local must have shape": (ql, qs, qm, gl[:, :, :2], gs, gm),
        "gallery_mask must have shape": (ql, qs, qm, gl, gs, gm[:, :2]),
        r"values must lie in 0\.\.2": (ql, qs + 3, qm, gl, gs, gm),
        "integer scale indices": (ql, qs + 0.5, qm, gl, gs, gm),
        "0/1 or bool": (ql, qs, qm * 2 + 2, gl, gs, gm),
        "NaN": (ql * float("nan"), qs, qm, gl, gs, gm),
        "floating point": (ql.long(), qs, qm, gl, gs, gm),
        "give both": (ql, qs, qm, gl, gs, gm, qg, None),
        "query_global must have shape": (ql, qs, qm, gl, gs, gm, qg[:, :5], gg),
        "torch.Tensor or a numpy array": (ql.tolist(), qs, qm, gl, gs, gm),
    }
    for msg, args in bad.items():
        with pytest.raises(ValueError, match=msg):
            model.score(*args)
    with pytest.raises(ValueError, match="mode must be one of"):
        model.score(ql, qs, qm, gl, gs, gm, mode="max-mean")
    no_global = LoCoRe.preset("tiny", device="cpu", num_layers=1, global_dim=None)
    with pytest.raises(ValueError, match="takes no global descriptors"):
        no_global.score(ql, qs, qm, gl, gs, gm, qg, gg)


def test_device_and_dtype_strings():
    model = LoCoRe.preset("tiny", device="cpu", dtype="float64", num_layers=1)
    assert model.dtype == torch.float64 and model.device.type == "cpu"
    with pytest.raises(ValueError, match="unknown dtype"):
        LoCoRe.preset("tiny", device="cpu", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            LoCoRe.preset("tiny", device="cuda")


def test_l2_normalised_projections(tmp_path):
    cfg = LoCoReConfig(**SMALL, num_layers=1, local_dim=32, global_dim=48, l2_normalize=True,
                       local_projection=ProjectionConfig("linear"), global_projection=ProjectionConfig("linear"))
    sd, path = save_checkpoint(tmp_path, cfg)
    model = LoCoRe.from_pretrained(path, device="cpu", num_attention_heads=4, attention_window=8, l2_normalize=True)
    assert model.config == cfg
    check_against_oracle(model, sd, make_inputs(cfg, 2, 5, 4, True))


def test_large_layer_norm_eps_reaches_every_layer_norm(tmp_path):
    """layer_norm_eps = 1.0: a LayerNorm that ignores the configured eps (a hard-coded 1e-5) moves the
    logits by order 1, far past the 1e-4 bound. The oracle side shows the case is sensitive to each of
    the embedding LayerNorm and both LayerNorms of every layer."""
    cfg = LoCoReConfig(**SMALL, num_layers=2, local_dim=32, global_dim=48, layer_norm_eps=1.0,
                       local_projection=ProjectionConfig("linear"), global_projection=ProjectionConfig("linear"))
    sd, path = save_checkpoint(tmp_path, cfg)
    model = LoCoRe.from_pretrained(path, device="cpu", num_attention_heads=4, attention_window=8, layer_norm_eps=1.0)
    assert model.config.layer_norm_eps == 1.0
    inputs = make_inputs(cfg, 2, 5, 4, True)
    check_against_oracle(model, sd, inputs)
    logits = model(*inputs)
    hf = build_hf_longformer(sd, cfg, torch.float64)
    norms = {"embeddings": hf.embeddings.LayerNorm}
    for i, layer in enumerate(hf.encoder.layer):
        norms[f"layer {i} attention output"] = layer.attention.output.LayerNorm
        norms[f"layer {i} output"] = layer.output.LayerNorm
    for name, ln in norms.items():
        ln.eps = 1e-5
        err = rel_err(logits, hf_logits(hf, sd, cfg, *inputs))
        ln.eps = 1.0
        assert err > 100 * FP32_TOL, f"eps of the {name} LayerNorm changes the logits by only {err:.1e}"
