"""Benchmark harness: timing, peak memory, device slug, results JSON, plots (dev-only; not in the package).

The workloads live in ``benchmarks/bench_model.py`` and ``benchmarks/bench_attention.py``; this module
holds what they share, so both measure the same way:

* **Timing** (:func:`time_runs`): after warm-up, every run is timed on its own. On CUDA the device is
  synchronised before each run and the run is bracketed by CUDA events (the latency of one call,
  never overlapped with the previous one); on CPU by ``time.perf_counter`` around the call (CPU ops
  are synchronous). Reported: the median and the 10th / 90th percentiles.
* **Input rotation**: a row times its call on several independently generated input sets in turn,
  so no run finds its inputs already in cache.
* **Peak memory** (:class:`PeakMemory`), for one call after warm-up, with only the row's model and
  one input set alive: on CUDA ``torch.cuda.max_memory_allocated`` (reset right before the call) minus
  what was allocated before the row built anything, so it counts the row's weights, its inputs and
  the call's activations and workspaces, and nothing of other rows; plus the memory a row's captured
  CUDA graphs hold in their private pools (a replay allocates nothing: its activations live there). On CPU the same quantity from
  the resident set size: before the call freed heap is handed back to the OS (``malloc_trim``) and the
  kernel's RSS high-water mark is reset (``/proc/self/clear_refs``), so the peak is that of this call
  alone; the RSS the process had before the row built anything is subtracted.
* **Results**: one JSON file per device (``benchmarks/results/<device-slug>.json``; CPU runs:
  ``cpu-<slug>.json``) with the environment at the top and one row per measurement; a rerun replaces
  the rows it measures again and keeps the others. Each row records the commit it was measured at.
* **Plots** (matplotlib, Agg): latency per model and implementation beside Table 5, latency vs
  shortlist length, attention time vs sequence length.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

__all__ = [
    "REPO_ROOT", "RESULTS_DIR", "TABLE5", "ROW_FIELDS", "Case", "MeasureSettings", "PeakMemory", "Timing",
    "add_common_args", "device_name", "device_slug", "environment", "git_commit", "format_table",
    "load_results", "measure_case", "percentile", "plot_attention", "plot_model", "plot_scaling",
    "results_path", "run_cases", "settings_from_args", "summarize", "synchronize", "time_runs",
    "write_results",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# SPEC section 9 (paper, Table 5: one query, 100-image shortlist). peak in MB (GB x 1024).
TABLE5 = {
    "tiny": {"latency_ms": 18.5, "peak_mb": 3.2 * 1024},
    "small": {"latency_ms": 24.7, "peak_mb": 4.5 * 1024},
    "base": {"latency_ms": 140.1, "peak_mb": 8.9 * 1024},
    "rrt": {"latency_ms": 74.4, "peak_mb": None},
    "ames": {"latency_ms": 61.1, "peak_mb": 130.0},
}

# Every row has these; rows may add more (mode, note, runs, passes, ...).
ROW_FIELDS = ("bench", "impl", "model", "dtype", "batch", "gallery", "tokens",
              "median_ms", "p10_ms", "p90_ms", "peak_mb")
# What identifies a measurement: a rerun replaces the row with the same key.
ROW_KEY = ("bench", "impl", "model", "dtype", "batch", "gallery", "tokens", "mode")


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    """Human-readable name: the GPU's name, or the CPU model with its core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({_cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _slugify(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", " ", text.lower())
    text = re.sub(r"\b(cpu|processor)\b|@.*$", " ", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def device_slug(device: torch.device) -> str:
    """File-name-safe id of the device, e.g. ``nvidia-h100-80gb-hbm3`` or ``amd-epyc-2c``."""
    device = torch.device(device)
    if device.type == "cuda":
        return _slugify(torch.cuda.get_device_name(device))
    return f"{_slugify(_cpu_model())}-{_cpu_count()}c"


def results_path(device: torch.device, out_dir: Optional[os.PathLike] = None) -> Path:
    """``<out_dir>/<slug>.json`` for a GPU, ``<out_dir>/cpu-<slug>.json`` for the CPU."""
    device = torch.device(device)
    prefix = "" if device.type == "cuda" else "cpu-"
    return Path(out_dir or RESULTS_DIR) / f"{prefix}{device_slug(device)}.json"


def git_commit(root: os.PathLike = REPO_ROOT) -> tuple[Optional[str], Optional[bool]]:
    """(full hash of HEAD, whether the tree differs from it), ignoring benchmark outputs.

    Untracked files count as a difference: a new kernel file not yet committed is measured code.
    """
    def git(*args: str) -> Optional[str]:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  check=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return None

    head = git("rev-parse", "HEAD")
    if head is None:
        return None, None
    status = git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    return head.strip(), (None if status is None else bool(status.strip()))


def environment(device: torch.device) -> dict[str, Any]:
    """The top-level fields of a results file."""
    device = torch.device(device)
    commit, dirty = git_commit()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import transformers
        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    return {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "device_type": device.type,
        "commit": commit,
        "dirty": dirty,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers_version,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "host_cpu": _cpu_model(),
    }


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``q`` in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int


def summarize(times_ms: Sequence[float]) -> Timing:
    return Timing(median_ms=percentile(times_ms, 50), p10_ms=percentile(times_ms, 10),
                  p90_ms=percentile(times_ms, 90), mean_ms=sum(times_ms) / len(times_ms),
                  min_ms=min(times_ms), runs=len(times_ms))


def time_runs(fn: Callable[[int], Any], runs: int, device: torch.device) -> list[float]:
    """Milliseconds of ``fn(i)`` for i = 0 .. runs-1, each run timed on its own (see module doc)."""
    device = torch.device(device)
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(runs)]
        for i, (start, end) in enumerate(events):
            torch.cuda.synchronize(device)
            start.record()
            fn(i)
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


