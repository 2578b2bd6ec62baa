"""Command line: `python -m qlora_nb prepare | run | strip` (also installed as `qlora-nb`).

Leaves out: the tests (run `pytest`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _prepare(args) -> int:
    from .models import embedded_base_path, tiny_mistral_path

    start = time.perf_counter()
    path = embedded_base_path()
    print(f"embedded base model ready: {path} ({time.perf_counter() - start:.1f} s)")
    print(f"tiny Mistral ready: {tiny_mistral_path()}")
    return 0


def _run(args) -> int:
    from .runner import run_all

    extra = {"base_model": args.base_model} if args.base_model else None
    results = run_all(args.profile, only=args.only, out_dir=args.out, extra=extra)
    return 0 if all(r.status == "ok" for r in results) else 1


def _strip(args) -> int:
    from .nbtools import convention_problems, strip_file
    from .runner import list_notebooks

    dirty = []
    for path in list_notebooks():
        if args.check:
            if any("carries outputs" in p for p in convention_problems(path)):
                dirty.append(path.name)
        elif strip_file(path):
            print(f"stripped {path.name}")
    if dirty:
        print(f"notebooks with outputs: {', '.join(dirty)}; run `python -m qlora_nb strip`", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_nb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="fetch and convert the embedded base model (once; cached)")
    run = sub.add_parser("run", help="execute every notebook headless with papermill")
    run.add_argument("--profile", default="ci", choices=["ci", "full", "gpu"],
                     help="ci: fast, embedded model (default); full: longer runs; gpu: CUDA + Mistral-7B when reachable")
    run.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 01 02")
    run.add_argument("--out", type=Path, help="folder for executed notebooks (default runs/executed)")
    run.add_argument("--base-model", help="override base_model in every notebook (embedded, tiny-mistral, hub id, folder)")
    strip = sub.add_parser("strip", help="remove outputs from the committed notebooks")
    strip.add_argument("--check", action="store_true", help="only check; exit 1 if any notebook has outputs")
    args = parser.parse_args(argv)
    return {"prepare": _prepare, "run": _run, "strip": _strip}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
