"""Accuracy curve of the triage fine-tune: steps, training rows, rank and LoRA layers vs accuracy on hand-written messages.

Each setting trains once through `train.finetune` (the Trainer path notebook 05 runs) on rows of
`datagen.generate_split("train", n)` and is scored with greedy answers on three sets:
handwritten_dev (the only set used to choose settings), the scored hand-written set and the
template test split of the generator it trained on. One JSON line per setting is appended to --out as soon as it is done, so
an interrupted run keeps what it finished and a rerun skips settings already in the file.

Use: python benchmarks/triage_curve.py --out data/bench/triage_curve.jsonl \
         --settings steps=120,rows=2000 steps=400,rows=4000,rank=32 ...
Keys of a setting: any FinetuneConfig field (steps is max_steps), rows (training rows drawn) and
data (content: datagen.py, the default; cues: datagen_cues.py, the first generator).

Leaves out: plots and the choice of a default (notebook 06 and data/bench/README.md read the file).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETS = ("handwritten_dev", "handwritten", "test")
KEEP = ("valid", "valid_low", "valid_high", "category_accuracy", "category_accuracy_low", "category_accuracy_high",
        "priority_accuracy", "priority_accuracy_low", "priority_accuracy_high", "invalid_json", "schema_errors")


def parse_setting(text: str) -> dict:
    """'steps=120,rows=2000,rank=32' -> {"max_steps": 120, "rows": 2000, "rank": 32} (numbers parsed, None kept)."""
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = {"steps": "max_steps"}.get(key.strip(), key.strip())
        value = value.strip()
        literal = {"None": None, "true": True, "false": False}
        out[key] = literal[value] if value in literal else json.loads(value) if value[:1].isdigit() else value
    return out


def run(setting: dict, gen_batch: int, limit: int | None = None, save: Path | None = None) -> dict:
    import torch

    from qlora_nb import data, datagen, datagen_cues, evaluate, train

    rows = setting.get("rows", 2000)
    generator = {"content": datagen, "cues": datagen_cues}[setting.get("data", "content")]
    fields = {k: v for k, v in setting.items() if k not in ("rows", "data")}
    with tempfile.TemporaryDirectory() as tmp:
        config = train.FinetuneConfig(output_dir=tmp, resume=False, save_steps=10_000,
                                      eval_steps=fields.get("max_steps", 60), **fields)
        train_rows = generator.generate_split("train", n=rows)
        result = train.finetune(config, progress=False, train_rows=train_rows,
                                eval_rows=generator.generate_split("validation", n=200))
        sets = {"handwritten_dev": data.load_triage("handwritten_dev"), "handwritten": data.load_triage("handwritten"),
                "test": generator.generate_split("test")}
        scores = {}
        for name in SETS:
            m = evaluate.triage_metrics(result.model, result.tokenizer, sets[name][:limit],
                                        batch_size=gen_batch, progress=False)
            scores[name] = {k: m[k] for k in KEEP}
        if save is not None:  # the adapter folder as one tarball (what a device call can bring back)
            import tarfile
            with tarfile.open(save, "w:gz") as tar:
                tar.add(result.adapter_dir, arcname="adapter")
    out = {"setting": setting, "train_seconds": round(result.train_seconds, 1),
           "median_step_seconds": train.training_metrics(result)["median_step_seconds"],
           "final_validation_loss": train.training_metrics(result)["final_validation_loss"],
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
           "date": time.strftime("%Y-%m-%d"), "scores": scores}
    del result
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--settings", nargs="+", required=True)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--save", type=Path, default=None, help="tar.gz the adapter of the last setting here")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N rows of each set (a smoke test)")
    args = ap.parse_args(argv)
    done = []
    if args.out.exists():
        done = [json.loads(line)["setting"] for line in args.out.read_text().splitlines() if line.strip()]
    for i, text in enumerate(args.settings):
        setting = parse_setting(text)
        if setting in done:
            print(f"skip (done): {text}")
            continue
        start = time.perf_counter()
        line = run(setting, args.gen_batch, args.limit,
                   args.save if i == len(args.settings) - 1 else None)
        with args.out.open("a") as f:
            f.write(json.dumps(line) + "\n")
        s = line["scores"]
        print(f"{text:45s} {time.perf_counter() - start:6.0f}s  " + "  ".join(
            f"{n}: v{s[n]['valid']:.2f} c{s[n]['category_accuracy']:.2f} p{s[n]['priority_accuracy']:.2f}"
            for n in SETS), flush=True)


if __name__ == "__main__":
    main()
