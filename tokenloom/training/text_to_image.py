"""Train a whole text-to-image pipeline: image tokenizer, then text conditioner + generator jointly.

``train_text_to_image(cfg, output_dir)`` runs a recipe (``configs/pipeline/*.yaml``)::

    tokenizer: {path: DIR} | {recipe: <configs/tokenizer recipe>}   # as in generator recipes
    data: {name: shapes, split: train, image_size: 32, num_samples: 20000}
    conditioner: {context_length: 16, width: 128, heads: 4, layers: 2}   # OpenCLIPTextConditioner
    generator: {name: raster_ar, <constructor arguments except token_spec/condition/cond_dim/cond_len>}
             | {init_from: PIPELINE_DIR}       # continue from a saved pipeline (its tokenizer, conditioner, generator)
    train: {<GeneratorTrainConfig fields>, rounds: 1, round_lr_decay: 1.0, round_steps: [n1, n2, ...]}
    sampling: {<SamplingParams fields>}           # the pipeline's default sampling settings

The conditioner is built from scratch with a compact vocabulary covering the training captions
(open_clip's BPE; see :mod:`tokenloom.conditioning.openclip_text`) and trained with the generator.
The result is saved as a :class:`~tokenloom.pipelines.text_to_image.TextToImagePipeline` folder.

Rounds (so that a long CPU run never loses its progress): ``train.rounds = R`` runs the trainer ``R`` times
on the same pre-tokenised data, each round a full warm-up + cosine over ``max_steps``/``max_minutes``, with the
peak learning rate multiplied by ``round_lr_decay`` after every round (warm restarts, SGDR-style). The pipeline
folder is saved after every round (``train_log.json`` lists the rounds), so a run killed in round ``k`` leaves
round ``k - 1`` on disk; ``generator: {init_from: output_dir}`` continues from it. ``round_steps`` gives each round
its own ``max_steps`` (and sets ``rounds``): how a time-budgeted run is replayed with step budgets. Each round
starts a fresh AdamW (the trainer owns its optimiser); the short warm-up re-estimates the moments.
"""

from __future__ import annotations

import json
import os

import torch

from tokenloom import generators
from tokenloom.conditioning.openclip_text import OpenCLIPTextConditioner
from tokenloom.training.generator_trainer import (
    GeneratorTrainConfig,
    load_tokenizer,
    pretokenize,
    train_generator,
)
from tokenloom.training.tokenizer_trainer import build_dataset
from tokenloom.training.tokenizer_trainer import train_from_config as train_tokenizer_recipe


def _tokenizer(section: dict, work_dir: str, progress: bool):
    if section.get("path"):
        return load_tokenizer(section["path"])
    if section.get("recipe"):
        return train_tokenizer_recipe(section["recipe"], output_dir=os.path.join(work_dir, "tokenizer"),
                                      progress=progress)["model"]
    raise ValueError(f"recipe's tokenizer section needs 'path' or 'recipe', got keys {sorted(section)}")


def _captions(dataset) -> list[str]:
    if hasattr(dataset, "scene"):
        return [dataset.scene(i)["caption"] for i in range(len(dataset))]
    return [dataset[i]["caption"] for i in range(len(dataset))]


def _round_settings(train_cfg: dict) -> tuple[list[int | None], float]:
    """Pop the round keys → (per-round max_steps, None = the train section's; lr decay per round)."""
    rounds, decay = train_cfg.pop("rounds", None), train_cfg.pop("round_lr_decay", 1.0)
    steps = train_cfg.pop("round_steps", None)
    if steps is not None:
        if not isinstance(steps, list) or not steps or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                                           for n in steps):
            raise ValueError(f"train.round_steps must be a non-empty list of positive ints, got {steps!r}")
        if rounds is not None and rounds != len(steps):
            raise ValueError(f"train.rounds={rounds!r} disagrees with train.round_steps ({len(steps)} rounds)")
        rounds = len(steps)
    rounds = 1 if rounds is None else rounds
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"train.rounds must be a positive int, got {rounds!r}")
    if not 0.0 < float(decay) <= 1.0:
        raise ValueError(f"train.round_lr_decay must be in (0, 1], got {decay!r}")
    return (steps or [None] * rounds), float(decay)


