"""The package's layers (pyproject.toml's import-linter contracts) and its private names.

``lint-imports`` runs in CI; these tests make the same checks part of ``pytest``.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hwslim", "profilers")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            out[".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = p
    return out


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed (the dev extra)")
def test_import_contracts_are_kept():
    run = subprocess.run(["lint-imports", "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "0 broken" in run.stdout


def _imported(mods: dict[str, Path], name: str, tree: ast.Module, pkg: str):
    """(target module, imported names, line) of every hwslim/profilers import, in functions too."""
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - n.level + 1] + ([base] if base else []))
            if base.split(".")[0] in PACKAGES:
                yield base, [a.name for a in n.names], n.lineno


def test_no_import_cycles_among_modules():
    """Tarjan's strongly connected components over every import, those inside functions included."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        tree = ast.parse(p.read_text())
        targets = [t for n in ast.walk(tree) if isinstance(n, ast.Import) for t in (a.name for a in n.names)]
        for base, names, _ in _imported(mods, m, tree, pkg):
            targets += [base] + [f"{base}.{a}" for a in names]
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != m:
                edges[m].add(t)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in mods:
        if v not in index:
            visit(v)
    assert cycles == []


def test_private_names_stay_in_their_module():
    """No ``from hwslim.x import _name``, and no ``module._name`` on an imported hwslim module."""
    mods = _modules()
    found = []
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        tree = ast.parse(p.read_text())
        aliases = {}
        for base, names, line in _imported(mods, m, tree, pkg):
            for a in names:
                if a.startswith("_") and not a.startswith("__"):
                    found.append(f"{p.relative_to(ROOT)}:{line} imports {base}.{a}")
                if f"{base}.{a}" in mods:
                    aliases[a] = f"{base}.{a}"
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom):
                for a in n.names:
                    if a.asname and a.name in aliases:
                        aliases[a.asname] = aliases[a.name]
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases \
                    and n.attr.startswith("_") and not n.attr.startswith("__"):
                found.append(f"{p.relative_to(ROOT)}:{n.lineno} uses {aliases[n.value.id]}.{n.attr}")
    assert found == []
