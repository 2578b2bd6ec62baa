"""Sweeps: cache keys, cache hits without training, one real tiny run, grid, plots and widgets headless."""
import dataclasses
import json

import matplotlib
import pytest
import torch

from qlora_nb import data, lora, sweeps, train

matplotlib.use("Agg")


def _config(**kw):
    base = dict(base_model="tiny-mistral", rank=2, alpha=4, max_steps=1, batch_size=2, train_limit=4,
                eval_limit=2, eval_steps=1, save_steps=1, warmup_steps=0, max_seq_length=512)
    return train.FinetuneConfig(**{**base, **kw})


@pytest.mark.parametrize("change", [dict(rank=4), dict(alpha=8), dict(learning_rate=2e-4), dict(max_steps=2),
                                    dict(target_modules=("q_proj", "v_proj")), dict(seed=1),
                                    dict(base_model="embedded")])
def test_key_changes_with_every_setting_that_matters(change):
    assert sweeps.setting_key(_config(), 4, "h") != sweeps.setting_key(_config(**change), 4, "h")


def test_key_ignores_where_a_run_writes_but_not_data_or_test_size():
    key = sweeps.setting_key(_config(), 4, "h")
    assert key == sweeps.setting_key(_config(output_dir="/elsewhere", resume=False, save_steps=9), 4, "h")
    assert key != sweeps.setting_key(_config(), 8, "h")
    assert key != sweeps.setting_key(_config(), 4, "other data")


def test_real_run_then_cache_hit_without_training(tmp_path, monkeypatch):
    """One real 1-step QLoRA run on tiny-mistral; the second call must read the JSON and never train."""
    config = _config()
    first = sweeps.run_setting(config, n_test=2, root=tmp_path)
    assert first["cached"] is False
    assert (tmp_path / f"{first['key']}.json").exists()
    assert first["trainable_params"] == lora.lora_parameter_count(
        __import__("transformers").AutoConfig.from_pretrained(
            __import__("qlora_nb").models.tiny_mistral_path()), 2)
    assert first["validation_loss"] > 0 and 0 <= first["category_accuracy"] <= 1 and first["adapter_bytes"] > 0
    assert not list((tmp_path / first["key"]).glob("checkpoint-*"))  # optimizer states removed, adapter kept
    assert (tmp_path / first["key"] / "adapter" / "adapter_model.safetensors").exists()

    def no_training(*a, **k):
        raise AssertionError("a cached setting was trained again")

    monkeypatch.setattr(train, "finetune", no_training)
    again = sweeps.run_setting(dataclasses.replace(config, output_dir="/ignored"), n_test=2, root=tmp_path)
    assert again["cached"] is True
    assert {k: v for k, v in again.items() if k != "cached"} == json.loads(json.dumps(
        {k: v for k, v in first.items() if k != "cached"}))
    assert sweeps.cached_result(config, n_test=2, root=tmp_path)["key"] == first["key"]
    assert sweeps.cached_result(_config(rank=4), n_test=2, root=tmp_path) is None
    with pytest.raises(AssertionError, match="trained again"):  # a new setting does train
        sweeps.run_setting(_config(rank=4), n_test=2, root=tmp_path)


def test_grid_alpha_is_ratio_times_rank():
    configs = sweeps.grid(_config(), [2, 8], [0.5, 2])
    assert [(c.rank, c.alpha) for c in configs] == [(2, 1), (2, 4), (8, 4), (8, 16)]
    assert all(c.max_steps == 1 for c in configs)


def _fake(rank, ratio, key):
    return {"key": key, "rank": rank, "alpha": rank * ratio, "alpha_over_r": ratio, "validation_loss": 1.0 / rank,
            "valid_json": 0.5, "category_accuracy": 0.25, "trainable_params": 10 * rank, "adapter_bytes": 2**20,
            "train_seconds": 1.0, "loss_history": {"train": [(1, 2.0), (2, 1.0)], "validation": [(2, 1.1)]},
            "cached": True}


def test_table_and_plots_label_everything():
    import matplotlib.pyplot as plt

    results = [_fake(r, q, f"k{r}{q}") for r in (2, 4) for q in (1, 2)]
    table = sweeps.results_table(results)
    assert len(table.splitlines()) == 2 + len(results)
    fig, ax = plt.subplots()
    sweeps.plot_vs_rank(ax, results, "validation_loss", "validation loss (nats/token)")
    assert len(ax.get_lines()) == 2 and ax.get_xlabel() and ax.get_title() and ax.get_legend()
    fig, ax = plt.subplots()
    sweeps.plot_loss_curves(ax, results, highlight="k22")
    assert len(ax.get_lines()) == 4 and ax.get_ylabel()
    plt.close("all")


