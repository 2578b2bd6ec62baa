"""Where the workbook keeps things: the repo's data folder, the model cache, run outputs.

Leaves out: anything about models or data formats (see models.py, data.py).
Every location can be moved with an environment variable, so Binder, Colab and CI
can put large files where they have room.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def repo_root() -> Path | None:
    """The checkout this package was installed from (editable install), or None on Colab/pip."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").exists() and (root / "notebooks").is_dir() else None


def cache_dir() -> Path:
    """Model cache, `$QLORA_NB_CACHE` or `~/.cache/qlora_nb`; created on first use."""
    path = Path(os.environ.get("QLORA_NB_CACHE", Path.home() / ".cache" / "qlora_nb")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """The project's data sets: `$QLORA_NB_DATA`, else the repo's `data/`, else a cache copy."""
    if "QLORA_NB_DATA" in os.environ:
        return Path(os.environ["QLORA_NB_DATA"])
    root = repo_root()
    return root / "data" if root else cache_dir() / "data"


def recorded_json(relative: str, command: str, path=None) -> dict:
    """A recorded result file under data/ (`relative`, e.g. 'bench/bench_cuda.json'; or `path`) as a dict.

    A missing file raises FileNotFoundError naming `command`, the command that writes it.
    """
    import json

    path = Path(path) if path else data_dir() / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `{command}` on a CUDA GPU, or restore data/ from git")
    return json.loads(path.read_text())


def runs_dir(name: str = "") -> Path:
    """Outputs of notebook runs (adapters, checkpoints, sweep caches): `$QLORA_NB_RUNS` or `<repo>/runs`.

    >>> runs_dir("05_finetune").name
    '05_finetune'
    """
    base = Path(os.environ.get("QLORA_NB_RUNS") or ((repo_root() or Path.cwd()) / "runs"))
    path = base / name if name else base
    path.mkdir(parents=True, exist_ok=True)
    return path
