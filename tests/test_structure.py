"""The shape of the code, checked with ``ast`` and subprocesses: no import circles among the project's modules,
no argparse Namespace below a job's ``main``, modules of one concept (at most 450 lines), and job scripts whose
``--help`` imports neither torch nor Ray (so it is instant)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("ichmodel", "ray_jobs")
JOBS = ("preprocess", "train", "tune", "ensemble", "folds", "predict", "demo")
MAX_LINES = 450
#: The synthetic-data generator is one long recipe; every other library module holds one concept.
LONG_MODULES = {"synth.py"}
#: Script-only helpers, imported by a script's own folder on sys.path (``import _paths``), not by the package.
SCRIPT_HELPERS = {"_paths"}


def _modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of :data:`PACKAGES` (a package as its ``__init__``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).glob("*.py")):
            if path.stem in SCRIPT_HELPERS:
                continue
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``path`` imports anywhere in it: at module level, inside functions, under
    ``TYPE_CHECKING``. ``from pkg import mod`` counts as an import of ``pkg.mod`` when that is a module."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .y import z
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in modules else base)
    return {t for t in targets if t in modules and t != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycle_among_the_projects_modules():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    assert graph["ray_jobs.ensemble"] >= {"ray_jobs.folds", "ray_jobs.tune"}  # the walk sees real edges
    assert "ichmodel.trials" in graph["ray_jobs.experiment"]  # function-level imports count too
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _namespace_uses(tree: ast.AST) -> list[str]:
    """Functions other than ``main`` that take, are annotated with, or use an argparse Namespace: a parameter
    annotated ``Namespace``, or a parameter named ``args`` read with attribute access (``args.out``)."""
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) or fn.name == "main":
            continue
        params = [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]
        for param in params:
            if param.annotation is not None and "Namespace" in ast.unparse(param.annotation):
                found.append(f"{fn.name}({param.arg}: {ast.unparse(param.annotation)})")
        if any(p.arg == "args" for p in params):
            for node in ast.walk(fn):
                if (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "args"
                ):
                    found.append(f"{fn.name}(args) reads args.{node.attr}")
                    break
    return found


def _namespace_mutations(tree: ast.AST) -> list[str]:
    """Assignments to an attribute of ``args`` (``args.out = ...``, ``args.a, b = ...``) anywhere."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        for target in targets:
            for part in target.elts if isinstance(target, ast.Tuple | ast.List) else [target]:
                if (
                    isinstance(part, ast.Attribute)
                    and isinstance(part.value, ast.Name)
                    and part.value.id == "args"
                ):
                    found.append(f"line {node.lineno}: {ast.unparse(part)} = ...")
    return found


def test_no_function_below_a_jobs_main_takes_or_changes_the_namespace():
    offenders = {}
    for path in sorted((REPO_ROOT / "ray_jobs").glob("*.py")):
        tree = ast.parse(path.read_text())
        found = _namespace_uses(tree) + _namespace_mutations(tree)
        if found:
            offenders[path.name] = found
    assert not offenders, offenders


def test_the_namespace_checks_find_what_they_look_for():
    code = """
def main(args):
    return run(args)
def run(args):
    args.out = None
    args.name, x = "n", 1
    d[args.key] = 1
    return args.top_k
def load(options: argparse.Namespace):
    pass
"""
    tree = ast.parse(code)
    assert _namespace_uses(tree) == ["run(args) reads args.out", "load(options: argparse.Namespace)"]
    assert _namespace_mutations(tree) == ["line 5: args.out = ...", "line 6: args.name = ..."]


def _job_calls(tree: ast.AST) -> list[str]:
    """Calls of another module's ``main`` (``tune.main(...)``) and parses of a made-up command line
    (``parse_args([...])``, ``parse_job_args(parser, [...])``)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if isinstance(node.func, ast.Attribute) and name == "main":
            found.append(f"line {node.lineno}: {ast.unparse(node.func)}(...)")
        if name in {"parse_args", "parse_job_args"} and any(isinstance(a, ast.List) for a in node.args):
            found.append(f"line {node.lineno}: {name} of a made-up argv")
    return found


def test_no_job_runs_another_jobs_main_or_parses_a_made_up_command_line():
    offenders = {}
    for path in sorted((REPO_ROOT / "ray_jobs").glob("*.py")):
        found = _job_calls(ast.parse(path.read_text()))
        if found:
            offenders[path.name] = found
    assert not offenders, offenders
    sample = "tune.main(tune.parse_args(['--smoke-test']))\nmain(parse_args())"
    assert _job_calls(ast.parse(sample)) == ["line 1: tune.main(...)", "line 1: parse_args of a made-up argv"]


def _help_imports(job: str) -> set[str]:
    """The top-level packages ``python ray_jobs/<job>.py --help`` imports (``-X importtime``), run as a user
    runs it: from the repository root, with no PYTHONPATH (the script finds this checkout itself)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", f"ray_jobs/{job}.py", "--help"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert lines, proc.stderr[-2000:]
    return {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in lines}


