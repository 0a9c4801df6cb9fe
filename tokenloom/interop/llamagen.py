"""LlamaGen's class-conditional pipeline (VQ tokenizer + c2i GPT) as a tokenloom ``class-to-image`` pipeline.

The weights go through :func:`tokenloom.interop.llamagen_vq.load_llamagen_vq` and
:func:`tokenloom.interop.llamagen_gpt.convert_llamagen_gpt`; this module reads the *sizes* from the checkpoints,
fills what a state dict cannot tell from a config or a named preset, and translates LlamaGen's sampling settings.

**Sizes.** From the VQ checkpoint: codebook size and dim (``quantize.embedding.weight``), ``z_channels``
(``quant_conv``), ``ch`` (``encoder.conv_in``), ``encoder_ch_mult`` / ``decoder_ch_mult`` (the level widths) and
``num_res_blocks``. From the GPT checkpoint: ``dim`` and ``vocab_size`` (``tok_embeddings``), ``n_layer``,
``num_classes`` (``cls_embedding`` rows − 1: the last row is the CFG null class). A state dict cannot say
``n_head`` (``wqkv`` only gives ``n_head + 2·n_kv_head`` times ``head_dim``), ``block_size`` (the RoPE table is not
saved) nor the VQ's ``codebook_l2_norm``; they come from the config (``ModelArgs`` as a dict, a ``config.json`` path
with a ``ModelArgs`` section as in the fixtures), a preset of :data:`LLAMAGEN_GPT_PRESETS` /
:data:`LLAMAGEN_VQ_PRESETS`, or — for ``n_head`` only — the one published preset with the checkpoint's
``dim``/``n_layer``. ``block_size`` defaults to ``(image_size / downsample)²`` with LlamaGen's ``image_size`` 256
(pass 384 for the ``*_384`` checkpoints). Every size a config states is cross-checked against the checkpoint.

**Sampling** (LlamaGen's ``autoregressive/models/generate.py``, ``sample_c2i.py`` defaults) as
:class:`~tokenloom.config.SamplingParams` (:func:`llamagen_sampling_params`):

* ``cfg_scale`` → ``guidance_scale``: LlamaGen computes ``uncond + (cond − uncond)·cfg_scale`` with the null class
  ``num_classes``, and only when ``cfg_scale > 1``; a scale ``<= 1`` means no guidance (1.0 here).
* ``cfg_interval`` (``-1`` = always): LlamaGen guides the prefill token and the decode steps ``i <= cfg_interval``,
  i.e. tokens ``t = 0 … cfg_interval + 1``. Over the ``L`` token steps (progress ``t/(L−1)``) that is
  ``GuidanceSchedule.interval(0, (cfg_interval + 1)/(L − 1))`` — the same set of guided tokens; ``L`` is the
  model's ``block_size``.
* ``temperature``: logits are divided by ``max(temperature, 1e-5)``; 0 is greedy in both.
* ``top_k`` (0 = off; ``>= vocab`` keeps everything → 0 here) and ``top_p`` (1.0 = off) filter after the
  temperature, in that order, as tokenloom's sampler does. LlamaGen's ``top_p = 0`` keeps only the best token:
  ``top_k = 1``.

``sample_c2i.py`` defaults: ``cfg_scale=4.0, cfg_interval=-1, top_k=2000, top_p=1.0, temperature=1.0``.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from torch import Tensor

from tokenloom.config import GuidanceSchedule, SamplingParams
from tokenloom.interop.llamagen_gpt import convert_llamagen_gpt
from tokenloom.interop.llamagen_gpt import load_state_dict as load_gpt_state_dict
from tokenloom.interop.llamagen_vq import LLAMAGEN_ENCODER_DECODER_DEFAULTS, _read_state_dict, load_llamagen_vq

# autoregressive/models/gpt.py: GPT_B … GPT_3B are Transformer(ModelArgs(n_layer, n_head, dim, **kwargs)).
LLAMAGEN_GPT_PRESETS = {
    "GPT-B": {"dim": 768, "n_layer": 12, "n_head": 12},
    "GPT-L": {"dim": 1024, "n_layer": 24, "n_head": 16},
    "GPT-XL": {"dim": 1280, "n_layer": 36, "n_head": 20},
    "GPT-XXL": {"dim": 1536, "n_layer": 48, "n_head": 24},
    "GPT-3B": {"dim": 3200, "n_layer": 24, "n_head": 32},
}
# tokenizer/tokenizer_image/vq_model.py: VQ_16 / VQ_8 (ch=128, num_res_blocks=2 hard-coded by VQModel).
LLAMAGEN_VQ_PRESETS = {
    "VQ-16": {"codebook_size": 16384, "codebook_embed_dim": 8, "encoder_ch_mult": [1, 1, 2, 2, 4],
              "decoder_ch_mult": [1, 1, 2, 2, 4], "z_channels": 256, "codebook_l2_norm": True},
    "VQ-8": {"codebook_size": 16384, "codebook_embed_dim": 8, "encoder_ch_mult": [1, 2, 2, 4],
             "decoder_ch_mult": [1, 2, 2, 4], "z_channels": 256, "codebook_l2_norm": True},
}
LLAMAGEN_IMAGE_SIZE = 256
#: sample_c2i.py's argparse defaults.
LLAMAGEN_SAMPLING_DEFAULTS = {"cfg_scale": 4.0, "cfg_interval": -1, "top_k": 2000, "top_p": 1.0, "temperature": 1.0}


# ---------------------------------------------------------------- configs
def _read_config(config, presets: dict, what: str) -> tuple[dict, dict]:
    """(ModelArgs fields, encoder/decoder overrides) from None, a preset name, a dict or a config.json path."""
    if config is None:
        return {}, {}
    if isinstance(config, str) and config in presets:
        return dict(presets[config]), {}
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"{what} config must be a dict, a preset in {sorted(presets)} or a config.json path, "
                             f"got {str(config)!r}")
        config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise TypeError(f"{what} config must be a dict, a preset name or a path, got {type(config).__name__}")
    if "ModelArgs" in config:
        return dict(config["ModelArgs"]), dict(config.get("encoder_decoder_overrides") or {})
    return dict(config), {}


def _agree(what: str, name: str, stated, found):
    """The checkpoint's value, after checking that the config's (if any) agrees."""
    if stated is not None and stated != found:
        raise ValueError(f"{what} config says {name}={stated!r} but the checkpoint has {name}={found!r}")
    return found


def _need(sd: dict[str, Tensor], key: str, what: str) -> Tensor:
    if key not in sd:
        raise ValueError(f"{what} checkpoint is missing key {key!r}, needed to read the model sizes")
    return sd[key]


def _count(sd: dict[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    if found != set(range(len(found))):
        raise ValueError(f"checkpoint indices for {pattern!r} are not 0..n-1: {sorted(found)}")
    return len(found)


def vq_args_from_checkpoint(state_dict: dict[str, Tensor], config=None) -> tuple[dict, dict]:
    """LlamaGen VQ ``ModelArgs`` and encoder/decoder sizes read from the state dict, cross-checked with ``config``
    (a dict, ``config.json`` path or a name in :data:`LLAMAGEN_VQ_PRESETS`)."""
    args, ed = _read_config(config, LLAMAGEN_VQ_PRESETS, "LlamaGen VQ")
    sd, what = state_dict, "LlamaGen VQ"
    size, dim = (int(n) for n in _need(sd, "quantize.embedding.weight", what).shape)
    out = {"codebook_size": _agree(what, "codebook_size", args.get("codebook_size"), size),
           "codebook_embed_dim": _agree(what, "codebook_embed_dim", args.get("codebook_embed_dim"), dim),
           "z_channels": _agree(what, "z_channels", args.get("z_channels"),
                                int(_need(sd, "quant_conv.weight", what).shape[1]))}
    ch = _agree(what, "ch", ed.get("ch"), int(_need(sd, "encoder.conv_in.weight", what).shape[0]))
    mults = {}
    for part in ("encoder", "decoder"):
        levels = _count(sd, rf"{part}\.conv_blocks\.(\d+)\.")
        if not levels:
            raise ValueError(f"{what} checkpoint has no {part}.conv_blocks.* keys")
        widths = [int(_need(sd, f"{part}.conv_blocks.{i}.res.0.conv1.weight", what).shape[0]) for i in range(levels)]
        if part == "decoder":
            widths = widths[::-1]  # decoder list index 0 is the lowest-resolution level
        if any(w % ch for w in widths):
            raise ValueError(f"{what} {part} level widths {widths} are not multiples of ch={ch}")
        name = f"{part}_ch_mult"
        stated = None if args.get(name) is None else [int(m) for m in args[name]]
        mults[name] = _agree(what, name, stated, [w // ch for w in widths])
    blocks = _agree(what, "num_res_blocks", ed.get("num_res_blocks"),
                    _count(sd, r"encoder\.conv_blocks\.0\.res\.(\d+)\."))
    out.update(mults)
    out["codebook_l2_norm"] = bool(args.get("codebook_l2_norm", True))
    for key in ("codebook_show_usage", "commit_loss_beta", "entropy_loss_ratio", "dropout_p"):
        if key in args:
            out[key] = args[key]
    encoder_decoder = {**{k: v for k, v in ed.items() if k in LLAMAGEN_ENCODER_DECODER_DEFAULTS},
                       "ch": ch, "num_res_blocks": blocks}
    return out, encoder_decoder


def gpt_args_from_checkpoint(state_dict: dict[str, Tensor], config=None, *, image_size: int | None = None,
                             downsample: int = 16) -> dict:
    """LlamaGen GPT ``ModelArgs`` (c2i) read from the state dict, completed and cross-checked with ``config`` (a dict,
    a ``config.json`` path or a name in :data:`LLAMAGEN_GPT_PRESETS`).

    ``block_size`` comes from the config, else ``(image_size // downsample)²`` (``image_size`` default 256).
    """
    args, _ = _read_config(config, LLAMAGEN_GPT_PRESETS, "LlamaGen GPT")
    sd, what = state_dict, "LlamaGen GPT"
    vocab, dim = (int(n) for n in _need(sd, "tok_embeddings.weight", what).shape)
    dim = _agree(what, "dim", args.get("dim"), dim)
    vocab = _agree(what, "vocab_size", args.get("vocab_size"), vocab)
    n_layer = _agree(what, "n_layer", args.get("n_layer"), _count(sd, r"layers\.(\d+)\."))
    if n_layer < 1:
        raise ValueError(f"{what} checkpoint has no layers.{{i}}.* keys")
    rows = int(_need(sd, "cls_embedding.embedding_table.weight", what).shape[0])
    dropout = float(args.get("class_dropout_prob", 0.1))
    num_classes = _agree(what, "num_classes", args.get("num_classes"), rows - 1 if dropout > 0 else rows)
    if args.get("n_head") is None:
        match = [name for name, p in LLAMAGEN_GPT_PRESETS.items() if p["dim"] == dim and p["n_layer"] == n_layer]
        if not match:
            raise ValueError(f"{what} checkpoints do not store n_head and dim={dim}, n_layer={n_layer} is no published "
                             f"size; pass a config with n_head or a preset in {sorted(LLAMAGEN_GPT_PRESETS)}")
        args["n_head"] = LLAMAGEN_GPT_PRESETS[match[0]]["n_head"]
    n_head = int(args["n_head"])
    n_kv = int(args.get("n_kv_head") or n_head)
    qkv_rows = int(_need(sd, "layers.0.attention.wqkv.weight", what).shape[0])
    if dim % n_head or qkv_rows != (n_head + 2 * n_kv) * (dim // n_head):
        raise ValueError(f"{what}: n_head={n_head}, n_kv_head={n_kv} do not fit dim={dim} and "
                         f"layers.0.attention.wqkv.weight with {qkv_rows} rows")
    if args.get("block_size") is None:
        side = (image_size or LLAMAGEN_IMAGE_SIZE) // downsample
        args["block_size"] = side * side
    return {**args, "dim": dim, "vocab_size": vocab, "n_layer": n_layer, "num_classes": num_classes,
            "n_head": n_head, "class_dropout_prob": dropout}


# ---------------------------------------------------------------- sampling
def llamagen_sampling_params(cfg_scale: float = 4.0, cfg_interval: int = -1, top_k: int = 2000, top_p: float = 1.0,
                             temperature: float = 1.0, *, num_tokens: int | None = None,
                             vocab_size: int | None = None) -> SamplingParams:
    """LlamaGen's ``generate(cfg_scale, cfg_interval, temperature, top_k, top_p)`` as :class:`SamplingParams`.

    ``num_tokens`` (the model's ``block_size``) is needed when ``cfg_interval >= 0``; ``vocab_size`` maps a
    ``top_k >= vocab_size`` (keeps everything) to 0. See the module docstring for each convention.
    """
    for name, value in (("cfg_scale", cfg_scale), ("top_p", top_p), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must lie in [0, 1] (LlamaGen: 1.0 = off), got {top_p!r}")
    for name, value, low in (("top_k", top_k, 0), ("cfg_interval", cfg_interval, -1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if vocab_size is not None and top_k >= vocab_size:
        top_k = 0
    if top_p == 0:
        top_k, top_p = 1, 1.0  # LlamaGen's filter keeps min_tokens_to_keep = 1 token
    scale = float(cfg_scale) if cfg_scale > 1.0 else 1.0
    schedule = GuidanceSchedule.constant()
    if cfg_interval >= 0 and scale != 1.0:
        if num_tokens is None or isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens (the model's block_size) must be a positive int when cfg_interval >= 0, "
                             f"got {num_tokens!r}")
        last_guided = cfg_interval + 1  # the prefill token, then decode steps i <= cfg_interval (token i + 1)
        if last_guided < num_tokens - 1:
            schedule = GuidanceSchedule.interval(0.0, last_guided / (num_tokens - 1))
    return SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                          guidance_scale=scale, guidance_schedule=schedule)


# ---------------------------------------------------------------- pipeline
def llamagen_pipeline(vq_checkpoint, gpt_checkpoint, *, vq_args=None, gpt_args=None, image_size: int | None = None,
                      cfg_scale: float = 4.0, cfg_interval: int = -1, top_k: int = 2000, top_p: float = 1.0,
                      temperature: float = 1.0):
    """A ``class-to-image`` pipeline of LlamaGen's VQ tokenizer and c2i GPT, LlamaGen's sampling as its defaults.

    Args:
        vq_checkpoint, gpt_checkpoint: paths (``torch.load(weights_only=True)``) or loaded containers/state dicts.
        vq_args: VQ ``ModelArgs`` (dict, ``config.json`` path, or a name in :data:`LLAMAGEN_VQ_PRESETS`); None = all
            from the checkpoint (``codebook_l2_norm=True``).
        gpt_args: GPT ``ModelArgs`` (dict, ``config.json`` path, or a name in :data:`LLAMAGEN_GPT_PRESETS`); None =
            from the checkpoint, ``n_head`` from the published size with its ``dim``/``n_layer``.
        image_size: LlamaGen's ``--image-size`` (sets ``block_size`` when ``gpt_args`` has none; default 256).
        cfg_scale, cfg_interval, top_k, top_p, temperature: LlamaGen's sampling settings (see the module docstring).

    Raises:
        ValueError: unknown container, missing/unexpected/mis-shaped keys, a config contradicting a checkpoint, or a
            tokenizer whose tokens do not fit the GPT.
    """
    from tokenloom.pipelines.base import params_to_dict
    from tokenloom.pipelines.class_to_image import ClassToImagePipeline

    vq_sd = _read_state_dict(vq_checkpoint)
    model_args, encoder_decoder = vq_args_from_checkpoint(vq_sd, vq_args)
    downsample = 2 ** (len(model_args["encoder_ch_mult"]) - 1)
    gpt_sd = load_gpt_state_dict(gpt_checkpoint) if isinstance(gpt_checkpoint, (str, os.PathLike)) \
        else gpt_checkpoint
    if not isinstance(gpt_sd, dict) or not gpt_sd or not all(isinstance(v, Tensor) for v in gpt_sd.values()):
        raise ValueError("the GPT checkpoint must be a LlamaGen state dict or a {'model': state_dict} container")
    margs = gpt_args_from_checkpoint(gpt_sd, gpt_args, image_size=image_size, downsample=downsample)
    grid = math.isqrt(int(margs["block_size"]))
    if model_args["codebook_size"] != margs["vocab_size"]:
        raise ValueError(f"the VQ codebook has {model_args['codebook_size']} codes but the GPT's vocab_size is "
                         f"{margs['vocab_size']}")
    generator = convert_llamagen_gpt(gpt_sd, margs)
    tokenizer = load_llamagen_vq(vq_sd, model_args, encoder_decoder, image_size=grid * downsample)
    if tokenizer.spec != generator.spec:
        raise ValueError(f"the VQ tokenizer's tokens {tokenizer.spec} do not fit the GPT's {generator.spec}")
    params = llamagen_sampling_params(cfg_scale, cfg_interval, top_k, top_p, temperature,
                                      num_tokens=generator.spec.length, vocab_size=generator.spec.vocab_size)
    return ClassToImagePipeline(tokenizer, generator, sampling_defaults=params_to_dict(params))


__all__ = ["LLAMAGEN_GPT_PRESETS", "LLAMAGEN_SAMPLING_DEFAULTS", "LLAMAGEN_VQ_PRESETS", "gpt_args_from_checkpoint",
           "llamagen_pipeline", "llamagen_sampling_params", "vq_args_from_checkpoint"]
