"""The package's import graph: no cycles, and no module importing from a station above its own.

Every `import` in every module counts, including those inside functions (lazy imports still tie modules
together). A new module must be given a station here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import maskedlm

PACKAGE = Path(maskedlm.__file__).parent

# Low to high. A module may import from its own station (without a cycle) and from the stations below.
STATIONS = [
    ("foundations", {"errors", "progress", "paths", "runtime", "config", "flops"}),
    ("text, data and the model", {"tokenizer", "corpus", "data", "batches", "masking", "model", "modernbert", "distributed", "optim"}),
    ("formats on disk", {"checkpoint", "hf", "loading", "schedules", "plots"}),
    ("what runs on a model", {"fill", "evaluate", "finetune", "probe", "step", "feed", "metrics"}),
    ("a pre-training run", {"run", "artifacts", "train"}),
    ("front ends", {"serve", "cli", "__main__", "__init__"}),
]


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                absolute = node.level == 0 and (node.module or "").split(".")[0] == "maskedlm"
                if node.level == 1 or absolute:
                    parts = (node.module or "").split(".")[1 if absolute else 0:]
                    deps |= {parts[0]} if parts and parts[0] else {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("maskedlm.")}
        graph[path.stem] = deps - {path.stem}
    return graph


def test_every_module_has_a_station():
    placed = [m for _, mods in STATIONS for m in mods]
    assert len(placed) == len(set(placed)), "a module is in two stations"
    assert set(import_graph()) == set(placed)


def test_no_module_imports_from_above_its_station():
    station = {m: i for i, (_, mods) in enumerate(STATIONS) for m in mods}
    upward = [f"{m} ({STATIONS[station[m]][0]}) imports {d} ({STATIONS[station[d]][0]})"
              for m, deps in import_graph().items() for d in sorted(deps) if station[d] > station[m]]
    assert not upward, upward


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports (as a path a -> ... -> a), or None."""
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> list[str] | None:
        if m in path:
            return path[path.index(m):] + [m]
        if m in done:
            return None
        for d in sorted(graph[m]):
            if cycle := visit(d, path + [m]):
                return cycle
        done.add(m)
        return None

    return next((c for m in sorted(graph) if (c := visit(m, [])) is not None), None)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_can_fail():
    """The reader sees lazy imports inside functions; a planted cycle is found."""
    graph = import_graph()
    assert "train" in graph["cli"]  # imported inside a function
    assert {"checkpoint", "hf"} <= graph["loading"]
    planted = {**graph, "errors": graph["errors"] | {"cli"}}
    cycle = find_cycle(planted)
    assert cycle is not None and cycle[0] == cycle[-1] and {"errors", "cli"} <= set(cycle)
