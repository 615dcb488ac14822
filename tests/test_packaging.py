"""What `pip install dit-bench` brings is what the code imports: an import that only works
because another package happens to pull its distribution in breaks when that one stops."""

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).parent.parent


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> tuple[set[str], set[str]]:
    """The distributions of `dependencies`, and those of every extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {canonical(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in reqs}

    extras = set().union(*map(names, project["optional-dependencies"].values()))
    return names(project["dependencies"]), extras


def imported() -> tuple[set[str], set[str]]:
    """Top-level names of third-party modules dit_bench imports: at module level, and inside
    functions (lazily)."""
    top, lazy = set(), set()
    for path in (ROOT / "dit_bench").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                name = mod.split(".")[0]
                if name not in sys.stdlib_module_names and name != "dit_bench":
                    (top if node.col_offset == 0 else lazy).add(name)
    return top, lazy


def test_every_import_is_declared():
    deps, extras = declared()
    dists = metadata.packages_distributions()
    top, lazy = imported()
    undeclared = {m for m in top if not {canonical(d) for d in dists.get(m, [m])} & deps}
    assert not undeclared, f"imported at module level, not in dependencies: {undeclared}"
    undeclared = {
        m for m in lazy if not {canonical(d) for d in dists.get(m, [m])} & (deps | extras)
    }
    assert not undeclared, f"imported, in neither dependencies nor an extra: {undeclared}"
