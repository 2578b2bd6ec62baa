"""Gather the rank files of finished multi-GPU runs into one data/multigpu/<experiment>.json that notebook 10 renders.

    python benchmarks/multigpu_collect.py --experiment llama70b_fsdp --out data/multigpu \\
        --run 1gpu_ddp=$OUT/llama70b/1gpu_ddp --run 2gpu_fsdp=$OUT/llama70b/2gpu_fsdp

Each --run NAME=FOLDER takes FOLDER/rank*.json (written by qlora_nb.distributed), the
exit code in FOLDER/returncode (written by multigpu_bench.sh) and the command in
FOLDER/command.txt. A run that left no rank file keeps the end of its log as its error.

Leaves out: running anything (multigpu_bench.sh does) and judging the numbers (the
notebook and tests/test_distributed.py do).
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path


def environment() -> dict:
    """Date, GPUs and library versions of this machine."""
    import importlib.metadata as md

    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        gpus = []
    versions = {}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "missing"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "gpus": gpus, "versions": versions}


def collect_run(folder: Path) -> dict:
    folder = Path(folder)
    files = sorted(folder.glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    run = {"ranks": [json.loads(p.read_text()) for p in files]}
    if (folder / "returncode").exists():
        run["returncode"] = int((folder / "returncode").read_text().strip() or 0)
    if (folder / "command.txt").exists():
        run["command"] = (folder / "command.txt").read_text().strip()
    if not files:
        logs = sorted(folder.glob("*.log"))
        tail = logs[-1].read_text().splitlines()[-20:] if logs else []
        run["error"] = "no rank file was written; end of the log:\n" + "\n".join(tail)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--run", action="append", required=True, help="NAME=FOLDER")
    args = p.parse_args(argv)
    runs = {}
    for item in args.run:
        name, _, folder = item.partition("=")
        runs[name] = collect_run(Path(folder))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.experiment}.json"
    path.write_text(json.dumps({"experiment": args.experiment, "environment": environment(), "runs": runs}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
