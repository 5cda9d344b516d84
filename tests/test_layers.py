"""The import structure of ``bmm_cli``: layers, no cycles, and imports at module level.

Every module belongs to one layer (below). A module may import modules of its own layer or of lower layers, never
of a higher one, and the import graph has no cycle. Imports sit at the top of a module; an import inside a
function is allowed only where start-up time needs it:

* in the CLI layer (``bmm --help`` and shell completion must not import torch and the stages), and
* for heavy optional third-party packages (:data:`LAZY_OK`): a module that needs them for one feature imports
  them in the function that uses them, so that the rest of bmm works without them installed.

The imports are read from the source (``ast``), so nothing is imported to check them.
"""

from __future__ import annotations

import ast
from fnmatch import fnmatch
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bmm_cli"

# low to high; a pattern ending in ".*" covers a sub-package's modules
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["bmm_cli", "bmm_cli.hook_guard", "bmm_cli.errors", "bmm_cli.faults", "bmm_cli.progress",
              "bmm_cli.defaults"]),
    ("math", ["bmm_cli.closed_form", "bmm_cli.evidence", "bmm_cli.posterior", "bmm_cli.ensemble_metrics",
              "bmm_cli.spectrum", "bmm_cli.lowrank"]),
    ("params format", ["bmm_cli.params", "bmm_cli.arch"]),
    ("io", ["bmm_cli.atomic", "bmm_cli.store", "bmm_cli.writer", "bmm_cli.device", "bmm_cli.hooks",
            "bmm_cli.preflight", "bmm_cli.out_lock",
            "bmm_cli.budget", "bmm_cli.timing", "bmm_cli.lora", "bmm_cli.tokens", "bmm_cli.hub",
            "bmm_cli.keymap"]),
    ("anchor methods", ["bmm_cli.anchors", "bmm_cli.anchors.*"]),
    ("work dir", ["bmm_cli.stage", "bmm_cli.workdir"]),
    ("factor cache", ["bmm_cli.trial_solver", "bmm_cli.factor_cache"]),
    ("stages", ["bmm_cli.taskvec", "bmm_cli.activations", "bmm_cli.gram", "bmm_cli.anchor",
                "bmm_cli.default_params", "bmm_cli.solve", "bmm_cli.sample", "bmm_cli.plan"]),
    ("options", ["bmm_cli.options"]),
    ("search", ["bmm_cli.search", "bmm_cli.search.*"]),
    ("pipeline", ["bmm_cli.merge"]),
    ("cli", ["bmm_cli.cli", "bmm_cli.completions"]),
]
LAZY_ANYTHING = {"cli"}  # layers whose functions may import anything (start-up time)
LAZY_OK = {"transformers", "accelerate", "psutil", "ray", "lm_eval", "matplotlib", "skopt", "scipy",
           "huggingface_hub"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def layer_of(mod: str) -> int | None:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch(mod, pat) if pat.endswith(".*") else mod == pat for pat in patterns):
            return i
    return None


def _imports(mod: str, path: Path):
    """``(imported module, line, inside a function)`` for every import statement of ``mod``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    name = ".".join(base + ([child.module] if child.module else []))
                else:
                    name = child.module
                for a in child.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{name}.{a.name}"
                    out.append((sub if sub in MODULES else name, child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return out


IMPORTS = {mod: _imports(mod, path) for mod, path in MODULES.items()}


def test_every_module_has_a_layer_and_every_layer_entry_a_module():
    assert [m for m in MODULES if layer_of(m) is None] == []
    stale = [pat for _, pats in LAYERS for pat in pats
             if not any(fnmatch(m, pat) if pat.endswith(".*") else m == pat for m in MODULES)]
    assert stale == []


def test_no_module_imports_a_higher_layer():
    bad = []
    for mod, imports in IMPORTS.items():
        for name, line, _ in imports:
            if name in MODULES and layer_of(name) > layer_of(mod):
                bad.append(f"{MODULES[mod].name}:{line}: {mod} ({LAYERS[layer_of(mod)][0]}) imports {name} "
                           f"({LAYERS[layer_of(name)][0]})")
    assert bad == []


def test_the_import_graph_has_no_cycle():
    graph = {mod: sorted({n for n, _, _ in imps if n in MODULES and n != mod}) for mod, imps in IMPORTS.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def walk(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for nxt in graph[mod]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[mod] = 2

    for mod in graph:
        if mod not in state:
            walk(mod, [mod])
    assert cycles == []


def test_imports_inside_functions_only_where_start_up_time_needs_them():
    bad = []
    for mod, imports in IMPORTS.items():
        if LAYERS[layer_of(mod)][0] in LAZY_ANYTHING:
            continue
        for name, line, in_function in imports:
            if in_function and name.split(".")[0] not in LAZY_OK:
                bad.append(f"{MODULES[mod].relative_to(PACKAGE.parent)}:{line}: import of {name} inside a function")
    assert bad == []


@pytest.mark.parametrize("source, want", [
    ("import os\n", [("os", 1, False)]),
    ("from . import atomic, __version__\n", [("bmm_cli.atomic", 1, False), ("bmm_cli", 1, False)]),
    ("def f():\n    from .store import DTYPES\n", [("bmm_cli.store", 2, True)]),
    ("class C:\n    def m(self):\n        import ray\n", [("ray", 3, True)]),
])
def test_the_import_reader(tmp_path, source, want):
    """The checks above see what Python imports: relative names resolved, submodules named, functions noticed."""
    path = tmp_path / "mod.py"
    path.write_text(source)
    assert _imports("bmm_cli.solve", path) == want
