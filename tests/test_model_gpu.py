"""GPU model paths: fp32 "exact" (Triton attention, no TF32) vs the float64 oracle, bf16 vs fp32 agreement,
CUDA-graph replay vs eager. Marked gpu: skipped cleanly without a CUDA device."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from locore import LoCoRe, LoCoReConfig
from locore.data import LocalBatch
from locore.rerank import DatasetReranker, Sliding
from hf_baseline import build_hf_longformer, hf_logits, random_reference_state_dict, scores_from_logits

pytestmark = pytest.mark.gpu

MODES = ("max-start", "max-end", "max-sum", "max-prod")


def inputs(cfg: LoCoReConfig, B: int, K: int, S: int, seed: int = 0, device: str = "cuda"):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(B, S, cfg.local_dim, generator=g), torch.randint(0, cfg.num_scales, (B, S), generator=g),
           (torch.rand(B, S, generator=g) < 0.1).float(), torch.randn(B, K, S, cfg.local_dim, generator=g),
           torch.randint(0, cfg.num_scales, (B, K, S), generator=g), (torch.rand(B, K, S, generator=g) < 0.2).float(),
           torch.randn(B, cfg.global_dim, generator=g), torch.randn(B, K, cfg.global_dim, generator=g)]
    out[5][:, -1, -1] = 1  # a padded last slot
    return [t.to(device) for t in out]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().double().argsort().argsort().double()
    rb = b.flatten().double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_fp32_cuda_matches_float64_oracle(tmp_path):
    cfg = LoCoReConfig(hidden=128, num_layers=2, num_attention_heads=2, intermediate=256, attention_window=32,
                       local_dim=128, global_dim=128)
    sd = random_reference_state_dict(cfg)
    save_file(sd, str(tmp_path / "m.safetensors"))
    model = LoCoRe.from_pretrained(tmp_path / "m.safetensors", device="cuda", num_attention_heads=2,
                                   attention_window=32)
    x = inputs(cfg, 2, 20, 6)
    hf = build_hf_longformer(sd, cfg, torch.float64)
    ref_logits = hf_logits(hf, sd, cfg, *[t.cpu() for t in x])
    logits = model(*x).cpu().double()
    assert (logits - ref_logits).abs().max() / ref_logits.abs().max() <= 1e-4
    for mode in MODES:
        ref = scores_from_logits(ref_logits, 20, 8, mode)
        ours = model.score(*x, mode=mode).cpu().double()
        assert (ours - ref).abs().max() / ref.abs().max() <= 1e-4, mode


def test_bf16_agrees_with_fp32_at_base_width():
    fp32 = LoCoRe.preset("small", device="cuda", dtype="float32", seed=0)
    bf16 = LoCoRe.preset("small", device="cuda", dtype="bfloat16", seed=0)
    x = inputs(fp32.config, 2, 100, 48, seed=1)
    for mode in ("max-end", "max-sum"):
        a = fp32.score(*x, mode=mode)
        b = bf16.score(*x, mode=mode)
        assert b.dtype == torch.float32
        max_abs = (a - b).abs().max().item()
        rho = spearman(a, b)
        print(f"bf16 vs fp32 {mode}: max |d| = {max_abs:.3e} (scores up to {a.abs().max().item():.3f}), "
              f"Spearman = {rho:.4f}")
        assert rho >= 0.95
        assert max_abs <= 0.1 * a.abs().max().item()


def test_cuda_graph_replay_matches_eager():
    model = LoCoRe.preset("tiny", device="cuda", seed=0)
    x1 = inputs(model.config, 2, 30, 10, seed=1)
    x2 = inputs(model.config, 2, 30, 10, seed=2)
    x2[2] = x1[2].clone()  # same query padding -> same number of global tokens -> the same graph
    for mode in ("max-end", "max-sum"):
        for x in (x1, x2, x1):
            eager = model.score(*x, mode=mode)
            graphed = model.score(*x, mode=mode, cuda_graph=True)
            torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    assert len(model._graphs) == 2  # one capture per mode
    x3 = inputs(model.config, 2, 30, 10, seed=3)  # other query padding: recaptured if G changed
    torch.testing.assert_close(model.score(*x3, cuda_graph=True), model.score(*x3), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs a model on a CUDA device"):
        LoCoRe.preset("tiny", device="cpu", num_layers=1).score(*[t.cpu() for t in x1], cuda_graph=True)


def test_cpu_and_cuda_models_agree():
    cpu = LoCoRe.preset("tiny", device="cpu", seed=4)
    gpu = LoCoRe.preset("tiny", device="cuda", seed=4)
    x = inputs(cpu.config, 1, 50, 12, seed=5)
    a = cpu.score(*[t.cpu() for t in x])
    b = gpu.score(*x).cpu()
    assert (a - b).abs().max() / a.abs().max() <= 1e-4


class _SlowLocal:
    """In-memory local descriptors; ``read`` sleeps so the reranker's loader thread is still copying the
    next batch to the GPU while the main thread captures its first CUDA graph."""

    def __init__(self, n: int, S: int, D: int, num_scales: int, seed: int):
        g = np.random.default_rng(seed)
        self.desc = g.standard_normal((n, S, D)).astype(np.float32)
        self.scales = g.integers(0, num_scales, (n, S))
        self.mask = g.random((n, S)) < 0.2
        self.num_descriptors = S

    def read(self, ids):
        time.sleep(0.05)
        ids = np.asarray(ids).reshape(-1)
        return LocalBatch(desc=self.desc[ids], scales=self.scales[ids], mask=self.mask[ids])


def test_rerank_with_cuda_graphs_while_the_loader_thread_copies():
    model = LoCoRe.preset("tiny", device="cuda", seed=0, num_layers=2)
    cfg = model.config
    q_local, g_local = _SlowLocal(4, 10, cfg.local_dim, cfg.num_scales, 1), _SlowLocal(40, 10, cfg.local_dim, cfg.num_scales, 2)
    rng = np.random.default_rng(3)
    ids = np.stack([rng.permutation(40)[:30] for _ in range(4)])
    sims = np.sort(rng.uniform(0.2, 0.9, ids.shape), axis=1)[:, ::-1].copy()
    method = Sliding("end-to-start", 30, 20, 10)
    ranks = {}
    for graph in (False, True):
        reranker = DatasetReranker(model, q_local, g_local, alpha=0.5, temp=0.1, batch_size=1, cuda_graph=graph)
        ranks[graph], _ = reranker.rerank(ids, sims, method, progress=False)
    np.testing.assert_array_equal(ranks[True], ranks[False])
