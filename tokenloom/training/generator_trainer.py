"""Train a :class:`~tokenloom.generators.TokenGenerator` on pre-tokenised images with Accelerate.

Images are encoded once by any :class:`~tokenloom.tokenizers.ImageTokenizer` (:func:`pretokenize`) into a
``TensorDataset`` of ``tokens [N, L, C]`` plus the condition (``labels [N]``, or text ``features [N, Lc, Cc]``
and ``mask [N, Lc]``); :func:`train_generator` then runs AdamW with linear warm-up and cosine decay, gradient
clipping, a step budget and an optional wall-clock budget (``max_minutes``), and saves with ``save_pretrained``.

The cosine follows ``progress = max(step / max_steps, elapsed / budget)``, so a run cut short by ``max_minutes``
still ends at the low learning rate.

``train_from_config(cfg)`` runs a whole YAML recipe (``configs/generator/*.yaml``)::

    tokenizer: {path: DIR}                        # a saved tokenizer folder, or
    tokenizer: {recipe: <a configs/tokenizer recipe dict>}   # trained first (tokenizer_trainer)
    data: {name: digits, split: train, image_size: 16}        # tokenizer_trainer.build_dataset
    generator: {name: raster_ar, <constructor arguments except token_spec>}
    train: {<GeneratorTrainConfig fields>}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from tokenloom.generators.base import TokenGenerator
from tokenloom.generators.condition import Condition
from tokenloom.tokens import Tokens

CONDITIONS = ("class", "text", "none")


@dataclass
class GeneratorTrainConfig:
    """Optimisation settings of :func:`train_generator` (all JSON/YAML-serialisable).

    Attributes:
        max_steps: optimiser steps (``max_minutes`` may stop earlier).
        max_minutes: wall-clock budget; None = none.
        batch_size: sequences per step.
        lr, weight_decay, betas: AdamW (weight decay on parameters with ``dim >= 2`` only).
        warmup_steps: linear warm-up from 0; then cosine to ``lr · min_lr_ratio`` (see the module docstring).
        grad_clip: max global gradient norm; None = off.
        seed: data order and condition dropout (seeded before training).
        threads: ``torch.set_num_threads`` for the run; None = leave as is.
        log_every: steps between history records (mean loss).
        output_dir: where ``save_pretrained`` writes the generator and ``train_log.json``; None = don't save.
        progress: show a tqdm bar.
    """

    max_steps: int = 1000
    max_minutes: float | None = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    threads: int | None = None
    log_every: int = 50
    output_dir: str | None = None
    progress: bool = True

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GeneratorTrainConfig.{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"GeneratorTrainConfig.lr must be > 0, got {self.lr!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"GeneratorTrainConfig.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"GeneratorTrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"GeneratorTrainConfig.max_minutes must be > 0 or None, got {self.max_minutes!r}")
        self.betas = tuple(self.betas)


@dataclass
class GeneratorTrainResult:
    """Steps done, minutes taken, why it stopped (``"steps"`` or ``"time"``), logged history."""

    steps: int
    minutes: float
    stopped_by: str
    threads: int
    history: list[dict] = field(default_factory=list)  # {"step", "lr", "minutes", "loss"}

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else float("nan")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def pretokenize(
    tokenizer,
    dataset: Dataset,
    *,
    condition: str = "class",
    batch_size: int = 128,
    text_encoder: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    progress: bool = True,
) -> TensorDataset:
    """Encode every item's ``"image"`` once with ``tokenizer.encode``.

    Args:
        tokenizer: any object with ``encode(images [B, 3, H, W]) -> Tokens`` (an ImageTokenizer); run in eval mode.
        dataset: items are dicts with ``"image"`` and, per ``condition``, ``"label"`` or ``"caption"``.
        condition: ``"class"`` → ``TensorDataset(tokens, labels)``; ``"text"`` → ``(tokens, features, mask)`` with
            ``text_encoder(captions) -> (features [B, Lc, Cc], mask [B, Lc] bool or None)``; ``"none"`` →
            ``(tokens,)``.

    Returns:
        a ``TensorDataset`` whose first tensor is ``tokens [N, L, C]``.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    if condition == "text" and text_encoder is None:
        raise ValueError("condition='text' needs a text_encoder(captions) -> (features, mask)")
    was_training = bool(getattr(tokenizer, "training", False))
    if hasattr(tokenizer, "eval"):
        tokenizer.eval()
    device = getattr(tokenizer, "device", torch.device("cpu"))
    tokens, labels, features, masks = [], [], [], []
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        for batch in tqdm(loader, disable=not progress, desc="pretokenize", leave=False):
            tokens.append(tokenizer.encode(batch["image"].to(device)).data.cpu())
            if condition == "class":
                labels.append(torch.as_tensor(batch["label"]).long())
            elif condition == "text":
                f, m = text_encoder(list(batch["caption"]))
                features.append(f.cpu())
                masks.append(torch.ones(f.shape[:2], dtype=torch.bool) if m is None else m.cpu().bool())
    finally:
        if was_training:
            tokenizer.train()
    if condition == "class":
        return TensorDataset(torch.cat(tokens), torch.cat(labels))
    if condition == "text":
        return TensorDataset(torch.cat(tokens), torch.cat(features), torch.cat(masks))
    return TensorDataset(torch.cat(tokens))