def _components(cfg: dict, captions: list[str], work_dir: str, progress: bool):
    """(tokenizer, conditioner, generator): fresh from the recipe, or loaded from ``generator.init_from``."""
    from tokenloom.pipelines.text_to_image import TextToImagePipeline

    gen_cfg = dict(cfg["generator"])
    init_from = gen_cfg.pop("init_from", None)
    if init_from is not None:
        if not os.path.exists(os.path.join(str(init_from), "model_index.json")):
            raise ValueError(f"generator.init_from must be a text-to-image pipeline folder (model_index.json), "
                             f"got {init_from!r}")
        pipe = TextToImagePipeline.from_pretrained(str(init_from))
        unused = sorted(k for k in gen_cfg if k != "name")
        if unused:
            raise ValueError(f"generator.init_from={init_from!r} takes the architecture from the folder; remove "
                             f"the generator keys {unused}")
        return pipe.image_tokenizer.eval(), pipe.conditioner, pipe.token_generator
    if "conditioner" not in cfg:
        raise ValueError(f"recipe must have a 'conditioner' section (or generator.init_from), got {sorted(cfg)}")
    tokenizer = _tokenizer(dict(cfg["tokenizer"]), work_dir, progress).eval()
    conditioner = OpenCLIPTextConditioner.for_captions(captions, **cfg["conditioner"])
    generator = generators.build(gen_cfg.pop("name"), token_spec=tokenizer.spec.to_dict(), condition="text",
                                 cond_dim=conditioner.feature_dim, cond_len=conditioner.feature_length,
                                 **gen_cfg)
    return tokenizer, conditioner, generator


def train_text_to_image(cfg: dict, output_dir: str, progress: bool = True):
    """Run a text-to-image recipe; returns the trained pipeline (also saved to ``output_dir`` after every round)."""
    from tokenloom.pipelines.text_to_image import TextToImagePipeline

    sections = ("data", "generator") if cfg.get("generator", {}).get("init_from") else ("tokenizer", "data",
                                                                                         "generator")
    for key in sections:
        if key not in cfg:
            raise ValueError(f"recipe must have a {key!r} section, got sections {sorted(cfg)}")
    work_dir = output_dir + ".work"
    train_cfg = dict(cfg.get("train", {}))
    round_steps, lr_decay = _round_settings(train_cfg)
    train_cfg.setdefault("progress", progress)
    train_cfg.pop("output_dir", None)
    config = GeneratorTrainConfig(**train_cfg)
    if config.threads is not None:
        torch.set_num_threads(config.threads)

    data_cfg = dict(cfg["data"])
    dataset = build_dataset(data_cfg.pop("name"), **data_cfg)
    captions = _captions(dataset)
    torch.manual_seed(config.seed)
    tokenizer, conditioner, generator = _components(cfg, captions, work_dir, progress)
    if hasattr(generator, "bind_tokenizer"):
        generator.bind_tokenizer(tokenizer)
    data = pretokenize(tokenizer, dataset, condition="text", progress=progress,
                       text_encoder=lambda caps: (conditioner.tokenize(caps), None))
    log = {"rounds": []}
    pipe = None
    rounds = len(round_steps)
    for r, steps in enumerate(round_steps):
        overrides = {"lr": config.lr * lr_decay ** r, "seed": config.seed + r}
        if steps is not None:
            overrides["max_steps"] = steps
        round_cfg = GeneratorTrainConfig(**{**train_cfg, **overrides})
        result = train_generator(generator, data, round_cfg, conditioner=conditioner)
        pipe = TextToImagePipeline(tokenizer, generator.eval(), conditioner.eval(),
                                   sampling_defaults=cfg.get("sampling"))
        pipe.save_pretrained(output_dir)
        log["rounds"].append(result.to_dict())
        with open(os.path.join(output_dir, "train_log.json"), "w") as f:
            json.dump({**log, "steps": sum(x["steps"] for x in log["rounds"]),
                       "minutes": sum(x["minutes"] for x in log["rounds"])}, f, indent=1)
        if progress:
            print(f"round {r + 1}/{rounds}: {result.steps} steps, {result.minutes:.1f} min, "
                  f"loss {result.final_loss:.4f} -> saved {output_dir}", flush=True)
    return pipe
