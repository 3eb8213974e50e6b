"""The package's shape (issue "Structure"): modules stay small and synthesis never reaches for the trainer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "lungddpm"
MAX_LINES = 400


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every lungddpm module ``path`` imports, at module level or inside functions (relative imports resolved)."""
    package = _module(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("lungddpm")}


def test_imports_are_resolved_to_real_modules() -> None:
    modules = {_module(p) for p in PACKAGE.rglob("*.py")}
    assert "lungddpm.diffusion.train" in modules and "lungddpm.data.phantom.dicom" in modules
    assert imports_of(PACKAGE / "synthesis" / "volume_run.py") >= {"lungddpm.diffusion.checkpoint", "lungddpm.io"}


def test_no_module_is_over_400_lines() -> None:
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {p: n for p, n in sizes.items() if n > MAX_LINES}


def test_sampling_and_synthesis_never_import_the_training_loop() -> None:
    users = [*PACKAGE.glob("synthesis/*.py"), *(PACKAGE / "diffusion" / f for f in ("sample.py", "checkpoint.py"))]
    trainer = {"lungddpm.diffusion.train", "lungddpm.diffusion.jobs", "lungddpm.diffusion.data"}
    assert {str(p.relative_to(REPO)): sorted(imports_of(p) & trainer) for p in users if imports_of(p) & trainer} == {}


def test_per_case_jobs_without_a_network_do_not_load_torch() -> None:
    """torch costs ~1.3 s of import per job; the preprocessing, ROI and lesion-metric jobs never run a network."""
    modules = ["lungddpm.preprocessing.rois", "lungddpm.preprocessing.preprocess", "lungddpm.metrics.lesion"]
    code = f"import sys; import {', '.join(modules)}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_tests_share_helpers_through_support_only() -> None:
    for path in (REPO / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                assert not node.module.startswith("test_"), f"{path}: import helpers from tests/support.py"


def test_ci_runs_the_readmes_test_command_and_groups_the_workflow_tests() -> None:
    """CI (``.ci/run``) runs the README's test command, verbatim; under its xdist workers every test that uses the
    CI-size workflow is put in one group, before xdist reads the groups (the workflow built once, in one worker, and
    never rerun by two tests side by side: without ``tryfirst`` xdist read no group and built it twice)."""
    import re

    import conftest
    import pytest

    readme = (REPO / "README.md").read_text()
    block = re.search(r"# 2\. install and run the tests.*\n(?:#.*\n)*((?:[^#\n].*\n)+)", readme)
    assert block, "README: no test command under '# 2. install and run the tests'"
    command = " ".join(line.strip().rstrip("\\").strip() for line in block.group(1).splitlines())
    ci = " ".join(line.strip().rstrip("\\").strip() for line in (REPO / ".ci/run").read_text().splitlines())
    assert "python -m pytest -n 2 --dist loadgroup" in command and command in ci

    class Item:
        def __init__(self, *fixtures: str) -> None:
            self.fixturenames, self.marks = fixtures, []

        def add_marker(self, mark: pytest.MarkDecorator) -> None:
            self.marks.append(mark.mark)

    items = [Item("tmp_path"), Item("studio", "demo_workflow", "tmp_path"), Item("demo_workflow")]
    conftest.pytest_collection_modifyitems(None, items)  # type: ignore[arg-type]
    assert [[(m.name, m.args) for m in item.marks] for item in items] == [
        [],
        [("xdist_group", ("demo_workflow",))],
        [("xdist_group", ("demo_workflow",))],
    ]
    assert conftest.pytest_collection_modifyitems.pytest_impl["tryfirst"]  # type: ignore[attr-defined]