def test_widgets_build_headless_without_training(monkeypatch):
    monkeypatch.setattr(train, "finetune", lambda *a, **k: pytest.fail("a widget trained while being built"))
    box = sweeps.launcher(_config(), [_fake(2, 2, "a")])
    assert box.children
    torch.manual_seed(0)
    delta = torch.randn(24, 4) @ torch.randn(4, 16)  # exactly rank 4
    explorer = sweeps.rank_explorer(delta, r=4)
    err = sweeps.show_rank_capture(lora.singular_values(delta), tuple(delta.shape), 4)
    assert err < 1e-3 and explorer.children
    import matplotlib.pyplot as plt
    plt.close("all")


def test_train_data_hash_is_the_data_modules():
    assert sweeps._train_data_hash(None, 4) == data.dataset_hash(data.load_triage("train")[:4])


def test_adapter_delta_equals_peft_delta_weight(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_nb import models

    model = AutoModelForCausalLM.from_pretrained(models.tiny_mistral_path(), dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    peft_model.save_pretrained(tmp_path)
    layer = peft_model.base_model.model.model.layers[1].self_attn.v_proj
    got = sweeps.adapter_delta(tmp_path, "model.layers.1.self_attn.v_proj")
    assert torch.equal(got, layer.get_delta_weight("default"))
    with pytest.raises(KeyError, match="no LoRA weights"):
        sweeps.adapter_delta(tmp_path, "model.layers.1.mlp.up_proj")


def test_plot_live_draws_earlier_runs_grey_and_the_live_run_on_top():
    import matplotlib.pyplot as plt
    from transformers import TrainerControl, TrainerState

    from qlora_nb.live import LiveLoss

    live = LiveLoss(None)
    state = TrainerState(max_steps=5)
    live.on_train_begin(None, state, TrainerControl())
    for step, logs in [(1, {"loss": 2.0}), (2, {"loss": 1.5}), (2, {"eval_loss": 1.7})]:
        state.global_step = step
        live.on_log(None, state, TrainerControl(), logs=logs)
    fig, ax = plt.subplots()
    sweeps.plot_live(ax, [_fake(2, 2, "a"), _fake(4, 2, "b")], live, "r=8, alpha=16")
    lines = ax.get_lines()
    assert [ln.get_color() for ln in lines[:2]] == ["0.6", "0.6"]
    assert [list(ln.get_xdata()) for ln in lines[2:]] == [[1, 2], [2]]  # live train points, live validation point
    assert list(lines[2].get_ydata()) == [2.0, 1.5]
    assert ax.get_title() == "Live: r=8, alpha=16, step 2 of 5"
    assert ax.get_xlim() == (0, 5) and "step" in ax.get_xlabel() and "nats" in ax.get_ylabel()
    assert len(ax.get_legend().get_texts()) == 3  # one entry for all earlier runs, two for the live run
    plt.close("all")


def test_launcher_draws_the_new_run_live_then_reads_it_from_the_cache(tmp_path, monkeypatch):
    """A click trains a real 3-step run on tiny-mistral; the live figure is redrawn as each loss is logged."""
    import matplotlib.pyplot as plt

    titles, passed = [], []
    real_plot_live, real_run_setting = sweeps.plot_live, sweeps.run_setting

    def recording_plot_live(ax, results, live, name):
        real_plot_live(ax, results, live, name)
        titles.append(ax.get_title())

    def recording_run_setting(*a, **k):
        passed.append(k.get("callbacks"))
        return real_run_setting(*a, **k)

    monkeypatch.setattr(sweeps, "plot_live", recording_plot_live)
    monkeypatch.setattr(sweeps, "run_setting", recording_run_setting)
    results = [_fake(2, 2, "earlier")]
    box = sweeps.launcher(_config(max_steps=3, eval_steps=3), results, n_test=2, root=tmp_path, redraw_seconds=0)
    button, status = box.children[1].children
    assert titles == []  # building the box draws the earlier runs only, without training
    button.click()
    live = passed[0][0]
    assert len(results) == 2 and results[-1]["cached"] is False
    assert live.history == {k: [tuple(p) for p in v] for k, v in results[-1]["loss_history"].items()}
    assert len(live.history["train"]) == 3
    assert titles[:3] == [f"Live: r=2, alpha=4, step {n} of 3" for n in (1, 2, 3)]  # one redraw per logged loss
    assert "validation loss" in status.value and "from the cache" not in status.value

    monkeypatch.setattr(train, "finetune", lambda *a, **k: pytest.fail("a cached setting trained again"))
    n_titles = len(titles)
    button.click()
    assert "from the cache" in status.value and len(results) == 2 and len(titles) == n_titles
    plt.close("all")
