"""The one Accelerate training loop shared by the tokenizer and generator trainers.

Per optimiser step: ``grad_accum_steps`` micro-batches under ``accelerator.accumulate`` (mixed precision through
the Accelerator), gradient clipping on the synchronising micro-batch, AdamW, the learning-rate schedule set by
hand from a pure function of the step (so resuming needs no scheduler state), an optional EMA of the weights,
metrics averaged over ranks, trackers (TensorBoard by default), a progress bar, a sample grid every
``sample_every`` steps, atomic checkpoints every ``checkpoint_every`` steps (:mod:`.checkpoint`) and, at the
end, ``save_pretrained`` of the model (the EMA weights when EMA is on; the raw ones in ``non_ema/``).

FSDP (FSDP2 through accelerate; on CPUs see :mod:`.launch`) trains, checkpoints (sharded state dicts) and resumes
through the same calls; EMA, sample grids and ``broadcast_states`` are refused under it (see :func:`run_training`).

``batch_size`` is the **global** batch of one optimiser step: it is split over processes and accumulation
steps (:mod:`.data_stream`), so a recipe trains the same way on 1 or N processes.

Resuming (``resume: latest``) restores model, optimiser, RNG states (per rank), EMA and the loop's own state;
the data stream restarts at the saved step, so a resumed run ends with the same weights, bit for bit, as one
that was never interrupted (CPU, fixed seeds, same process count, no ``max_minutes``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device, set_seed
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tokenloom.training import checkpoint as ckpt
from tokenloom.training.data_stream import batch_stream
from tokenloom.training.ema import EMA
from tokenloom.training.launch import make_accelerator

# Fields that may change between a checkpoint and its resumption (they do not change the arithmetic).
RESUMABLE_CHANGES = ("progress", "log_every", "checkpoint_every", "checkpoint_keep", "checkpoint_dir", "output_dir",
                     "resume", "sample_every", "log_with", "num_workers", "threads", "max_steps")


@dataclass
class LoopConfig:
    """Settings of :func:`run_training` shared by both trainers (all JSON/YAML-serialisable).

    Attributes:
        max_steps: optimiser steps (the lr schedule spans them).
        max_minutes: time budget; None = none. Single-process only (ranks would stop at different steps).
        budget_clock: what ``max_minutes`` counts: ``"wall"`` or ``"cpu"`` (CPU time of this process).
        batch_size: global items per optimiser step (split over processes and accumulation steps).
        lr, weight_decay, betas: AdamW.
        warmup_steps, min_lr_ratio: linear warm-up, then cosine decay to ``lr · min_lr_ratio``.
        grad_clip: max global gradient norm; None = off.
        seed: data order, and the RNG of rank ``r`` is seeded with ``seed + r``.
        num_workers: DataLoader workers (map-style data sets).
        threads: ``torch.set_num_threads`` for the run; None = leave as is.
        log_every: steps between history records (means over the steps and ranks).
        output_dir: where ``save_pretrained`` writes the model, ``train_log.json``, ``logs/``, ``samples/`` and
            (by default) ``checkpoints/``; None = save nothing.
        progress: show a tqdm bar (main process only).
        grad_accum_steps: micro-batches per optimiser step.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (autocast through accelerate; bf16 works on CPUs).
        ema_decay: keep an EMA of the weights of every trained module with this decay (e.g. 0.999); None = off.
        compile: ``torch.compile`` the model (accelerate's ``dynamo_backend="inductor"``).
        checkpoint_every: steps between atomic checkpoints; None = off.
        checkpoint_keep: complete checkpoints kept (oldest removed first).
        checkpoint_dir: default ``<output_dir>/checkpoints``.
        resume: None, ``"latest"`` (the newest checkpoint, or a fresh start when there is none) or a path.
        sample_every: steps between sample grids (``samples/step-N.png`` + trackers); None = off.
        log_with: ``"auto"`` (TensorBoard when installed), ``"none"``, or an accelerate tracker name.
    """

    max_steps: int = 1000
    max_minutes: float | None = None
    budget_clock: str = "wall"
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    num_workers: int = 0
    threads: int | None = None
    log_every: int = 50
    output_dir: str | None = None
    progress: bool = True
    grad_accum_steps: int = 1
    mixed_precision: str = "no"
    ema_decay: float | None = None
    compile: bool = False
    checkpoint_every: int | None = None
    checkpoint_keep: int = 2
    checkpoint_dir: str | None = None
    resume: str | None = None
    sample_every: int | None = None
    log_with: str | None = "auto"

    def __post_init__(self):
        name = type(self).__name__
        for key in ("max_steps", "batch_size", "log_every", "grad_accum_steps", "checkpoint_keep"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}.{key} must be a positive int, got {value!r}")
        for key in ("checkpoint_every", "sample_every"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}.{key} must be a positive int or None, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"{name}.lr must be > 0, got {self.lr!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"{name}.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"{name}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"{name}.max_minutes must be > 0 or None, got {self.max_minutes!r}")
        if self.budget_clock not in ("wall", "cpu"):
            raise ValueError(f"{name}.budget_clock must be 'wall' or 'cpu', got {self.budget_clock!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"{name}.mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"{name}.ema_decay must lie in (0, 1) or be None, got {self.ema_decay!r}")
        if (self.checkpoint_every or self.resume) and self.output_dir is None and self.checkpoint_dir is None:
            raise ValueError(f"{name}.checkpoint_every/resume need output_dir or checkpoint_dir to be set")
        self.betas = tuple(self.betas)

    @property
    def checkpoint_folder(self) -> str | None:
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        return None if self.output_dir is None else os.path.join(self.output_dir, "checkpoints")


@dataclass
class LoopResult:
    """Steps done, wall and CPU minutes (of this session), why it stopped, the logged history."""

    steps: int
    minutes: float
    cpu_minutes: float
    stopped_by: str  # "steps" or "time"
    threads: int
    history: list[dict] = field(default_factory=list)
    resumed_from: str | None = None


class _LoopState:
    """What the loop itself must carry across a resume (registered for checkpointing)."""

    def __init__(self):
        self.step, self.minutes, self.cpu_minutes, self.history, self.window = 0, 0.0, 0.0, [], {}

    def state_dict(self) -> dict:
        return {"step": self.step, "minutes": self.minutes, "cpu_minutes": self.cpu_minutes,
                "history": self.history, "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.minutes, self.cpu_minutes = state["step"], state["minutes"], state["cpu_minutes"]
        self.history, self.window = list(state["history"]), dict(state["window"])


def adamw(param_groups: list[dict], config: LoopConfig) -> torch.optim.AdamW:
    """AdamW, fused when every parameter allows it (one kernel instead of ~10 small ops per tensor: on a busy CPU
    the per-op overhead of the plain loop dominates small models)."""
    params = [p for g in param_groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                for p in params)
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                             fused=fused)


def _scalars(out: dict) -> dict[str, Tensor]:
    return {k: v.detach().float() for k, v in out.items() if isinstance(v, Tensor) and v.dim() == 0}


def _image_grid(images: Tensor) -> Tensor:
    """``images [B, 3, H, W]`` in [-1, 1] → one ``[3, H', W']`` grid in [0, 1]."""
    from torchvision.utils import make_grid

    nrow = max(1, int(len(images) ** 0.5))
    return make_grid(((images.float().clamp(-1, 1) + 1) / 2).cpu(), nrow=nrow, padding=1)


def _write_samples(accelerator: Accelerator, images: Tensor, output_dir: str | None, step: int) -> None:
    grid = _image_grid(images)
    if output_dir is not None:
        from torchvision.utils import save_image

        os.makedirs(os.path.join(output_dir, "samples"), exist_ok=True)
        save_image(grid, os.path.join(output_dir, "samples", f"step-{step:08d}.png"))
    for tracker in accelerator.trackers:
        if hasattr(tracker, "log_images"):
            try:
                tracker.log_images({"samples": grid[None]}, step=step, dataformats="NCHW")
            except TypeError:  # trackers whose log_images takes other arguments
                tracker.log_images({"samples": [grid.permute(1, 2, 0).numpy()]}, step=step)


def _tracker_config(flat: dict) -> dict:
    """Scalars TensorBoard's hparams accept (None and lists become strings)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def run_training(model: torch.nn.Module, dataset: Dataset, config: LoopConfig,
                 forward_fn: Callable[[list, object], dict], *, param_groups: Callable[[list], list[dict]],
                 schedule: Callable[[int, float], float], accelerator: Accelerator | None = None,
                 extra_modules: tuple = (), sample_fn: Callable[[torch.nn.Module], Tensor] | None = None,
                 fingerprint: dict | None = None, collate_fn=None, desc: str = "training",
                 broadcast_states: bool = False) -> tuple[LoopResult, list]:
    """Train ``model`` (and ``extra_modules``, e.g. a jointly trained text encoder) on ``dataset``.

    Args:
        forward_fn: ``forward_fn(modules, batch) -> {"loss": scalar, other scalars...}`` with ``modules`` the
            prepared ``[model, *extra_modules]`` and ``batch`` on the device.
        param_groups: ``param_groups(unwrapped modules) -> AdamW param groups``.
        schedule: ``schedule(step, progress) -> lr factor``; ``progress = max(step / max_steps,
            elapsed / budget)``.
        sample_fn: ``sample_fn(unwrapped model) -> images [B, 3, H, W] in [-1, 1]`` for the sample grid; run in
            eval mode, on the main process, without touching the global RNG.
        fingerprint: the run's configuration (nested dict); a resume from a checkpoint made with another one
            fails naming the differing keys (the loop adds ``config`` and the model's ``config`` itself).
        broadcast_states: with several processes, copy every parameter and buffer of rank 0 to the other ranks
            after each optimiser step. For models that change weights outside the gradient (VQ dead-code restarts,
            EMA codebooks, usage counters): each rank would otherwise apply its own data-dependent update and the
            replicas would drift apart. Costs one broadcast of the model per step.

    Returns:
        ``(LoopResult, unwrapped [model, *extra_modules])``, in eval mode; the model holds the EMA weights when
        EMA is on. Under FSDP the returned modules stay sharded across ranks (``accelerator.get_state_dict`` gathers
        them); the exported folder holds the full weights, gathered before saving.
    """
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    accelerator = accelerator or make_accelerator(
        mixed_precision=config.mixed_precision, grad_accum_steps=config.grad_accum_steps, log_with=config.log_with,
        project_dir=config.output_dir, compile=config.compile)
    if accelerator.gradient_accumulation_steps != config.grad_accum_steps:
        raise ValueError(f"the accelerator accumulates {accelerator.gradient_accumulation_steps} steps but "
                         f"train.grad_accum_steps={config.grad_accum_steps}")
    world, rank = accelerator.num_processes, accelerator.process_index
    if world > 1 and config.max_minutes is not None:
        raise ValueError(f"train.max_minutes={config.max_minutes} is a per-process clock: with {world} processes "
                         f"the ranks would stop at different steps. Use train.max_steps and train.max_minutes=null.")
    sharded = str(getattr(accelerator, "distributed_type", "")).endswith(("FSDP", "DEEPSPEED"))
    if config.ema_decay is not None and sharded:
        # Under FSDP2 the EMA's shadows would be this rank's shards (DTensors), while accelerate saves registered
        # objects from the main process only: a checkpoint would lose the other ranks' shards.
        raise ValueError("train.ema_decay with FSDP/DeepSpeed is not supported (the EMA is checkpointed from the "
                         "main process only, so sharded shadows of the other ranks would be lost); set "
                         "train.ema_decay=null or use DDP")
    if sharded and broadcast_states:
        raise ValueError("broadcast_states (weights changed outside the gradient, e.g. VQ dead-code restarts) "
                         "needs replicated weights: use DDP, not FSDP/DeepSpeed")
    if sharded and config.sample_every and sample_fn is not None:
        raise ValueError(f"train.sample_every={config.sample_every} with FSDP/DeepSpeed is not supported (sample "
                         f"grids run on the main process only, a sharded forward needs every rank); set "
                         f"train.sample_every=null or use DDP")
    set_seed(config.seed + rank)

    modules = [model, *extra_modules]
    classes = [type(m) for m in modules]  # FSDP2 swaps each prepared module's class for an FSDP subclass
    optimizer = adamw(param_groups(modules), config)
    prepared = list(accelerator.prepare(*modules, optimizer))
    optimizer = prepared.pop()
    # read after prepare: FSDP replaces the parameters (sharded DTensors) and accelerate re-points the optimiser.
    # In the modules' own order: accelerate's FSDP clip_grad_norm_ matches the list against model.parameters().
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trained = [p for m in prepared for p in m.parameters() if id(p) in in_optimizer]
    for m in prepared:
        m.train()
    unwrapped = [accelerator.unwrap_model(m) for m in prepared]
    # the EMA averages every trained module (the model and e.g. a jointly trained text conditioner), so the
    # exported modules stay consistent with each other
    ema = EMA(torch.nn.ModuleList(unwrapped), config.ema_decay) if config.ema_decay is not None else None
    state = _LoopState()
    accelerator.register_for_checkpointing(state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    model_config = {k: v for k, v in dict(getattr(model, "config", None) or {}).items() if not k.startswith("_")}
    flat = ckpt.flatten({"config": dataclasses.asdict(config), "model": model_config, **(fingerprint or {})})
    allowed = tuple(f"config.{k}" for k in RESUMABLE_CHANGES)
    folder = config.checkpoint_folder
    resume_path = ckpt.resolve_resume(config.resume, folder) if config.resume else None
    if resume_path is not None:
        saved = ckpt.read_run_info(resume_path)
        ckpt.check_fingerprint(saved["fingerprint"], flat, resume_path, allowed)
        if saved.get("num_processes", world) != world:
            warnings.warn(f"resuming a {saved['num_processes']}-process run on {world} processes: the same global "
                          f"batches, but RNG streams differ from an uninterrupted run", stacklevel=2)
        accelerator.load_state(resume_path)  # model, optimiser, RNG states, then the loop state and EMA
    if accelerator.log_with:
        accelerator.init_trackers("train", config=_tracker_config(flat))

    budget = None if config.max_minutes is None else config.max_minutes
    start, cpu_start = time.perf_counter(), time.process_time()
    base_minutes, base_cpu = state.minutes, state.cpu_minutes

    def clock() -> tuple[float, float]:
        return (base_minutes + (time.perf_counter() - start) / 60, base_cpu + (time.process_time() - cpu_start) / 60)

    stream = batch_stream(dataset, batch_size=config.batch_size, seed=config.seed, start_step=state.step, rank=rank,
                          world=world, accumulation=config.grad_accum_steps, num_workers=config.num_workers,
                          collate_fn=collate_fn)
    bar = tqdm(total=config.max_steps, initial=state.step, desc=desc,
               disable=not (config.progress and accelerator.is_local_main_process))
    stopped_by, lr = "steps", config.lr
    while state.step < config.max_steps:
        minutes, cpu_minutes = clock()
        used = minutes if config.budget_clock == "wall" else cpu_minutes
        progress = max(state.step / config.max_steps, 0.0 if budget is None else used / budget)
        lr = config.lr * schedule(state.step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, Tensor] = {}
        for _ in range(config.grad_accum_steps):
            batch = send_to_device(next(stream), accelerator.device)
            with accelerator.accumulate(*prepared):
                out = forward_fn(prepared, batch)
                if not isinstance(out, dict) or "loss" not in out:
                    raise TypeError("forward_fn must return a dict with a scalar 'loss'")
                loss = out["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {float(loss)} at step {state.step}")
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.grad_clip is not None:
                    accelerator.clip_grad_norm_(trained, config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in _scalars(out).items():
                sums[k] = sums.get(k, 0.0) + v / config.grad_accum_steps
        state.step += 1
        if broadcast_states and world > 1:
            _broadcast_from_rank0(unwrapped)
        if ema is not None:
            ema.update(torch.nn.ModuleList(unwrapped))
        names = sorted(sums)
        means = accelerator.reduce(torch.stack([sums[k] for k in names]).to(accelerator.device), "mean")
        scalars = dict(zip(names, means.tolist()))
        for k, v in scalars.items():
            state.window.setdefault(k, []).append(v)
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in scalars.items()}, refresh=False)
        if state.step % config.log_every == 0 or state.step == config.max_steps:
            minutes, cpu_minutes = clock()
            record = {"step": state.step, "lr": lr, "minutes": minutes, "cpu_minutes": cpu_minutes}
            record.update({k: sum(v) / len(v) for k, v in state.window.items()})
            state.history.append(record)
            state.window = {}
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
        if config.sample_every and state.step % config.sample_every == 0 and sample_fn is not None:
            if accelerator.is_main_process:
                _sample(unwrapped[0], sample_fn, accelerator, config.output_dir, state.step)
            accelerator.wait_for_everyone()
        if config.checkpoint_every and state.step % config.checkpoint_every == 0:
            state.minutes, state.cpu_minutes = clock()
            base_minutes, base_cpu = state.minutes, state.cpu_minutes
            start, cpu_start = time.perf_counter(), time.process_time()
            ckpt.save_checkpoint(accelerator, folder, state.step,
                                 {"fingerprint": flat, "num_processes": world}, keep=config.checkpoint_keep)
        if budget is not None and clock()[0 if config.budget_clock == "wall" else 1] >= budget:
            stopped_by = "time"  # checked after a step, so a run always makes at least one
            break
    bar.close()
    if config.checkpoint_every and state.step % config.checkpoint_every and state.step > 0:
        # the last step (a time budget, or max_steps off the checkpoint grid): keep it resumable too
        state.minutes, state.cpu_minutes = clock()
        base_minutes, base_cpu = state.minutes, state.cpu_minutes
        start, cpu_start = time.perf_counter(), time.process_time()
        ckpt.save_checkpoint(accelerator, folder, state.step, {"fingerprint": flat, "num_processes": world},
                             keep=config.checkpoint_keep)
    if state.window:
        minutes, cpu_minutes = clock()
        record = {"step": state.step, "lr": lr, "minutes": minutes, "cpu_minutes": cpu_minutes}
        record.update({k: sum(v) / len(v) for k, v in state.window.items()})
        state.history.append(record)
        state.window = {}
    minutes, cpu_minutes = clock()
    result = LoopResult(steps=state.step, minutes=minutes, cpu_minutes=cpu_minutes, stopped_by=stopped_by,
                        threads=torch.get_num_threads(), history=state.history, resumed_from=resume_path)
    accelerator.wait_for_everyone()
    # drop accelerate's mixed-precision forward wrapper, so the returned model runs in its own dtype
    unwrapped = [accelerator.unwrap_model(m, keep_fp32_wrapper=False) for m in prepared]
    raw_state = None
    if ema is not None:
        raw_state = {k: v.detach().clone() for k, v in unwrapped[0].state_dict().items()}
        ema.copy_to(torch.nn.ModuleList(unwrapped))
    for m in unwrapped:
        m.eval()
    to_export = unwrapped[0]
    if sharded:
        # the full weights, gathered by every rank (a collective), into a plain copy of the original class
        full = accelerator.get_state_dict(prepared[0])
        if accelerator.is_main_process:
            to_export = classes[0].from_config(to_export.config)
            to_export.load_state_dict(full)
            to_export.eval()
    if config.output_dir is not None and accelerator.is_main_process:
        export(to_export, config.output_dir, raw_state)
        with open(os.path.join(config.output_dir, "train_log.json"), "w") as f:
            json.dump(dataclasses.asdict(result), f, indent=1)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result, unwrapped


@torch.no_grad()
def _broadcast_from_rank0(modules) -> None:
    import torch.distributed as dist

    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def _sample(model, sample_fn, accelerator, output_dir, step) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            images = sample_fn(model)
        if images is not None:
            _write_samples(accelerator, images, output_dir, step)
    finally:
        model.train(was_training)


def export(model: torch.nn.Module, output_dir: str, raw_state: dict | None = None) -> None:
    """``save_pretrained`` into ``output_dir``; with EMA, the raw (non-averaged) weights go to ``non_ema/``."""
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    if raw_state is not None:
        ema_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(raw_state)
        model.save_pretrained(os.path.join(output_dir, "non_ema"))
        model.load_state_dict(ema_state)


__all__ = ["LoopConfig", "LoopResult", "adamw", "export", "run_training"]
