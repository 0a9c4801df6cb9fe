"""Accelerate training loop for any tokenizer whose ``model(images)`` returns a dict with a scalar ``"loss"``.

AdamW, linear warm-up then cosine decay (by steps), gradient clipping, a tqdm bar showing the scalar outputs,
a step count and an optional wall-clock budget (``max_minutes``), then ``save_pretrained`` to ``output_dir``.

``train_from_config(cfg)`` runs a whole YAML recipe (``configs/tokenizer/*.yaml``)::

    tokenizer: {name: vq, <constructor arguments>}     # tokenloom.tokenizers.build(name, **cfg)
    data: {name: shapes, image_size: 32, num_samples: 20000, seed: 0}
    eval_data: {name: shapes, split: test, image_size: 32, num_samples: 1000}   # optional
    train: {<TrainConfig fields>}

Determinism: the same seed gives the same model on the same machine and thread count, unless
``max_minutes`` stops the run early (then the number of steps depends on the machine's speed).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

# Data sets reachable by name from a recipe: name -> "module:Class".
DATASETS = {
    "shapes": "tokenloom.data.shapes:ShapesDataset",
    "single_shapes": "tokenloom.data.shapes:SingleShapeDataset",
    "digits": "tokenloom.data.digits:DigitsDataset",
}


@dataclass
class TrainConfig:
    """Optimisation settings of :func:`train_tokenizer` (all JSON/YAML-serialisable).

    Attributes:
        max_steps: optimiser steps (the lr schedule spans them).
        max_minutes: time budget for the loop; None = no budget. Stops early when reached.
        budget_clock: what ``max_minutes`` counts: ``"wall"`` (elapsed time) or ``"cpu"`` (CPU time of this
            process, all threads: steadier than wall time on a shared, overloaded machine).
        batch_size: images per step (per process).
        lr, weight_decay, betas: AdamW settings.
        warmup_steps: linear warm-up from 0; then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``.
        grad_clip: max gradient norm; None = off.
        seed: seeds model init (when the caller builds the model after :func:`seed_everything`), shuffling
            and any randomness inside the model.
        num_workers: DataLoader workers.
        threads: ``torch.set_num_threads`` for the run; None = leave as is.
        log_every: steps between history records (means of the scalar outputs).
        output_dir: where ``save_pretrained`` writes the model and ``train_log.json``; None = don't save.
        progress: show the tqdm bar.
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

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"TrainConfig.max_minutes must be > 0 or None, got {self.max_minutes!r}")
        if self.budget_clock not in ("wall", "cpu"):
            raise ValueError(f"TrainConfig.budget_clock must be 'wall' or 'cpu', got {self.budget_clock!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        self.betas = tuple(self.betas)


@dataclass
class TrainResult:
    """What :func:`train_tokenizer` returns: steps done, wall and CPU minutes, why it stopped, logged history."""

    steps: int
    minutes: float
    cpu_minutes: float
    stopped_by: str  # "steps" or "time"
    threads: int
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) for a reproducible run."""
    torch.manual_seed(seed)


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warm-up, then cosine to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def images_of(batch) -> Tensor:
    """The image tensor of a batch: ``batch["image"]``, ``batch[0]`` or the batch itself."""
    if isinstance(batch, dict):
        return batch["image"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


def cache_images(dataset: Dataset, progress: bool = True, batch_size: int = 256) -> TensorDataset:
    """Render every image of ``dataset`` once into memory: a ``TensorDataset`` of ``[N, 3, H, W]`` float32.

    Procedural data sets (shapes) are rendered in Python per item; caching keeps the training loop fed.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    parts = [images_of(b) for b in tqdm(loader, desc="rendering images", disable=not progress)]
    return TensorDataset(torch.cat(parts))


def build_dataset(name: str, **config) -> Dataset:
    """A data set by recipe name (see :data:`DATASETS`), e.g. ``build_dataset("shapes", split="test")``."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {sorted(DATASETS)}")
    module, cls = DATASETS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**config)


def _adamw(params: list, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused when the parameters allow it (one kernel instead of ~10 small ops per tensor: on a busy
    CPU the per-op overhead of the plain loop dominates small models)."""
    kwargs = dict(lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
           for p in params):
        return torch.optim.AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _scalars(out: dict) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in out.items() if isinstance(v, Tensor) and v.dim() == 0}


