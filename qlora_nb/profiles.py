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
    },
    "gpu": {
        "01_low_rank": {"delta_steps": 20},
        "03_qlora_layer": {"seq_len": 512, "batch_size": 4},
        "04_data": {"quantize": "nf4", "mismatch_rows": 200},
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
