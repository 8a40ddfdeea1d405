"""torch.compile(fullgraph=True) of the whole model on CPU (C++ attention backend): ``LoCoRe.score`` and
``LoCoRe.forward`` trace as ONE graph (input checks, layout, embedding, every layer, scoring) and give the
eager scores and logits to 1e-5; the input checks still fire inside the compiled graph.

The default path (max-end: a whole layer, then the pruned last layer through the rows op) compiles with
inductor; max-sum and forward with ``aot_eager`` (Dynamo + AOTAutograd: the same trace, fake kernels
and functionalization, without inductor's C++ code generation, which costs tens of seconds cold)."""
from __future__ import annotations

import pytest
import torch

from locore.model import LoCoRe

B, K, S, D_LOCAL, D_GLOBAL = 2, 4, 6, 32, 24


@pytest.fixture(scope="module")
def model() -> LoCoRe:
    torch._dynamo.reset()
    # two layers: a whole one (attention op), then under max-end the pruned one (rows op); a small
    # window (w = 4) so that the band and the global tokens both matter at N = 5 * 8 = 40
    return LoCoRe.preset("tiny", device="cpu", num_layers=2, local_dim=D_LOCAL, global_dim=D_GLOBAL,
                         attention_window=8).set_attention("cpu")


def inputs(seed: int = 0) -> tuple:
    """Padding in the query (so fewer global tokens than the compiled layout's bound) and in the gallery."""
    g = torch.Generator().manual_seed(seed)
    ql, gl = torch.randn(B, S, D_LOCAL, generator=g), torch.randn(B, K, S, D_LOCAL, generator=g)
    qs, gs = torch.randint(0, 3, (B, S), generator=g), torch.randint(0, 3, (B, K, S), generator=g)
    qm, gm = torch.zeros(B, S, dtype=torch.bool), torch.zeros(B, K, S, dtype=torch.bool)
    qm[1, -2:] = True
    gm[0, 1, -3:] = True
    gm[1, 3, 1] = True
    qg, gg = torch.randn(B, D_GLOBAL, generator=g), torch.randn(B, K, D_GLOBAL, generator=g)
    return ql, qs, qm, gl, gs, gm, qg, gg


@pytest.fixture(scope="module")
def compiled_score(model):
    return torch.compile(model.score, fullgraph=True)   # inductor


def test_compiled_score_matches_eager(model, compiled_score):
    x = inputs()
    eager = model.score(*x)   # max-end
    compiled = compiled_score(*x)
    assert compiled.shape == (B, K) and compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    # new values, same shapes: the same graph runs again (no retrace) and still matches
    x2 = inputs(seed=1)
    torch.testing.assert_close(compiled_score(*x2), model.score(*x2), atol=1e-5, rtol=1e-5)


def test_traced_max_sum_scores_match_eager(model):
    traced = torch.compile(model.score, fullgraph=True, backend="aot_eager")
    x = inputs()
    torch.testing.assert_close(traced(*x, mode="max-sum"), model.score(*x, mode="max-sum"), atol=1e-5, rtol=1e-5)
    x = [t[:, :3] if i in (3, 4, 5, 7) else t for i, t in enumerate(x)]   # K = 3: a new shape, traced again
    torch.testing.assert_close(traced(*x, mode="max-sum"), model.score(*x, mode="max-sum"), atol=1e-5, rtol=1e-5)


def test_traced_forward_matches_eager_logits(model):
    x = inputs()
    traced = torch.compile(model.forward, fullgraph=True, backend="aot_eager")(*x)
    assert traced.shape == (B, (1 + K) * (S + 2), 2)
    torch.testing.assert_close(traced, model(*x), atol=1e-5, rtol=1e-5)


def test_score_is_one_graph_without_breaks(model):
    explained = torch._dynamo.explain(model.score)(*inputs(), mode="max-end")
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_fullgraph_raises_on_a_graph_break(model):
    """The check above can fail: an attention callable that breaks the graph is refused."""
    def attend_with_break(q, k, v, qg, kg, vg, layout):
        torch._dynamo.graph_break()
        return torch.ops.locore.attention(q, k, v, qg, kg, vg, layout.is_global, layout.key_padding,
                                          layout.band_key, layout.global_idx, layout.num_global,
                                          layout.one_sided_window, "cpu")
    model.set_attention(attend_with_break)
    try:
        with pytest.raises(torch._dynamo.exc.Unsupported):
            torch.compile(model.forward, fullgraph=True, backend="aot_eager")(*inputs())
    finally:
        model.set_attention("cpu")


def test_input_checks_run_inside_the_compiled_graph(model, compiled_score):
    x = list(inputs())
    compiled_score(*x)
    bad = [t.clone() for t in x]
    bad[3][1, 2, 0, 5] = float("nan")
    with pytest.raises(RuntimeError, match="gallery_local contains NaN or infinite values"):
        compiled_score(*bad)
    bad = [t.clone() for t in x]
    bad[1][0, 3] = 7
    with pytest.raises(RuntimeError, match=r"query_scales values must lie in 0\.\.2"):
        compiled_score(*bad)
