"""The restricted, metered unpickler against hand-written hostile pickles (issue 17.1, 13.4).

Payloads are assembled opcode by opcode (GLOBAL for protocols 0 and 2, STACK_GLOBAL for 5), so every
spelling of a dangerous callable is tried literally, not only the one ``pickle.dumps`` would pick.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from locore.data import DataError, UnsafePickleError, read_gnd, read_neighbours, safe_load_pickle
from locore.unpickle import ALLOWED_GLOBALS, TORCH_ARCHIVE_GLOBALS, budget_for

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# A tiny pickle assembler: enough opcodes to call a global with string / list arguments.
# ------------------------------------------------------------------------------------------------

def _global(module: str, name: str, proto: int) -> bytes:
    if proto >= 4:
        return _str(module, proto) + _str(name, proto) + pickle.STACK_GLOBAL
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _str(s: str, proto: int) -> bytes:
    if proto == 0:
        return pickle.UNICODE + s.encode("raw_unicode_escape") + b"\n"
    b = s.encode()
    if proto >= 4 and len(b) < 256:
        return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _int(n: int, proto: int) -> bytes:
    if proto == 0 or not -2**31 <= n < 2**31:
        return pickle.INT + str(n).encode() + b"\n"
    return pickle.BININT + struct.pack("<i", n)


def _call(func: bytes, *args: bytes) -> bytes:
    """func(*args): MARK args TUPLE REDUCE (works at every protocol)."""
    return func + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def _list(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.LIST


def _frame(body: bytes, proto: int) -> bytes:
    head = pickle.PROTO + bytes([proto]) if proto >= 2 else b""
    return head + body + pickle.STOP


def _payload(module: str, name: str, marker: Path, proto: int) -> bytes:
    """A pickle that, loaded by plain ``pickle.loads``, calls ``module.name`` to create ``marker``."""
    s = lambda x: _str(x, proto)  # noqa: E731
    g = lambda m, n: _global(m, n, proto)  # noqa: E731
    cmd = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    if name in ("system", "popen"):
        body = _call(g(module, name), s(cmd))
    elif name in ("exec", "eval"):
        body = _call(g(module, name), s(code))
    elif name == "getattr":  # getattr(__import__('os'), 'system')(cmd): getattr is named first
        body = _call(_call(g(module, "getattr"), _call(g(module, "__import__"), s("os")), s("system")), s(cmd))
    elif name == "__import__":  # __import__('os').system needs getattr too; the import is named first
        body = _call(g(module, "__import__"), s("os"))
    elif module == "subprocess":
        body = _call(g(module, name), _list(s("touch"), s(str(marker))))
    else:
        raise AssertionError(name)
    return _frame(body, proto)


DANGEROUS = [("os", "system"), ("posix", "system"), ("nt", "system"), ("os", "popen"),
             ("builtins", "exec"), ("builtins", "eval"), ("builtins", "getattr"), ("builtins", "__import__"),
             ("__builtin__", "eval"), ("__builtin__", "exec"), ("__builtin__", "getattr"),
             ("subprocess", "Popen"), ("subprocess", "call"), ("subprocess", "run"), ("subprocess", "check_call")]
LIVE = {("os", "system"), ("posix", "system"), ("os", "popen"), ("builtins", "exec"), ("builtins", "eval"),
        ("builtins", "getattr"), ("__builtin__", "eval"), ("__builtin__", "exec"), ("__builtin__", "getattr"),
        ("subprocess", "Popen"), ("subprocess", "call"), ("subprocess", "run"), ("subprocess", "check_call")}


def _wait_for(path: Path, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists():
            return True
        time.sleep(0.02)
    return path.exists()


@pytest.mark.parametrize("proto", [0, 2, 5])
@pytest.mark.parametrize("module, name", DANGEROUS)
def test_every_spelling_of_a_dangerous_global_is_refused(tmp_path, module, name, proto):
    marker = tmp_path / "pwned"
    data = _payload(module, name, marker, proto)
    path = tmp_path / "nn_evil.pkl"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError) as info:
        safe_load_pickle(path)
    msg = str(info.value)
    assert "refusing to load global" in msg and f"{module}.{name}" in msg and str(path) in msg
    with pytest.raises(UnsafePickleError):
        read_neighbours(path)
    with pytest.raises(UnsafePickleError):
        read_gnd(path)
    time.sleep(0.05)
    assert not marker.exists(), "a refused pickle ran code"
    if (module, name) in LIVE and not (module == "__builtin__" and proto >= 3):
        # the payload is real: plain pickle runs it (it maps Python 2 names only below protocol 3)
        pickle.loads(data)
        assert _wait_for(marker), f"payload {module}.{name} at protocol {proto} did not run under plain pickle"


# The documented allow-list (README "What the loaders refuse"; locore.unpickle). A new entry must be a
# deliberate change here too: every name below is either a data constructor with checked arguments or
# a value that is never called.
DOCUMENTED_GLOBALS = {
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytes"), ("builtins", "bytearray"),
    ("collections", "OrderedDict"), ("_codecs", "encode"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
    ("torch.storage", "_load_from_bytes"), ("torch", "Size"),
} | {("torch", dt) for dt in ("float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "int32",
                              "int64", "bool", "half", "float", "double", "long", "int", "short")}
DOCUMENTED_ARCHIVE_GLOBALS = {("torch", f"{t}Storage") for t in ("Float", "Double", "Half", "BFloat16", "Long",
                                                                  "Int", "Short", "Char", "Byte", "Bool")}


def test_allow_list_is_exactly_the_documented_set():
    assert set(ALLOWED_GLOBALS) == DOCUMENTED_GLOBALS
    assert set(TORCH_ARCHIVE_GLOBALS) == DOCUMENTED_ARCHIVE_GLOBALS
    for module, name in DANGEROUS:
        assert (module, name) not in ALLOWED_GLOBALS
    for name in ("list", "range", "dict", "tuple", "str", "int", "getattr", "eval", "exec", "__import__"):
        assert ("builtins", name) not in ALLOWED_GLOBALS


@pytest.mark.parametrize("body, why", [
    (_call(_global("numpy", "ndarray", 2), _list(_int(10**5, 2))), "refusing to call type"),
    (_global("numpy", "ndarray", 2) + pickle.EMPTY_TUPLE + pickle.NEWOBJ, "opcode NEWOBJ"),
    (pickle.MARK + _global("numpy", "ndarray", 2) + pickle.OBJ, "opcode OBJ"),
    (_call(_global("_codecs", "encode", 2), _str("x", 2), _str("zlib", 2)), "encode"),
    (_call(_global("collections", "OrderedDict", 2), _int(3, 2)), "OrderedDict"),
])
def test_allowed_names_are_called_only_in_the_forms_pickle_writes(tmp_path, body, why):
    path = tmp_path / "x.pkl"
    path.write_bytes(_frame(body, 2))
    with pytest.raises(UnsafePickleError, match=why):
        safe_load_pickle(path)


# ------------------------------------------------------------------------------------------------
# Memory bombs: refused fast, with little memory, in a fresh process (peak RSS measured there).
# ------------------------------------------------------------------------------------------------

def _bombs(tmp: Path) -> dict:
    p2 = 2
    b = {}
    # the issue's ~25-byte file: bytes(2e9) at protocol 3
    b["bytes-2e9"] = (pickle.PROTO + b"\x03" + _global("builtins", "bytes", 3) + pickle.BININT
                      + struct.pack("<i", 2_000_000_000) + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)
    assert len(b["bytes-2e9"]) <= 26
    b["bytearray-1e10"] = _frame(_call(_global("builtins", "bytearray", p2), _int(10**10, p2)), p2)
    b["list-range-1e10"] = _frame(_call(_global("builtins", "list", p2),
                                        _call(_global("builtins", "range", p2), _int(10**10, p2))), p2)
    b["range-proto0"] = _frame(_call(_global("__builtin__", "xrange", 0), _int(10**10, 0)), 0)
    # a list that holds another list 1000 times, three levels deep: 10^9 floats to numpy.asarray
    b["shared-sublists"] = _frame(_dag(), p2)
    # a numpy array whose state claims 10^10 elements
    b["ndarray-state-1e10"] = pickle.dumps(np.zeros(3), protocol=2).replace(
        b"K\x03\x85", pickle.LONG1 + b"\x05" + (10**10).to_bytes(5, "little") + b"\x85")
    # a stride-0 torch view: two floats of storage, 10^10 elements of tensor
    t = pickle.dumps(torch.zeros(2), protocol=2)
    b["tensor-stride0-1e10"] = t.replace(b"K\x02\x85", pickle.LONG1 + b"\x05" + (10**10).to_bytes(5, "little")
                                         + b"\x85", 1).replace(b"K\x01\x85", b"K\x00\x85", 1)
    # torch.save archive (zip) whose pickle calls bytearray(10**10): torch's weights_only allows bytearray
    class _Bomb:
        def __reduce__(self):
            return (bytearray, (10**10,))
    torch.save({"w": torch.zeros(2), "x": _Bomb()}, tmp / "bomb.pt")
    b["torch-zip-bytearray"] = (tmp / "bomb.pt").read_bytes()
    # legacy torch.save stream claiming a 10^10-element storage it does not hold
    torch.save(torch.zeros(2), tmp / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = (tmp / "legacy.pt").read_bytes()
    at = legacy.index(b"cpuq") + 5  # BINUNICODE 'cpu', BINPUT n, then the numel: BININT1 2
    assert legacy[at:at + 2] == b"K\x02"
    b["torch-legacy-storage-1e10"] = legacy[:at] + pickle.LONG1 + b"\x05" + (10**10).to_bytes(5, "little") \
        + legacy[at + 2:]
    # many empty sets: 1 byte of file each, ~216 bytes of memory each (last: it does build up to the budget)
    b["empty-set-flood"] = _frame(pickle.MARK + pickle.EMPTY_SET * 2_000_000 + pickle.LIST, 4)
    return b


def _dag(width: int = 1000, levels: int = 3) -> bytes:
    """L0 = [1.0]; L_i = [L_{i-1}] * width (memo references): width**levels floats once expanded."""
    out = pickle.EMPTY_LIST + pickle.BINPUT + b"\x00" + pickle.BINFLOAT + struct.pack(">d", 1.0) + pickle.APPEND
    for i in range(1, levels + 1):
        out += (pickle.POP + pickle.EMPTY_LIST + pickle.BINPUT + bytes([i]) + pickle.MARK
                + (pickle.BINGET + bytes([i - 1])) * width + pickle.APPENDS)
    return out


_PROBE = textwrap.dedent("""
    import json, resource, sys, time
    sys.path[:0] = [{python!r}, {root!r}]
    from locore.data import read_neighbours
    from locore.checkpoint import CheckpointError, open_checkpoint
    from locore.data import DataError, UnsafePickleError
    import torch  # imported before the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {{}}
    for name, path in json.loads(sys.argv[1]).items():
        t0 = time.perf_counter()
        try:
            if path.endswith(".pt"):
                open_checkpoint(path)
            else:
                read_neighbours(path)
            err = "loaded"
        except (UnsafePickleError, DataError, CheckpointError) as e:
            err = type(e).__name__ + ": " + str(e)
        out[name] = dict(error=err, seconds=time.perf_counter() - t0,
                         rss_growth_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    print(json.dumps(out))
""")


def test_memory_bombs_are_refused_fast_with_little_memory(tmp_path):
    paths = {}
    for name, data in _bombs(tmp_path).items():
        p = tmp_path / (name + (".pt" if name.startswith("torch-") else ".pkl"))
        p.write_bytes(data)
        paths[name] = str(p)
    # the same archive read as a first-stage file too (before the set flood: peak RSS only grows)
    flood = paths.pop("empty-set-flood")
    paths["torch-zip-bytearray-as-nn"] = str(tmp_path / "bomb_nn.pkl")
    Path(paths["torch-zip-bytearray-as-nn"]).write_bytes(Path(paths["torch-zip-bytearray"]).read_bytes())
    paths["empty-set-flood"] = flood
    probe = _PROBE.format(python=str(ROOT / "python"), root=str(ROOT))
    run = subprocess.run([sys.executable, "-c", probe, json.dumps(paths)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps({k: (round(r["seconds"], 3), round(r["rss_growth_mb"])) for k, r in results.items()}))
    for name, r in results.items():
        assert r["error"] != "loaded", f"{name} was loaded"
        assert "Traceback" not in r["error"]
        # every bomb is refused before it builds much: the budget is 64 MiB for these small files
        limit = 150 if name == "empty-set-flood" else 40
        assert r["rss_growth_mb"] < limit, f"{name}: peak RSS grew {r['rss_growth_mb']:.0f} MB ({r['error']})"
        assert r["seconds"] < 30, f"{name}: took {r['seconds']:.1f} s"
    assert "builtins.bytes may only be called with no argument" in results["bytes-2e9"]["error"]
    assert "builtins.list" in results["list-range-1e10"]["error"]
    assert "builtins.range" in results["range-proto0"]["error"]  # xrange is Python 2's name for range
    assert "expands to more than" in results["shared-sublists"]["error"]
    assert "memory bomb" in results["empty-set-flood"]["error"]
    assert "does not match" in results["ndarray-state-1e10"]["error"]
    assert "memory bomb" in results["tensor-stride0-1e10"]["error"]
    assert "bytearray" in results["torch-zip-bytearray"]["error"]
    assert "CheckpointError" in results["torch-zip-bytearray"]["error"]
    assert "UnsafePickleError" in results["torch-zip-bytearray-as-nn"]["error"]
    assert "claims" in results["torch-legacy-storage-1e10"]["error"]


def test_budget_scales_with_the_file():
    assert budget_for(10) == 64 << 20
    assert budget_for(10 << 20) == 640 << 20


def test_recursive_and_deep_structures_are_refused(tmp_path):
    a: list = []
    a.append(a)
    (tmp_path / "r.pkl").write_bytes(pickle.dumps(a))
    with pytest.raises(UnsafePickleError, match="recursive"):
        safe_load_pickle(tmp_path / "r.pkl")
    deep: list = [1.0]
    for _ in range(200):
        deep = [deep]
    (tmp_path / "d.pkl").write_bytes(pickle.dumps(deep))
    with pytest.raises(UnsafePickleError, match="deeper than"):
        safe_load_pickle(tmp_path / "d.pkl")


# ------------------------------------------------------------------------------------------------
# Legitimate first-stage files keep loading.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("proto", [0, 2, 4, 5])
@pytest.mark.parametrize("form", ["nested-lists", "tensor", "numpy", "numpy-tuple", "torch.save"])
def test_legitimate_neighbour_files_load(tmp_path, proto, form):
    rng = np.random.default_rng(proto)
    sims = np.sort(rng.random((4, 6)), axis=1)[:, ::-1].astype(np.float32)
    ids = np.stack([rng.permutation(50)[:6] for _ in range(4)])
    arr = np.stack([sims.astype(np.float64), ids.astype(np.float64)])
    obj = {"nested-lists": arr.tolist(), "tensor": torch.from_numpy(arr), "numpy": arr,
           "numpy-tuple": (sims, ids)}.get(form)
    path = tmp_path / "nn.pkl"
    if form == "torch.save":
        torch.save(torch.from_numpy(arr), path)  # (torch.load itself reads protocol 2 only)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=proto))
    nb = read_neighbours(path)
    np.testing.assert_allclose(nb.sims, sims, rtol=1e-6)
    np.testing.assert_array_equal(nb.ids, ids)


@pytest.mark.parametrize("proto", [0, 2, 5])
def test_legitimate_gnd_files_load(tmp_path, proto):
    gnd = {"gnd": [{"easy": [1, 2], "hard": np.array([3]), "junk": [], "bbx": [1.0, 2.0, 3.0, 4.0]}],
           "imlist": [f"img{i}" for i in range(5)], "qimlist": ["q0"], "extra": {(1, 2), frozenset({3})},
           "b": b"", "ba": bytearray(b"ab"), "s": np.float32(1.5)}
    (tmp_path / "g.pkl").write_bytes(pickle.dumps(gnd, protocol=proto))
    out = read_gnd(tmp_path / "g.pkl")
    assert out["gnd"][0]["hard"].tolist() == [3] and out["imlist"][4] == "img4"
    raw = safe_load_pickle(tmp_path / "g.pkl")
    assert raw["b"] == b"" and raw["ba"] == bytearray(b"ab") and raw["s"] == np.float32(1.5)


def test_malformed_pickles_are_data_errors(tmp_path):
    for i, data in enumerate([b"", b"\x80\x02", b"garbage\n", pickle.dumps([1, 2])[:-1], b"\x80\x05\x95" + b"\xff" * 8]):
        (tmp_path / f"{i}.pkl").write_bytes(data)
        with pytest.raises((DataError, UnsafePickleError)):
            safe_load_pickle(tmp_path / f"{i}.pkl")
