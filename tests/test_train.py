"""locore.train: samples, token labels, the training graph against the inference path, checkpoints that
from_pretrained loads, exact resume, label sources, DDP (2 gloo processes) against one process, the CLI."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from locore.checkpoint import save_pretrained
from locore.demo import generate_problem
from locore.model import LoCoRe
from locore.train import (IGNORE, STATE_FILE, TokenClassifier, TrainError, TrainSettings, dense_attention_with_dropout,
                          make_sample, step_checkpoints, token_labels, token_loss, train, trainable_attention)

SMALL = dict(hidden=32, num_layers=2, num_attention_heads=2, intermediate=64, local_dim=16, global_dim=16,
             attention_window=8)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("train-data"))
    generate_problem(folder, queries=8, images=140, slots=6, num_descriptors=4, local_dim=16, global_dim=16, seed=3)
    return folder


def settings(problem, out, **kw) -> TrainSettings:
    base = dict(data=problem, desc="demo", out_dir=str(out), checkpoint="preset:tiny", overrides=SMALL,
                list_size=5, topk=20, max_pos=2, descriptors=4, batch_size=2, max_steps=3, lr=1e-3,
                hidden_dropout=0.1, progress=False, attention="reference")
    base.update(kw)
    return TrainSettings(**base)


def small_model(seed=0, dtype=torch.float32) -> LoCoRe:
    return LoCoRe.preset("tiny", device="cpu", dtype=dtype, seed=seed, **SMALL)


def inputs(B=2, K=3, S=4, seed=0, labels=True):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, K, S, dtype=torch.bool)
    mask[0, 1, -2:] = True
    out = dict(query_local=torch.randn(B, S, 16, generator=g), query_scales=torch.randint(0, 3, (B, S), generator=g),
               query_mask=torch.zeros(B, S, dtype=torch.bool), gallery_local=torch.randn(B, K, S, 16, generator=g),
               gallery_scales=torch.randint(0, 3, (B, K, S), generator=g), gallery_mask=mask,
               query_global=torch.randn(B, 16, generator=g), gallery_global=torch.randn(B, K, 16, generator=g))
    out["query_mask"][-1, -1] = True
    if labels:
        out["labels"] = torch.randint(0, 2, (B, K), generator=g)
    return out


# ------------------------------------------------------------------------------------------------
# samples and labels

def test_token_labels_every_gallery_token_gets_its_image_label_query_ignored():
    y = token_labels(torch.tensor([[1, 0, 1]]), T=4)
    assert y.tolist() == [[IGNORE] * 4 + [1] * 4 + [0] * 4 + [1] * 4]


def test_make_sample_caps_positives_skips_junk_and_shuffles():
    ids = np.arange(30)
    positives, junk = np.array([0, 1, 2, 3, 4, 25]), np.array([5, 6])
    orders = set()
    for seed in range(20):
        chosen, y = make_sample(ids[:20], positives, junk, K=10, max_pos=3, rng=np.random.default_rng(seed))
        assert len(chosen) == 10 and len(set(chosen.tolist())) == 10
        assert not np.isin(chosen, junk).any() and np.isin(chosen, ids[:20]).all()  # first topk only, no junk
        assert (y == np.isin(chosen, positives)).all() and y.sum() == 3
        orders.add(tuple(np.flatnonzero(y)))
    assert len(orders) > 5  # positives land at different places: the gallery order is shuffled


def test_make_sample_refuses_lists_too_short():
    with pytest.raises(TrainError, match="raise topk"):
        make_sample(np.arange(6), np.array([0, 1, 2, 3]), np.array([5]), K=4, max_pos=1,
                    rng=np.random.default_rng(0))


# ------------------------------------------------------------------------------------------------
# the training graph

def test_training_graph_matches_inference_path_without_dropout():
    model = small_model()
    x = inputs()
    want = model(*(x[k] for k in ("query_local", "query_scales", "query_mask", "gallery_local", "gallery_scales",
                                  "gallery_mask", "query_global", "gallery_global")))
    for attend in (trainable_attention(None), trainable_attention("reference")):
        net = TokenClassifier(model, attend, hidden_dropout=0.1).eval()  # eval: no dropout
        got, labels = net(x)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        assert labels.shape == got.shape[:2]


def test_dropout_only_in_training_and_gradients_reach_every_parameter():
    model = small_model().requires_grad_(True)
    net = TokenClassifier(model, trainable_attention("reference"), hidden_dropout=0.5)
    x = inputs()
    net.eval()
    a, _ = net(x)
    b, _ = net(x)
    assert torch.equal(a, b)
    net.train()
    c, labels = net(x)
    assert not torch.allclose(a, c)
    token_loss(c, labels).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_attention_dropout_drops_probabilities_on_the_dense_path():
    model = small_model().requires_grad_(True)
    x = inputs()
    plain = TokenClassifier(model, trainable_attention("reference"), 0.0).train()
    torch.manual_seed(0)
    a, _ = plain(x)
    b, _ = TokenClassifier(model, dense_attention_with_dropout(0.0), 0.0).train()(x)
    torch.testing.assert_close(a, b)
    torch.manual_seed(0)
    c, labels = TokenClassifier(model, dense_attention_with_dropout(0.5), 0.0).train()(x)
    assert not torch.allclose(a, c)
    token_loss(c, labels).backward()
    assert model.layers[0].qkv.weight.grad.abs().sum() > 0


def test_training_graph_gradient_float64():
    """float64 gradcheck of the loss through the whole training graph w.r.t. the classifier and one
    projection (dropout off; the attention's own gradcheck lives with the attention backward)."""
    model = small_model(dtype=torch.float64)
    net = TokenClassifier(model, trainable_attention("reference"), 0.0).eval()
    x = inputs(B=1, K=2, S=3)
    W = model.layers[1].qkv.weight

    def loss_of(w):
        with torch.no_grad():
            W.copy_(w)
        W.requires_grad_(True)
        logits, labels = net(x)
        return token_loss(logits, labels)

    w0 = W.detach().clone()
    loss = loss_of(w0)
    (grad,) = torch.autograd.grad(loss, W)
    direction = torch.randn_like(w0)
    eps = 1e-6
    numeric = (loss_of(w0 + eps * direction).detach() - loss_of(w0 - eps * direction).detach()) / (2 * eps)
    analytic = float((grad * direction).sum())
    assert abs(float(numeric) - analytic) < 1e-6 * max(1.0, abs(analytic)), (float(numeric), analytic)


# ------------------------------------------------------------------------------------------------
# the loop: checkpoints, resume, labels

def test_train_saves_published_layout_that_from_pretrained_loads(problem, tmp_path):
    r = train(settings(problem, tmp_path / "run", max_steps=3, holdout=2, eval_every=2))
    assert r.steps == 3 and len(r.losses) == 3 and all(np.isfinite(r.losses))
    assert os.path.basename(r.checkpoint) == "step-000003"
    assert sorted(os.listdir(r.checkpoint)) == ["config.json", "model.safetensors", STATE_FILE]
    assert [e["step"] for e in r.evals] == [2, 3] and 0 <= r.evals[-1]["reranked_mAP"] <= 100
    loaded = LoCoRe.from_pretrained(r.checkpoint)
    assert loaded.config == small_model().config
    with open(os.path.join(r.checkpoint, "config.json")) as f:
        assert json.load(f)["num_attention_heads"] == 2
    start = small_model()
    moved = [n for n, p in loaded.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert "classifier.weight" in moved and "layers.0.qkv.weight" in moved
    assert not any(n.startswith(".") for n in os.listdir(tmp_path / "run"))  # no temporary left behind


def test_resume_gives_the_same_weights_as_one_run(problem, tmp_path):
    one = train(settings(problem, tmp_path / "one", max_steps=4))
    train(settings(problem, tmp_path / "two", max_steps=2))
    resumed = train(settings(problem, tmp_path / "two", max_steps=4))
    assert resumed.steps == 4 and len(resumed.losses) == 2
    assert resumed.losses == pytest.approx(one.losses[2:], rel=1e-5)
    a, b = LoCoRe.from_pretrained(one.checkpoint), LoCoRe.from_pretrained(resumed.checkpoint)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)
    assert [os.path.basename(p) for p in step_checkpoints(str(tmp_path / "two"))] == ["step-000002", "step-000004"]


def test_starts_from_a_published_layout_checkpoint(problem, tmp_path):
    start = small_model(seed=5)
    folder = save_pretrained(start, str(tmp_path / "start"))
    r = train(settings(problem, tmp_path / "run", checkpoint=folder, overrides={}, max_steps=1, lr=1e-6))
    trained = LoCoRe.from_pretrained(r.checkpoint)
    w0, w1 = start.classifier.weight, trained.classifier.weight
    assert not torch.equal(w0, w1) and torch.allclose(w0, w1, atol=1e-4)  # one tiny step from those weights


def test_labels_from_ok_lists_and_class_labels(problem, tmp_path):
    with open(os.path.join(problem, "gnd_demo.pkl"), "rb") as f:
        gnd = pickle.load(f)
    ok = {"gnd": [{"ok": list(g["easy"]) + list(g["hard"])} for g in gnd["gnd"]], "imlist": gnd["imlist"],
          "qimlist": gnd["qimlist"]}
    with open(tmp_path / "gnd_ok.pkl", "wb") as f:
        pickle.dump(ok, f)
    r = train(settings(problem, tmp_path / "ok", gnd=str(tmp_path / "gnd_ok.pkl"), max_steps=1))
    assert r.steps == 1
    db = np.zeros(140, np.int64)
    for q, g in enumerate(gnd["gnd"]):
        db[list(g["easy"]) + list(g["hard"])] = q + 1
    np.save(tmp_path / "q.npy", np.arange(1, 9))
    np.save(tmp_path / "d.npy", db)
    r = train(settings(problem, tmp_path / "cls", query_labels=str(tmp_path / "q.npy"),
                       db_labels=str(tmp_path / "d.npy"), max_steps=1))
    assert r.steps == 1
    np.save(tmp_path / "bad.npy", np.arange(3))
    with pytest.raises(ValueError, match="bad.npy: expected one label per queries"):
        train(settings(problem, tmp_path / "bad", query_labels=str(tmp_path / "bad.npy"),
                       db_labels=str(tmp_path / "d.npy"), max_steps=1))


@pytest.mark.parametrize("change, match", [(dict(topk=3), "topk"), (dict(hidden_dropout=1.0), "hidden_dropout"),
                                           (dict(batch_size=0), "batch_size"), (dict(holdout=8), "no training query")])
def test_bad_settings_are_one_line_errors(problem, tmp_path, change, match):
    with pytest.raises(TrainError, match=match):
        train(settings(problem, tmp_path / "x", **change))


# ------------------------------------------------------------------------------------------------
# DDP and CLI

DDP_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from locore.train import TrainSettings, train
data, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
train(TrainSettings(data=data, desc="demo", out_dir=out, checkpoint="preset:tiny", overrides=%r, list_size=5,
                    topk=20, max_pos=2, descriptors=4, batch_size=batch, max_steps=3, lr=1e-3, hidden_dropout=0.0,
                    progress=False, attention="reference"))
""" % (SMALL,)


def test_ddp_two_gloo_processes_match_one_process_with_the_same_global_batch(problem, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), ROOT]), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(script), problem, str(tmp_path / "one"), "4"], check=True, env=env,
                   timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(script), problem, str(tmp_path / "two"), "2"], check=True, env=env, timeout=300)
    a = LoCoRe.from_pretrained(step_checkpoints(str(tmp_path / "one"))[-1])
    b = LoCoRe.from_pretrained(step_checkpoints(str(tmp_path / "two"))[-1])
    start = small_model()
    H = start.config.hidden
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if n.endswith("qkv.bias"):
            # the key biases (rows key and key_global) get a gradient that is mathematically 0 (softmax is
            # shift invariant): rounding noise, which Adam scales up to steps of up to lr, differs with
            # the summation order; they are held to steps * lr, every other weight to 1e-5
            keys = torch.zeros(5 * H, dtype=torch.bool)
            keys[H:2 * H] = keys[3 * H:4 * H] = True
            assert (p[keys] - q[keys]).abs().max() <= 3 * 1e-3
            p, q = p[~keys], q[~keys]
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)
    assert not torch.equal(a.classifier.weight, start.classifier.weight)
    state = torch.load(os.path.join(step_checkpoints(str(tmp_path / "two"))[-1], STATE_FILE), weights_only=True)
    assert state["world_size"] == 2 and state["global_batch"] == 4


def test_cli_train_maps_flags_to_settings(problem, tmp_path, capsys):
    from locore.cli import main

    rc = main(["train", "--data", problem, "--desc", "demo", "--out", str(tmp_path / "cli"), "--num-layers", "1",
               "--list-size", "4", "--topk", "20", "--descriptors", "4", "--batch-size", "1", "--max-steps", "1",
               "--attention", "reference", "--no-progress", "--checkpoint", str(_small_folder(tmp_path))])
    assert rc == 0
    out = capsys.readouterr().out
    assert "step-000001" in out
    assert LoCoRe.from_pretrained(str(tmp_path / "cli" / "step-000001")).config.num_layers == 1
    rc = main(["train", "--data", problem, "--desc", "demo", "--out", str(tmp_path / "bad"), "--topk", "2"])
    assert rc == 2 and "topk" in capsys.readouterr().err


def _small_folder(tmp_path):
    return save_pretrained(small_model(), str(tmp_path / "small"))
