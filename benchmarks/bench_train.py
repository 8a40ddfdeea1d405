"""One training step (forward + backward, no optimizer) of a LoCoRE model at N = (1 + K) * T tokens.

Implementations, each measured in its own subprocess (so one's peak RSS never hides another's):
* ``locore``: ``locore.train.TokenClassifier`` with the memory-lean attention backward
  (``locore_kernels.autograd``; C++ on CPU, Triton on CUDA) - when that module is present;
* ``locore-dense``: the same graph on the dense reference attention's autograd (O(N^2) saved probabilities);
* ``transformers``: transformers' ``LongformerModel`` + the token classifier, same weights, fed the
  assembled token embeddings (``benchmarks/hf_baseline.py``; the descriptor projections are the identity
  for the small model, so nothing is left out).
All three: the token-label cross-entropy of SPEC section 10, hidden dropout 0.1, attention dropout 0, fp32
on CPU; on CUDA bf16 autocast. Reported: median step time over ``--runs`` timed steps after one warm-up,
and peak RSS of one step above the process's RSS before it (VmHWM reset; CPU) or
``torch.cuda.max_memory_allocated`` (CUDA), plus the process's whole peak.

    python benchmarks/bench_train.py --cpu                 # small model, K = 100 (N = 5050), CPU
    python benchmarks/bench_train.py --layers 1 --impls locore-dense
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "python"), str(ROOT), str(HERE)]

IMPLS = ("locore", "locore-dense", "transformers")


def child(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from harness import _reset_rss_peak, _rss_kb, release_memory
    from locore.model import LoCoRe
    from locore.train import TokenClassifier, token_labels, token_loss, trainable_attention

    device = torch.device("cuda" if args.cuda else "cpu")
    layers = {"num_layers": args.layers} if args.layers else {}
    model = LoCoRe.preset(args.model, device=device, seed=0, **layers).requires_grad_(True)
    cfg = model.config
    S, K, B = args.descriptors, args.gallery, args.batch
    g = torch.Generator().manual_seed(0)
    x = dict(query_local=torch.randn(B, S, cfg.local_dim, generator=g), query_scales=torch.randint(0, 3, (B, S), generator=g),
             query_mask=torch.zeros(B, S, dtype=torch.bool), gallery_local=torch.randn(B, K, S, cfg.local_dim, generator=g),
             gallery_scales=torch.randint(0, 3, (B, K, S), generator=g), gallery_mask=torch.rand(B, K, S, generator=g) < 0.05,
             query_global=torch.randn(B, cfg.global_dim, generator=g),
             gallery_global=torch.randn(B, K, cfg.global_dim, generator=g),
             labels=torch.randint(0, 2, (B, K), generator=g))
    T = S + 2
    row = {"impl": args.impl, "model": args.model, "layers": cfg.num_layers, "N": (1 + K) * T, "batch": B,
           "device": str(device)}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    if args.impl.startswith("locore"):
        if args.impl == "locore":
            try:
                import locore_kernels.autograd  # noqa: F401
            except ImportError:
                return {**row, "skipped": "locore_kernels.autograd (the attention backward) is not on this branch"}
            attend = trainable_attention(None)
        else:
            attend = trainable_attention("reference")
        net = TokenClassifier(model, attend, hidden_dropout=0.1).train()

        def step() -> None:
            model.zero_grad(set_to_none=True)
            with autocast:
                logits, labels = net(x)
                loss = token_loss(logits, labels)
            loss.backward()
    else:
        from hf_baseline import build_hf_longformer, hf_logits
        from locore.checkpoint import state_dict_to_reference

        sd = state_dict_to_reference(model)
        hf = build_hf_longformer(sd, cfg, dtype=torch.float32).to(device)
        hf.config.hidden_dropout_prob = 0.1
        for m in hf.modules():
            if isinstance(m, torch.nn.Dropout) and m.p == 0.0:
                m.p = 0.1  # hidden dropout as ours (the attention-probability dropout is functional, stays 0)
        hf.train().requires_grad_(True)
        classifier = torch.nn.Linear(cfg.hidden, 2).to(device)
        # inputs_embeds, masks as SPEC section 2 assembles them (hf_logits builds them image by image)
        captured = {}

        def capture(**kw):
            captured.update(kw)
            raise StopIteration

        real_forward, hf.forward = hf.forward, capture
        try:
            hf_logits(hf, sd, cfg, *(x[k] for k in ("query_local", "query_scales", "query_mask", "gallery_local",
                                                     "gallery_scales", "gallery_mask", "query_global", "gallery_global")))
        except StopIteration:
            pass
        hf.forward = real_forward
        inputs = {k: v.to(device) for k, v in captured.items()}
        labels = token_labels(x["labels"], T).to(device)

        def step() -> None:
            hf.zero_grad(set_to_none=True)
            classifier.zero_grad(set_to_none=True)
            with autocast:
                hidden = hf(**inputs).last_hidden_state
                loss = token_loss(classifier(hidden), labels)
            loss.backward()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    sync()
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    release_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = _rss_kb("VmRSS")
        _reset_rss_peak()
        step()
        peak_mb = (_rss_kb("VmHWM") - base) / 1024
    return {**row, "step_s": sorted(times)[len(times) // 2], "times_s": times, "step_peak_mb": peak_mb,
            "process_peak_mb": _rss_kb("VmHWM") / 1024 if device.type == "cpu" else None,
            "threads": torch.get_num_threads()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=("tiny", "small", "base"))
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers (default: all of the preset)")
    p.add_argument("--gallery", type=int, default=100, help="K gallery images (N = (1 + K) * (S + 2))")
    p.add_argument("--descriptors", type=int, default=48)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=3, help="timed steps per implementation (median reported)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--cpu", action="store_true", help="CPU even when CUDA is available")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/train-<device>.json)")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--cuda", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:  # child: one implementation, one JSON line
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0

    import torch

    from harness import environment, format_table

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    rows = []
    for impl in args.impls.split(","):
        if impl not in IMPLS:
            p.error(f"unknown implementation {impl!r}; choose among {IMPLS}")
        cmd = [sys.executable, __file__, "--impl", impl, "--model", args.model, "--gallery", str(args.gallery),
               "--descriptors", str(args.descriptors), "--batch", str(args.batch), "--runs", str(args.runs)]
        cmd += ["--layers", str(args.layers)] if args.layers else []
        cmd += ["--cuda"] if cuda else []
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            row = {"impl": impl, "failed": f"exit {proc.returncode}: {tail}"}
        else:
            row = json.loads(lines[-1][len("RESULT "):])
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"{impl}: {json.dumps(row)}", flush=True)
    print(format_table([r for r in rows if "step_s" in r],
                       ["impl", "model", "layers", "N", "batch", "step_s", "step_peak_mb", "process_peak_mb"]))
    for r in rows:
        if "step_s" not in r:
            print(f"{r['impl']}: {r.get('skipped') or r.get('failed')}")
    env = environment(device)
    layers = f"-{args.layers}layer" if args.layers else ""
    out = Path(args.out) if args.out else HERE / "results" / f"{'' if cuda else 'cpu-'}{env['device_slug']}-train-{args.model}{layers}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"environment": env, "settings": vars(args), "rows": rows}, indent=1, default=str))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
