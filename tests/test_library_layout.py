"""The library's layout: no import cycle among ``ichmodel``'s modules (read with ``ast``, imports inside
functions included), and the modules a job's ``--help`` needs load without torch or Ray."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LIBRARY = REPO_ROOT / "ichmodel"
#: What the jobs read before they parse their arguments: configs, constants, paths, shards, stages, splits,
#: the prediction table and everything that reads it.
LIGHT_MODULES = ("config", "constants", "io", "shards", "stages", "splits", "prediction_table", "folds",
                 "ensemble", "submission", "report", "demo_data", "readers", "preprocess")  # fmt: skip


def library_imports() -> dict[str, set[str]]:
    """``{module: the ichmodel modules it imports}`` for every module of ``ichmodel/``."""
    modules = {p.stem for p in LIBRARY.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name in modules:
        deps = set()
        for node in ast.walk(ast.parse((LIBRARY / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "ichmodel":
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ichmodel."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ichmodel.")}
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or ``None``."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for dep in sorted(graph.get(node, ())):
            cycle = visit(dep, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_find_cycle_finds_one_and_no_module_of_the_library_is_in_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = library_imports()
    assert {"engine", "stages", "train_step", "validation", "splits"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_modules_a_jobs_help_needs_import_neither_torch_nor_ray():
    code = (
        "import importlib, json, sys\n"
        f"for name in {LIGHT_MODULES!r}: importlib.import_module('ichmodel.' + name)\n"
        "print(json.dumps(sorted(m for m in ('torch', 'ray') if m in sys.modules)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []
