"""The ``Accelerator`` a training run uses, and the checks that it runs with the processes it was launched for.

One code path for one process, several, or several machines: the scripts are started with ``accelerate launch``
(or plain ``python``) and build their Accelerator here. On a machine without CUDA the Accelerator is a CPU one,
so ``accelerate launch --multi_gpu --num_processes 2 script.py`` gives two real gloo ranks.

``accelerate launch --num_processes 2 --cpu script.py`` starts only one process (see
``../shared/specs/environment.md``), and ``--multi_gpu`` without a CPU Accelerator gives two independent
single-process runs. Both would train silently with the wrong batch; :func:`check_process_count` refuses them.

FSDP on CPUs (``configs/accelerate/fsdp_cpu.yaml``): accelerate 1.15's ``AcceleratorState`` switches to FSDP only
for accelerator devices (its FSDP branch covers MULTI_GPU/XPU/NPU/..., not MULTI_CPU), so an FSDP launch with a CPU
Accelerator silently trains as DDP. torch's FSDP2 (``fully_shard``) itself runs on CPU tensors over gloo, and
accelerate's FSDP2 code paths (prepare, ``clip_grad_norm_``, ``save_state``/``load_state`` through
``torch.distributed.checkpoint``, ``get_state_dict``) are device-agnostic, so :func:`_enable_fsdp_on_cpu` sets the
distributed type and the FSDP plugin exactly as ``AcceleratorState`` does for GPUs. Only FSDP2 is enabled this way
(FSDP1 on CPUs is not tested here).
"""

from __future__ import annotations

import os
import warnings

import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, ProjectConfiguration

KNOWN_PRECISIONS = ("no", "bf16", "fp16")


def requested_processes(argv: list[str]) -> int | None:
    """The process count an ``accelerate launch`` command line asks for (``--num_processes`` or its
    ``--config_file``), or None when ``argv`` is not such a command."""
    if "launch" not in argv and not any(a.endswith("accelerate.commands.launch") for a in argv):
        return None
    if not any("accelerate" in a for a in argv[:4]):
        return None
    for i, arg in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(argv):
                return int(argv[i + 1])
            if arg.startswith(flag + "="):
                return int(arg.split("=", 1)[1])
        if arg in ("--config_file", "--config-file") and i + 1 < len(argv):
            try:
                with open(argv[i + 1]) as f:
                    return int((yaml.safe_load(f) or {}).get("num_processes", 1))
            except (OSError, ValueError, TypeError):
                return None
    return None


def _requested_by_launcher() -> int | None:
    """:func:`requested_processes` of this process's parent (Linux ``/proc``), else None."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    return requested_processes(argv)


def check_process_count(accelerator) -> None:
    """Refuse to run as one process when the launch asked for several (see the module docstring).

    ``accelerator``: an ``Accelerator`` or ``PartialState`` (anything with ``num_processes``)."""
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    requested = max(world_env, _requested_by_launcher() or 1)
    if requested > 1 and accelerator.num_processes != requested:
        raise RuntimeError(
            f"launched for {requested} processes but this run has {accelerator.num_processes}: refusing to "
            f"train with the wrong batch split. On CPUs, "
            f"`accelerate launch --num_processes N --cpu` starts a single process: use "
            f"`accelerate launch --multi_gpu --num_processes N` with ACCELERATE_USE_CPU=1 (or "
            f"--config_file configs/accelerate/cpu_2proc.yaml) to get N gloo ranks.")


def resolve_log_with(log_with: str | None) -> str | None:
    """``"auto"`` → ``"tensorboard"`` when installed, else None with a warning; ``"none"``/None → None."""
    if log_with in (None, "none"):
        return None
    if log_with == "auto":
        from accelerate.utils import is_tensorboard_available

        if is_tensorboard_available():
            return "tensorboard"
        warnings.warn("TensorBoard is not installed: training metrics go to train_log.json and the progress bar "
                      "only (pip install tensorboard, or set train.log_with=none to silence this)", stacklevel=2)
        return None
    return log_with


def make_accelerator(*, mixed_precision: str = "no", grad_accum_steps: int = 1, log_with: str | None = None,
                     project_dir: str | None = None, compile: bool = False) -> Accelerator:
    """A CPU Accelerator when CUDA is absent, else the default device; ``log_with`` as :func:`resolve_log_with`."""
    if mixed_precision not in KNOWN_PRECISIONS:
        raise ValueError(f"train.mixed_precision must be one of {KNOWN_PRECISIONS}, got {mixed_precision!r}")
    tracker = resolve_log_with(log_with)
    if tracker is not None and project_dir is None:
        tracker = None  # nowhere to write logs (no output_dir)
    kwargs = {}
    if project_dir is not None:
        kwargs["project_config"] = ProjectConfiguration(project_dir=project_dir,
                                                        logging_dir=os.path.join(project_dir, "logs"))
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision,
                              gradient_accumulation_steps=grad_accum_steps, log_with=tracker,
                              dynamo_backend="inductor" if compile else "no", **kwargs)
    check_process_count(accelerator)
    _enable_fsdp_on_cpu(accelerator, mixed_precision)
    return accelerator


def _enable_fsdp_on_cpu(accelerator: Accelerator, mixed_precision: str) -> None:
    """Turn an FSDP launch (``ACCELERATE_USE_FSDP=true``) that accelerate left as MULTI_CPU into FSDP (see the
    module docstring). Does nothing for any other launch."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # read from the launcher's FSDP_* variables, as accelerate does
    if plugin.fsdp_version != 2:
        raise ValueError(f"FSDP on CPUs needs fsdp_config.fsdp_version: 2 (FSDP2, torch fully_shard), got "
                         f"fsdp_version {plugin.fsdp_version}; see configs/accelerate/fsdp_cpu.yaml")
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    # AcceleratorState re-reads PartialState's shared fields whenever it is instantiated: set both.
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    if not accelerator.is_fsdp2:
        raise RuntimeError("could not switch the CPU Accelerator to FSDP2")


__all__ = ["check_process_count", "make_accelerator", "requested_processes", "resolve_log_with"]
