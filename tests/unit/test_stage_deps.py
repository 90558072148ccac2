"""Every DVC stage lists, among its deps, each package module that can change its outputs: the modules its stage
module imports, directly or not (at the top or inside a function), within the package. A module missing there is a
change to the code that `dvc repro` would not re-run the stage for: its outputs would silently be stale.

`test_a_missing_dep_is_caught` removes one dep from a stage and checks that the walk names it: the test can fail."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from dvc.repo import Repo

from tests.helpers import ROOT

PACKAGE = ROOT / "src" / "action3d"

# Modules a stage imports that cannot change what it writes, and why.
CANNOT_CHANGE_OUTPUTS = {
    "action3d/__init__.py": "the package marker (its version string)",
    "action3d/errors.py": "the exception types: a message, never an output",
    "action3d/progress.py": "progress bars on the terminal",
    "action3d/atomic.py": "how a file is written (atomically), not what it holds",
    "action3d/stages/__init__.py": "the stage table: names and options, which test_stage_table.py checks against "
                                   "dvc.yaml",
    "action3d/tracking/__init__.py": "the package marker of tracking",
    "action3d/tracking/store.py": "where MLflow's store is: what a stage logs to, not what it writes",
    "action3d/tracking/runs.py": "the MLflow run a stage logs into (its id in run.json is new every run anyway)",
    "action3d/storage.py": "the S3 mirror of checkpoints: a copy, not an output",
}


def module_file(name: str) -> Path | None:
    """src/action3d/<...>.py or <...>/__init__.py for an `action3d.<...>` module name; None outside the package."""
    if name != "action3d" and not name.startswith("action3d."):
        return None
    path = PACKAGE.parent.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def lazy_exports(package_init: Path) -> dict[str, str]:
    """A package's names imported on first use (`_EXPORTS = {name: submodule}` beside a module `__getattr__`)."""
    for node in ast.parse(package_init.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def imported(path: Path) -> set[Path]:
    """The package's modules `path` imports anywhere in its body (function-level imports included)."""
    here = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *filter(None, [base])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]  # `from pkg import module`
            if (init := module_file(base)) is not None and init.name == "__init__.py":
                exports = lazy_exports(init)  # `from action3d.data import read_manifest`: data/annotations.py
                names += [f"{base}.{exports[alias.name]}" for alias in node.names if alias.name in exports]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                if (file := module_file(".".join(parts[:i]))) is not None:
                    found.add(file)
    return found


def allowed(module: Path) -> bool:
    return str(module.relative_to(PACKAGE.parent)) in CANNOT_CHANGE_OUTPUTS


def closure(start: Path) -> set[Path]:
    """`start` and what it imports, and so on; not through an allowed module (what it calls cannot change outputs
    through it; what the stage itself imports is walked on its own path)."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            if not allowed(path):
                todo.extend(imported(path) - seen)
    return seen


def covered(module: Path, deps: list[Path]) -> bool:
    return any(module == dep or dep in module.parents for dep in deps)


def missing(stage) -> list[str]:
    """The package modules `stage` imports (transitively) that can change its outputs and that its deps omit."""
    command = stage.cmd.split()
    assert command[:2] == ["action3d", "stage"], stage.cmd
    entry = PACKAGE / "stages" / f"{command[2]}.py"
    deps = [Path(dep.def_path) if Path(dep.def_path).is_absolute() else ROOT / dep.def_path
            for dep in stage.deps if not hasattr(dep, "params")]
    return sorted(str(m.relative_to(PACKAGE.parent)) for m in closure(entry) if not covered(m, deps) and not allowed(m))


@pytest.fixture(scope="module")
def dvc_stages() -> dict:
    with Repo(str(ROOT)) as repo:
        return {stage.addressing: stage for stage in repo.index.stages}


def test_every_stage_lists_the_modules_that_can_change_its_outputs(dvc_stages):
    gaps = {name: missing(stage) for name, stage in dvc_stages.items()}
    gaps = {name: modules for name, modules in gaps.items() if modules}
    assert not gaps, ("add these to the stage's deps in dvc.yaml (or, if a module cannot change what the stage "
                      f"writes, to CANNOT_CHANGE_OUTPUTS with why): {gaps}")


def test_the_allow_list_names_real_modules_only():
    assert all((PACKAGE.parent / name).is_file() for name in CANNOT_CHANGE_OUTPUTS)


def test_a_missing_dep_is_caught(dvc_stages):
    stage = dvc_stages["evaluate@finetune"]
    kept = [dep for dep in stage.deps if getattr(dep, "def_path", "") != "src/action3d/engine.py"]
    assert len(kept) == len(stage.deps) - 1

    class WithoutEngine:
        cmd, deps = stage.cmd, kept

    assert "action3d/engine.py" in missing(WithoutEngine)
    assert "action3d/engine.py" not in missing(stage)