def lr_factor(step: int, progress: float, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up over ``warmup_steps``, times a cosine from 1 to ``min_lr_ratio`` as ``progress`` goes 0 → 1."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return warm * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def _condition(kind: str, rest: list[torch.Tensor], batch: int) -> Condition:
    if kind == "class":
        return Condition(labels=rest[0])
    if kind == "text":
        return Condition(features=rest[0], mask=rest[1])
    return Condition(batch=batch)


def _forever(loader):
    while True:
        yield from loader


def train_generator(model: TokenGenerator, data: TensorDataset, config: GeneratorTrainConfig | None = None,
                    accelerator: Accelerator | None = None, conditioner=None) -> GeneratorTrainResult:
    """Train ``model`` in place on ``data`` (from :func:`pretokenize`).

    Args:
        model: a TokenGenerator; its ``condition_kind`` decides how ``data``'s extra tensors are read.
        data: ``TensorDataset(tokens [N, L, C], *condition)``.
        config: :class:`GeneratorTrainConfig`.
        accelerator: an ``accelerate.Accelerator``; None = ``Accelerator(cpu=True)``.
        conditioner: a text conditioner trained jointly with the generator (e.g. a from-scratch
            :class:`~tokenloom.conditioning.openclip_text.OpenCLIPTextConditioner`); ``data`` then holds its token
            ids instead of features (``pretokenize(..., text_encoder=lambda c: (conditioner.tokenize(c), None))``)
            and each step runs ``conditioner(ids)``. Saved to ``<output_dir>/../conditioner`` when set.

    Returns:
        :class:`GeneratorTrainResult`; the model (eval mode) is saved to ``config.output_dir`` when set.
    """
    config = GeneratorTrainConfig() if config is None else config
    if not isinstance(config, GeneratorTrainConfig):
        raise TypeError(f"config must be a GeneratorTrainConfig, got {type(config).__name__}")
    if not isinstance(model, TokenGenerator):
        raise TypeError(f"model must be a TokenGenerator, got {type(model).__name__}")
    if not isinstance(data, TensorDataset) or len(data) == 0:
        raise ValueError(f"data must be a non-empty TensorDataset from pretokenize(), got {data!r}")
    kind = model.condition_kind
    need = {"class": 2, "text": 3, "none": 1}[kind]
    if len(data.tensors) != need:
        raise ValueError(f"a generator with condition={kind!r} needs a TensorDataset of {need} tensors "
                         f"(tokens + condition), got {len(data.tensors)}")
    spec = model.spec
    spec.validate(data.tensors[0], "data.tensors[0]")
    if config.threads is not None:
        torch.set_num_threads(config.threads)

    accelerator = accelerator or Accelerator(cpu=True)
    torch.manual_seed(config.seed)
    if conditioner is not None and kind != "text":
        raise ValueError(f"a conditioner is trained only with a text generator, got condition={kind!r}")
    trained = list(model.parameters()) + ([] if conditioner is None else list(conditioner.parameters()))
    decay = [p for p in trained if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in trained if p.requires_grad and p.dim() < 2]
    # fused AdamW: one kernel instead of ~10 small ops per tensor (the per-op overhead dominates small models)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=config.betas,
                                  fused=all(p.dtype == torch.float32 for p in decay + no_decay))
    loader = DataLoader(data, batch_size=min(config.batch_size, len(data)), shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(config.seed))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if conditioner is not None:
        conditioner = accelerator.prepare(conditioner)
        conditioner.train()
    model.train()

    budget = None if config.max_minutes is None else config.max_minutes * 60.0
    history, window = [], []
    start, step, stopped_by = time.perf_counter(), 0, "steps"
    bar = tqdm(total=config.max_steps, disable=not config.progress, desc="train generator")
    for batch in _forever(loader):
        elapsed = time.perf_counter() - start
        if step >= config.max_steps:
            break
        if budget is not None and elapsed >= budget:
            stopped_by = "time"
            break
        progress = max(step / config.max_steps, 0.0 if budget is None else elapsed / budget)
        lr = config.lr * lr_factor(step, progress, config.warmup_steps, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens, *rest = batch
        if conditioner is not None:
            features, mask, _ = conditioner(rest[0])
            rest = [features, mask]
        out = model(Tokens(tokens, spec), _condition(kind, rest, tokens.shape[0]), return_logits=False)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"generator loss became {float(loss)} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if config.grad_clip is not None:
            accelerator.clip_grad_norm_(trained, config.grad_clip)
        optimizer.step()
        step += 1
        window.append(float(loss.detach()))
        bar.update(1)
        if step % config.log_every == 0:
            history.append({"step": step, "lr": lr, "minutes": (time.perf_counter() - start) / 60,
                            "loss": sum(window) / len(window)})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            window = []
    bar.close()
    if window:
        history.append({"step": step, "lr": lr, "minutes": (time.perf_counter() - start) / 60,
                        "loss": sum(window) / len(window)})
    result = GeneratorTrainResult(steps=step, minutes=(time.perf_counter() - start) / 60, stopped_by=stopped_by,
                                  threads=torch.get_num_threads(), history=history)
    model = accelerator.unwrap_model(model).eval()
    if conditioner is not None:
        conditioner = accelerator.unwrap_model(conditioner).eval()
    if config.output_dir is not None:
        os.makedirs(config.output_dir, exist_ok=True)
        model.save_pretrained(config.output_dir)
        if conditioner is not None:
            conditioner.save_pretrained(os.path.join(os.path.dirname(config.output_dir.rstrip("/")), "conditioner"))
        with open(os.path.join(config.output_dir, "train_log.json"), "w") as f:
            json.dump(result.to_dict(), f, indent=1)
    return result


def load_tokenizer(path: str):
    """A saved tokenizer folder → the registered tokenizer class it names (``config.json``'s ``_class_name``)."""
    from tokenloom import tokenizers

    with open(os.path.join(path, "config.json")) as f:
        class_name = json.load(f).get("_class_name")
    classes = {tokenizers.TOKENIZERS.get(n).__name__: tokenizers.TOKENIZERS.get(n) for n in tokenizers.available()}
    if class_name not in classes:
        raise ValueError(f"tokenizer folder {path} holds a {class_name!r}, not a registered tokenizer class "
                         f"({sorted(classes)})")
    return classes[class_name].from_pretrained(path)


def train_from_config(cfg: dict, output_dir: str | None = None, progress: bool = True) -> dict:
    """Run a generator recipe (see the module docstring): get the tokenizer, pre-tokenise, train, save.

    Writes ``<output_dir>/tokenizer`` (when trained here) and ``<output_dir>/generator``.
    Returns ``{"tokenizer", "generator", "data", "train": result dict, "tokenizer_train": dict or None}``.
    """
    from tokenloom import generators
    from tokenloom.training.tokenizer_trainer import build_dataset
    from tokenloom.training.tokenizer_trainer import train_from_config as train_tokenizer_recipe

    for key in ("tokenizer", "data", "generator"):
        if key not in cfg:
            raise ValueError(f"recipe must have a {key!r} section, got sections {sorted(cfg)}")
    train_cfg = dict(cfg.get("train", {}))
    train_cfg.setdefault("progress", progress)
    out_root = output_dir or train_cfg.pop("output_dir", None)
    train_cfg.pop("output_dir", None)
    config = GeneratorTrainConfig(**train_cfg,
                                  output_dir=None if out_root is None else os.path.join(out_root, "generator"))
    if config.threads is not None:
        torch.set_num_threads(config.threads)

    tok_cfg, tokenizer_train = dict(cfg["tokenizer"]), None
    if tok_cfg.get("path"):
        tokenizer = load_tokenizer(tok_cfg["path"])
    elif tok_cfg.get("recipe"):
        tok_out = None if out_root is None else os.path.join(out_root, "tokenizer")
        trained = train_tokenizer_recipe(tok_cfg["recipe"], output_dir=tok_out, progress=progress)
        tokenizer, tokenizer_train = trained["model"], trained["train"]
    else:
        raise ValueError(f"recipe's tokenizer section needs 'path' or 'recipe', got keys {sorted(tok_cfg)}")
    tokenizer.eval()

    gen_cfg = dict(cfg["generator"])
    torch.manual_seed(config.seed)
    generator = generators.build(gen_cfg.pop("name"), token_spec=tokenizer.spec.to_dict(), **gen_cfg)
    if hasattr(generator, "bind_tokenizer"):
        generator.bind_tokenizer(tokenizer)
    data_cfg = dict(cfg["data"])
    data = pretokenize(tokenizer, build_dataset(data_cfg.pop("name"), **data_cfg),
                       condition=generator.condition_kind, progress=progress)
    result = train_generator(generator, data, config)
    return {"tokenizer": tokenizer, "generator": generator, "data": data, "train": result.to_dict(),
            "tokenizer_train": tokenizer_train}


__all__ = ["GeneratorTrainConfig", "GeneratorTrainResult", "load_tokenizer", "lr_factor", "pretokenize",
           "train_from_config", "train_generator"]
