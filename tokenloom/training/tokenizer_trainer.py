"""Train any tokenizer whose ``model(images)`` returns a dict with a scalar ``"loss"``, through :mod:`.loop`.

AdamW, linear warm-up then cosine decay (by steps, or by the used fraction of ``max_minutes`` when that is
ahead), gradient clipping, mixed precision, gradient accumulation,
EMA, atomic checkpoints and resumption, a tqdm bar showing the scalar outputs, a step count and an optional time
budget (``max_minutes``, single process only), then ``save_pretrained`` to ``output_dir``.

``train_from_config(cfg)`` runs a whole YAML recipe (``configs/tokenizer/*.yaml``)::

    tokenizer: {name: vq, <constructor arguments>}     # tokenloom.tokenizers.build(name, **cfg)
    data: {name: shapes, image_size: 32, num_samples: 20000, seed: 0}   # any name of data_sources.DATASETS
    eval_data: {name: shapes, split: test, image_size: 32, num_samples: 1000}   # optional
    train: {<TrainConfig fields>}

Determinism: the same seed gives the same model on the same machine, thread count and process count, unless
``max_minutes`` stops the run early (then the number of steps depends on the machine's speed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator, PartialState
from torch.utils.data import Dataset, IterableDataset

from tokenloom.training.data_sources import DATASETS, build_dataset, cache_images, images_of, maybe_cache
from tokenloom.training.loop import LoopConfig, run_training


@dataclass
class TrainConfig(LoopConfig):
    """Settings of :func:`train_tokenizer`: the fields of :class:`~tokenloom.training.loop.LoopConfig` (AdamW
    defaults ``weight_decay=0``, ``betas=(0.9, 0.99)``); ``batch_size`` is the global batch per optimiser step."""


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


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0,
              budget_progress: float = 0.0) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warm-up, then cosine to ``min_lr_ratio``.

    ``budget_progress`` (the used fraction of a ``max_minutes`` budget) advances the cosine when it is ahead of the
    steps, so a run cut short by its budget still ends at the low learning rate."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, max((step - warmup_steps) / max(1, max_steps - warmup_steps), budget_progress))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def step_schedule(config: LoopConfig):
    """The loop's ``schedule`` for :func:`lr_factor` over ``config.max_steps`` (the ``max_minutes`` budget advances
    the cosine when it is ahead of the steps)."""
    return lambda step, progress: lr_factor(step, config.warmup_steps, config.max_steps, config.min_lr_ratio,
                                            progress if config.max_minutes is not None else 0.0)


def trainable_parameters(modules) -> list[dict]:
    """The loop's ``param_groups`` for one trained model: its parameters that require grad, one group."""
    return [{"params": [p for p in modules[0].parameters() if p.requires_grad]}]


def _forward(modules, batch) -> dict:
    out = modules[0](images_of(batch))
    if not isinstance(out, dict) or "loss" not in out:
        raise TypeError("model(images) must return a dict with a scalar 'loss'")
    return out


def reconstruction_sampler(dataset: Dataset, count: int = 8):
    """A ``sample_fn`` for the loop: the first ``count`` images above their reconstructions."""
    if isinstance(dataset, IterableDataset):
        return None
    images = torch.stack([images_of(dataset[i]) for i in range(min(count, len(dataset)))])

    def sample(model) -> torch.Tensor:
        x = images.to(next(model.parameters()).device)
        return torch.cat([x, model.decode(model.encode(x)).clamp(-1, 1)])

    return sample


def train_tokenizer(model: torch.nn.Module, dataset: Dataset, config: TrainConfig,
                    accelerator: Accelerator | None = None, fingerprint: dict | None = None) -> TrainResult:
    """Train ``model`` on the images of ``dataset``; ``model(images)`` must return a dict with ``"loss"``.

    Args:
        model: a tokenizer (any ``nn.Module`` with that forward); trained in place (holds the EMA weights at the
            end when ``config.ema_decay`` is set).
        dataset: items are dicts with ``"image"``, tuples whose first element is the image, or tensors; or an
            iterable data set with ``stream(seed, rank, world, skip)`` (WebDataset shards).
        config: :class:`TrainConfig`.
        accelerator: an ``accelerate.Accelerator``; None = built from ``config`` (CPU when there is no CUDA).
        fingerprint: recipe sections a resume must match (see :func:`~tokenloom.training.loop.run_training`).

    Returns:
        :class:`TrainResult`; the model is saved to ``config.output_dir`` when it is set.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(dataset, IterableDataset) and len(dataset) < config.batch_size:
        raise ValueError(f"dataset has {len(dataset)} items, fewer than batch_size={config.batch_size}")
    sampler = reconstruction_sampler(dataset) if config.sample_every else None
    result, _ = run_training(
        model, dataset, config, _forward, accelerator=accelerator, fingerprint=fingerprint, sample_fn=sampler,
        broadcast_states=True,  # codebook restarts and usage counters are updated outside the gradient, per rank
        param_groups=trainable_parameters, schedule=step_schedule(config))
    return TrainResult(steps=result.steps, minutes=result.minutes, cpu_minutes=result.cpu_minutes,
                       stopped_by=result.stopped_by, threads=result.threads, history=result.history)


def train_from_config(cfg: dict, output_dir: str | None = None, progress: bool = True) -> dict:
    """Run a recipe dict (the YAML of ``configs/tokenizer/``): check keys, build, train, save, evaluate.

    Returns ``{"model", "train": TrainResult dict, "eval": metrics or None}``; ``output_dir`` overrides
    ``train.output_dir``; evaluation metrics are also written to ``<output_dir>/eval.json``.
    """
    from tokenloom.evaluation.reconstruction import evaluate_reconstruction
    from tokenloom.tokenizers import build
    from tokenloom.training.config_schema import check_recipe

    for key in ("tokenizer", "data"):
        if key not in cfg:
            raise ValueError(f"recipe must have a {key!r} section, got sections {sorted(cfg)}")
    check_recipe(cfg, "tokenizer")
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
    data = maybe_cache(build_dataset(data_cfg.pop("name"), **data_cfg), progress=config.progress)
    result = train_tokenizer(model, data, config,
                             fingerprint={"tokenizer": cfg["tokenizer"], "data": cfg["data"]})
    metrics = None
    if cfg.get("eval_data"):
        eval_cfg = dict(cfg["eval_data"])
        eval_set = build_dataset(eval_cfg.pop("name"), **eval_cfg)
        metrics = evaluate_reconstruction(model, eval_set, progress=config.progress)
        metrics["train_minutes"] = result.minutes
        metrics["train_cpu_minutes"] = result.cpu_minutes
        metrics["train_steps"] = result.steps
        metrics["threads"] = result.threads
        if config.output_dir is not None and PartialState().is_main_process:
            with open(os.path.join(config.output_dir, "eval.json"), "w") as f:
                json.dump(metrics, f, indent=1)
    return {"model": model, "train": result.to_dict(), "eval": metrics}


__all__ = ["DATASETS", "TrainConfig", "TrainResult", "build_dataset", "cache_images", "images_of", "lr_factor",
           "reconstruction_sampler", "seed_everything", "step_schedule", "train_from_config", "train_tokenizer",
           "trainable_parameters"]
