"""Adapter artifacts: save a LoRA adapter with the metadata that says what it fits, load it only onto that.

`save_adapter` writes peft's files (adapter_config.json + adapter_model.safetensors) and
`qlora_nb_metadata.json` (base model id and weight fingerprint, tokenizer fingerprint, LoRA
config, data hash, training args, metrics, library versions, sha256 of the weights) into a
temporary folder beside the target and renames it into place, so a crash mid-save never
leaves a folder that loads. `load_adapter` checks that metadata before peft sees the files
and raises `AdapterMismatch`, saying what to do, for another base, another tokenizer, a
missing metadata file or a corrupted weight file.

Leaves out: training (train.py), merging (merge.py), and any remote registry or signing:
the checksum guards against accidents (truncation, bit rot), not against an attacker.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from .models import file_sha256

METADATA_FILE = "qlora_nb_metadata.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT_VERSION = 1


class AdapterMismatch(RuntimeError):
    """An adapter folder does not fit the base model or tokenizer it is loaded onto, or is damaged."""


def _jsonable(x):
    """Sets and other non-JSON values (peft configs hold sets of module names) -> JSON types."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted(_jsonable(v) for v in x)
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short sha256 of what decides token ids: the vocabulary (special tokens and their ids included) and the chat template.

    Two tokenizers with the same fingerprint turn the same chat into the same ids. Which tokens
    a transformers version *flags* as special is left out: it decides no id, and it changed
    between transformers 5.17 and 5.24 for SmolLM2 (<|im_end|> flagged or not), which made the
    same tokenizer look like another one.

    >>> class T:  # any object with get_vocab / chat_template
    ...     chat_template = "{{ m }}"
    ...     def get_vocab(self): return {"a": 0, "b": 1}
    >>> len(tokenizer_fingerprint(T()))
    16
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = {"vocab": vocab, "chat_template": getattr(tokenizer, "chat_template", None)}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()[:16]


