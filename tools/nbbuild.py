"""Build a workbook notebook from a compact Python list of cells (an authoring aid; notebooks are the source of truth).

Usage from a script:
    from tools.nbbuild import md, code, write
    write("notebooks/00_setup.ipynb", [md("# 00 · ..."), code("x = 1", tags=["parameters"]), ...])
"""
from __future__ import annotations

import nbformat

SETUP_CELL = '''# Setup: on Colab (or wherever qlora_nb is missing) install the workbook package; locally this does nothing.
import importlib.util, subprocess, sys
if importlib.util.find_spec("qlora_nb") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "qlora-workbook @ git+https://github.com/qlora-workbook/qlora-workbook"], check=True)'''


def md(text: str, tags=()):
    cell = nbformat.v4.new_markdown_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def code(text: str, tags=()):
    cell = nbformat.v4.new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def setup_cells():
    """The `## Setup` markdown + the shared setup code cell."""
    return [md("## Setup"), code(SETUP_CELL)]


def write(path: str, cells) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"c{i:02d}"
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    nbformat.validate(nb)
    nbformat.write(nb, path)
