"""``locore demo``: the main job on a generated problem.

1. Generate (seeded, deterministic) a small retrieval problem in the AMES file layout: queries with
   their own local descriptors; database images with planted matches (easy positives share many local
   descriptors and have a close global descriptor, hard positives share fewer and sit further away in
   the global space, junk in between, and "confusers" are globally close but share nothing locally),
   plus random distractors; the first-stage neighbour lists by global cosine similarity; the ground truth.
2. Re-rank it with the application layer (``locore.pipeline``; sliding windows by default) and evaluate it.
3. Print a re-ranked list, the latency per shortlist, peak memory, and the agreement of the scores with
   the same model in float64 on the dense reference attention.

With a preset the weights are random: the pipeline, timings and numerical agreement are real, the
re-ranked order is not meaningful. ``--checkpoint FILE`` runs a trained model on the same problem.
"""
from __future__ import annotations

import copy
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from .data import GlobalFeatures, LocalFeatures, ames_paths, write_global, write_gnd, write_local, write_neighbours
from .pipeline import DataSettings, ModelSettings, RerankOptions, check_output, load_model, rerank
from .rerank import SettingsError, Sliding, check_count, windows

# planted images per query: (kind, count, fraction of the query's local descriptors shared, global cosine range)
PLANTED = (("easy", 4, 0.6, (0.55, 0.80)), ("hard", 3, 0.3, (0.20, 0.40)), ("junk", 2, 0.4, (0.30, 0.60)),
           ("confuser", 5, 0.0, (0.45, 0.65)))
PER_QUERY = sum(n for _, n, _, _ in PLANTED)
DESC = "demo"


@dataclass
class Problem:
    folder: str
    num_queries: int
    num_images: int
    kinds: List[Dict[int, str]]   # per query: database id -> easy | hard | junk | confuser


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def generate_problem(folder: str, queries: int = 8, images: int = 300, slots: int = 50, num_descriptors: int = 48,
                     local_dim: int = 768, global_dim: Optional[int] = 768, seed: int = 0) -> Problem:
    """Write ``{demo}_*`` descriptor files, ``nn_demo.pkl`` and ``gnd_demo.pkl`` into ``folder``."""
    if images < queries * PER_QUERY:
        raise ValueError(f"need at least {queries * PER_QUERY} database images for {queries} queries")
    rng = np.random.default_rng(seed)
    S = min(num_descriptors, slots)

    def local_block(n):
        desc = rng.standard_normal((n, slots, local_dim)).astype(np.float32)
        scales = rng.integers(0, 3, size=(n, slots))
        mask = np.zeros((n, slots), bool)
        for i, pad in enumerate(rng.integers(0, 5, size=n)):  # 0-4 padded slots at the end of the used ones
            mask[i, S - pad:S] = pad > 0
        return desc, scales, mask

    q_desc, q_scales, q_mask = local_block(queries)
    db_desc, db_scales, db_mask = local_block(images)
    q_glob = _unit(rng.standard_normal((queries, global_dim or 1)))
    db_glob = _unit(rng.standard_normal((images, global_dim or 1)))
    order = rng.permutation(images)  # database position of the i-th generated image
    kinds: List[Dict[int, str]] = [dict() for _ in range(queries)]
    i = 0
    for q in range(queries):
        valid = np.flatnonzero(~q_mask[q, :S])
        for kind, count, share, (c_lo, c_hi) in PLANTED:
            for _ in range(count):
                d = order[i]
                i += 1
                kinds[q][int(d)] = kind
                n_shared = int(round(share * len(valid)))
                if n_shared:
                    src = rng.choice(valid, n_shared, replace=False)
                    dst = rng.choice(S, n_shared, replace=False)
                    noise = 0.35 * rng.standard_normal((n_shared, local_dim)).astype(np.float32)
                    db_desc[d, dst] = q_desc[q, src] + noise
                    db_mask[d, dst] = False
                    db_scales[d, dst] = q_scales[q, src]
                if global_dim:
                    c = rng.uniform(c_lo, c_hi)
                    u = rng.standard_normal(global_dim)
                    u = _unit(u - (u @ q_glob[q]) * q_glob[q])
                    db_glob[d] = c * q_glob[q] + np.sqrt(1 - c * c) * u
    os.makedirs(folder, exist_ok=True)
    files = ames_paths(folder, DESC, gnd=os.path.join(folder, f"gnd_{DESC}.pkl"), use_global=bool(global_dim))
    write_local(files.query_local, q_desc, q_scales, q_mask)
    write_local(files.gallery_local, db_desc, db_scales, db_mask)
    if global_dim:
        write_global(files.query_global, q_glob)
        write_global(files.gallery_global, db_glob)
        sims = q_glob @ db_glob.T
    else:  # no global descriptors: a first stage from mean-pooled local descriptors
        pooled = _unit(np.stack([db_desc[d, :S][~db_mask[d, :S]].mean(0) for d in range(images)]))
        qpooled = _unit(np.stack([q_desc[q, :S][~q_mask[q, :S]].mean(0) for q in range(queries)]))
        sims = qpooled @ pooled.T
    ids = np.argsort(-sims, axis=1, kind="stable")
    write_neighbours(files.nn, np.take_along_axis(sims, ids, axis=1), ids)
    gnd = [{"easy": sorted(d for d, k in kq.items() if k == "easy"),
            "hard": sorted(d for d, k in kq.items() if k == "hard"),
            "junk": sorted(d for d, k in kq.items() if k == "junk"),
            "bbx": [0.0, 0.0, 224.0, 224.0]} for kq in kinds]
    write_gnd(files.gnd, gnd, [f"db_{d:05d}" for d in range(images)],
              [f"query_{q:03d}" for q in range(queries)])
    return Problem(folder, queries, images, kinds)


