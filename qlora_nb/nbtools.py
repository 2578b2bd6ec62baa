"""Keep committed notebooks clean: strip outputs, and check the shape every notebook shares.

Leaves out: running notebooks (runner.py). The shape rules are in notebooks/CONVENTIONS.md.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat

SECTION_ORDER = ("## Setup", "## Imports", "## Parameters", "## Summary")
_VOLATILE_CELL_METADATA = ("execution", "papermill", "collapsed", "scrolled", "ExecuteTime")


def strip_notebook(nb) -> bool:
    """Remove outputs, execution counts and run metadata in place; True if anything changed."""
    changed = False
    for cell in nb.cells:
        if cell.cell_type == "code":
            if cell.get("outputs") or cell.get("execution_count") is not None:
                cell.outputs, cell.execution_count, changed = [], None, True
        for key in _VOLATILE_CELL_METADATA:
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
    for key in ("papermill", "widgets"):
        if key in nb.metadata:
            del nb.metadata[key]
            changed = True
    return changed


def strip_file(path: Path) -> bool:
    nb = nbformat.read(path, as_version=4)
    if strip_notebook(nb):
        nbformat.write(nb, path)
        return True
    return False


def convention_problems(path: Path) -> list[str]:
    """Everything in one notebook that breaks notebooks/CONVENTIONS.md (empty list: fine)."""
    nb = nbformat.read(path, as_version=4)
    problems = []
    cells = nb.cells
    if not cells or cells[0].cell_type != "markdown" or not re.match(r"# \d\d · ", cells[0].source):
        problems.append("first cell must be a markdown title '# NN · Title'")
    elif "What you will learn" not in cells[0].source:
        problems.append("title cell must say 'What you will learn'")
    headings = [c.source.splitlines()[0].strip() for c in cells if c.cell_type == "markdown" and c.source]
    positions = []
    for section in SECTION_ORDER:
        where = [i for i, h in enumerate(headings) if h == section]
        if not where:
            problems.append(f"missing markdown section '{section}'")
        positions.append(where[0] if where else -1)
    if all(p >= 0 for p in positions) and positions != sorted(positions):
        problems.append(f"sections out of order; expected {' -> '.join(SECTION_ORDER)}")
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        problems.append(f"needs exactly one cell tagged 'parameters', found {len(tagged)}")
    else:
        try:
            tree = ast.parse(tagged[0].source)
        except SyntaxError as err:
            problems.append(f"parameters cell does not parse: {err}")
        else:
            if not all(isinstance(node, (ast.Assign, ast.AnnAssign)) for node in tree.body):
                problems.append("parameters cell must hold plain assignments only")
            names = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                     if isinstance(t, ast.Name)}
            if "profile" not in names:
                problems.append("parameters cell must set `profile`")
    for i, cell in enumerate(cells):
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None):
            problems.append(f"cell {i} carries outputs; run `python -m qlora_nb strip`")
            break
    return problems


def package_references(path: Path) -> set[tuple[str, str]]:
    """(module, name) pairs a notebook uses from qlora_nb: `from qlora_nb.m import n` and `m.n` calls."""
    nb = nbformat.read(path, as_version=4)
    refs: set[tuple[str, str]] = set()
    aliases: dict[str, str] = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse("\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!"))))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qlora_nb"):
                for alias in node.names:
                    if node.module == "qlora_nb":
                        aliases[alias.asname or alias.name] = f"qlora_nb.{alias.name}"
                    else:
                        refs.add((node.module, alias.name))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("qlora_nb."):
                        aliases[alias.asname or alias.name] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                refs.add((aliases[node.value.id], node.attr))
        refs.update((module, "") for module in aliases.values())
    return refs
