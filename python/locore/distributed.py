"""Many processes, one result: ``torchrun`` process groups, query blocks, gathering, resumable work folders.

``torchrun --standalone --nproc-per-node=K -m locore rerank ...`` starts K copies of the command; each
finds its place in the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and
the rendezvous), and :func:`init` joins the process group: ``nccl`` on CUDA (device ``cuda:LOCAL_RANK``)
with a ``gloo`` group beside it for Python objects, ``gloo`` alone on CPU (torch's threads divided
between the processes of a node). Without torchrun everything here degrades to one process and no
communication, so the pipeline has a single code path.

Work split: rank r takes the contiguous block :func:`query_block` of the Q queries (sizes differ by at
most one when K does not divide Q); rank 0 gathers the blocks in rank order, which is query order, so
the final array is the one a single process computes, row for row.

Resumable runs (:class:`WorkFolder`): results are written, as they are computed, to a work folder beside
the output: every ``save_every`` queries a rank writes the rows it finished since its last write to a
new ``.npz`` file (temporary name + rename, so a kill leaves either the whole file or none). Every file
records the fingerprint of the run (:func:`fingerprint`: a hash of the settings that change results and
of the inputs' sizes and modification times, or their contents); a folder or file of another run is
refused, never mixed in. Partial files are keyed by query index, not by rank, so a run can be resumed
with a different number of processes. After the final files are written the folder is removed.

This module knows no model, no files of the dataset and no CLI: the pipeline passes it the settings and
paths to fingerprint and the rows to keep.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

__all__ = ["Context", "DistributedError", "init", "launched_by_torchrun", "query_block", "merge_topk", "fingerprint",
           "WorkFolder", "Shard", "KILL_AFTER_ENV"]

# test hook: a process SIGKILLs itself once it has saved this many queries (tests of --resume)
KILL_AFTER_ENV = "LOCORE_KILL_AFTER_QUERIES"
MANIFEST = "run.json"
PARTIAL_SUFFIX = ".npz"


class DistributedError(RuntimeError):
    """A run that cannot start or resume as asked (stale or foreign work folder, bad launch); the message
    says what to do."""


# --------------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------------

@dataclass
class Context:
    """Where this process stands among the K of a run (K = 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: Optional[str] = None        # the device this process should use (None: the caller decides)
    threads: Optional[int] = None       # torch threads of this process on CPU (None: untouched)
    backend: Optional[str] = None       # gloo | nccl once a group is initialised
    _object_group: Any = field(default=None, repr=False)  # gloo group for Python objects

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    # -- collectives (no-ops in one process) ----------------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self._object_group)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._object_group)
        return box[0]

    def gather(self, obj: Any) -> Optional[List[Any]]:
        """Every rank's ``obj``, in rank order, on rank 0 (None on the others)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: Optional[List[Any]] = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self._object_group)
        return out

    def all_gather(self, obj: Any) -> List[Any]:
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._object_group)
        return out

    def agree(self, error: Optional[BaseException]) -> None:
        """Collective error check: when any rank failed, every rank raises the first failure (so no rank is
        left waiting in a collective for one that gave up). Call it on every rank at the same point."""
        errors = self.all_gather(None if error is None else (type(error), str(error)))
        for rank, e in enumerate(errors):
            if e is not None:
                if error is not None:
                    raise error
                kind, msg = e
                try:
                    raise kind(msg if self.world_size == 1 else f"{msg} (on rank {rank})")
                except TypeError:  # an exception type that does not take one message
                    raise DistributedError(f"rank {rank}: {msg}") from None

    # -- progress counters in torch's rendezvous store ------------------------------------------------
    def count(self, key: str, n: int) -> None:
        """Add ``n`` to this rank's counter ``key`` (for rank 0's progress bar)."""
        store = self._store()
        if store is not None:
            store.add(f"locore/{key}/{self.rank}", int(n))

    def total(self, key: str) -> Optional[int]:
        """The sum of counter ``key`` over all ranks (None without a store)."""
        store = self._store()
        if store is None:
            return None
        return sum(int(store.add(f"locore/{key}/{r}", 0)) for r in range(self.world_size))

    def _store(self):
        if not self.distributed:
            return None
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.backend, self._object_group = None, None


def launched_by_torchrun() -> bool:
    """True when the environment holds a torchrun (or any ``env://``) launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def init(device: Optional[str] = None, timeout_minutes: float = 60.0) -> Context:
    """Join the process group torchrun prepared (a no-op :class:`Context` in one process).

    ``device``: None picks CUDA when available; ``cuda`` / ``cuda:N`` become ``cuda:LOCAL_RANK`` under
    torchrun (one GPU per process); ``cpu`` divides this machine's cores between the node's processes.
    """
    world = _env_int("WORLD_SIZE", 1)
    ctx = Context(rank=_env_int("RANK", 0), world_size=world, local_rank=_env_int("LOCAL_RANK", 0),
                  local_world_size=_env_int("LOCAL_WORLD_SIZE", 1), device=device)
    if world <= 1:
        return ctx
    import torch
    import torch.distributed as dist

    use_cuda = (device is None and torch.cuda.is_available()) or (device is not None and device.startswith("cuda"))
    if use_cuda:
        if not torch.cuda.is_available():
            raise DistributedError(f"--device {device} under torchrun, but this machine has no CUDA device")
        if ctx.local_rank >= torch.cuda.device_count():
            raise DistributedError(f"local rank {ctx.local_rank} needs GPU {ctx.local_rank}, but this node has "
                                   f"{torch.cuda.device_count()}; use --nproc-per-node={torch.cuda.device_count()} "
                                   "or fewer")
        ctx.device = f"cuda:{ctx.local_rank}"
        torch.cuda.set_device(ctx.local_rank)
        backend = "nccl"
    else:
        ctx.device = "cpu"
        # the node's cores, shared evenly by its processes (torchrun itself sets OMP_NUM_THREADS=1)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        ctx.threads = max(1, cores // max(1, ctx.local_world_size))
        torch.set_num_threads(ctx.threads)
        backend = "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        kw = {"device_id": torch.device(ctx.device)} if use_cuda else {}
        dist.init_process_group(backend=backend, timeout=timeout, **kw)
    ctx.backend = backend
    # objects (ranks arrays, errors, stats) travel over gloo even when the tensors' group is nccl
    ctx._object_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    return ctx


def query_block(num_queries: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous block of ``range(num_queries)``: the first ``Q % K`` ranks take one query
    more than the others, so blocks differ by at most one and follow each other in rank order."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of {world_size}")
    base, extra = divmod(int(num_queries), world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def merge_topk(parts: Sequence[tuple], m: int) -> tuple:
    """Exact top-``m`` of a sharded search: ``parts`` are each rank's ``(scores [Q, m_r], ids [Q, m_r])``
    over its block of the database (its own top-``m`` there, ids global). Returns ``(scores [Q, m'], ids
    [Q, m'])``, ``m' = min(m, sum m_r)``, best first; equal scores go to the smaller id, so the result does
    not depend on how the database was split (a search over the whole database must break ties the same
    way)."""
    scores = np.concatenate([np.asarray(s) for s, _ in parts], axis=1)
    ids = np.concatenate([np.asarray(i, dtype=np.int64) for _, i in parts], axis=1)
    if scores.shape != ids.shape:
        raise ValueError(f"scores {scores.shape} and ids {ids.shape} of the shards disagree")
    order = np.lexsort((ids, -scores.astype(np.float64)), axis=1)[:, :m]  # last key first: score, then id
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


# --------------------------------------------------------------------------------------------------
# Fingerprint of a run
# --------------------------------------------------------------------------------------------------

def _file_identity(path: str, contents: bool) -> Any:
    """Size and modification time (or a content hash) of a file, of every file of a folder, or the string
    itself when it names no file (e.g. ``preset:tiny``)."""
    if not os.path.exists(path):
        return path
    if os.path.isdir(path):
        out = {}
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                p = os.path.join(root, name)
                out[os.path.relpath(p, path)] = _file_identity(p, contents)
        return out
    st = os.stat(path)
    if not contents:
        return [st.st_size, st.st_mtime_ns]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return [st.st_size, h.hexdigest()]


def fingerprint(settings: Mapping[str, Any], inputs: Iterable[Optional[str]],
                contents: bool = False) -> Dict[str, Any]:
    """``{"hash", "settings", "inputs"}`` of a run: ``settings`` are the options that change results (JSON
    values), ``inputs`` the files they are computed from (checkpoint, descriptors, lists; None skipped),
    identified by size and modification time, or by a SHA-256 of their contents with ``contents``."""
    ids = {os.path.abspath(p) if os.path.exists(p) else p: _file_identity(p, contents)
           for p in inputs if p is not None}
    record = {"settings": json.loads(json.dumps(dict(settings), sort_keys=True, default=str)), "inputs": ids}
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]
    return {"hash": digest, **record}


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    """What changed between two fingerprints, for the refusal message."""
    out = []
    for section in ("settings", "inputs"):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                if section == "settings":
                    out.append(f"{key}: {a.get(key, '(unset)')!r} then, {b.get(key, '(unset)')!r} now")
                elif key not in a or key not in b:
                    out.append(f"input {key} {'added' if key not in a else 'no longer used'}")
                else:
                    out.append(f"input {key} changed (size, time or contents)")
    return out


# --------------------------------------------------------------------------------------------------
# Work folder
# --------------------------------------------------------------------------------------------------

def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def work_folder_for(out: str) -> str:
    """The work folder of the output ``out``: ``ranks.npy`` -> ``ranks.work`` beside it."""
    base = out[:-4] if out.endswith(".npy") else out
    return base + ".work"


class WorkFolder:
    """Partial results of one run (see the module docstring). Open it with :meth:`open` on every rank."""

    def __init__(self, path: str, print_: Dict[str, Any], ctx: Context):
        self.path, self.fingerprint, self.ctx = path, print_, ctx
        self._created = False

    @classmethod
    def open(cls, ctx: Context, path: str, print_: Dict[str, Any], resume: bool) -> "WorkFolder":
        """Collective. Without ``resume`` an existing folder is refused (it holds an unfinished run: resume
        it or delete it); with ``resume`` a folder of another run (another fingerprint) is refused. The
        folder itself is made by the first save, so a run that fails before finishing a query leaves none."""
        error: Optional[BaseException] = None
        if ctx.is_main:
            try:
                cls._check(path, print_, resume)
            except (DistributedError, OSError) as e:
                error = e if isinstance(e, DistributedError) else DistributedError(f"work folder {path}: {e}")
        ctx.agree(error)
        return cls(path, print_, ctx)

    @staticmethod
    def _check(path: str, print_: Dict[str, Any], resume: bool) -> None:
        if os.path.exists(path) and not os.path.isdir(path):
            raise DistributedError(f"work folder {path} is a file; move it away")
        if not os.path.isdir(path):
            return
        partials = [n for n in os.listdir(path) if n.endswith(PARTIAL_SUFFIX)]
        if not partials:  # nothing saved yet (or only a manifest): nothing to lose, nothing to reuse
            return
        if not resume:
            raise DistributedError(
                f"found the work folder {path} of an earlier unfinished run ({len(partials)} partial result "
                f"file(s)); add --resume to continue it, or delete the folder to start over")
        manifest = os.path.join(path, MANIFEST)
        try:
            with open(manifest) as f:
                old = json.load(f)
        except (OSError, ValueError):
            if partials:
                raise DistributedError(f"work folder {path} holds partial results but no readable {MANIFEST}; "
                                       "delete the folder to start over") from None
            return
        if old.get("hash") != print_["hash"]:
            changes = "; ".join(_differences(old, print_)) or "fingerprints differ"
            raise DistributedError(f"cannot --resume from {path}: it holds partial results of a different run "
                                   f"({changes}); run the same command as before, or delete the folder")

    # -- partial results -------------------------------------------------------------------------------
    def save(self, run: str, queries: np.ndarray, rows: np.ndarray) -> str:
        """Write ``rows [m, n]`` (ranks of query indices ``queries``) of ``run`` as one new partial file."""
        queries = np.asarray(queries, dtype=np.int64)
        if not self._created:  # every rank writes the same manifest, atomically
            os.makedirs(self.path, exist_ok=True)
            _atomic_write(os.path.join(self.path, MANIFEST),
                          lambda f: f.write(json.dumps(self.fingerprint, indent=2).encode()))
            self._created = True
        name = f"{run}.q{int(queries[0]):08d}+{len(queries)}.r{self.ctx.rank}{PARTIAL_SUFFIX}"
        path = os.path.join(self.path, name)
        arrays = {"fingerprint": np.array(self.fingerprint["hash"]), "run": np.array(run), "queries": queries,
                  "rows": np.ascontiguousarray(rows, dtype=np.int64)}
        _atomic_write(path, lambda f: np.savez(f, **arrays))
        return path

    def load(self, run: str, num_queries: int, row_len: int) -> Dict[int, np.ndarray]:
        """Every saved row of ``run``: query index -> ranks row. A file of another run is refused."""
        done: Dict[int, np.ndarray] = {}
        if not os.path.isdir(self.path):
            return done
        for name in sorted(os.listdir(self.path)):
            if not (name.startswith(run + ".q") and name.endswith(PARTIAL_SUFFIX)):
                continue
            path = os.path.join(self.path, name)
            try:
                with np.load(path, allow_pickle=False) as z:
                    fp, queries, rows = str(z["fingerprint"]), z["queries"], z["rows"]
            except (OSError, ValueError, KeyError) as e:
                raise DistributedError(f"partial result {path} is unreadable ({e}); delete the work folder "
                                       f"{self.path} to start over") from None
            if fp != self.fingerprint["hash"]:
                raise DistributedError(f"partial result {path} belongs to a different run (fingerprint {fp}, "
                                       f"this run {self.fingerprint['hash']}); delete the work folder {self.path}")
            if rows.ndim != 2 or rows.shape != (len(queries), row_len) or rows.dtype != np.int64:
                raise DistributedError(f"partial result {path} has rows {rows.shape} {rows.dtype}, expected "
                                       f"({len(queries)}, {row_len}) int64; delete the work folder {self.path}")
            for q, row in zip(queries.tolist(), rows):
                if q < num_queries:  # a run with more queries (--max-queries) saved them too
                    done[q] = row
        return done

    def remove(self) -> None:
        """Collective: once every rank is done with it, rank 0 removes the folder."""
        self.ctx.barrier()
        if self.ctx.is_main:
            shutil.rmtree(self.path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# One rank's share of one run
# --------------------------------------------------------------------------------------------------

class Shard:
    """This rank's block of a run's queries: what is left to do, saving as rows come in, the progress bar
    on rank 0 (total over all ranks), and the gather of the whole array on rank 0.

        shard = Shard(ctx, work, "medium", num_queries=Q, row_len=n)
        new_rows, stats = rerank(ids, sims, queries=shard.todo, on_chunk=shard.record)
        ranks = shard.finish()         # [Q, n] on rank 0, None elsewhere
    """

    def __init__(self, ctx: Context, work: Optional[WorkFolder], run: str, num_queries: int, row_len: int,
                 save_every: int = 16, progress: bool = True, desc: str = "re-ranking",
                 log: Callable[[str], None] = print):
        self.ctx, self.work, self.run, self.row_len = ctx, work, run, int(row_len)
        self.num_queries, self.save_every = int(num_queries), max(1, int(save_every))
        self.block = query_block(self.num_queries, ctx.rank, ctx.world_size)
        error: Optional[BaseException] = None
        saved: Dict[int, np.ndarray] = {}
        try:
            saved = work.load(run, self.num_queries, self.row_len) if work is not None else {}
        except DistributedError as e:  # a foreign or broken partial file: every rank stops with the message
            error = e
        ctx.agree(error)
        self.rows: Dict[int, np.ndarray] = {q: saved[q] for q in self.block if q in saved}
        self.todo = np.array([q for q in self.block if q not in self.rows], dtype=np.int64)
        self.resumed = len(self.rows)
        self._pending: List[int] = []
        self._key = f"progress/{run}"
        self._kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
        self._saved_new = 0
        resumed_all = ctx.all_gather(self.resumed)
        if ctx.is_main and sum(resumed_all):
            log(f"[{run}] resuming: {sum(resumed_all)} of {self.num_queries} queries already done in {work.path}")
        ctx.count(self._key, self.resumed)
        self._bar = None
        if progress and ctx.is_main:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.num_queries, initial=sum(resumed_all), desc=desc, unit="query",
                             leave=True)
        self._shown = sum(resumed_all)

    def record(self, queries: Sequence[int], rows: np.ndarray) -> None:
        """Rows of finished queries (the re-ranker's per-chunk callback)."""
        for q, row in zip(np.asarray(queries).tolist(), np.asarray(rows)):
            self.rows[int(q)] = np.array(row, dtype=np.int64)  # a copy: the caller may reuse its buffer
            self._pending.append(int(q))
        self.ctx.count(self._key, len(queries))
        if len(self._pending) >= self.save_every:
            self._save()
        self._update_bar()

    def _save(self) -> None:
        if not self._pending:
            return
        if self.work is not None:
            qs = np.array(self._pending, dtype=np.int64)
            self.work.save(self.run, qs, np.stack([self.rows[q] for q in self._pending]))
        self._saved_new += len(self._pending)
        self._pending = []
        if self._kill_after and self._saved_new >= self._kill_after:  # test hook: die like a killed job
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    def _update_bar(self) -> None:
        if self._bar is None:
            return
        total = self.ctx.total(self._key)
        done = total if total is not None else len(self.rows)
        if done > self._shown:
            self._bar.update(done - self._shown)
            self._shown = done

    def finish(self, poll_seconds: float = 0.2) -> Optional[np.ndarray]:
        """Save what is pending, wait for every rank (rank 0 keeps its bar moving), gather on rank 0:
        ``[num_queries, row_len]`` int64 in query order there, None on the other ranks."""
        self._save()
        missing = [q for q in self.block if q not in self.rows]
        if missing:
            raise DistributedError(f"rank {self.ctx.rank}: queries {missing[:5]} of its block were not computed")
        if self.ctx.distributed:
            # wait on the store rather than in a collective, so a long wait never meets a collective timeout
            while (self.ctx.total(self._key) or 0) < self.num_queries:
                self._update_bar()
                time.sleep(poll_seconds)
        self._update_bar()
        if self._bar is not None:
            self._bar.close()
        mine = (np.stack([self.rows[q] for q in self.block]) if len(self.block)
                else np.empty((0, self.row_len), np.int64))
        parts = self.ctx.gather(mine)
        if parts is None:
            return None
        return np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.int64)
