"""Every committed notebook keeps the shared shape, carries no outputs, and uses only what the package has."""
import ast
import importlib

import nbformat
import pytest

from qlora_nb import nbtools, profiles, runner

NOTEBOOKS = runner.list_notebooks()


def test_the_workbook_has_its_notebooks():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "00_setup.ipynb"
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == sorted(set(numbers)), "notebook numbers must be unique"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_follows_conventions(path):
    assert nbtools.convention_problems(path) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_uses_only_what_the_package_has(path):
    missing = []
    for module, name in sorted(nbtools.package_references(path)):
        mod = importlib.import_module(module)
        if name and not hasattr(mod, name):
            missing.append(f"{module}.{name}")
    assert not missing, f"{path.name} calls names the package no longer has: {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_profile_overrides_name_real_parameters(path):
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    names = {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets}
    for profile in profiles.PROFILES:
        unknown = set(profiles._OVERRIDES.get(profile, {}).get(path.stem, {})) - names
        assert not unknown, f"profile {profile} sets {unknown}, which {path.name} has no parameter for"


def test_strip_removes_outputs(tmp_path):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(1)")
    cell.outputs = [nbformat.v4.new_output("stream", text="1\n")]
    cell.execution_count = 3
    nb.cells = [cell]
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    assert nbtools.strip_file(path) is True
    again = nbformat.read(path, as_version=4)
    assert again.cells[0].outputs == [] and again.cells[0].execution_count is None
    assert nbtools.strip_file(path) is False


def test_conventions_catch_a_broken_notebook(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("no title"), nbformat.v4.new_code_cell("import os")]
    path = tmp_path / "99_broken.ipynb"
    nbformat.write(nb, path)
    problems = " | ".join(nbtools.convention_problems(path))
    assert "title" in problems and "## Setup" in problems and "parameters" in problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_sees_every_parameter(path):
    from papermill.translators import PythonTranslator

    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    names = [t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets]
    seen = [p.name for p in PythonTranslator.inspect(cell)]
    assert seen == names, f"papermill cannot parse some parameter lines of {path.name} (an '=' in a comment?)"
