"""Start `qlora_nb.distributed` on N processes with `accelerate launch` (or alone), stream its progress, and fail fast with a reason.

A notebook cannot fork ranks itself, so it calls `run(...)`, which checks the accelerate
config file and the device count before anything starts, runs

    accelerate launch --config_file configs/accelerate/<name>.yaml [--num_processes N] -m qlora_nb.distributed ...

as a subprocess (NVLink multicast off and one thread per CPU process in its environment),
prints each rank's progress lines as they come, keeps the whole output in a log file,
and stops it (the whole process group) after `timeout` seconds. A failure raises
LaunchError carrying the script's own error message, not a page of tracebacks.

>>> display_command("cpu_ddp_2proc", ["--device", "cpu"])
'accelerate launch --config_file configs/accelerate/cpu_ddp_2proc.yaml -m qlora_nb.distributed --device cpu'

Leaves out: what the ranks do (distributed.py), multi-node launches, and SLURM.
"""
from __future__ import annotations

import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .distributed import ERROR_PREFIX, NVLS_OFF, DistributedSetupError, check_devices

MODULE = "qlora_nb.distributed"
CONFIG_SUBDIR = Path("configs") / "accelerate"


class LaunchError(RuntimeError):
    """The launched run failed or timed out; the message holds the script's reason and the log path."""


@dataclass
class LaunchResult:
    """A finished launch: exit code 0, wall seconds, the command, and the log with all output."""
    command: list
    seconds: float
    log: Path


def config_dir() -> Path:
    from .paths import repo_root

    root = repo_root()
    if root is None:
        raise FileNotFoundError("The accelerate configs live in the git checkout (configs/accelerate/); clone the "
                                "repo and `pip install -e .` there.")
    return root / CONFIG_SUBDIR


def available_configs() -> list[str]:
    """Names of the accelerate configs in the repo (file stems)."""
    folder = config_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def config_path(config) -> Path:
    """A config name ('cpu_ddp_2proc') or path -> the existing file; a missing one says which exist."""
    path = Path(config)
    if not path.suffix:
        path = config_dir() / f"{config}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"accelerate config {str(config)!r} not found (looked for {path.resolve()}). Use one of "
                                f"{', '.join(available_configs()) or 'none found'} in {config_dir()}, or write one "
                                "with `accelerate config --config_file <path>`.")
    return path


def read_config(config) -> dict:
    """The accelerate config as a dict (YAML), checked for the keys the launch relies on."""
    import yaml

    path = config_path(config)
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML ({err}); fix it or start from one of {available_configs()}") from None
    if not isinstance(cfg, dict) or "distributed_type" not in cfg or "num_processes" not in cfg:
        raise ValueError(f"{path} is not an accelerate config: it needs at least distributed_type and num_processes")
    return cfg


def check_launch(config, num_processes: int | None = None, device: str = "cpu") -> int:
    """Before starting anything: the config exists, its processes fit the devices here. Returns the process count."""
    cfg = read_config(config)
    n = int(num_processes or cfg["num_processes"])
    if n < 1:
        raise DistributedSetupError(f"num_processes={n}: give at least 1")
    fsdp = cfg["distributed_type"] == "FSDP"
    if fsdp and device != "cuda":
        raise DistributedSetupError(f"{config_path(config).name} is an FSDP config, which needs CUDA GPUs; on the CPU "
                                    "use cpu_ddp_2proc.")
    check_devices(n, device, str(config_path(config)))
    return n


