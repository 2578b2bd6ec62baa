"""QLoRA fine-tuning with TRL's SFTTrainer: a 4-bit NF4 base, LoRA adapters, completion-only loss.

`finetune(FinetuneConfig(...))` loads the base through `models.load_base` (NF4, double
quantization, bf16 compute), runs `peft.prepare_model_for_kbit_training`, attaches LoRA
with `LoraConfig` + `get_peft_model`, and trains on the triage chat rows with
`trl.SFTTrainer`, where only the assistant's answer counts in the loss. It checkpoints
every `save_steps`, resumes from the last checkpoint, and returns the loss history.

Leaves out: the data set (data.py), scoring answers (evaluate.py), the adapter file
format and its metadata (adapters.py), sweeps (notebook 06). Every bad setting is
checked before anything big is loaded, and the error says what to change.

>>> FinetuneConfig().rank, FinetuneConfig().alpha, len(FinetuneConfig().target_modules)
(16, 32, 7)
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE = "finetune_config.json"
# Changing any other field (max_steps, eval/save interval, resume) keeps a run resumable.
_RESUMABLE_FIELDS = ("max_steps", "eval_steps", "save_steps", "resume", "output_dir", "eval_limit")


@dataclass
class FinetuneConfig:
    """Everything that defines one fine-tune; the defaults are the CI-sized run on the embedded model.

    Units: learning_rate per optimizer step; max_steps, eval_steps, save_steps in optimizer
    steps (each step sees batch_size * grad_accum examples); max_seq_length in tokens.
    output_dir None means `paths.runs_dir("05_finetune")`.
    """
    base_model: str = "embedded"
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    lora_layers: int | None = None     # LoRA on the top N decoder layers only (None: every layer)
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"       # transformers scheduler name; "constant" makes resumed runs bit-exact
    warmup_steps: int = 3
    max_steps: int = 60
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_length: int = 256
    output_dir: str | None = None
    seed: int = 0
    eval_steps: int = 20
    save_steps: int = 20
    resume: bool = True
    train_limit: int | None = None     # use only the first N training rows (None: all)
    eval_limit: int | None = 48        # validation rows for the validation loss (None: all)
    pad_to_max_length: bool = False    # pad every batch to max_seq_length (GPU benchmark: fixed-size steps)
    optim: str = "auto"                # "auto": paged_adamw_8bit on CUDA, adamw_torch on CPU
    gradient_checkpointing: bool | None = None  # None: on for CUDA (memory), off on CPU (speed)
    fast_path: bool = False            # qlora_nb.fast (notebook 09): same math, faster and leaner; needs dropout 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


@dataclass
class FinetuneResult:
    """What `finetune` returns: the trained PeftModel and how training went.

    loss_history: {"train": [(step, loss)], "validation": [(step, loss)]}, losses in nats
    per answer token, including steps run before a resume. step_seconds: wall time of each
    optimizer step run in this call. peak_gpu_memory_bytes: None on the CPU.
    """
    model: object
    tokenizer: object
    adapter_dir: Path
    loss_history: dict
    train_seconds: float
    trainable_params: int
    total_params: int
    global_step: int
    steps_run: int
    resumed_from: str | None
    step_seconds: list = field(default_factory=list)
    tokens_per_step: float = 0.0
    peak_gpu_memory_bytes: int | None = None
    config: FinetuneConfig | None = None


# ---------------------------------------------------------------- checks before loading

def linear_module_names(base_model: str) -> list[str]:
    """Names of the distinct nn.Linear layers inside the base's decoder (e.g. 'q_proj'), read on the meta device.

    No weights are loaded, so this is instant even for a 7B model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import models

    config = AutoConfig.from_pretrained(models.resolve_base_model(base_model))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and ".layers." in name}
    return sorted(names)


def model_context_length(base_model: str) -> int:
    """The base's context window in tokens (`max_position_embeddings` of its config.json)."""
    from transformers import AutoConfig

    from . import models

    config = AutoConfig.from_pretrained(models.resolve_base_model(base_model))
    return int(config.max_position_embeddings)


