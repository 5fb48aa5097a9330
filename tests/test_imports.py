"""The package's modules form layers: no module imports (even lazily, inside a function) one that
imports it back."""

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "gblr"


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in SOURCE.rglob("*.py"):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if parts[-1] == "__init__" else module.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("gblr")):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # `from . import submodule` depends on the submodule alone
                    submodule = f"{source}.{alias.name}"
                    targets.add(submodule if (SOURCE.parent / (submodule.replace(".", "/") + ".py")).is_file() else source)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith("gblr")}
        graph[module] = targets
    return graph


def test_no_import_cycles():
    graph, cycles, done = import_graph(), [], set()

    def visit(module, path):
        if module in path:
            cycles.append(" -> ".join(path[path.index(module):] + [module]))
            return
        if module in done or module not in graph:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert len(graph) > 30 and "gblr.fit" in graph["gblr.convert"]
    assert not cycles, cycles