@pytest.mark.slow
@pytest.mark.parametrize("job", JOBS)
def test_a_jobs_help_imports_neither_ray_nor_torch(job):
    imported = _help_imports(job)
    assert "argparse" in imported and "ichmodel" in imported  # the check sees the script's imports
    assert "ray" not in imported
    assert "torch" not in imported


def test_no_library_module_is_longer_than_one_concept_needs():
    long = {
        path.name: n
        for path in sorted((REPO_ROOT / "ichmodel").glob("*.py"))
        if path.name not in LONG_MODULES and (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _options_and_parsers():
    from ray_jobs import ensemble, folds, predict, preprocess, train, tune

    return [
        (tune.SearchOptions, tune.get_args_parser()),
        (ensemble.EnsembleOptions, ensemble.get_args_parser()),
        (folds.FoldOptions, folds.get_args_parser()),
        (preprocess.PreprocessJob, preprocess.get_args_parser()),
        (predict.PredictOptions, predict.get_args_parser()),
        (train.TrainRun, train.get_args_parser()),
    ]


def test_a_jobs_typed_options_have_its_command_lines_defaults():
    """What the demo and ``ensemble --folds`` build without a command line is what the command line gives."""
    for cls, parser in _options_and_parsers():
        dests = {a.dest for a in parser._actions if a.dest != "help"}
        for field in dataclasses.fields(cls):
            if field.name == "given":
                continue
            assert field.name in dests, f"{cls.__name__}.{field.name} is no option of its job"
            if field.default is dataclasses.MISSING:
                continue
            default = parser.get_default(field.name)
            if isinstance(default, list):
                default = tuple(tuple(v) if isinstance(v, list) else v for v in default)
            assert field.default == default, (cls.__name__, field.name, field.default, default)


def test_a_namespace_is_no_options_dataclass():
    """The options check above compares like with like: argparse's defaults, not a parsed Namespace."""
    assert not dataclasses.is_dataclass(argparse.Namespace())


def _marked_copy(folder: Path) -> Path:
    """A copy of the code whose library prints ``SUBMITTED COPY <file>`` when imported."""
    import shutil

    for name in ("ichmodel", "ray_jobs", "search_spaces"):
        shutil.copytree(REPO_ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    with (folder / "ichmodel" / "constants.py").open("a") as file:
        file.write('\nprint(f"SUBMITTED COPY {__file__}")\n')
    return folder


def _imported_copy(output: str) -> Path:
    (line,) = {line for line in output.splitlines() if "SUBMITTED COPY" in line}
    return Path(line.split("SUBMITTED COPY ", 1)[1].strip())


@pytest.mark.slow
def test_a_script_imports_the_code_beside_it_not_an_installed_copy(tmp_path):
    """``python <copy>/ray_jobs/predict.py`` from elsewhere, without PYTHONPATH, imports <copy>'s library
    (ray_jobs/_paths.py), not the installed package or the checkout running the tests."""
    copy = _marked_copy(tmp_path / "copy")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(copy / "ray_jobs" / "predict.py"), "--help"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _imported_copy(proc.stdout) == copy / "ichmodel" / "constants.py"


@pytest.mark.ray
@pytest.mark.slow
def test_a_submitted_job_imports_the_submitted_copy_of_the_code(ray_head, tmp_path):
    """``ray job submit --working-dir COPY -- python ray_jobs/<job>.py`` runs COPY's code, not the checkout the
    cluster has on its PYTHONPATH: the copy's library announces itself when imported."""
    copy = _marked_copy(tmp_path / "copy")
    assert str(REPO_ROOT) in ray_head.env["PYTHONPATH"]  # the cluster's own checkout, which must not win
    proc = ray_head.run(
        [f"{Path(sys.executable).parent}/ray", "job", "submit", "--address", ray_head.dashboard,
         "--working-dir", str(copy), "--", "python", "ray_jobs/predict.py", "--help"]
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out.lower(), out[-4000:]
    imported = _imported_copy(out)
    assert imported.name == "constants.py" and not imported.is_relative_to(REPO_ROOT)
    assert "usage: predict.py" in out
