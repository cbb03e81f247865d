"""The package's structure, read from its imports (top-level and inside functions alike).

Layers, bottom up: the example models (zoo, digits: plain PyTorch/diffusers), the foundation (errors, plan, cache configs, fx helpers, the mesh description) <- `ops`
(what rewritten graphs call) <- `compiler` (capture, passes, rewrite) <- `debug` (dumps) <- `runtime` (process
groups, executor, cache/PipeFusion state, VAE, launcher) <- the API (`parallelize`, pipelines, loading) <-
the commands (`cli`, `serve`). A module imports only its own layer and the ones below; no two modules
import each other, directly or around a longer circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "xdit_fx"

#: (layer, module-name prefixes), bottom up; a module belongs to the first layer with a matching prefix
LAYERS = [
    ("models", ("xdit_fx.zoo", "xdit_fx.digits", "xdit_fx.version")),
    ("foundation", ("xdit_fx.errors", "xdit_fx.plan", "xdit_fx.cache_config", "xdit_fx.compiler.fx_utils",
                    "xdit_fx.compiler.mesh")),
    ("ops", ("xdit_fx.ops",)),
    ("compiler", ("xdit_fx.compiler",)),
    ("debug", ("xdit_fx.debug",)),
    ("runtime", ("xdit_fx.runtime",)),
    ("api", ("xdit_fx.api", "xdit_fx.pipeline", "xdit_fx.loading", "xdit_fx.__init__")),
    ("commands", ("xdit_fx.cli", "xdit_fx.serve")),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts)


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in its body (a `from package import name` that names a
    submodule counts as that submodule)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [s for s in subs if s in known] or [node.module]  # submodules, else the module's names
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("xdit_fx"):
                out.add(name)
    return out


def import_graph() -> nx.DiGraph:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p).removesuffix(".__init__") for p in paths} | {"xdit_fx.__init__"}
    g = nx.DiGraph()
    for p in paths:
        me = module_name(p)
        if me == "xdit_fx.__init__":
            src = me
        else:
            src = me.removesuffix(".__init__")
        g.add_node(src)
        for dst in imports_of(p, known):
            if dst == "xdit_fx":
                dst = "xdit_fx.__init__"
            if dst != src and not src.startswith(dst + ".") or dst == "xdit_fx.__init__" and src != dst:
                g.add_edge(src, dst)
    return g


GRAPH = import_graph()


def test_the_walk_sees_the_package():
    """The walk reads every module and the imports that matter (guards the two checks below)."""
    assert len(GRAPH) > 60
    assert GRAPH.has_edge("xdit_fx.runtime.module", "xdit_fx.compiler.rewrite")
    assert GRAPH.has_edge("xdit_fx.compiler.passes.sequence_parallel", "xdit_fx.ops.attention")


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    below = [(dst, LAYERS[layer_of(dst)][0]) for dst in GRAPH.successors(module) if layer_of(dst) > layer_of(module)]
    assert not below, f"{module} ({LAYERS[layer_of(module)][0]}) imports upward: {below}"


def test_no_import_cycle():
    cycles = [sorted(c) for c in nx.strongly_connected_components(GRAPH) if len(c) > 1]
    assert not cycles, f"modules that import each other (directly or around a circle): {cycles}"


def test_passes_never_import_the_runtime():
    """Passes see a Mesh, never process groups: nothing under compiler/ or ops/ reaches runtime/."""
    low = [m for m in GRAPH if layer_of(m) <= 3]
    reach = {m: sorted(d for d in nx.descendants(GRAPH, m) if d.startswith("xdit_fx.runtime")) for m in low}
    assert not {m: r for m, r in reach.items() if r}


MAX_FUNCTION_LINES = 120


def test_functions_are_short():
    """No function in the package is longer than a screenful or two (decorators and docstring included)."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{module_name(path)}.{node.name}: {node.end_lineno - start + 1} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_lint_is_clean():
    """ruff with the rule set of pyproject.toml (pyflakes, pycodestyle errors, McCabe complexity <= 25)."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the test extra: pip install -e '.[test]')")
    run = subprocess.run([ruff, "check", "--no-cache", str(PACKAGE)], cwd=PACKAGE.parent, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