def library_versions() -> dict:
    """{package: version} of the libraries that decide how the adapter's weights are read."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "qlora-workbook"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _lora_config_dict(peft_model, adapter_name: str) -> dict:
    config = peft_model.peft_config[adapter_name]
    return _jsonable(config.to_dict())


def save_adapter(peft_model, folder, *, base_model: str, tokenizer, data_hash: str | None = None,
                 training_args: dict | None = None, metrics: dict | None = None,
                 adapter_name: str | None = None) -> Path:
    """Write one adapter of `peft_model` + its metadata to `folder` atomically; returns `folder` as a Path.

    base_model: the name it was trained on ("embedded", "tiny-mistral", a folder or hub id);
    its weight fingerprint (`models.base_fingerprint`) is recorded. adapter_name: which
    adapter of the PeftModel (default: the active one). An existing `folder` is replaced
    only once the new one is complete.
    """
    from . import models

    folder = Path(folder)
    adapter_name = adapter_name or peft_model.active_adapter
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"adapter_name={adapter_name!r} is not on this model; it has "
                         f"{sorted(peft_model.peft_config)}.")
    base_fp = models.base_fingerprint(base_model)  # before writing anything: fails fast on an unknown base
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.saving-", dir=folder.parent))
    try:
        peft_model.save_pretrained(str(tmp), safe_serialization=True, selected_adapters=[adapter_name])
        if not (tmp / CONFIG_FILE).exists():  # peft puts a non-"default" adapter in a subfolder
            for p in (tmp / adapter_name).iterdir():
                p.replace(tmp / p.name)
            (tmp / adapter_name).rmdir()
        weights = tmp / WEIGHTS_FILE
        metadata = {
            "format_version": FORMAT_VERSION,
            "base_model": base_model,
            "base_fingerprint": base_fp,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "adapter_name": adapter_name,
            "lora_config": _lora_config_dict(peft_model, adapter_name),
            "data_hash": data_hash,
            "training_args": _jsonable(training_args or {}),
            "metrics": _jsonable(metrics or {}),
            "library_versions": library_versions(),
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": file_sha256(weights),
            "weights_bytes": weights.stat().st_size,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2))  # written last: its presence = complete
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{time.time_ns()}")
            folder.replace(old)
        tmp.replace(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_metadata(folder) -> dict:
    """The metadata dict saved beside an adapter; AdapterMismatch if the folder has none."""
    folder = Path(folder)
    path = folder / METADATA_FILE
    if not path.exists():
        raise AdapterMismatch(
            f"{folder} has no {METADATA_FILE}, so nothing says which base model it was trained on "
            "(it is not a qlora_nb adapter, or its save did not finish). Save adapters with "
            "qlora_nb.adapters.save_adapter, or re-train it.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterMismatch(f"{path} is not valid JSON ({err}); the folder is damaged. "
                              "Re-save or re-train the adapter.") from None


def check_adapter(folder, *, base_model: str, tokenizer=None) -> dict:
    """Check an adapter folder against a base (and tokenizer) without loading any weights; returns its metadata.

    Raises AdapterMismatch naming what differs and what to do.
    """
    from . import models

    folder = Path(folder)
    meta = read_metadata(folder)
    trained_on, fp_then = meta.get("base_model"), meta.get("base_fingerprint")
    fp_now = models.base_fingerprint(base_model)
    if fp_then != fp_now:
        raise AdapterMismatch(
            f"The adapter in {folder} was trained on base '{trained_on}' (fingerprint {fp_then}), "
            f"but it is being loaded onto '{base_model}' (fingerprint {fp_now}). Its low-rank updates "
            f"only make sense on the weights they were trained with: load it onto '{trained_on}', "
            f"or train a new adapter on '{base_model}'.")
    if tokenizer is not None:
        tok_now = tokenizer_fingerprint(tokenizer)
        if meta.get("tokenizer_fingerprint") != tok_now:
            raise AdapterMismatch(
                f"The adapter in {folder} was trained with tokenizer {meta.get('tokenizer_fingerprint')}, "
                f"but the tokenizer given has fingerprint {tok_now} (another vocabulary or chat template): "
                f"prompts would turn into other token ids. Use the tokenizer of '{trained_on}' "
                "(models.load_tokenizer), or re-train the adapter with this one.")
    weights = folder / meta.get("weights_file", WEIGHTS_FILE)
    if not weights.exists():
        raise AdapterMismatch(f"{weights} is missing: the adapter folder is incomplete. "
                              "Re-save or re-train the adapter.")
    size, digest = weights.stat().st_size, file_sha256(weights)
    if digest != meta.get("weights_sha256"):
        raise AdapterMismatch(
            f"{weights} is corrupted: sha256 {digest[:16]}... ({size} bytes), but the adapter was saved "
            f"with {str(meta.get('weights_sha256'))[:16]}... ({meta.get('weights_bytes')} bytes). "
            "The file was truncated or changed after saving; copy it again or re-train the adapter.")
    return meta


def load_adapter(base_model_obj, folder, *, base_model: str, tokenizer=None, adapter_name: str = "default"):
    """PeftModel: the adapter in `folder` attached to `base_model_obj`, after `check_adapter` passes.

    base_model: the name `base_model_obj` was loaded from (e.g. "embedded"). If
    `base_model_obj` is already a PeftModel, the adapter is added to it under
    `adapter_name` (peft's `load_adapter`, the base is not reloaded) and made active.
    """
    from peft import PeftModel

    from . import models

    meta = check_adapter(folder, base_model=base_model, tokenizer=tokenizer)
    # The name may not match the object: check the folder the object itself was loaded from, too.
    loaded_from = getattr(getattr(base_model_obj, "config", None), "_name_or_path", "") or ""
    if Path(loaded_from).is_dir() and models.base_fingerprint(loaded_from) != meta["base_fingerprint"]:
        raise AdapterMismatch(
            f"The model object was loaded from {loaded_from} (fingerprint {models.base_fingerprint(loaded_from)}), "
            f"not from the base the adapter in {folder} was trained on ('{meta['base_model']}', fingerprint "
            f"{meta['base_fingerprint']}), although base_model={base_model!r} was passed. Load the right base "
            "with models.load_base and pass its name as base_model.")
    if isinstance(base_model_obj, PeftModel):
        if adapter_name in base_model_obj.peft_config:
            raise ValueError(f"adapter_name={adapter_name!r} is already on this model "
                             f"({sorted(base_model_obj.peft_config)}); pick another name.")
        base_model_obj.load_adapter(str(folder), adapter_name=adapter_name)
        base_model_obj.set_adapter(adapter_name)
        return base_model_obj
    return PeftModel.from_pretrained(base_model_obj, str(folder), adapter_name=adapter_name)


def recorded_adapter_dir() -> Path:
    """data/adapters/triage: the committed triage adapter notebook 05 can load instead of training
    (how it was made: its README.md). Check it with `check_adapter` like any other before use."""
    from . import paths

    folder = paths.data_dir() / "adapters" / "triage"
    if not (folder / METADATA_FILE).exists():
        raise FileNotFoundError(f"{folder} holds no recorded adapter: restore data/adapters/triage from git, "
                                "or train one (notebook 05 with its defaults).")
    return folder


def adapter_bytes(folder) -> int:
    """Bytes on disk of an adapter folder (weights, config and metadata)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
