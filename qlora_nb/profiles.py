"""Run profiles: which papermill parameters each notebook gets under `ci`, `full` and `gpu`.

Leaves out: the parameter values a learner sees first; those are each notebook's own
`parameters` cell, and they *are* the `ci` profile (fast, embedded model, CPU). `full`
and `gpu` only list what they change.

>>> notebook_parameters("gpu", "05_finetune")["base_model"]
'auto'
"""
from __future__ import annotations

PROFILES = ("ci", "full", "gpu")

# Per notebook stem: overrides on top of the notebook's own defaults.
_OVERRIDES: dict[str, dict[str, dict]] = {
    "full": {
        "01_low_rank": {"delta_steps": 20},
        "03_qlora_layer": {"seq_len": 256, "batch_size": 2},
        "04_data": {"mismatch_rows": 200},
        "05_finetune": {"max_steps": 150, "eval_sample": 0},
        # 12 settings x 30 steps of 8 rows: the wall time is measured and stated in README.md
        "06_sweeps": {"ranks": [2, 4, 8, 16, 32, 64], "alpha_ratios": [1, 2], "max_steps": 30,
                      "batch_size": 8, "train_limit": None, "eval_limit": 48, "n_test": 48},
        "07_merge_and_ship": {"n_prompts": 32, "fallback_steps": 60, "orders_steps": 30, "train_batch_size": 8,
                              "speed_new_tokens": 64, "speed_repeats": 5},
        "09_fast_qlora": {"check_steps": 20},
    },
    "gpu": {
        "01_low_rank": {"delta_steps": 20},
        "03_qlora_layer": {"seq_len": 512, "batch_size": 4},
        "04_data": {"quantize": "nf4", "mismatch_rows": 200},
        "05_finetune": {"learning_rate": 2e-4, "max_steps": 200, "batch_size": 4, "grad_accum": 4,
                        "max_seq_length": 512, "eval_sample": 0, "gen_batch_size": 32},
        # a 7B base: a smaller grid than `full`
        "06_sweeps": {"ranks": [4, 16, 64], "alpha_ratios": [1, 2], "max_steps": 100, "batch_size": 8,
                      "train_limit": None, "eval_limit": 48, "n_test": 48},
        "07_merge_and_ship": {"n_prompts": 32, "fallback_steps": 60, "orders_steps": 30, "train_batch_size": 8,
                              "speed_new_tokens": 64, "speed_repeats": 5},
        "09_fast_qlora": {"check_steps": 20, "check_batch": 4, "check_seq": 512},
        # its training runs on CPU processes (gloo) in every profile; the 2-GPU runs are benchmarks/multigpu_bench.sh
        "10_multi_gpu": {"base_model": "embedded"},
    },
}

# Every notebook receives these for the profile (a notebook without such a parameter ignores it).
_COMMON = {
    "ci": {},
    "full": {},
    "gpu": {"base_model": "auto"},
}


def notebook_parameters(profile: str, stem: str) -> dict:
    """Papermill parameters for notebook `stem` (e.g. '05_finetune') under `profile`."""
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r}: choose one of {', '.join(PROFILES)}")
    params = {"profile": profile, **_COMMON[profile]}
    params.update(_OVERRIDES.get(profile, {}).get(stem, {}))
    return params