# --------------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------------

def _rss_kb(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_memory(device: torch.device) -> None:
    """Free what dropped rows left behind, so the next row starts from the same baseline."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


def _graph_pool_idle_bytes(device: torch.device) -> int:
    """Bytes the CUDA caching allocator holds, unallocated, in private pools: a captured CUDA graph's
    activations live there, reserved for its replays, where ``max_memory_allocated`` does not see them."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    try:
        segments = torch.cuda.memory_snapshot()
    except (RuntimeError, AttributeError):
        return 0
    return sum(seg["total_size"] - seg["allocated_size"] for seg in segments
               if seg.get("device", index) == index and tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0))


class PeakMemory:
    """Peak memory of one call above the level the process had before the row was set up.

    ``start()`` before the row builds anything; ``measure(call)`` once the row is warm.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.base_bytes = 0
        self.base_pool_bytes = 0
        self.method = ("torch.cuda.max_memory_allocated + CUDA-graph pools" if self.device.type == "cuda"
                       else "RSS high-water mark (VmHWM, reset before the call)")

    def start(self) -> None:
        release_memory(self.device)
        if self.device.type == "cuda":
            self.base_bytes = torch.cuda.memory_allocated(self.device)
            self.base_pool_bytes = _graph_pool_idle_bytes(self.device)
        else:
            self.base_bytes = (_rss_kb("VmRSS") or 0) * 1024

    def measure(self, call: Callable[[], Any]) -> Optional[float]:
        """MB (2^20 bytes) of the peak during ``call()`` minus the baseline taken by ``start()``."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            call()
            torch.cuda.synchronize(self.device)
            # a graph replay allocates nothing: its activations are the graph pool captured at setup
            pools = _graph_pool_idle_bytes(self.device) - self.base_pool_bytes
            return (torch.cuda.max_memory_allocated(self.device) - self.base_bytes + max(pools, 0)) / 2**20
        gc.collect()
        _malloc_trim()
        if not _reset_rss_peak():
            self.method = "RSS high-water mark of the whole process (VmHWM could not be reset)"
        call()
        hwm = _rss_kb("VmHWM")
        if hwm is None:
            self.method = "unavailable (no /proc/self/status)"
            return None
        return (hwm * 1024 - self.base_bytes) / 2**20


# --------------------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------------------

@dataclass
class Case:
    """One row to measure.

    ``row``: the row's identity fields (bench, impl, model, dtype, batch, gallery, tokens, mode, note, ...).
    ``setup()`` builds the model and returns ``(call, make_input)``: ``make_input(r)`` generates the
    r-th input set (independent random data), ``call(x)`` runs the measured computation on one.
    ``check(output)``, if given, gets the output of the first call (input set 0) and returns extra
    fields for the row (e.g. the difference to a reference implementation).
    """

    row: dict[str, Any]
    setup: Callable[[], tuple[Callable[[Any], Any], Callable[[int], Any]]]
    skip_reason: Optional[str] = None
    check: Optional[Callable[[Any], dict[str, Any]]] = None