def train_tokenizer(model: torch.nn.Module, dataset: Dataset, config: TrainConfig,
                    accelerator: Accelerator | None = None) -> TrainResult:
    """Train ``model`` on the images of ``dataset``; ``model(images)`` must return a dict with ``"loss"``.

    Args:
        model: a tokenizer (any ``nn.Module`` with that forward); trained in place.
        dataset: items are dicts with ``"image"``, tuples whose first element is the image, or tensors.
        config: :class:`TrainConfig`.
        accelerator: an ``accelerate.Accelerator``; None = ``Accelerator(cpu=not cuda)``.

    Returns:
        :class:`TrainResult`; the model is saved to ``config.output_dir`` when it is set.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if len(dataset) < config.batch_size:
        raise ValueError(f"dataset has {len(dataset)} items, fewer than batch_size={config.batch_size}")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                        generator=generator, num_workers=config.num_workers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _adamw(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, config.max_steps, config.min_lr_ratio))
    # The scheduler is not prepared: accelerate would step it once per process, and our schedule counts
    # optimiser steps.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()

    history: list[dict] = []
    window: dict[str, list[float]] = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    step, stopped_by = 0, "steps"
    bar = tqdm(total=config.max_steps, desc="training", disable=not (config.progress
                                                                      and accelerator.is_local_main_process))
    while step < config.max_steps:
        for batch in loader:
            out = model(images_of(batch))
            if not isinstance(out, dict) or "loss" not in out:
                raise TypeError("model(images) must return a dict with a scalar 'loss'")
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {float(loss)} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if config.grad_clip is not None:
                accelerator.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            scalars = _scalars(out)
            for k, v in scalars.items():
                window.setdefault(k, []).append(v)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in scalars.items()}, refresh=False)
            if step % config.log_every == 0 or step == config.max_steps:
                record = {"step": step, "lr": scheduler.get_last_lr()[0],
                          "minutes": (time.perf_counter() - start) / 60,
                          "cpu_minutes": (time.process_time() - cpu_start) / 60}
                record.update({k: sum(v) / len(v) for k, v in window.items()})
                history.append(record)
                window = {}
            clock = time.perf_counter() - start if config.budget_clock == "wall" else time.process_time() - cpu_start
            minutes = clock / 60
            if config.max_minutes is not None and minutes >= config.max_minutes:
                stopped_by = "time"
                break
            if step >= config.max_steps:
                break
        if stopped_by == "time":
            break
    bar.close()
    result = TrainResult(steps=step, minutes=(time.perf_counter() - start) / 60,
                         cpu_minutes=(time.process_time() - cpu_start) / 60, stopped_by=stopped_by,
                         threads=torch.get_num_threads(), history=history)
    accelerator.wait_for_everyone()
    if config.output_dir is not None and accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
        accelerator.unwrap_model(model).save_pretrained(config.output_dir)
        with open(os.path.join(config.output_dir, "train_log.json"), "w") as f:
            json.dump(result.to_dict(), f, indent=1)
    return result


def train_from_config(cfg: dict, output_dir: str | None = None, progress: bool = True) -> dict:
    """Run a recipe dict (the YAML of ``configs/tokenizer/``): build, train, save, evaluate.

    Returns ``{"model", "train": TrainResult dict, "eval": metrics or None}``; ``output_dir`` overrides
    ``train.output_dir``; evaluation metrics are also written to ``<output_dir>/eval.json``.
    """
    from tokenloom.evaluation.reconstruction import evaluate_reconstruction
    from tokenloom.tokenizers import build

    for key in ("tokenizer", "data"):
        if key not in cfg:
            raise ValueError(f"recipe must have a {key!r} section, got sections {sorted(cfg)}")
    train_cfg = dict(cfg.get("train", {}))
    if output_dir is not None:
        train_cfg["output_dir"] = output_dir
    train_cfg.setdefault("progress", progress)
    config = TrainConfig(**train_cfg)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    tok_cfg = dict(cfg["tokenizer"])
    seed_everything(config.seed)
    model = build(tok_cfg.pop("name"), **tok_cfg)
    data_cfg = dict(cfg["data"])
    data = cache_images(build_dataset(data_cfg.pop("name"), **data_cfg), progress=config.progress)
    result = train_tokenizer(model, data, config)
    metrics = None
    if cfg.get("eval_data"):
        eval_cfg = dict(cfg["eval_data"])
        eval_set = build_dataset(eval_cfg.pop("name"), **eval_cfg)
        metrics = evaluate_reconstruction(model, eval_set, progress=config.progress)
        metrics["train_minutes"] = result.minutes
        metrics["train_cpu_minutes"] = result.cpu_minutes
        metrics["train_steps"] = result.steps
        metrics["threads"] = result.threads
        if config.output_dir is not None:
            with open(os.path.join(config.output_dir, "eval.json"), "w") as f:
                json.dump(metrics, f, indent=1)
    return {"model": model, "train": result.to_dict(), "eval": metrics}


__all__ = ["DATASETS", "TrainConfig", "TrainResult", "build_dataset", "cache_images", "images_of", "lr_factor",
           "seed_everything", "train_from_config", "train_tokenizer"]
