"""Sweeps over LoRA rank and alpha/r on the triage task, each setting trained once and cached on disk as JSON.

`run_setting(config)` trains one `train.FinetuneConfig` with `train.finetune`, scores it
(validation loss, test JSON validity and category accuracy, trainable parameters, adapter
bytes, training seconds) and writes `<runs>/06_sweeps/<key>.json`, where the key hashes
every setting that changes the result; asking again returns the saved JSON at once.
`grid`, `results_table` and the `plot_*` helpers turn a list of results into notebook 06's
table and figures; `launcher` and `rank_explorer` are its two widgets. The launcher draws a
new run's loss live while it trains (`plot_live`, fed by a `live.LiveLoss` callback).

Leaves out: the training loop itself (train.py), the callback that collects logged losses
(live.py), and search strategies beyond a grid.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

SWEEP_DIR = "06_sweeps"
# Settings that do not change what a run computes (where it writes, whether it may resume).
_NOT_IN_KEY = ("output_dir", "resume", "save_steps")


def setting_key(config, n_test: int, data_hash: str) -> str:
    """12 hex digits naming a (config, test sample size, training data) combination; output_dir is not part of it.

    >>> from qlora_nb.train import FinetuneConfig
    >>> setting_key(FinetuneConfig(rank=8), 16, "d") == setting_key(FinetuneConfig(rank=8, output_dir="/x"), 16, "d")
    True
    >>> setting_key(FinetuneConfig(rank=8), 16, "d") == setting_key(FinetuneConfig(rank=16), 16, "d")
    False
    """
    identity = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_KEY}
    payload = json.dumps({"config": identity, "n_test": n_test, "data": data_hash}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def grid(base, ranks, alpha_ratios) -> list:
    """FinetuneConfigs for every (rank, alpha/r) pair: alpha = ratio * rank, everything else from `base`.

    >>> from qlora_nb.train import FinetuneConfig
    >>> [(c.rank, c.alpha) for c in grid(FinetuneConfig(), [4, 8], [1, 2])]
    [(4, 4), (4, 8), (8, 8), (8, 16)]
    """
    out = []
    for r in ranks:
        for ratio in alpha_ratios:
            alpha = ratio * r
            out.append(dataclasses.replace(base, rank=int(r), alpha=int(alpha) if float(alpha).is_integer() else alpha))
    return out


def cache_root() -> Path:
    from . import paths

    return paths.runs_dir(SWEEP_DIR)


def _write_json_atomic(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
    os.replace(tmp, path)


def _train_data_hash(train_rows: list[dict] | None, train_limit: int | None) -> str:
    from . import data

    rows = train_rows if train_rows is not None else data.load_triage("train")
    return data.dataset_hash(rows[:train_limit] if train_limit else rows)


def key_of(config, n_test: int = 16, train_rows=None) -> str:
    """setting_key of `config` on its training rows (default: the triage train split, cut to train_limit)."""
    return setting_key(config, n_test, _train_data_hash(train_rows, config.train_limit))


def cached_result(config, n_test: int = 16, root: Path | None = None, train_rows=None) -> dict | None:
    """The saved result of this setting, or None if it was never run (nothing is trained here)."""
    key = key_of(config, n_test, train_rows)
    path = Path(root or cache_root()) / f"{key}.json"
    return {**json.loads(path.read_text()), "cached": True} if path.exists() else None


def run_setting(config, n_test: int = 16, root: Path | None = None, train_rows=None, eval_rows=None,
                test_rows=None, progress: bool = False, callbacks=()) -> dict:
    """Result dict of one setting: from the cache if it was run before, else trained and scored now.

    callbacks: TrainerCallbacks for the training run (e.g. a `live.LiveLoss`); a cached
    setting trains nothing, so they are never called then.

    Keys: key, config, rank, alpha, alpha_over_r, validation_loss (nats/token), valid_json and
    category_accuracy (fractions of n_test test rows), trainable_params, adapter_bytes,
    train_seconds, loss_history, cached (True when read from disk).
    """
    from . import adapters, data, evaluate, train

    root = Path(root or cache_root())
    root.mkdir(parents=True, exist_ok=True)
    key = key_of(config, n_test, train_rows)
    path = root / f"{key}.json"
    if path.exists():
        return {**json.loads(path.read_text()), "cached": True}
    run_config = dataclasses.replace(config, output_dir=str(root / key), resume=False, save_steps=config.max_steps)
    result = train.finetune(run_config, progress=progress, train_rows=train_rows, eval_rows=eval_rows,
                            callbacks=callbacks)
    test_rows = (test_rows if test_rows is not None else data.load_triage("test"))[:n_test]
    scores = evaluate.triage_metrics(result.model, result.tokenizer, test_rows, progress=progress)
    for ckpt in Path(run_config.output_dir).glob("checkpoint-*"):  # the adapter folder is kept; optimizer states are not
        shutil.rmtree(ckpt, ignore_errors=True)
    history = result.loss_history
    out = {"key": key, "config": config.to_dict(), "rank": config.rank, "alpha": config.alpha,
           "alpha_over_r": config.alpha / config.rank, "n_test": len(test_rows),
           "validation_loss": history["validation"][-1][1] if history["validation"] else None,
           "valid_json": scores["valid"], "category_accuracy": scores["category_accuracy"],
           "trainable_params": result.trainable_params,
           "adapter_bytes": adapters.adapter_bytes(result.adapter_dir) if Path(result.adapter_dir).exists() else None,
           "train_seconds": result.train_seconds, "loss_history": history,
           "adapter_dir": str(result.adapter_dir)}
    _write_json_atomic(path, out)
    del result
    return {**out, "cached": False}


def run_sweep(configs, n_test: int = 16, root: Path | None = None, progress: bool = False, **rows) -> list[dict]:
    """run_setting for each config in order (cached ones cost nothing); rows: train_rows/eval_rows/test_rows."""
    return [run_setting(c, n_test=n_test, root=root, progress=progress, **rows) for c in configs]


def results_table(results: list[dict]) -> str:
    """A fixed-width text table, one line per setting, sorted by alpha/r then rank."""
    head = (f"{'rank':>4} {'alpha':>5} {'a/r':>5} {'val loss':>8} {'JSON ok':>7} {'cat acc':>7} "
            f"{'trainable':>10} {'adapter MiB':>11} {'train s':>7} {'cached':>6}")
    lines = [head, "-" * len(head)]
    for r in sorted(results, key=lambda x: (x["alpha_over_r"], x["rank"])):
        loss = f"{r['validation_loss']:.4f}" if r["validation_loss"] is not None else "-"
        mib = f"{r['adapter_bytes'] / 2**20:.2f}" if r.get("adapter_bytes") else "-"
        lines.append(f"{r['rank']:>4} {r['alpha']:>5} {r['alpha_over_r']:>5.2g} {loss:>8} {r['valid_json']:>7.0%} "
                     f"{r['category_accuracy']:>7.0%} {r['trainable_params']:>10,} {mib:>11} "
                     f"{r['train_seconds']:>7.1f} {str(r.get('cached', False)):>6}")
    return "\n".join(lines)


def plot_vs_rank(ax, results: list[dict], metric: str, ylabel: str, title: str | None = None):
    """One line per alpha/r: `metric` against rank (log2 x axis)."""
    from .plots import label

    ratios = sorted({r["alpha_over_r"] for r in results})
    for ratio in ratios:
        pts = sorted((r["rank"], r[metric]) for r in results if r["alpha_over_r"] == ratio and r[metric] is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"alpha/r = {ratio:g}")
    ax.set_xscale("log", base=2)
    return label(ax, title or f"{ylabel} vs LoRA rank", "LoRA rank r (log scale)", ylabel, legend=True)


def plot_loss_curves(ax, results: list[dict], highlight: str | None = None, split: str = "train"):
    """Training-loss curves of every result (grey), the one whose key is `highlight` drawn on top in colour."""
    from .plots import label

    for r in results:
        pts = r["loss_history"][split]
        if not pts:
            continue
        mine = r["key"] == highlight
        ax.plot(*zip(*pts), color="C3" if mine else "0.6", lw=2.2 if mine else 1.0, zorder=3 if mine else 2,
                label=f"r={r['rank']}, alpha={r['alpha']}" + (" (this run)" if mine else ""))
    return label(ax, f"{split.capitalize()} loss of each run", "optimizer step", "loss (nats per answer token)",
                 legend=True)


def plot_live(ax, results: list[dict], live, name: str = "this run"):
    """Earlier runs' training-loss curves in grey, the live run's points so far on top in colour.

    live: a `live.LiveLoss` (its history, step and max_steps). The x axis spans the whole
    planned run, so the live curve grows into an axis that does not rescale at each redraw.
    """
    from .plots import label

    right = live.max_steps or 1
    earlier = [r["loss_history"]["train"] for r in results if r["loss_history"]["train"]]
    for i, pts in enumerate(earlier):
        ax.plot(*zip(*pts), color="0.6", lw=1.0, zorder=2, label=f"earlier runs ({len(earlier)})" if i == 0 else None)
        right = max(right, pts[-1][0])
    styles = {"train": dict(color="C3", lw=2.2, marker="."), "validation": dict(color="C1", ls="", marker="s")}
    for split, style in styles.items():
        pts = live.history[split]
        if pts:
            ax.plot(*zip(*pts), zorder=3, label=f"{name}: {split} loss", **style)
    ax.set_xlim(0, right)
    return label(ax, f"Live: {name}, step {live.step} of {live.max_steps or '?'}", "optimizer step",
                 "loss (nats per answer token)", legend=True)


def launcher(base, results: list[dict], n_test: int = 16, root: Path | None = None, interactive: bool = True,
             redraw_seconds: float = 1.0):
    """ipywidgets box: choose rank, alpha, target modules and learning rate, click to run (or read from the cache).

    While a new setting trains, its loss curve is redrawn live over the earlier runs (grey)
    as the trainer logs each step, at most once per `redraw_seconds` (a `live.LiveLoss`
    callback); when it ends, every run's curve is drawn with the new one on top. A cached
    setting comes back at once and is drawn the same way. Training happens only on a click;
    the figure is drawn once when the box is built (so it exists headless). `results` is
    extended in place with each new run.
    """
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from . import train
    from .live import LiveLoss

    rank = w.Dropdown(options=sorted({1, 2, 4, 8, 16, 32, 64, base.rank}), value=base.rank, description="rank r")
    alpha = w.Dropdown(options=sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, base.alpha}), value=base.alpha,
                       description="alpha")
    targets = w.SelectMultiple(options=train.ALL_PROJECTIONS, value=tuple(base.target_modules), rows=7,
                               description="targets")
    lr = w.FloatLogSlider(value=base.learning_rate, base=10, min=-5, max=-2, step=0.25, description="learning rate",
                          readout_format=".1e")
    button = w.Button(description="train (cached if run before)", layout=w.Layout(width="260px"))
    status = w.Label("")
    out = w.Output()

    def show(plot):
        with out:
            out.clear_output(wait=True)  # wait: the old figure stays until the new one arrives (no flicker)
            fig, ax = plt.subplots(figsize=(7, 3.6))
            plot(ax)
            plt.show()
            plt.close(fig)  # live redraws would otherwise pile up open figures

    def draw(highlight=None):
        show(lambda ax: plot_loss_curves(ax, results, highlight))

    def on_click(_):
        config = dataclasses.replace(base, rank=rank.value, alpha=alpha.value, learning_rate=lr.value,
                                     target_modules=tuple(targets.value) or tuple(base.target_modules))
        name = f"r={config.rank}, alpha={config.alpha}"
        status.value = "running ..."

        def draw_live(live):
            status.value = (f"training {name}: step {live.step} of {live.max_steps}"
                            + (f", loss {live.history['train'][-1][1]:.4f}" if live.history["train"] else ""))
            show(lambda ax: plot_live(ax, results, live, name))

        live = LiveLoss(draw_live, min_interval=redraw_seconds)
        result = run_setting(config, n_test=n_test, root=root, callbacks=[live])
        if all(r["key"] != result["key"] for r in results):
            results.append(result)
        status.value = (f"r={result['rank']}, alpha={result['alpha']}: validation loss {result['validation_loss']:.4f}, "
                        f"category accuracy {result['category_accuracy']:.0%}"
                        + (" (from the cache)" if result["cached"] else f" ({result['train_seconds']:.0f} s)"))
        draw(result["key"])

    button.on_click(on_click)
    draw(results[-1]["key"] if results else None)
    return w.VBox([w.HBox([w.VBox([rank, alpha, lr]), targets]), w.HBox([button, status]), out])


def adapter_delta(adapter_dir, module: str = "model.layers.0.self_attn.q_proj"):
    """float32 (out, in): the update (alpha/r) B @ A that a saved adapter adds to one base weight.

    Read straight from adapter_model.safetensors; `module` is the layer's name inside the base
    model (as in `model.named_modules()`), e.g. "model.layers.0.self_attn.q_proj".
    """
    import math

    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    prefix = f"base_model.model.{module}."
    if prefix + "lora_A.weight" not in tensors:
        names = sorted({k.removeprefix("base_model.model.").split(".lora_")[0] for k in tensors})
        raise KeyError(f"{module!r} has no LoRA weights in {adapter_dir}; adapted layers include {names[:4]} ...")
    a, b = tensors[prefix + "lora_A.weight"].float(), tensors[prefix + "lora_B.weight"].float()  # (r, in), (out, r)
    r = a.shape[0]
    scaling = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    return (b @ a) * scaling


def numerical_rank(singular_values, rtol: float = 1e-4) -> int:
    """How many singular values exceed rtol times the largest (the rank up to fp32 round-off).

    >>> import torch
    >>> numerical_rank(torch.tensor([3.0, 1.0, 1e-9]))
    2
    """
    s = singular_values.float()
    return int((s > rtol * s[0]).sum()) if len(s) else 0


def plot_rank_capture(axes, singular_values, r: int, what: str = "fine-tuning delta"):
    """Two panels: the delta's leading singular values with the first r highlighted, and the rank-r error curve.

    Only the first max(2 r, 2 x numerical rank, 8) values are drawn: past the numerical rank
    they are round-off. Returns the relative Frobenius error of the best rank-r approximation.
    """
    from . import lora
    from .plots import label

    s = singular_values.float()
    errors = lora.rank_r_errors(s)  # r = 0..len(s)
    n = min(len(s), max(2 * r, 2 * numerical_rank(s), 8))
    idx = list(range(1, n + 1))
    axes[0].plot(idx, s[:n].numpy(), color="0.6", lw=1, marker=".")
    axes[0].plot(idx[:r], s[:min(r, n)].numpy(), color="C0", lw=2.5, marker="o", label=f"kept by rank {r}")
    label(axes[0], f"Leading singular values of the {what}", "index i", "singular value s_i", legend=True)
    axes[1].plot(range(n + 1), errors[:n + 1].numpy(), color="C1", marker=".")
    axes[1].axvline(r, color="C0", ls="--", label=f"r = {r}: error {errors[min(r, len(s))]:.3f}")
    label(axes[1], "Best rank-r approximation", "rank r", "relative Frobenius error", legend=True)
    return float(errors[min(r, len(s))])


def show_rank_capture(singular_values, shape: tuple[int, int], r: int = 8, what: str = "fine-tuning delta") -> float:
    """Draw `plot_rank_capture` for rank r and print what r keeps; returns the relative error."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    err = plot_rank_capture(axes, singular_values, r, what)
    fig.tight_layout()
    plt.show()
    print(f"rank {r} of {len(singular_values)}: relative error {err:.3f}, energy captured {1 - err ** 2:.1%}; "
          f"LoRA parameters r*(out+in) = {r * sum(shape):,} vs {shape[0] * shape[1]:,} in the full delta")
    return err


def rank_explorer(delta, r: int = 8, what: str = "fine-tuning delta"):
    """Widget (a rank slider) showing how well a rank-r approximation captures `delta` (out, in); no training.

    The SVD is computed once; moving the slider only redraws (`show_rank_capture`).
    """
    import ipywidgets as w

    from . import lora

    s = lora.singular_values(delta)
    shape = tuple(delta.shape)
    slider = w.IntSlider(value=r, min=1, max=min(len(s), max(2 * numerical_rank(s), 8)), description="rank r")
    return w.interactive(lambda r: show_rank_capture(s, shape, r, what), r=slider)
