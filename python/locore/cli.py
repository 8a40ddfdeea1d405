"""Command-line interface: ``locore <subcommand>``."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence


def _demo(args: argparse.Namespace) -> int:
    # Smallest real piece until the full pipeline lands: the attention op on a LoCoRE token layout.
    import torch

    import locore_kernels

    print("locore demo (attention op only): C++ CPU kernel vs the float64 dense reference")
    g = torch.Generator().manual_seed(0)
    K, T, H, D, w = args.gallery, 50, 12, 64, 256
    N = (1 + K) * T
    pos = torch.arange(N)
    is_global = ((pos % T) == T - 1) | (pos < T - 1)
    key_padding = torch.zeros(N, dtype=torch.bool)
    qkv = [torch.randn(1, N, H, D, generator=g) for _ in range(6)]
    t0 = time.perf_counter()
    out = locore_kernels.longformer_attention(*qkv, is_global=is_global[None], key_padding=key_padding[None],
                                              one_sided_window=w, backend="cpu")
    dt = time.perf_counter() - t0
    ref = locore_kernels.longformer_attention(*[t.double() for t in qkv], is_global=is_global[None],
                                              key_padding=key_padding[None], one_sided_window=w,
                                              backend="reference")
    err = (out.double() - ref).abs().max().item()
    print(f"tokens={N} heads={H} head_dim={D} window=±{w}: cpu kernel {dt * 1e3:.1f} ms, max |Δ| vs float64 = {err:.2e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="locore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main job on a generated input")
    demo.add_argument("--gallery", type=int, default=20, help="shortlist length K (tokens = 50 (1 + K))")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
