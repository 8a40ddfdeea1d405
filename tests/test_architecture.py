"""The import arrows of the product packages, read from the source with ast (no module is imported).

Every module of ``locore_kernels/`` and ``python/locore/`` is parsed; every import counts, the lazy ones
inside functions included. The test fails on a transformers import, on an import cycle between
modules, on an arrow the LAYERS table does not allow, and on a module the table does not place.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"locore_kernels": ROOT / "locore_kernels", "locore": ROOT / "python" / "locore"}

# layer -> module-name prefixes (a prefix "a.b" matches "a.b" and "a.b.*"; the longest match wins).
# Coming modules (search, integrations, train, distributed) are placed by prefix ahead of time.
LAYERS = {
    "Kernels": ("locore_kernels",),
    # torch-free, model-free reading of untrusted files: the input-error types and the restricted unpickler,
    # used by the data readers and by the checkpoint loader alike
    "Foundation": ("locore.errors", "locore.unpickle"),
    "Scoring": ("locore.scoring",),  # torch-free names shared by the model, the re-ranker and the CLI
    "Model": ("locore.config", "locore.checkpoint", "locore.sequence", "locore.encoder", "locore.cuda_graphs",
              "locore.model", "locore.device"),
    "Data": ("locore.data",),
    "Eval": ("locore.evaluate",),
    "Rerank": ("locore.rerank",),
    "Search": ("locore.search",),
    "Integrations": ("locore.integrations",),
    "Train": ("locore.train",),
    "Distributed": ("locore.distributed",),
    "Pipeline": ("locore.pipeline",),
    "Demo": ("locore.demo",),
    "CLI": ("locore.cli", "locore.__main__"),
    "Root": ("locore",),  # locore/__init__: lazy LoCoRe / LoCoReConfig
}
# layer -> the layers it may import (its own always allowed)
ALLOWED = {
    "Kernels": set(),
    "Foundation": set(),
    "Scoring": set(),
    "Model": {"Kernels", "Scoring"},
    "Data": set(),
    "Eval": {"Data"},
    "Rerank": {"Data", "Scoring"},  # takes a scorer (the model) as an argument, never imports it
    "Search": {"Data"},
    "Integrations": {"Kernels"},
    "Train": {"Model", "Kernels", "Scoring", "Data", "Eval"},
    "Distributed": {"Data"},
    "Pipeline": {"Model", "Kernels", "Scoring", "Data", "Eval", "Rerank", "Search", "Distributed"},
    "Demo": {"Pipeline", "Model", "Kernels", "Scoring", "Data", "Eval", "Rerank"},
    "CLI": {"Pipeline", "Demo", "Model", "Kernels", "Scoring", "Data", "Eval", "Rerank", "Search", "Distributed",
            "Train"},
    "Root": {"Model"},
}
for _layer in set(ALLOWED) - {"Kernels", "Foundation"}:  # every locore layer may raise / read with Foundation
    ALLOWED[_layer] = ALLOWED[_layer] | {"Foundation"}
# Single arrows allowed against the layer rule, each with its reason. Keep this list short (empty today):
# an entry here is a module that wants to move.
EXCEPTIONS: set = set()
FORBIDDEN_TOP_LEVEL = {"transformers"}


def _modules() -> dict[str, Path]:
    """module name -> source file, for every .py file of the two packages."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([pkg, *parts])] = path
    return out


def _extensions() -> set[str]:
    """Compiled extension modules (``locore_kernels/_cpu*.so``): leaves of the graph."""
    out = set()
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*"):
            if path.suffix in (".so", ".pyd"):
                out.add(".".join([pkg, *path.relative_to(folder).parent.parts, path.name.split(".")[0]]))
    return out


MODULES = _modules()
KNOWN = set(MODULES) | _extensions()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) of every import in the file, relative imports resolved."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # "from pkg import submodule" imports the submodule
                sub = f"{target}.{a.name}"
                found.append((sub if sub in KNOWN else target, node.lineno))
    return found


def _layer(module: str) -> str | None:
    best = None
    for layer, prefixes in LAYERS.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (layer, p)
    return best and best[0]


def _ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_tree_is_parsed():
    for expected in ("locore_kernels", "locore_kernels.ops", "locore.model", "locore.sequence", "locore.encoder",
                     "locore.scoring", "locore.cuda_graphs", "locore.pipeline", "locore.cli", "locore.data.local"):
        assert expected in MODULES
    assert any(m == "locore.pipeline" for m, _ in GRAPH["locore.cli"])
    assert any(m == "locore.model" for m, _ in GRAPH["locore"])  # the lazy import inside __getattr__ counts


def test_every_module_is_placed_in_a_layer():
    unplaced = [m for m in MODULES if _layer(m) is None]
    assert not unplaced, (f"modules missing from the LAYERS table of tests/test_architecture.py: {unplaced}; "
                          "add each to the layer it belongs to (and check ALLOWED says what it may import)")


def test_no_product_module_imports_transformers():
    bad = [f"{MODULES[m]}:{line} imports {imp}" for m, imps in GRAPH.items() for imp, line in imps
           if imp.split(".")[0] in FORBIDDEN_TOP_LEVEL]
    assert not bad, "product packages must not import transformers (tests and benchmarks may):\n" + "\n".join(bad)


def test_every_arrow_is_allowed():
    bad = []
    for m, imps in GRAPH.items():
        src = _layer(m)
        for imp, line in imps:
            if not _ours(imp):
                continue
            dst = _layer(imp)
            if dst is None:
                bad.append(f"{MODULES[m]}:{line}: {m} imports {imp}, which no layer holds")
            elif dst != src and dst not in ALLOWED[src] and (m, imp) not in EXCEPTIONS:
                bad.append(f"{MODULES[m]}:{line}: {m} ({src}) imports {imp} ({dst}); {src} may import "
                           f"{sorted(ALLOWED[src]) or 'nothing of ours'}")
    assert not bad, "arrows against the architecture table:\n" + "\n".join(bad)


def test_no_import_cycles():
    edges = {m: sorted({imp for imp, _ in imps if imp in MODULES and imp != m}) for m, imps in GRAPH.items()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in edges[m]:
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module,imports,allowed", [
    ("locore.model", "locore.cli", False), ("locore.data.local", "locore.model", False),
    ("locore.rerank", "locore.model", False), ("locore_kernels.ops", "locore.config", False),
    ("locore.train.loop", "locore.evaluate", True), ("locore.distributed", "locore.model", False),
    ("locore.demo", "locore.cli", False), ("locore.cli", "locore.demo", True),
])
def test_the_table_says_what_the_brief_says(module, imports, allowed):
    src, dst = _layer(module), _layer(imports)
    assert (dst == src or dst in ALLOWED[src]) == allowed


def test_importing_locore_loads_neither_the_cli_nor_torch():
    import subprocess
    import sys

    code = ("import sys, locore, locore.scoring, locore.rerank; "
            "print(sorted(m for m in ('torch', 'locore.cli', 'locore.model', 'locore.pipeline') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": f"{ROOT / 'python'}:{ROOT}"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
