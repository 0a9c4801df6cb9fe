"""Train a whole text-to-image pipeline: image tokenizer, then text conditioner + generator jointly.

``train_text_to_image(cfg, output_dir)`` runs a recipe (``configs/pipeline/*.yaml``)::

    tokenizer: {path: DIR} | {recipe: <configs/tokenizer recipe>}   # as in generator recipes
    data: {name: shapes, split: train, image_size: 32, num_samples: 20000}
    conditioner: {context_length: 16, width: 128, heads: 4, layers: 2}   # OpenCLIPTextConditioner
    generator: {name: raster_ar, <constructor arguments except token_spec/condition/cond_dim/cond_len>}
    train: {<GeneratorTrainConfig fields>}
    sampling: {<SamplingParams fields>}           # the pipeline's default sampling settings

The conditioner is built from scratch with a compact vocabulary covering the training captions
(open_clip's BPE; see :mod:`tokenloom.conditioning.openclip_text`) and trained with the generator.
The result is saved as a :class:`~tokenloom.pipelines.text_to_image.TextToImagePipeline` folder.
"""

from __future__ import annotations

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


def train_text_to_image(cfg: dict, output_dir: str, progress: bool = True):
    """Run a text-to-image recipe; returns the trained pipeline (also saved to ``output_dir``)."""
    from tokenloom.pipelines.text_to_image import TextToImagePipeline

    for key in ("tokenizer", "data", "conditioner", "generator"):
        if key not in cfg:
            raise ValueError(f"recipe must have a {key!r} section, got sections {sorted(cfg)}")
    work_dir = output_dir + ".work"
    train_cfg = dict(cfg.get("train", {}))
    train_cfg.setdefault("progress", progress)
    train_cfg.pop("output_dir", None)
    config = GeneratorTrainConfig(**train_cfg)
    if config.threads is not None:
        torch.set_num_threads(config.threads)

    tokenizer = _tokenizer(dict(cfg["tokenizer"]), work_dir, progress).eval()
    data_cfg = dict(cfg["data"])
    dataset = build_dataset(data_cfg.pop("name"), **data_cfg)
    captions = [dataset.scene(i)["caption"] for i in range(len(dataset))] if hasattr(dataset, "scene") \
        else [dataset[i]["caption"] for i in range(len(dataset))]
    torch.manual_seed(config.seed)
    conditioner = OpenCLIPTextConditioner.for_captions(captions, **cfg["conditioner"])
    gen_cfg = dict(cfg["generator"])
    generator = generators.build(gen_cfg.pop("name"), token_spec=tokenizer.spec.to_dict(), condition="text",
                                 cond_dim=conditioner.feature_dim, cond_len=conditioner.config.context_length,
                                 **gen_cfg)
    if hasattr(generator, "bind_tokenizer"):
        generator.bind_tokenizer(tokenizer)
    data = pretokenize(tokenizer, dataset, condition="text", progress=progress,
                       text_encoder=lambda caps: (conditioner.tokenize(caps), None))
    result = train_generator(generator, data, config, conditioner=conditioner)
    pipe = TextToImagePipeline(tokenizer, generator.eval(), conditioner.eval(),
                               sampling_defaults=cfg.get("sampling"))
    pipe.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "train_log.json"), "w") as f:
        import json

        json.dump(result.to_dict(), f, indent=1)
    return pipe
