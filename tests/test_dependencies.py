"""Every package xdit_fx imports (at the top of a module or inside a function) is declared in pyproject.toml,
as a dependency or in an extra; and every required dependency is imported by the package."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imported_modules(top_level_only: bool = False) -> dict[str, set[str]]:
    """Top-level module name -> the package files that import it (with `top_level_only`: in the module's body,
    so importing the module needs it)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "xdit_fx").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in (tree.body if top_level_only else ast.walk(tree)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top != "xdit_fx" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    req = {_norm(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]) for d in project["dependencies"]}
    extras = {_norm(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0])
              for group in project.get("optional-dependencies", {}).values() for d in group}
    return req, extras


def test_every_import_is_declared_and_every_requirement_imported():
    dists = packages_distributions()
    required, extras = _declared()
    imported = _imported_modules()
    missing = {}
    used = set()
    for module, files in imported.items():
        names = {_norm(d) for d in dists.get(module, [module])}
        used |= names
        if not names & (required | extras):
            missing[module] = sorted(files)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    never = sorted(required - used)
    assert not never, f"required in pyproject.toml but never imported by xdit_fx: {never}"


def test_modules_of_the_core_install_import_only_required_packages():
    """A module outside the service (xdit_fx/serve, the `serve` extra) that imports a package at its top needs it
    at import time: that package must be a required dependency, not only an extra (Pillow for the digits
    pipeline)."""
    dists = packages_distributions()
    required, _ = _declared()
    bad = {module: sorted(f for f in files if not f.startswith("xdit_fx/serve/"))
           for module, files in _imported_modules(top_level_only=True).items()
           if not {_norm(d) for d in dists.get(module, [module])} & required}
    bad = {m: f for m, f in bad.items() if f}
    assert not bad, f"imported at module top level but only an extra (or undeclared): {bad}"