def accelerate_command(config, script_args=(), num_processes: int | None = None, module: str = MODULE) -> list[str]:
    """argv that runs accelerate's launcher with this Python (so the same environment), module mode."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path(config))]
    if num_processes:
        cmd += ["--num_processes", str(num_processes)]
    return cmd + ["-m", module, *map(str, script_args)]


def display_command(config, script_args=(), num_processes: int | None = None, module: str = MODULE) -> str:
    """The same command as a person types it, from the repo root."""
    path = config_path(config)
    try:
        shown = path.relative_to(config_dir().parent.parent)
    except ValueError:
        shown = path
    parts = ["accelerate", "launch", "--config_file", str(shown)]
    if num_processes:
        parts += ["--num_processes", str(num_processes)]
    return shlex.join(parts + ["-m", module, *map(str, script_args)])


def launch_env(device: str = "cpu") -> dict:
    """The environment of the launched processes: NVLink multicast off, unbuffered output, 1 thread per CPU rank."""
    env = {**os.environ, **NVLS_OFF, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")  # 2 processes on 2 cores: more threads would fight over them
    return env


def _interesting(line: str) -> bool:
    return line.startswith("[rank") or ERROR_PREFIX in line


def _stream(cmd: list[str], env: dict, timeout: float, log: Path, progress) -> LaunchResult:
    """Run cmd in its own process group; pass progress lines on; kill the group after `timeout` seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    lines: queue.Queue = queue.Queue()
    with open(log, "w") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True, bufsize=1)
        reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True)
        reader.start()
        errors, done = [], False
        while not done:
            left = timeout - (time.perf_counter() - start)
            if left <= 0:
                _kill_group(proc)
                raise LaunchError(f"the run did not finish within {timeout:.0f} s and was stopped (all its "
                                  f"processes). Give it more time (timeout=...) or fewer steps; output in {log}")
            try:
                line = lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                done = True
                continue
            fh.write(line)
            fh.flush()
            text = line.rstrip("\n").split("\r")[-1]
            if ERROR_PREFIX in text:
                errors.append(text.split(ERROR_PREFIX, 1)[1].replace(" | ", "\n"))  # the script sends one line
            elif progress and _interesting(text):
                progress(text)
        code = proc.wait()
    seconds = time.perf_counter() - start
    if code != 0:
        if errors:
            unique = list(dict.fromkeys(errors))  # every rank says the same: once is enough
            raise LaunchError("\n".join(unique) + f"\n(full output: {log})")
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise LaunchError(f"the run failed with exit code {code}; the end of its output:\n{tail}(full output: {log})")
    return LaunchResult(cmd, seconds, log)


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the process we started and everything it started (its own session), TERM then KILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run(config, script_args=(), num_processes: int | None = None, device: str = "cpu", timeout: float = 600,
        progress=print, log: Path | None = None, module: str = MODULE) -> LaunchResult:
    """Check, then `accelerate launch` the training script; raises LaunchError (with the reason) if it fails.

    script_args: qlora_nb.distributed's flags (e.g. ['--out', folder, '--max-steps', 3]); '--device'
    is added from `device` when missing (for qlora_nb.distributed). progress: called with each progress
    line (None: quiet). module: the script accelerate starts (qlora_nb.launch_fsdp_cpu for the sharding demo).
    """
    n = check_launch(config, num_processes, device)
    args = [str(a) for a in script_args]
    if "--device" not in args and module == MODULE:
        args += ["--device", device]
    log = Path(log) if log else _default_log(args, f"launch_{n}proc.log")
    _clear_old_results(args)
    return _stream(accelerate_command(config, args, num_processes, module), launch_env(device), timeout, log, progress)


def run_single(script_args=(), device: str = "cpu", timeout: float = 600, progress=print,
               log: Path | None = None) -> LaunchResult:
    """The same training script as one plain process (no accelerate): the reference a parallel run must match."""
    args = [str(a) for a in script_args]
    if "--device" not in args:
        args += ["--device", device]
    log = Path(log) if log else _default_log(args, "single.log")
    _clear_old_results(args)
    return _stream([sys.executable, "-m", MODULE, *args], launch_env(device), timeout, log, progress)


def _clear_old_results(args: list[str]) -> None:
    """Remove rank files of an earlier run in --out, so a failed run cannot pass for a finished one."""
    if "--out" in args:
        folder = Path(args[args.index("--out") + 1])
        for old in (*folder.glob("rank*.json"), *folder.glob("adapter_rank*.safetensors")):
            old.unlink()


def _default_log(args: list[str], name: str) -> Path:
    """<--out folder>/<name>, or runs/10_multi_gpu/<name> when no --out is given."""
    if "--out" in args:
        return Path(args[args.index("--out") + 1]) / name
    from .paths import runs_dir

    return runs_dir("10_multi_gpu") / name
