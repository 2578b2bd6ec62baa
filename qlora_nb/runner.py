"""Run every workbook notebook headless with papermill and report notebook, status and seconds.

Leaves out: what the notebooks compute (they do) and test assertions (nbval and pytest do).
A failing notebook is reported with its cell and error, and the others still run.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .paths import repo_root, runs_dir
from .profiles import notebook_parameters


@dataclass
class NotebookResult:
    """One notebook's outcome: status is 'ok' or 'failed'; error names the cell when failed."""
    name: str
    status: str
    seconds: float
    output: Path
    error: str = ""


def notebooks_dir() -> Path:
    root = repo_root()
    if root is None:
        raise FileNotFoundError("The notebooks live in the git checkout; clone the repo and `pip install -e .` there.")
    return root / "notebooks"


def list_notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in order, optionally only those whose name starts with one of `only`."""
    paths = sorted(notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
        if not paths:
            raise ValueError(f"no notebook matches {only}; names look like 01_low_rank")
    return paths


def run_notebook(path: Path, out_dir: Path, profile: str, extra: dict | None = None) -> NotebookResult:
    """Execute one notebook with the profile's parameters into out_dir; never raises for a cell error."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output = out_dir / path.name
    params = {**notebook_parameters(profile, path.stem), **(extra or {})}
    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(path), str(output), parameters=params, cwd=str(path.parent),
                                   kernel_name="python3", progress_bar=True)
        return NotebookResult(path.stem, "ok", time.perf_counter() - start, output)
    except PapermillExecutionError as err:
        # papermill's cell_index counts its injected-parameters cell; exec_count is what a learner sees.
        msg = f"cell [{err.exec_count}]: {err.ename}: {str(err.evalue).splitlines()[0] if err.evalue else ''}"
        return NotebookResult(path.stem, "failed", time.perf_counter() - start, output, msg)
    except Exception as err:  # kernel died, bad parameters: still report and go on
        return NotebookResult(path.stem, "failed", time.perf_counter() - start, output, f"{type(err).__name__}: {err}")


def format_table(results: list[NotebookResult]) -> str:
    """A plain-text table: notebook | status | seconds (| error)."""
    width = max([len(r.name) for r in results] + [8])
    lines = [f"{'notebook':<{width}}  status   seconds", f"{'-' * width}  ------  --------"]
    for r in results:
        line = f"{r.name:<{width}}  {r.status:<6}  {r.seconds:8.1f}"
        lines.append(line + (f"  {r.error}" if r.error else ""))
    lines.append(f"{'total':<{width}}  {sum(r.status == 'ok' for r in results)}/{len(results)} ok "
                 f"{sum(r.seconds for r in results):8.1f}")
    return "\n".join(lines)


def run_all(profile: str = "ci", only: list[str] | None = None, out_dir: Path | None = None,
            extra: dict | None = None, paths: list[Path] | None = None) -> list[NotebookResult]:
    """Run the notebooks (default: the workbook's, in order); print progress and the final table."""
    out_dir = Path(out_dir) if out_dir else runs_dir("executed")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = paths if paths is not None else list_notebooks(only)
    results = []
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.name} (profile {profile})", file=sys.stderr, flush=True)
        result = run_notebook(path, out_dir, profile, extra)
        print(f"[{i}/{len(paths)}] {path.stem}: {result.status} in {result.seconds:.1f} s"
              + (f" -- {result.error}" if result.error else ""), file=sys.stderr, flush=True)
        results.append(result)
    print(format_table(results))
    print(f"executed notebooks are in {out_dir}")
    return results
