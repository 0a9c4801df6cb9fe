"""Train a :class:`~tokenloom.generators.TokenGenerator` on pre-tokenised images with Accelerate.

Images are encoded once by any :class:`~tokenloom.tokenizers.ImageTokenizer` (:func:`pretokenize`) into a
``TensorDataset`` of ``tokens [N, L, C]`` plus the condition (``labels [N]``, or text ``features [N, Lc, Cc]``
and ``mask [N, Lc]``), or once for all into token shards (``scripts/pretokenize.py``,
:mod:`tokenloom.data.token_shards`); :func:`train_generator` then runs the shared Accelerate loop
(:mod:`tokenloom.training.loop`: AdamW with linear warm-up and cosine decay, gradient clipping, accumulation, mixed
precision, EMA, atomic checkpoints, ``--resume latest``, a step budget and an optional wall-clock budget
``max_minutes`` for single-process runs) and saves with ``save_pretrained``.

The cosine follows ``progress = max(step / max_steps, elapsed / budget)``, so a run cut short by ``max_minutes``
still ends at the low learning rate.

``train_from_config(cfg)`` runs a whole YAML recipe (``configs/generator/*.yaml``)::

    tokenizer: {path: DIR}                        # a saved tokenizer folder, or
    tokenizer: {recipe: <a configs/tokenizer recipe dict>}   # trained first (tokenizer_trainer)
    data: {name: digits, split: train, image_size: 16}        # data_sources.build_dataset, or
    data: {name: token_shards, root: DIR}                     # shards written by scripts/pretokenize.py
    generator: {name: raster_ar, <constructor arguments except token_spec>}
    train: {<GeneratorTrainConfig fields>}
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator, PartialState
from torch.utils.data import Dataset, TensorDataset

from tokenloom.generators.base import TokenGenerator
from tokenloom.generators.condition import Condition
from tokenloom.tokens import Tokens
from tokenloom.training.data_sources import build_dataset
from tokenloom.training.loop import LoopConfig, run_training
from tokenloom.training.pretokenize import CONDITIONS, pretokenize  # noqa: F401  (re-exported)


@dataclass
class GeneratorTrainConfig(LoopConfig):
    """Settings of :func:`train_generator`: the fields of :class:`~tokenloom.training.loop.LoopConfig`, with AdamW
    defaults ``weight_decay=0.05`` (on parameters with ``dim >= 2`` only) and ``betas=(0.9, 0.95)``.
    ``batch_size`` is the global number of sequences per optimiser step."""

    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)


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


def _num_tensors(data: Dataset) -> int:
    if isinstance(data, TensorDataset):
        return len(data.tensors)
    item = data[0]
    return len(item) if isinstance(item, (tuple, list)) else 1


def _first_tokens(data: Dataset) -> torch.Tensor:
    if isinstance(data, TensorDataset):
        return data.tensors[0]
    return data[0][0][None]


def _param_groups(weight_decay: float):
    def groups(modules) -> list[dict]:
        trained = [p for m in modules for p in m.parameters() if p.requires_grad]
        return [{"params": [p for p in trained if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}]

    return groups


def class_sampler(tokenizer, num_classes: int, count: int = 16, seed: int = 0):
    """A ``sample_fn`` for the loop: one sample per class (cycling) decoded by ``tokenizer``; ``num_classes`` 0 =
    unconditional."""
    def sample(model) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        if num_classes:
            cond = torch.arange(count) % num_classes
        else:
            cond = Condition(batch=count)
        tokens = model.generate(cond, generator=gen)
        return tokenizer.decode(tokens).clamp(-1, 1)

    return sample


def train_generator(model: TokenGenerator, data: Dataset, config: GeneratorTrainConfig | None = None,
                    accelerator: Accelerator | None = None, conditioner=None, sample_fn=None,
                    fingerprint: dict | None = None) -> GeneratorTrainResult:
    """Train ``model`` in place on ``data`` (from :func:`pretokenize` or token shards).

    Args:
        model: a TokenGenerator; its ``condition_kind`` decides how ``data``'s extra tensors are read.
        data: ``TensorDataset(tokens [N, L, C], *condition)``, or any map-style data set whose items are such
            tuples (``tokenloom.data.token_shards.TokenShardDataset``).
        config: :class:`GeneratorTrainConfig`.
        accelerator: an ``accelerate.Accelerator``; None = built from ``config`` (CPU when there is no CUDA).
        conditioner: a text conditioner trained jointly with the generator (e.g. a from-scratch
            :class:`~tokenloom.conditioning.openclip_text.OpenCLIPTextConditioner`); ``data`` then holds its token
            ids instead of features (``pretokenize(..., text_encoder=lambda c: (conditioner.tokenize(c), None))``)
            and each step runs ``conditioner(ids)``. Saved to ``<output_dir>/../conditioner`` when set.
        sample_fn: ``sample_fn(model) -> images [B, 3, H, W]`` for the sample grid every ``config.sample_every``.
        fingerprint: recipe sections a resume must match.

    Returns:
        :class:`GeneratorTrainResult`; the model (eval mode; EMA weights when ``ema_decay`` is set) is saved to
        ``config.output_dir`` when set.
    """
    config = GeneratorTrainConfig() if config is None else config
    if not isinstance(config, GeneratorTrainConfig):
        raise TypeError(f"config must be a GeneratorTrainConfig, got {type(config).__name__}")
    if not isinstance(model, TokenGenerator):
        raise TypeError(f"model must be a TokenGenerator, got {type(model).__name__}")
    if not isinstance(data, Dataset) or isinstance(data, torch.utils.data.IterableDataset) or len(data) == 0:
        raise ValueError(f"data must be a non-empty map-style data set from pretokenize() or token shards, "
                         f"got {data!r}")
    kind = model.condition_kind
    need = {"class": 2, "text": 3, "none": 1}[kind]
    if _num_tensors(data) != need:
        raise ValueError(f"a generator with condition={kind!r} needs a TensorDataset of {need} tensors "
                         f"(tokens + condition), got {_num_tensors(data)}")
    spec = model.spec
    spec.validate(_first_tokens(data), "data.tensors[0]")
    if conditioner is not None and kind != "text":
        raise ValueError(f"a conditioner is trained only with a text generator, got condition={kind!r}")
    if len(data) < config.batch_size and config.grad_accum_steps == 1:
        config = dataclasses.replace(config, batch_size=len(data))  # tiny data sets: one batch of everything

    def forward(modules, batch) -> dict:
        tokens, *rest = batch
        if conditioner is not None:
            features, mask, _ = modules[1](rest[0])
            rest = [features, mask]
        return modules[0](Tokens(tokens, spec), _condition(kind, rest, tokens.shape[0]), return_logits=False)

    result, unwrapped = run_training(
        model, data, config, forward, accelerator=accelerator, param_groups=_param_groups(config.weight_decay),
        schedule=lambda step, progress: lr_factor(step, progress, config.warmup_steps, config.min_lr_ratio),
        extra_modules=() if conditioner is None else (conditioner,), sample_fn=sample_fn, fingerprint=fingerprint,
        desc="train generator")
    if conditioner is not None and config.output_dir is not None and PartialState().is_main_process:
        unwrapped[1].save_pretrained(os.path.join(os.path.dirname(config.output_dir.rstrip("/")), "conditioner"))
    return GeneratorTrainResult(steps=result.steps, minutes=result.minutes, stopped_by=result.stopped_by,
                                threads=result.threads, history=result.history)


def load_tokenizer(path: str):
    """A saved tokenizer folder → the registered tokenizer class it names (``config.json``'s ``_class_name``)."""
    from tokenloom import tokenizers

    return tokenizers.TOKENIZERS.load(path)


def train_from_config(cfg: dict, output_dir: str | None = None, progress: bool = True) -> dict:
    """Run a generator recipe (see the module docstring): check keys, get the tokenizer, pre-tokenise (or read
    token shards), train, save.

    Writes ``<output_dir>/tokenizer`` (when trained here) and ``<output_dir>/generator``. When resuming
    (``train.resume``) a tokenizer the recipe trained earlier is loaded from ``<output_dir>/tokenizer``, not
    trained again.
    Returns ``{"tokenizer", "generator", "data", "train": result dict, "tokenizer_train": dict or None}``.
    """
    from tokenloom import generators
    from tokenloom.training.config_schema import check_recipe
    from tokenloom.training.tokenizer_trainer import train_from_config as train_tokenizer_recipe

    for key in ("tokenizer", "data", "generator"):
        if key not in cfg:
            raise ValueError(f"recipe must have a {key!r} section, got sections {sorted(cfg)}")
    check_recipe(cfg, "generator")
    train_cfg = dict(cfg.get("train", {}))
    train_cfg.setdefault("progress", progress)
    out_root = output_dir or train_cfg.pop("output_dir", None)
    train_cfg.pop("output_dir", None)
    config = GeneratorTrainConfig(**train_cfg,
                                  output_dir=None if out_root is None else os.path.join(out_root, "generator"))
    if config.threads is not None:
        torch.set_num_threads(config.threads)

    tok_cfg, tokenizer_train = dict(cfg["tokenizer"]), None
    tok_out = None if out_root is None else os.path.join(out_root, "tokenizer")
    if tok_cfg.get("path"):
        tokenizer = load_tokenizer(tok_cfg["path"])
    elif tok_cfg.get("recipe"):
        if config.resume and tok_out is not None and os.path.isfile(os.path.join(tok_out, "config.json")):
            tokenizer = load_tokenizer(tok_out)
        else:
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
    name = data_cfg.pop("name")
    if name == "token_shards":
        from tokenloom.data.token_shards import TokenShardDataset

        data = TokenShardDataset(**data_cfg)
        if data.spec != tokenizer.spec or data.condition != generator.condition_kind:
            raise ValueError(f"token shards at {data_cfg.get('root')!r} hold {data.condition!r}-conditioned tokens "
                             f"of {data.spec}; the recipe needs {generator.condition_kind!r} and {tokenizer.spec}")
    else:
        data = pretokenize(tokenizer, build_dataset(name, **data_cfg), condition=generator.condition_kind,
                           progress=progress)
    sample_fn = None
    if config.sample_every and generator.condition_kind != "text":
        sample_fn = class_sampler(tokenizer, getattr(generator.config, "num_classes", 0)
                                  if generator.condition_kind == "class" else 0)
    result = train_generator(generator, data, config, sample_fn=sample_fn,
                             fingerprint={"tokenizer": cfg["tokenizer"], "data": cfg["data"],
                                          "generator": cfg["generator"]})
    return {"tokenizer": tokenizer, "generator": generator, "data": data, "train": result.to_dict(),
            "tokenizer_train": tokenizer_train}


__all__ = ["GeneratorTrainConfig", "GeneratorTrainResult", "class_sampler", "load_tokenizer", "lr_factor",
           "pretokenize", "train_from_config", "train_generator"]
