"""The code's layout: no import cycles between modules of evomerge/ and irt/ — counting the
imports inside functions too (a lazy import hides a cycle, it does not break it); imports under
``if TYPE_CHECKING:`` are annotations only and do not count."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in ("evomerge", "irt"):
        for p in (REPO / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of the project it imports (anywhere in its body)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}

    class Imports(ast.NodeVisitor):
        def __init__(self, module: str, package: str):
            self.module, self.package = module, package

        def visit_If(self, node: ast.If) -> None:
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                self.generic_visit(node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                parts = self.package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for target in [base] + [f"{base}.{a.name}" for a in node.names]:
                self._add(target)

        def visit_Import(self, node: ast.Import) -> None:
            for a in node.names:
                self._add(a.name)

        def _add(self, target: str) -> None:
            # a submodule importing its own package (``from evomerge.zoo import data``) is not a cycle
            if target in mods and target != self.module and not self.module.startswith(target + "."):
                graph[self.module].add(target)

    for m, p in mods.items():
        package = m if p.name == "__init__.py" else m.rpartition(".")[0]
        Imports(m, package).visit(ast.parse(p.read_text(encoding="utf-8")))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_known_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "evomerge.merge.recipe" in graph["evomerge.merge.mergekit_io"]  # the graph sees imports
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) + ")" for c in found)


def test_the_readme_module_map_matches_the_tree():
    """README's module map names every top-level module and package of evomerge/ and every merge-method
    module, and every path it lists exists."""
    import re

    text = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- module-map -->\n```\n(.*?)```", text, re.S)
    assert m, "README.md has no module map (a fenced block after <!-- module-map -->)"
    block = m.group(1)
    for line in block.splitlines():
        path = line.split(" ", 1)[0]
        if path:
            assert (REPO / path).exists(), f"README module map names {path}, which does not exist"
    top = [p.name + ("/" if p.is_dir() else "") for p in (REPO / "evomerge").iterdir()
           if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()]
    methods = [p.name for p in (REPO / "evomerge" / "merge" / "methods").glob("*.py") if p.name != "__init__.py"]
    missing = [n for n in top + methods if not re.search(rf"(?<![\w.]){re.escape(n)}", block)]
    assert not missing, f"README module map does not name {missing}"