def model_layer_count(base_model: str) -> int:
    """How many decoder layers the base has (`num_hidden_layers` of its config.json)."""
    from transformers import AutoConfig

    from . import models

    return int(AutoConfig.from_pretrained(models.resolve_base_model(base_model)).num_hidden_layers)


def check_config(config: FinetuneConfig) -> None:
    """Raise ValueError naming the bad field and what to change; loads only the base's config.json."""
    positive = {"rank": config.rank, "alpha": config.alpha, "max_steps": config.max_steps,
                "batch_size": config.batch_size, "grad_accum": config.grad_accum,
                "max_seq_length": config.max_seq_length, "eval_steps": config.eval_steps,
                "save_steps": config.save_steps}
    for name, value in positive.items():
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{name}={value!r}: it must be a positive number. Set {name} to at least 1.")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"dropout={config.dropout!r}: LoRA dropout is a probability. Use a value in [0, 1), e.g. 0.05.")
    if config.fast_path and config.dropout > 0:
        raise ValueError(f"fast_path=True with dropout={config.dropout}: the fast path has no LoRA dropout. "
                         "Set dropout=0.0, or fast_path=False for the plain peft path.")
    if not 0 < config.learning_rate < 1:
        raise ValueError(f"learning_rate={config.learning_rate!r}: use a small positive value such as 2e-4.")
    if config.lora_layers is not None:
        n_layers = model_layer_count(config.base_model)
        if not isinstance(config.lora_layers, int) or not 1 <= config.lora_layers <= n_layers:
            raise ValueError(f"lora_layers={config.lora_layers!r}: '{config.base_model}' has {n_layers} decoder "
                             f"layers. Use a whole number from 1 to {n_layers}, or None for every layer.")
    if isinstance(config.target_modules, str) or not config.target_modules:
        raise ValueError(f"target_modules={config.target_modules!r}: give a list of layer names, "
                         f"e.g. {list(ALL_PROJECTIONS)}.")
    available = linear_module_names(config.base_model)
    unknown = [m for m in config.target_modules if m not in available]
    if unknown:
        raise ValueError(f"target_modules names {unknown}, which the model '{config.base_model}' does not have. "
                         f"Its linear layers are {available}: change target_modules to a subset of these.")
    context = model_context_length(config.base_model)
    if config.max_seq_length > context:
        raise ValueError(f"max_seq_length={config.max_seq_length} is longer than the context of '{config.base_model}' "
                         f"({context} tokens, max_position_embeddings in its config.json). "
                         f"Set max_seq_length to at most {context}.")


def to_prompt_completion(rows: list[dict], split: str = "train") -> list[dict]:
    """Chat rows {"messages": [..., assistant]} -> TRL prompt-completion rows (the completion is the answer).

    TRL masks the prompt out of the loss for this format, whatever the chat template.

    >>> to_prompt_completion([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    [{'prompt': [{'role': 'user', 'content': 'q'}], 'completion': [{'role': 'assistant', 'content': 'a'}]}]
    """
    if not rows:
        raise ValueError(f"The {split} split is empty: there is nothing to train or evaluate on. "
                         "Check the data files (data/triage/) or the split name.")
    out = []
    for i, row in enumerate(rows):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(f"{split} row {i} has no final assistant message: each row needs "
                             "{'messages': [..., {'role': 'user', ...}, {'role': 'assistant', ...}]}.")
        out.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return out


def token_lengths(tokenizer, rows: list[dict]) -> list[int]:
    """Tokens per chat row (prompt + answer, chat template applied), as the trainer will see them."""
    return [len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
            for r in rows]