@dataclass
class MeasureSettings:
    device: torch.device
    warmup: int = 10
    runs: int = 50
    min_runs: int = 50            # never fewer timed runs than this, whatever the row budget says
    rotate: int = 4               # input sets the timed runs cycle through
    max_row_seconds: Optional[float] = None   # budget for the timed runs of one row
    commit: Optional[str] = None


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure_case(case: Case, s: MeasureSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Warm up, measure peak memory, time ``runs`` rotated runs; return the finished row.

    A row that cannot run (``skip_reason``, out of memory, an error) comes back with ``median_ms``
    None and the reason in ``skipped``; the benchmark goes on with the next row.
    """
    row = dict(case.row)
    row.update({"median_ms": None, "p10_ms": None, "p90_ms": None, "peak_mb": None})
    row.setdefault("commit", s.commit)
    if case.skip_reason:
        row["skipped"] = case.skip_reason
        return row
    device = s.device
    memory = PeakMemory(device)
    call = make_input = inputs = None
    try:
        memory.start()
        call, make_input = case.setup()
        inputs = [make_input(0)]
        t0 = time.perf_counter()
        out = call(inputs[0])                # first call: compilation, autotuning, graph capture
        synchronize(device)
        first_s = time.perf_counter() - t0
        if case.check is not None:
            row.update(case.check(out))
        del out
        t0 = time.perf_counter()
        call(inputs[0])
        synchronize(device)
        est_s = time.perf_counter() - t0     # one steady-state call, to budget the rest
        warmup = max(s.warmup - 2, 0)
        if s.max_row_seconds is not None and est_s > 0:
            warmup = min(warmup, int(0.2 * s.max_row_seconds / est_s))
        for _ in range(warmup):
            call(inputs[0])
        row["peak_mb"] = memory.measure(lambda: call(inputs[0]))
        row["peak_method"] = memory.method
        runs = s.runs
        if s.max_row_seconds is not None and est_s * runs > s.max_row_seconds:
            runs = max(s.min_runs, min(runs, int(s.max_row_seconds / est_s)))
        inputs += [make_input(r) for r in range(1, max(s.rotate, 1))]
        times = time_runs(lambda i: call(inputs[i % len(inputs)]), runs, device)
        t = summarize(times)
        row.update({"median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms,
                    "mean_ms": t.mean_ms, "min_ms": t.min_ms, "runs": t.runs,
                    "times_ms": [round(x, 4) for x in times],  # raw timings, in run order
                    "warmup": warmup + 2, "rotation": len(inputs), "first_call_s": round(first_s, 3)})
    except Exception as exc:  # a baseline that cannot run here must not stop the others
        reason = "out of memory" if _is_oom(exc) else f"{type(exc).__name__}: {exc}"
        row["skipped"] = reason.splitlines()[0][:300]
        log(f"  ! {row.get('impl')} {row.get('model')} {row.get('dtype')}: {row['skipped']}")
    finally:
        del call, make_input, inputs
        try:
            release_memory(device)
        except Exception as exc:  # e.g. a sticky CUDA error: the rows measured so far must still be written
            log(f"  ! releasing memory after {row.get('impl')} failed: {type(exc).__name__}: {exc}")
    return row


def run_cases(cases: Iterable[Case], s: MeasureSettings, label: Callable[[dict[str, Any]], str],
              time_limit: Optional[float] = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Measure ``cases`` in order, printing one line per row; once ``time_limit`` seconds have passed
    the remaining rows are not started and come back skipped, with the reason."""
    rows = []
    t_start = time.perf_counter()
    for case in cases:
        if time_limit is not None and time.perf_counter() - t_start > time_limit and not case.skip_reason:
            case.skip_reason = f"time limit ({time_limit:g} s, --time-limit) reached"
        row = measure_case(case, s, log)
        rows.append(row)
        if row["median_ms"] is not None:
            peak = "-" if row["peak_mb"] is None else f"{row['peak_mb']:.0f}"
            what = f"{row['median_ms']:.3f} ms (p10 {row['p10_ms']:.3f}, p90 {row['p90_ms']:.3f}), peak {peak} MB"
        else:
            what = f"skipped: {row.get('skipped')}"
        log(f"  {label(row)}  {what}")
        sys.stdout.flush()
    return rows


# --------------------------------------------------------------------------------------------------
# Results file
# --------------------------------------------------------------------------------------------------

def _key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in ROW_KEY)


