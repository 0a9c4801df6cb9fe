"""Train a :class:`~tokenloom.scoring.captioner.CaptionScorer` on (image, caption) pairs, through :mod:`.loop`.

Recipe (``configs/scoring/shapes_captioner.yaml``)::

    scorer: {<CaptionScorer arguments>}         # token_ids is filled from the data's captions when absent
    data: {name: shapes, <data set arguments>}  # any captioned data set of training.data_sources
    eval_data: {name: shapes, ...}              # optional: caption NLL per token in <output_dir>/eval.json
    reconstruct: {path: <image tokenizer folder>, fraction: 0.5}   # optional, see below
    train: {<LoopConfig fields>}

Teacher-forced caption cross-entropy. ``reconstruct`` passes that fraction of each batch through an image
tokenizer (encode, then decode) first: generated images are tokenizer decodes, so the scorer must read the
tokenizer's blur and ringing, not only clean renders.
"""

from __future__ import annotations

import json
import os

import torch

from tokenloom.conditioning.openclip_text import caption_token_ids
from tokenloom.training.config_schema import check_keys, check_named_section, dataclass_keys, signature_keys
from tokenloom.training.data_sources import build_dataset, dataset_class
from tokenloom.training.generator_trainer import load_tokenizer
from tokenloom.training.loop import LoopConfig, run_training
from tokenloom.training.tokenizer_trainer import seed_everything, step_schedule, trainable_parameters

SECTIONS = ("scorer", "data", "eval_data", "reconstruct", "train")


def caption_vocabulary(dataset, context_length: int, limit: int = 20000) -> list[int]:
    """BPE ids of the captions of the first ``limit`` items of ``dataset`` (for a compact vocabulary)."""
    captions = [dataset.scene(i)["caption"] if hasattr(dataset, "scene") else dataset[i]["caption"]
                for i in range(min(limit, len(dataset)))]  # scene(): the caption without rendering the image
    return caption_token_ids(captions, context_length=context_length)


def check_scorer_recipe(cfg: dict) -> None:
    """Reject unknown keys of a scorer recipe before anything is built."""
    from tokenloom.scoring.captioner import CaptionScorer

    check_keys(cfg, set(SECTIONS), "")
    for key in ("scorer", "data"):
        if key not in cfg:
            raise ValueError(f"scorer recipe must have a {key!r} section, got sections {sorted(cfg)}")
    check_keys(cfg["scorer"], signature_keys(CaptionScorer), "scorer")
    for section in ("data", "eval_data"):
        if section in cfg:
            check_named_section(cfg[section], section, dataset_class)
    if "reconstruct" in cfg:
        check_keys(cfg["reconstruct"], {"path", "fraction"}, "reconstruct")
    check_keys(cfg.get("train", {}), dataclass_keys(LoopConfig), "train")


def reconstructor(section: dict | None):
    """``images -> images`` replacing a random ``fraction`` of a batch by its tokenizer round trip."""
    if not section:
        return lambda images: images
    fraction = float(section.get("fraction", 0.5))
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"reconstruct.fraction must lie in [0, 1], got {fraction!r}")
    tokenizer = load_tokenizer(section["path"]).eval().requires_grad_(False)

    @torch.no_grad()
    def apply(images):
        pick = torch.rand(len(images)) < fraction
        if pick.any():
            images = images.clone()
            images[pick] = tokenizer.decode(tokenizer.encode(images[pick])).clamp(-1, 1).to(images.dtype)
        return images

    return apply


@torch.no_grad()
def caption_nll(model, dataset, batch_size: int = 256) -> float:
    """Mean caption negative log-likelihood per token over ``dataset``."""
    from torch.utils.data import DataLoader

    total, tokens = 0.0, 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        ids = model.tokenize(batch["caption"])
        total -= float(model.token_log_probs(batch["image"], ids).sum())
        tokens += int((ids[:, 1:] != 0).sum())
    return total / max(tokens, 1)


def train_scorer_from_config(cfg: dict, output_dir: str | None = None, progress: bool = True) -> dict:
    """Run a scorer recipe: check keys, build, train, save, evaluate. Returns ``{"model", "train", "eval"}``."""
    from tokenloom.scoring.captioner import CaptionScorer

    check_scorer_recipe(cfg)
    train_cfg = {"progress": progress, **cfg.get("train", {})}
    if output_dir is not None:
        train_cfg["output_dir"] = output_dir
    config = LoopConfig(**train_cfg)
    seed_everything(config.seed)
    data_cfg = dict(cfg["data"])
    data = build_dataset(data_cfg.pop("name"), **data_cfg)
    scorer_cfg = dict(cfg["scorer"])
    if scorer_cfg.get("token_ids") is None:
        scorer_cfg["token_ids"] = caption_vocabulary(data, scorer_cfg.get("context_length", 16))
    model = CaptionScorer(**scorer_cfg)
    augment = reconstructor(cfg.get("reconstruct"))

    def forward(modules, batch) -> dict:
        scorer = modules[0]
        return {"loss": scorer.loss(augment(batch["image"]), scorer.tokenize(batch["caption"]))}

    result, modules = run_training(
        model, data, config, forward, fingerprint={k: cfg[k] for k in SECTIONS if k in cfg}, desc="scorer",
        param_groups=trainable_parameters, schedule=step_schedule(config))
    model = modules[0]
    metrics = None
    if cfg.get("eval_data"):
        eval_cfg = dict(cfg["eval_data"])
        metrics = {"caption_nll_per_token": caption_nll(model, build_dataset(eval_cfg.pop("name"), **eval_cfg))}
        if config.output_dir is not None:
            with open(os.path.join(config.output_dir, "eval.json"), "w") as f:
                json.dump(metrics, f, indent=1)
    return {"model": model, "train": {"steps": result.steps, "minutes": result.minutes,
                                      "stopped_by": result.stopped_by}, "eval": metrics}


__all__ = ["caption_nll", "caption_vocabulary", "check_scorer_recipe", "reconstructor", "train_scorer_from_config"]