def _peak_memory(device) -> str:
    import torch

    if getattr(device, "type", "") == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB GPU (torch.cuda.max_memory_allocated)"
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{kb / 1024:.1f} MiB peak RSS of this process (data generation included)"


def _agreement(model, folder: str, ids: np.ndarray, num_descriptors: int, use_global: bool, mode: str):
    """Scores of one window by ``model`` and by a float64 copy on the reference attention."""
    import torch

    files = ames_paths(folder, DESC, use_global=use_global)
    ql = LocalFeatures(files.query_local, num_descriptors)
    gl = LocalFeatures(files.gallery_local, num_descriptors)
    try:
        q, g = ql.read([0]), gl.read(ids)
        inputs = [q.desc, q.scales, q.mask, g.desc[None], g.scales[None], g.mask[None]]
        kw = {}
        if use_global:
            qg = GlobalFeatures(files.query_global, num_images=len(ql))
            gg = GlobalFeatures(files.gallery_global, num_images=len(gl))
            kw = {"query_global": qg.read([0]), "gallery_global": gg.read(ids)[None]}
    finally:
        ql.close()
        gl.close()
    ref = copy.deepcopy(model).to(torch.float64).set_attention("reference")
    ours = model.score(*inputs, mode=mode, **kw).double().cpu()
    theirs = ref.score(*inputs, mode=mode, **kw).double().cpu()
    err = (ours - theirs).abs().max().item()
    return err, theirs.abs().max().item()


@dataclass(frozen=True)
class DemoSettings:
    """``locore demo``: the model, the re-ranking options, and the generated problem's size."""

    model: ModelSettings
    options: RerankOptions
    descriptors: int = 48                # local descriptors per image
    use_global: bool = True              # feed global descriptors when the model takes them
    queries: int = 8
    images: int = 300
    data_seed: int = 0
    out_dir: Optional[str] = None        # None: a temporary folder, removed afterwards

    def check(self) -> None:
        """Refuse a problem that cannot be generated, or an output folder that is a file, before any work."""
        check_count("--queries", self.queries)
        check_count("--images", self.images)
        need = self.queries * PER_QUERY
        if self.images < need:
            raise SettingsError(f"--images {self.images} is too few for {self.queries} queries: the demo plants "
                                f"{PER_QUERY} images per query ({', '.join(f'{n} {k}' for k, n, _, _ in PLANTED)}), "
                                f"so it needs --images >= {need}")
        if self.out_dir is not None and os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise SettingsError(f"--out-dir {self.out_dir} is a file, not a folder")
        if self.out_dir is not None:
            check_output([os.path.join(self.out_dir, "ranks.npy")])


