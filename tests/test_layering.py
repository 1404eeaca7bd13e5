"""The library's layering: imports flow one way (no cycle, imports inside functions included),
and minigpt_jax never imports torch_compat (torch_compat depends on it, never the reverse)."""

import ast
import graphlib
import pathlib

import pytest
from conftest import REPO

ROOT = REPO / "minigpt_jax"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imported(name: str, path: pathlib.Path) -> set[str]:
    """Every module `name` imports, at module level or inside a function, absolute or relative:
    for `from a import b` the module a.b when there is one, else a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                out.add(child if child in MODULES else base)
    return out


def edges(name: str, targets: set[str]) -> set[str]:
    """The library modules those imports run: the module itself, and every package above it
    that `name` is not inside (importing a.b.c runs a.b's __init__ first)."""
    out = set()
    for target in targets:
        parts = target.split(".")
        for i in range(2, len(parts) + 1):
            above = ".".join(parts[:i])
            if above in MODULES and above != name and not name.startswith(above + "."):
                out.add(above)
    return out


IMPORTS = {name: imported(name, path) for name, path in MODULES.items()}


def test_the_walk_sees_the_library_and_its_imports():
    assert {"minigpt_jax.runner", "minigpt_jax.data", "minigpt_jax.data.sources"} <= set(MODULES)
    assert "minigpt_jax.data.sequences" in IMPORTS["minigpt_jax.data.split"]
    assert "minigpt_jax.hf" in edges("minigpt_jax.runner", IMPORTS["minigpt_jax.runner"])


def test_no_import_cycle_inside_the_library():
    graph = {name: edges(name, targets) for name, targets in IMPORTS.items()}
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        cycle = reversed(e.args[1])  # graphlib lists a cycle dependency first
        pytest.fail(f"import cycle (each imports the next): {' -> '.join(cycle)}")
    assert set(order) == set(MODULES)


def test_the_library_never_imports_torch_compat():
    bad = sorted(name for name, targets in IMPORTS.items()
                 if any(t == "torch_compat" or t.startswith("torch_compat.") for t in targets))
    assert not bad, f"these import torch_compat (pass readers in instead): {', '.join(bad)}"
