"""A live loss curve: a TrainerCallback that collects each logged loss while a run trains and redraws, throttled.

`LiveLoss(redraw)` is passed to the trainer (`train.finetune(..., callbacks=[live])`). On
every `on_log` that carries a training loss ("loss") or a validation loss ("eval_loss") it
appends (optimizer step, loss in nats per answer token) to `live.history` and calls
`redraw(live)`, at most once per `min_interval` seconds of `clock` (a point that arrives
sooner is kept and drawn by the next redraw; the end of training always redraws). The
points are exactly the trainer's `state.log_history` entries, so after a run
`live.history == train.loss_history_of(trainer.state.log_history)`.

Worked example (a fake clock; no trainer needed):

>>> from transformers import TrainerControl, TrainerState
>>> t = [0.0]
>>> live = LiveLoss(lambda lv: None, min_interval=1.0, clock=lambda: t[0])
>>> state = TrainerState(global_step=1, max_steps=3)
>>> live.on_log(None, state, TrainerControl(), logs={"loss": 2.5})
>>> t[0], state.global_step = 0.4, 2
>>> live.on_log(None, state, TrainerControl(), logs={"loss": 2.0})  # 0.4 s later: kept, not drawn
>>> live.history["train"], live.draws, live.pending
([(1, 2.5), (2, 2.0)], 1, True)

Leaves out: the drawing itself (the caller's `redraw`, e.g. `sweeps.launcher`'s), and
anything but losses (learning rate, grad norm are logged too but not collected).
"""
from __future__ import annotations

import time

from transformers import TrainerCallback

from .train import LOSS_KEYS


class LiveLoss(TrainerCallback):
    """Collects {"train": [(step, loss)], "validation": [(step, loss)]} from trainer logs and calls `redraw(self)`.

    redraw: called with this callback; None only collects. min_interval: seconds between
    two redraws (0 draws on every log). clock: seconds, monotonic (time.monotonic; tests
    pass a fake). After training: `step` is the last logged optimizer step, `max_steps`
    the run's planned total, `draws` how often redraw ran, `pending` whether points
    arrived since the last redraw.
    """

    def __init__(self, redraw=None, min_interval: float = 1.0, clock=time.monotonic):
        self.redraw, self.min_interval, self.clock = redraw, min_interval, clock
        self.history = {"train": [], "validation": []}
        self.step, self.max_steps = 0, None
        self.draws, self.pending, self._last_draw = 0, False, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.max_steps = state.max_steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        new = False
        for key, split in LOSS_KEYS:
            if logs and key in logs:
                self.history[split].append((state.global_step, logs[key]))
                new = True
        if new:
            self.step = state.global_step
            self.max_steps = self.max_steps or state.max_steps
            self.pending = True
            self.maybe_redraw()

    def on_train_end(self, args, state, control, **kwargs):
        if self.pending:  # the last points may have been held back by the throttle
            self.maybe_redraw(force=True)

    def maybe_redraw(self, force: bool = False) -> bool:
        """Call redraw unless one ran less than min_interval ago (force: always); True if it ran."""
        last = self._last_draw
        if self.redraw is None or not (force or last is None or self.clock() - last >= self.min_interval):
            return False
        self.redraw(self)
        # Timed from the end of the draw, so a slow figure cannot take more than part of each interval.
        self.draws, self.pending, self._last_draw = self.draws + 1, False, self.clock()
        return True