def load_results(path: os.PathLike) -> Optional[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return None
    with open(path) as f:
        return json.load(f)


def write_results(path: os.PathLike, env: dict[str, Any], rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Merge ``rows`` into the file at ``path``: rows with the same key are replaced, others kept.

    The top-level fields describe this run; each row keeps the commit it was measured at.
    """
    path = Path(path)
    old = load_results(path)
    new_rows = list(rows)
    keys = {_key(r) for r in new_rows}
    kept = [r for r in (old or {}).get("rows", []) if _key(r) not in keys]
    data = dict(env)
    data["rows"] = kept + new_rows
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return data


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) >= 0.01 else f"{value:.2e}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str],
                 headers: Optional[Sequence[str]] = None) -> str:
    headers = list(headers or columns)
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _best_of_modes(rows: Iterable[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """One row per (impl, model, dtype, batch, gallery): the fastest of its modes (eager / graph)."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r.get("median_ms") is None:
            continue
        k = (r["impl"], r["model"], r["dtype"], r["batch"], r["gallery"])
        if k not in best or r["median_ms"] < best[k]["median_ms"]:
            best[k] = r
    return best


def plot_model(rows: Sequence[dict[str, Any]], path: os.PathLike, title: str, gallery: int = 100,
               batch: int = 1) -> Optional[Path]:
    """Bars: latency per model and implementation at one shortlist length, Table 5 beside (hatched)."""
    rows = [r for r in rows if r.get("bench") == "model" and r.get("gallery") == gallery
            and r.get("batch") == batch]
    best = _best_of_modes(rows)
    if not best:
        return None
    plt = _pyplot()
    models = [m for m in ("tiny", "small", "base", "rrt", "ames") if any(k[1] == m for k in best)]
    series = sorted({(k[0], k[2]) for k in best})            # (impl, dtype), one colour each
    colors = {sd: plt.get_cmap("tab10")(i % 10) for i, sd in enumerate(series)}
    fig, ax = plt.subplots(figsize=(max(7.0, 1.9 * len(models) + 2), 5))
    labelled, centers = set(), []
    x = 0.0
    for m in models:
        bars = [(f"{impl} {dtype}", best[(impl, m, dtype, batch, gallery)]["median_ms"], colors[(impl, dtype)], None)
                for impl, dtype in series if (impl, m, dtype, batch, gallery) in best]
        paper = TABLE5.get(m, {}).get("latency_ms")
        if paper is not None:
            bars.append(("paper, Table 5 (GPU)", paper, "white", "//"))
        for j, (label, y, color, hatch) in enumerate(bars):
            ax.bar(x + j, y, 0.9, color=color, hatch=hatch, edgecolor="black" if hatch else None,
                   label=None if label in labelled else label)
            labelled.add(label)
        centers.append(x + (len(bars) - 1) / 2)
        x += len(bars) + 1.0
    ax.set_xticks(centers, models)
    ax.set_yscale("log")
    ax.set_ylabel("latency per call [ms] (median, log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_scaling(rows: Sequence[dict[str, Any]], path: os.PathLike, title: str, batch: int = 1,
                 impls: Sequence[str] = ("locore", "locore-flex", "hf-longformer")) -> Optional[Path]:
    """Lines: latency vs shortlist length K, one panel per model, one line per (impl, dtype)."""
    rows = [r for r in rows if r.get("bench") == "model" and r.get("batch") == batch and r.get("impl") in impls]
    best = _best_of_modes(rows)
    lines: dict[tuple, list[tuple[int, float]]] = {}
    for (impl, model, dtype, _, gallery), r in best.items():
        lines.setdefault((model, impl, dtype), []).append((gallery, r["median_ms"]))
    lines = {k: sorted(v) for k, v in lines.items() if len(v) >= 2}
    if not lines:
        return None
    plt = _pyplot()
    models = [m for m in ("tiny", "small", "base") if any(k[0] == m for k in lines)]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.2), squeeze=False)
    for ax, m in zip(axes[0], models):
        ks = set()
        for (model, impl, dtype), pts in sorted(lines.items()):
            if model == m:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{impl} {dtype}")
                ks.update(p[0] for p in pts)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("shortlist length K (> 101: windows of 100, stride 50)")
        ax.set_ylabel("latency [ms] (median)")
        ax.set_title(f"LoCoRE {m}")
        ax.grid(which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_attention(rows: Sequence[dict[str, Any]], path: os.PathLike, title: str) -> Optional[Path]:
    """Lines: attention time vs sequence length N, one line per (impl, dtype); log-log."""
    lines: dict[tuple, list[tuple[int, float]]] = {}
    for r in rows:
        if r.get("bench") == "attention" and r.get("median_ms") is not None:
            lines.setdefault((r["impl"], r["dtype"]), []).append((r["tokens"], r["median_ms"]))
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for (impl, dtype), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{impl} {dtype}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens N (50 per image)")
    ax.set_ylabel("attention op time [ms] (median)")
    ax.set_title(title, fontsize=9)
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------------------------------
# Command-line options both benchmark scripts take
# --------------------------------------------------------------------------------------------------

# (warm-up, runs, min runs, rotation, row budget in s). GPU: >= 50 timed runs for every row that
# fits its budget; a slow baseline is cut to its budget but never below 20 runs (its row says how
# many). CPU (2 cores in CI): fewer runs, stated in every row.
GPU_DEFAULTS = dict(warmup=10, runs=50, min_runs=20, rotate=4, max_row_seconds=20.0)
CPU_DEFAULTS = dict(warmup=2, runs=10, min_runs=5, rotate=2, max_row_seconds=20.0)


def add_common_args(parser) -> None:
    g = parser.add_argument_group("measurement")
    g.add_argument("--cpu", action="store_true",
                   help="CPU mode: fp32, smaller default workload, results in cpu-<slug>.json")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--warmup", type=int, default=None, help="warm-up calls per row (GPU 10, CPU 2)")
    g.add_argument("--runs", type=int, default=None, help="timed runs per row (GPU 50, CPU 10)")
    g.add_argument("--min-runs", type=int, default=None,
                   help="fewest timed runs a row budget may leave (GPU 20, CPU 5)")
    g.add_argument("--rotate", type=int, default=None, help="input sets the timed runs cycle through (GPU 4, CPU 2)")
    g.add_argument("--max-row-seconds", type=float, default=None,
                   help="time budget of one row's timed runs; <= 0: none (GPU 20, CPU 20)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--time-limit", type=float, default=None,
                   help="start no row after this many seconds; the rest are listed as skipped")
    g.add_argument("--out", default=None,
                   help="results JSON path (default benchmarks/results/<slug>.json, cpu-<slug>.json on CPU)")
    g.add_argument("--no-write", action="store_true", help="print only; write no JSON and no plots")
    g.add_argument("--no-plot", action="store_true", help="write the JSON but no plots")


def settings_from_args(args) -> MeasureSettings:
    """Resolve device and measurement settings; fills ``args.device`` with a torch.device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    from locore.model import as_device

    try:
        device = torch.device("cpu") if args.cpu else as_device(args.device or None)
    except ValueError as e:  # e.g. cuda asked for where torch sees no GPU
        raise SystemExit(f"{e} (use --cpu)") from None
    args.device = device
    args.cpu = device.type == "cpu"
    d = CPU_DEFAULTS if args.cpu else GPU_DEFAULTS
    pick = lambda name: d[name] if getattr(args, name) is None else getattr(args, name)  # noqa: E731
    runs = pick("runs")
    budget = pick("max_row_seconds")
    commit, _ = git_commit()
    return MeasureSettings(device=device, warmup=pick("warmup"), runs=runs,
                           min_runs=min(pick("min_runs"), runs), rotate=pick("rotate"),
                           max_row_seconds=budget if budget and budget > 0 else None, commit=commit)


def output_path(args) -> Path:
    return Path(args.out) if args.out else results_path(args.device)


def describe_settings(s: MeasureSettings) -> str:
    budget = (f"; rows over {s.max_row_seconds:g} s of timed runs are cut to their budget, never "
              f"below {s.min_runs} runs" if s.max_row_seconds else "")
    how = ("CUDA events, device synchronised before each run" if s.device.type == "cuda"
           else "wall clock (perf_counter)")
    return (f"{s.warmup} warm-up calls, then {s.runs} timed runs ({how}) cycling over {s.rotate} "
            f"input sets{budget}; median, p10, p90")