def run_demo(settings: DemoSettings) -> int:
    t_start = time.perf_counter()
    settings.check()
    options = settings.options
    method = options.method
    tmp = None
    folder = settings.out_dir
    if folder is None:
        tmp = folder = tempfile.mkdtemp(prefix="locore-demo-")
    try:
        model, random_weights = load_model(settings.model)
        cfg = model.config
        use_global = cfg.global_dim is not None and settings.use_global
        t0 = time.perf_counter()
        problem = generate_problem(folder, settings.queries, settings.images, num_descriptors=settings.descriptors,
                                   local_dim=cfg.local_dim, global_dim=cfg.global_dim if use_global else None,
                                   seed=settings.data_seed)
        print(f"generated {settings.queries} queries and {settings.images} database images ({settings.descriptors} "
              f"local descriptors of dim {cfg.local_dim}{f' + a {cfg.global_dim}-d global' if use_global else ''} "
              f"each; per query {', '.join(f'{n} {k}' for k, n, _, _ in PLANTED)}) in {folder} "
              f"({time.perf_counter() - t0:.1f} s)")

        data = DataSettings(folder, DESC, descriptors=settings.descriptors, use_global=use_global)
        print(f"re-ranking with {method.describe()}, alpha {options.alpha}, temp {options.temp}, mode {options.mode}")
        report = rerank(settings.model, data, options, os.path.join(folder, "ranks.npy"), loaded_model=model)

        # --- a re-ranked list -------------------------------------------------------------------------
        run = next(iter(report.runs))
        L = method.shortlist
        tag = {"easy": "E", "hard": "H", "junk": "j", "confuser": "c"}
        for q in range(min(2, problem.num_queries)):
            before, after = report.first_stage[run][q, :12], report.runs[run][q, :12]
            fmt = lambda ids: " ".join(f"{d}{tag.get(problem.kinds[q].get(int(d)), '')}" for d in ids)  # noqa: E731
            print(f"query {q} ({run} run) first stage: {fmt(before)} ...")
            print(f"query {q} ({run} run) re-ranked:   {fmt(after)} ...")
        print("  (E easy, H hard positive, j junk, c confuser: globally close, no shared local descriptors)")

        # --- latency, memory, agreement ----------------------------------------------------------------
        stats = report.stats[run]
        B = report.batch_size
        per = np.median(stats.per_chunk_seconds) / min(B, stats.queries) * 1e3
        passes = stats.forward_passes / max(1, len(stats.per_chunk_seconds))
        print(f"latency per shortlist of {L}: {per:.1f} ms median ({passes:.0f} forward pass"
              f"{'es' if round(passes) != 1 else ''} of "
              f"{method.window if isinstance(method, Sliding) else L} images{f', {B} queries per pass' if B > 1 else ''}; "
              f"{model.device}, {str(model.dtype).replace('torch.', '')})")
        print(f"peak memory: {_peak_memory(model.device)}")
        st, ed = (windows(method.order, L, method.window, method.stride)[0] if isinstance(method, Sliding)
                  else (0, L))
        err, scale = _agreement(model, folder, report.first_stage[run][0, st:ed], settings.descriptors, use_global,
                                options.mode)
        prec = str(model.dtype).replace("torch.", "")
        print(f"agreement: {prec} scores vs the same model in float64 on attention backend 'reference' "
              f"(query 0, {ed - st} images): max |Δscore| = {err:.3e}, relative to the largest score "
              f"{err / max(scale, 1e-30):.3e} (target ≤ 1e-4 for float32)")
        if random_weights:
            print(f"NOTE: random weights (--checkpoint {settings.model.checkpoint}): the re-ranked order and the metrics are "
                  "not meaningful; pass --checkpoint FILE for a trained LoCoRE model.")
        print(f"demo finished in {time.perf_counter() - t_start:.1f} s")
        return 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