def check_lengths(tokenizer, rows: list[dict], max_seq_length: int, split: str = "train") -> None:
    """Refuse rows longer than max_seq_length: truncation would cut the end of the JSON answer off."""
    lengths = token_lengths(tokenizer, rows)
    too_long = [n for n in lengths if n > max_seq_length]
    if too_long:
        raise ValueError(f"{len(too_long)} of {len(rows)} {split} rows are longer than max_seq_length="
                         f"{max_seq_length} tokens (longest: {max(lengths)}); they would lose the end of their "
                         f"answer. Set max_seq_length to at least {max(lengths)}.")


# ---------------------------------------------------------------- model

def is_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as stored elements x 2 (two per byte)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def lora_config(config: FinetuneConfig):
    """The peft LoraConfig for `config` (LoRA on the named projections, causal LM task).

    lora_layers=N puts LoRA on the top N decoder layers only (peft's layers_to_transform): the
    backward pass then stops N layers below the output, which on the CPU more than halves a step
    for N = half the layers.
    """
    from peft import LoraConfig

    layers = None
    if config.lora_layers is not None:
        n_layers = model_layer_count(config.base_model)
        layers = list(range(n_layers - config.lora_layers, n_layers))
    return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), layers_to_transform=layers,
                      bias="none", task_type="CAUSAL_LM")


def load_for_training(config: FinetuneConfig):
    """(PeftModel, tokenizer): the base in 4-bit NF4 + double quant + bf16 compute, prepared, with fresh LoRA.

    LoRA's B matrices start at zero, so before training the model answers exactly as the
    4-bit base does (up to the fp32 layer norms that prepare_model_for_kbit_training makes).
    """
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    from . import models

    check_config(config)
    torch.manual_seed(config.seed)  # LoRA's A matrices are random
    model, tokenizer = models.load_base(config.base_model, quantize="nf4", double_quant=True)
    checkpointing = is_cuda() if config.gradient_checkpointing is None else config.gradient_checkpointing
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora_config(config))
    if config.fast_path:
        from . import fast
        fast.enable_fast_path(model, checkpointing=checkpointing)  # its own (offloaded) checkpointing
    return model, tokenizer


# ---------------------------------------------------------------- training

def output_dir_of(config: FinetuneConfig) -> Path:
    from . import paths

    return Path(config.output_dir) if config.output_dir else paths.runs_dir("05_finetune")


def _prepare_output_dir(config: FinetuneConfig) -> str | None:
    """Create output_dir; return the checkpoint to resume from (or None), refusing a checkpoint of another config."""
    from transformers.trainer_utils import get_last_checkpoint

    out = output_dir_of(config)
    out.mkdir(parents=True, exist_ok=True)
    identity = {k: v for k, v in config.to_dict().items() if k not in _RESUMABLE_FIELDS}
    saved = out / CONFIG_FILE
    last = get_last_checkpoint(str(out))
    if last and not config.resume:
        for ckpt in out.glob("checkpoint-*"):  # starting over: old checkpoints would be picked up later
            shutil.rmtree(ckpt)
        last = None
    if last and saved.exists():
        before = json.loads(saved.read_text())
        defaults = FinetuneConfig().to_dict()  # a field added since that run was saved counts as its default
        changed = sorted(k for k in identity if before.get(k, defaults.get(k)) != identity[k])
        if changed:
            raise ValueError(f"{out} holds checkpoints of a run with different {changed}; resuming would mix two "
                             "runs. Use another output_dir, or resume=False to start over in this one.")
    saved.write_text(json.dumps(identity, indent=2))
    return last


