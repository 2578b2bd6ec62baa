"""LiveLoss: collects exactly the logged losses, throttles redraws on a fake clock, and matches a real run's log_history."""
from transformers import TrainerCallback, TrainerControl, TrainerState

from qlora_nb import train
from qlora_nb.live import LiveLoss


def _feed(live, logs_by_step, max_steps=10):
    state = TrainerState(max_steps=max_steps)
    live.on_train_begin(None, state, TrainerControl())
    for step, logs in logs_by_step:
        state.global_step = step
        live.on_log(None, state, TrainerControl(), logs=logs)
    live.on_train_end(None, state, TrainerControl())
    return state


# What a Trainer logs: per-step training logs, validation logs, and the run summary (train_loss, not loss).
LOGS = [(1, {"loss": 3.0, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": 0.1}),
        (2, {"loss": 2.5, "grad_norm": 0.9, "learning_rate": 1e-3, "epoch": 0.2}),
        (2, {"eval_loss": 2.7, "eval_runtime": 0.1, "epoch": 0.2}),
        (3, {"loss": 2.25, "learning_rate": 5e-4, "epoch": 0.3}),
        (3, {"train_runtime": 1.0, "train_loss": 2.58, "epoch": 0.3}),
        (3, {})]


def test_collects_exactly_the_logged_losses_and_redraws_for_each():
    seen = []
    live = LiveLoss(lambda lv: seen.append((lv.step, len(lv.history["train"]), len(lv.history["validation"]))),
                    min_interval=0)
    _feed(live, LOGS, max_steps=3)
    assert live.history == {"train": [(1, 3.0), (2, 2.5), (3, 2.25)], "validation": [(2, 2.7)]}
    # one redraw per log that carried a loss, each seeing the points so far; none for the summary or empty logs
    assert seen == [(1, 1, 0), (2, 2, 0), (2, 2, 1), (3, 3, 1)]
    assert (live.step, live.max_steps, live.draws, live.pending) == (3, 3, 4, False)


def test_history_equals_loss_history_of_the_same_logs():
    live = LiveLoss(None)
    _feed(live, LOGS)
    as_log_history = [{**logs, "step": step} for step, logs in LOGS]
    assert live.history == train.loss_history_of(as_log_history)
    assert live.draws == 0 and live.pending  # no redraw function: collect only


def test_throttle_on_a_fake_clock():
    now = [0.0]
    drawn_at = []
    live = LiveLoss(lambda lv: drawn_at.append((now[0], lv.step)), min_interval=1.0, clock=lambda: now[0])
    state = TrainerState(max_steps=8)
    live.on_train_begin(None, state, TrainerControl())
    for step, t in enumerate([0.0, 0.3, 0.9, 1.0, 1.5, 2.2, 2.4], start=1):
        now[0], state.global_step = t, step
        live.on_log(None, state, TrainerControl(), logs={"loss": 1.0 / step})
    # first point draws at once; then only when a full second has passed since the last draw
    assert drawn_at == [(0.0, 1), (1.0, 4), (2.2, 6)]
    assert len(live.history["train"]) == 7 and live.pending  # step 7 was kept but not drawn yet
    live.on_train_end(None, state, TrainerControl())
    assert drawn_at[-1] == (2.4, 7) and not live.pending
    live.on_train_end(None, state, TrainerControl())  # nothing new: no extra draw
    assert len(drawn_at) == 4


def test_throttle_counts_from_the_end_of_a_slow_draw():
    now, drawn = [0.0], []

    def slow_draw(lv):
        drawn.append(lv.step)
        now[0] += 0.8  # drawing takes 0.8 s of the clock

    live = LiveLoss(slow_draw, min_interval=1.0, clock=lambda: now[0])
    state = TrainerState(max_steps=5)
    for step, t in enumerate([0.0, 1.2, 1.9], start=1):
        now[0], state.global_step = max(now[0], t), step
        live.on_log(None, state, TrainerControl(), logs={"loss": 1.0})
    assert drawn == [1, 3]  # drew at 0.0 (ended 0.8), skipped 1.2 (< 1 s after 0.8), drew at 1.9


class _Probe(TrainerCallback):
    """Keeps the trainer's state, whose log_history is the record LiveLoss must match."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.state = state


def test_real_tiny_run_records_every_logged_loss(tmp_path):
    config = train.FinetuneConfig(base_model="tiny-mistral", rank=2, alpha=4, max_steps=3, batch_size=2, train_limit=6,
                                  eval_limit=2, eval_steps=2, save_steps=3, warmup_steps=0, max_seq_length=512,
                                  output_dir=str(tmp_path), resume=False)
    drawn = []
    live = LiveLoss(lambda lv: drawn.append(lv.step), min_interval=0)
    probe = _Probe()
    result = train.finetune(config, progress=False, callbacks=[live, probe])
    log = probe.state.log_history
    train_logs = [(h["step"], h["loss"]) for h in log if "loss" in h]
    assert len(train_logs) == config.max_steps  # logging_steps=1
    assert live.history["train"] == train_logs
    assert live.history["validation"] == [(h["step"], h["eval_loss"]) for h in log if "eval_loss" in h]
    assert live.history == result.loss_history
    assert [s for s, _ in live.history["validation"]] == [2, 3]  # eval_steps=2, then finetune's final evaluate
    assert live.max_steps == 3 and drawn[:3] == [1, 2, 2] and drawn[-1] == 3
