"""The package's shape: no import cycles between koala modules, counting imports inside functions too (a lazy
import is still a dependency); only `if TYPE_CHECKING:` imports are exempt."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_graph() -> dict[str, set[str]]:
    files = {".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (SRC / "koala").rglob("*.py")}
    graph = {}
    for name, file in files.items():
        deps: set[str] = set()

        class Imports(ast.NodeVisitor):
            def visit_If(self, node: ast.If) -> None:
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    self.generic_visit(node)

            def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
                if node.module and node.module.startswith("koala"):
                    deps.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                                for a in node.names)

            def visit_Import(self, node: ast.Import) -> None:
                deps.update(a.name for a in node.names if a.name.startswith("koala"))

        Imports().visit(ast.parse(file.read_text()))
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_cycles():
    graph, state, cycles = module_graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [node, dep]) if dep in path else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, path + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert len(graph) > 30 and not cycles, cycles