def _step_clock():
    """A TrainerCallback that times each optimizer step run in this process (list `seconds`)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds, self._t = [], None

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if is_cuda():  # CUDA runs ahead of Python; wait so the step's time is its own
                import torch
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self._t)

    return StepClock()


def _qlora_trainer_class():
    """SFTTrainer whose resume copies the checkpoint's LoRA weights into the live fp32 adapter.

    (Trainer's own resume calls peft's load_adapter, which here re-creates the adapter in the
    base's bf16: the resumed run would then differ from an uninterrupted one.)
    """
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    from trl import SFTTrainer

    class QLoRATrainer(SFTTrainer):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            model = model if model is not None else self.model
            weights = Path(resume_from_checkpoint) / "adapter_model.safetensors"
            if not weights.exists():
                raise ValueError(f"{resume_from_checkpoint} has no adapter_model.safetensors: it is not a checkpoint "
                                 "of this training code. Use resume=False or another output_dir.")
            result = set_peft_model_state_dict(model, load_file(str(weights)))  # copy_ keeps each param's dtype
            if result.unexpected_keys:
                raise ValueError(f"{weights} holds weights this model lacks ({result.unexpected_keys[:3]} ...): "
                                 "it was trained with other LoRA settings. Use resume=False or another output_dir.")

    return QLoRATrainer


def sft_config(config: FinetuneConfig, progress: bool = True):
    """The trl SFTConfig for `config`: completion-only loss, checkpoints, validation loss every eval_steps.

    Optimizer: paged AdamW 8-bit on CUDA (the QLoRA paper's memory-spike guard); on the CPU
    bitsandbytes' paged optimizers do not exist (they page CUDA memory), so plain adamw_torch.
    """
    from trl import SFTConfig

    cuda = is_cuda()
    optim = config.optim if config.optim != "auto" else ("paged_adamw_8bit" if cuda else "adamw_torch")
    checkpointing = cuda if config.gradient_checkpointing is None else config.gradient_checkpointing
    return SFTConfig(
        output_dir=str(output_dir_of(config)),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size * 2,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        optim=optim,
        seed=config.seed,
        data_seed=config.seed,
        max_length=config.max_seq_length,
        pad_to_multiple_of=config.max_seq_length if config.pad_to_max_length else None,
        completion_only_loss=True,
        packing=False,
        gradient_checkpointing=checkpointing and not config.fast_path,  # the fast path checkpoints its own way
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=cuda,  # on the CPU the 4-bit layers already compute in bf16; autocast there only slows the fp32 rest
        use_cpu=not cuda,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        report_to="none",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )


# Trainer log key -> loss history split (also read live, entry by entry, by live.LiveLoss)
LOSS_KEYS = (("loss", "train"), ("eval_loss", "validation"))


def loss_history_of(log_history: list[dict]) -> dict:
    """Trainer log_history -> {"train": [(step, loss)], "validation": [(step, loss)]}."""
    return {split: [(h["step"], h[key]) for h in log_history if key in h] for key, split in LOSS_KEYS}


def finetune(config: FinetuneConfig, progress: bool = True, *, model=None, tokenizer=None,
             train_rows: list[dict] | None = None, eval_rows: list[dict] | None = None,
             callbacks=()) -> FinetuneResult:
    """Train LoRA adapters on the triage task; resume from output_dir's last checkpoint if config.resume.

    model/tokenizer: a pair from `load_for_training(config)` (e.g. to score the untrained
    model first without loading the base twice); None loads it here. train_rows/eval_rows:
    chat rows (default: data.load_triage("train") and ("validation")). callbacks: extra
    transformers TrainerCallbacks (e.g. live.LiveLoss, a live loss curve) given to the trainer.
    The adapter is saved to output_dir/adapter.
    """
    import torch
    from datasets import Dataset
    check_config(config)
    if train_rows is None or eval_rows is None:
        from . import data
        train_rows = data.load_triage("train") if train_rows is None else train_rows
        eval_rows = data.load_triage("validation") if eval_rows is None else eval_rows
    train_rows = train_rows[:config.train_limit] if config.train_limit else train_rows
    eval_rows = eval_rows[:config.eval_limit] if config.eval_limit else eval_rows
    train_set = Dataset.from_list(to_prompt_completion(train_rows, "train"))
    eval_set = Dataset.from_list(to_prompt_completion(eval_rows, "validation"))
    if model is None or tokenizer is None:
        model, tokenizer = load_for_training(config)
    check_lengths(tokenizer, train_rows, config.max_seq_length, "train")
    check_lengths(tokenizer, eval_rows, config.max_seq_length, "validation")
    resume_from = _prepare_output_dir(config)

    trainable, total = trainable_parameters(model)
    clock = _step_clock()
    trainer = _qlora_trainer_class()(model=model, args=sft_config(config, progress), train_dataset=train_set,
                         eval_dataset=eval_set, processing_class=tokenizer, callbacks=[clock, *callbacks])
    if is_cuda():
        torch.cuda.reset_peak_memory_stats()
    model.train()
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.perf_counter() - start
    # The last validation loss, unless the final step already logged one.
    history = loss_history_of(trainer.state.log_history)
    if not history["validation"] or history["validation"][-1][0] != trainer.state.global_step:
        trainer.evaluate()
        history = loss_history_of(trainer.state.log_history)
    model.eval()

    adapter_dir = output_dir_of(config) / "adapter"
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    tokens_per_step = (config.max_seq_length if config.pad_to_max_length else sum(lengths) / len(lengths)) \
        * config.batch_size * config.grad_accum
    result = FinetuneResult(
        model=model, tokenizer=tokenizer, adapter_dir=adapter_dir, loss_history=history,
        train_seconds=train_seconds, trainable_params=trainable, total_params=total,
        global_step=trainer.state.global_step, steps_run=len(clock.seconds),
        resumed_from=resume_from, step_seconds=clock.seconds, tokens_per_step=tokens_per_step,
        peak_gpu_memory_bytes=torch.cuda.max_memory_allocated() if is_cuda() else None, config=config)
    save_result(result, train_rows=train_rows)
    return result


def training_metrics(result: FinetuneResult) -> dict:
    """Numbers worth keeping next to the adapter (losses in nats/token, seconds, bytes)."""
    h = result.loss_history
    steps = sorted(result.step_seconds)
    return {"global_step": result.global_step,
            "final_train_loss": h["train"][-1][1] if h["train"] else None,
            "final_validation_loss": h["validation"][-1][1] if h["validation"] else None,
            "train_seconds": result.train_seconds,
            "median_step_seconds": steps[len(steps) // 2] if steps else None,
            "trainable_params": result.trainable_params,
            "peak_gpu_memory_bytes": result.peak_gpu_memory_bytes}


def save_result(result: FinetuneResult, metrics: dict | None = None, train_rows: list[dict] | None = None) -> Path:
    """Save the adapter (safetensors) and its metadata to result.adapter_dir; returns that folder.

    metrics: extra numbers (e.g. test accuracy) merged into the training metrics.
    """
    config = result.config
    all_metrics = {**training_metrics(result), **(metrics or {})}
    try:
        from . import adapters
    except ImportError:
        adapters = None
    if adapters is not None and hasattr(adapters, "save_adapter"):
        from . import data
        data_hash = data.dataset_hash(train_rows) if train_rows is not None else getattr(result, "_data_hash", None)
        result._data_hash = data_hash
        adapters.save_adapter(result.model, result.adapter_dir, base_model=config.base_model,
                              tokenizer=result.tokenizer, data_hash=data_hash,
                              training_args=config.to_dict(), metrics=all_metrics)
    else:  # adapters.py not there yet: plain peft files + our metadata
        result.adapter_dir.mkdir(parents=True, exist_ok=True)
        result.model.save_pretrained(result.adapter_dir, safe_serialization=True)
        (result.adapter_dir / "qlora_nb_metadata.json").write_text(json.dumps(
            {"base_model": config.base_model, "training_args": config.to_dict(), "metrics": all_metrics},
            indent=2, default=str))
    return result.adapter_dir


def steps_for_epochs(epochs: float, n_rows: int, batch_size: int, grad_accum: int = 1) -> int:
    """Optimizer steps that make `epochs` passes over n_rows.

    >>> steps_for_epochs(1.0, 100, 8)
    13
    """
    return max(1, math.ceil(epochs * n_rows / (batch_size * grad_accum)))
