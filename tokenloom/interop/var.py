"""Load VAR's class-conditional transformers (``var_d16.pth`` … ``var_d30.pth``) as :class:`NextScaleAR`.

VAR publishes a raw ``state_dict`` (``torch.save``) of ``models/var.py::VAR``. ``NextScaleAR`` reproduces it by
configuration (fixtures README §5): class embedding as adaLN condition and start token (``cond + pos_start``),
``lvl_embed`` + ``pos_1LC`` on every position, block-causal mask, adaLN blocks with the chunk order
``gamma1, gamma2, scale1, scale2, shift1, shift2``, non-affine LayerNorm (``norm_eps``), q/v biases without a k bias,
l2-normalised q/k with the clamped per-head ``exp(scale_mul)`` and softmax scale 1 (``attn_l2_norm``; otherwise
``0.25/sqrt(head_dim)``), tanh-GELU FFN of ``round(C · mlp_ratio)``, adaLN before a biased linear head.

Key map (everything else keeps its name):

=====================================  ========================================
VAR key                                tokenloom key
=====================================  ========================================
``class_emb.weight``                   ``cond_embed.embedding_table.weight``
``head.{weight,bias}``                 ``output_head.proj.{weight,bias}``
``blocks.{i}.attn.zero_k_bias``        checked to be zeros, dropped
``lvl_1L``, ``attn_bias_for_masking``  checked against the scales, dropped
=====================================  ========================================

Every size comes from the checkpoint (width, Cvae, vocabulary, classes, depth, FFN width, heads when
``attn_l2_norm``, the scales from the ``lvl_1L`` buffer); a VAR config (the constructor arguments, e.g. the fixtures'
``config.json`` section ``"VAR"`` or a preset of :data:`VAR_PRESETS`) supplies what a state dict cannot say
(``norm_eps``, the heads without ``attn_l2_norm``, dropout rates) and is cross-checked against it.

Sampling: VAR's ``autoregressive_infer_cfg(cfg, top_k, top_p)`` mixes ``(1 + t)·cond − t·uncond`` with
``t = cfg · k / (K − 1)`` at scale ``k``. In tokenloom's vocabulary (``uncond + s·(cond − uncond)``) that is
``s_k = 1 + cfg · k / (K − 1)``: ``guidance_scale = 1 + cfg`` with ``GuidanceSchedule.linear(start=1.0)``; VAR's
``top_p = 0`` and ``top_k = 0`` mean off (:func:`var_sampling_params`). ``more_smooth`` (Gumbel smoothing for
visualisation) is not supported. The generator needs the VQVAE for next-scale inputs:
``generator.bind_tokenizer(load_var_vqvae(...))``.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from tokenloom.config import GuidanceSchedule, SamplingParams
from tokenloom.generators.next_scale import NextScaleAR
from tokenloom.tokens import Scales, TokenSpec

# VAR's constructor arguments; the presets are the released class-conditional ImageNet 256 models
# (build_vae_var: C = 64·depth, heads = depth, drop_path_rate = 0.1·depth/24, attn_l2_norm, shared_aln=False).
VAR_ARGS = {"num_classes", "depth", "embed_dim", "num_heads", "mlp_ratio", "drop_rate", "attn_drop_rate",
            "drop_path_rate", "norm_eps", "shared_aln", "cond_drop_rate", "attn_l2_norm", "patch_nums",
            "flash_if_available", "fused_if_available"}
_RELEASED = {"num_classes": 1000, "mlp_ratio": 4.0, "norm_eps": 1e-6, "shared_aln": False, "cond_drop_rate": 0.1,
             "attn_l2_norm": True, "patch_nums": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]}
VAR_PRESETS = {f"d{d}": {**_RELEASED, "depth": d, "embed_dim": 64 * d, "num_heads": d,
                         "drop_path_rate": 0.1 * d / 24} for d in (16, 20, 24, 30)}
_BUFFERS = ("lvl_1L", "attn_bias_for_masking")
RENAMES = (("class_emb.", "cond_embed.embedding_table."), ("head.", "output_head.proj."))


# ---------------------------------------------------------------- reading
def load_state_dict(checkpoint: str | os.PathLike | dict) -> dict[str, Tensor]:
    """A VAR checkpoint (path, loaded with ``weights_only=True``, or a dict) → its raw state dict.

    Raises ``ValueError`` for any other container (VAR publishes bare ``state_dict``s).
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
        where = str(checkpoint)
    else:
        obj, where = checkpoint, "the given object"
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return obj
    if isinstance(obj, dict):
        kinds = {k: type(v).__name__ for k, v in list(obj.items())[:8]}
        hint = ""
        if any(k in obj for k in ("trainer", "model", "state_dict", "args")):
            hint = (" (this looks like a training checkpoint; VAR's released weights are the bare "
                    "var.state_dict(), e.g. trainer['var_wo_ddp'])")
        raise ValueError(f"unknown VAR checkpoint container in {where}: expected a raw state_dict (a dict of "
                         f"tensors), got a dict with entries {kinds}{hint}")
    raise ValueError(f"unknown VAR checkpoint container in {where}: expected a raw state_dict (a dict of tensors), "
                     f"got {type(obj).__name__}")


def _need(sd: dict[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        raise ValueError(f"VAR checkpoint is missing key {key!r}, needed to read the model sizes")
    return sd[key]


def _patch_nums_from_buffer(lvl_1L: Tensor) -> list[int]:
    counts = torch.bincount(lvl_1L.flatten().long()).tolist()
    if not torch.equal(lvl_1L.flatten(), torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))):
        raise ValueError("VAR checkpoint buffer lvl_1L is not a non-decreasing scale index per position")
    sides = [math.isqrt(c) for c in counts]
    if any(s * s != c for s, c in zip(sides, counts)):
        raise ValueError(f"VAR checkpoint buffer lvl_1L gives scales of {counts} positions, not square numbers")
    return sides


def _agree(name: str, from_config, from_checkpoint):
    """The checkpoint's value, after checking the config's (if any) agrees."""
    if from_config is not None and from_config != from_checkpoint:
        raise ValueError(f"VAR config says {name}={from_config!r} but the checkpoint has {name}={from_checkpoint!r}")
    return from_checkpoint


def read_var_config(config: dict | str | os.PathLike | None) -> dict:
    """VAR constructor arguments from a dict, a preset name (``"d16"`` …), a ``config.json`` path or folder
    (section ``"VAR"`` if present), or None (nothing known)."""
    if config is None:
        return {}
    if isinstance(config, str) and config in VAR_PRESETS:
        return dict(VAR_PRESETS[config])
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"config must be a dict, a preset in {sorted(VAR_PRESETS)} or a config.json path, "
                             f"got {str(config)!r}")
        config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, a preset name or a path, got {type(config).__name__}")
    args = dict(config.get("VAR", config))
    unknown = sorted(set(args) - VAR_ARGS)
    if unknown:
        raise ValueError(f"unknown VAR arguments {unknown}; known: {sorted(VAR_ARGS)}")
    return args


def next_scale_config(state_dict: dict[str, Tensor], config: dict | str | os.PathLike | None = None) -> dict:
    """``NextScaleAR`` arguments for a VAR state dict, sizes from the checkpoint (see the module docstring)."""
    args = read_var_config(config)
    sd = state_dict
    width, c_vae = _need(sd, "word_embed.weight").shape
    width = _agree("embed_dim", args.get("embed_dim"), int(width))
    vocab = int(_need(sd, "head.weight").shape[0])
    num_classes = _agree("num_classes", args.get("num_classes"), int(_need(sd, "class_emb.weight").shape[0]) - 1)
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth < 1:
        raise ValueError("VAR checkpoint has no blocks.{i}.* keys")
    depth = _agree("depth", args.get("depth"), depth)
    hidden = int(_need(sd, "blocks.0.ffn.fc1.weight").shape[0])
    ratio = args.get("mlp_ratio", hidden / width)
    if round(width * ratio) != hidden:
        raise ValueError(f"VAR config says mlp_ratio={ratio} (FFN width {round(width * ratio)}) but the checkpoint's "
                         f"blocks.0.ffn.fc1.weight has {hidden} rows")
    l2 = _agree("attn_l2_norm", args.get("attn_l2_norm"), "blocks.0.attn.scale_mul_1H11" in sd)
    shared = _agree("shared_aln", args.get("shared_aln"), "shared_ada_lin.1.weight" in sd)
    if l2:
        heads = _agree("num_heads", args.get("num_heads"), int(sd["blocks.0.attn.scale_mul_1H11"].shape[1]))
    elif "num_heads" in args:
        heads = int(args["num_heads"])
    else:
        raise ValueError("a VAR checkpoint without attn_l2_norm does not record its number of heads: pass a config "
                         "with num_heads")
    if "lvl_1L" in sd:
        patch_nums = _patch_nums_from_buffer(sd["lvl_1L"])
        if "patch_nums" in args:
            _agree("patch_nums", [int(p) for p in args["patch_nums"]], patch_nums)
    elif "patch_nums" in args:
        patch_nums = [int(p) for p in args["patch_nums"]]
    else:
        raise ValueError("VAR checkpoint has no lvl_1L buffer and no patch_nums config: the scales are unknown")
    spec = TokenSpec(kind="index", vocab_size=vocab, layout=Scales(tuple((p, p) for p in patch_nums)))
    return dict(
        token_spec=spec.to_dict(), input_dim=int(c_vae), width=width, depth=depth, num_heads=heads,
        mlp_ratio=float(ratio), norm_eps=float(args.get("norm_eps", 1e-6)), attn_l2_norm=l2,
        attn_scale=None if l2 else 0.25 / math.sqrt(width // heads), qkv_bias=True, shared_adaln=shared,
        pos_embed=True, level_embed=True, condition="class", num_classes=num_classes,
        cond_dropout=float(args.get("cond_drop_rate", 0.1)), head="categorical", head_options={"bias": True},
        drop_path=float(args.get("drop_path_rate", 0.0)),
    )


# ---------------------------------------------------------------- converting
def _check_buffers(sd: dict[str, Tensor], model: NextScaleAR) -> None:
    """VAR's derived buffers must be what the scales imply (zero k biases; the level map; the -inf mask)."""
    for key in [k for k in sd if k.endswith(".attn.zero_k_bias")]:
        if bool(sd[key].any()):
            raise ValueError(f"VAR checkpoint key {key} must be all zeros (k has no bias), got non-zero values")
    level = model.spec.layout.scale_of_position()
    if "lvl_1L" in sd and not torch.equal(sd["lvl_1L"].flatten().long(), level):
        raise ValueError(f"VAR checkpoint buffer lvl_1L {tuple(sd['lvl_1L'].shape)} does not match the scales "
                         f"{model.spec.layout.sizes}")
    if "attn_bias_for_masking" in sd:
        bias = sd["attn_bias_for_masking"]
        want = torch.where(level[:, None] >= level[None, :], 0.0, -math.inf)
        if bias.shape[-2:] != want.shape or not torch.equal(bias.reshape(want.shape).float(), want):
            raise ValueError(f"VAR checkpoint buffer attn_bias_for_masking {tuple(bias.shape)} is not the block-causal "
                             f"mask of the scales {model.spec.layout.sizes}")


def rename_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """VAR keys → NextScaleAR keys (derived buffers dropped; see the module table)."""
    out = {}
    for key, value in state_dict.items():
        if key in _BUFFERS or key.endswith(".attn.zero_k_bias"):
            continue
        for old, new in RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def convert_var(checkpoint: str | os.PathLike | dict, config: dict | str | os.PathLike | None = None) -> NextScaleAR:
    """Build a :class:`NextScaleAR` for a VAR checkpoint and load it (strict).

    Args:
        checkpoint: path of the raw ``state_dict`` (``weights_only=True``) or the dict itself.
        config: VAR constructor arguments (dict, preset name, ``config.json``), cross-checked; None = all from the
            checkpoint (``norm_eps`` 1e-6).

    Raises:
        ValueError: unknown container; missing, unexpected or mis-shaped keys (each key with both shapes); a config
            that contradicts the checkpoint.
    """
    sd = load_state_dict(checkpoint)
    model = NextScaleAR(**next_scale_config(sd, config))
    _check_buffers(sd, model)
    state = rename_state_dict(sd)
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    mis_shaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(want[k].shape)}"
                  for k in sorted(set(want) & set(state)) if state[k].shape != want[k].shape]
    if missing or unexpected or mis_shaped:
        lines = ["VAR checkpoint does not fit the model built from its sizes:"]
        if missing:
            lines.append(f"  missing keys: {missing}")
        if unexpected:
            lines.append(f"  unexpected keys: {unexpected}")
        if mis_shaped:
            lines.append(f"  mis-shaped keys: {mis_shaped}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_var_folder(folder: str | os.PathLike) -> NextScaleAR:
    """A folder with VAR's ``config.json`` (fixtures' format) and exactly one ``*.pth`` checkpoint → the model."""
    folder = Path(folder)
    pths = sorted(p.name for p in folder.glob("*.pth"))
    if len(pths) != 1:
        raise ValueError(f"{folder} must hold exactly one .pth checkpoint, found {pths}")
    config = folder / "config.json"
    return convert_var(folder / pths[0], config if config.is_file() else None)


# ---------------------------------------------------------------- sampling
def var_sampling_params(cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                        vocab_size: int | None = None) -> SamplingParams:
    """VAR's ``autoregressive_infer_cfg(cfg, top_k, top_p)`` settings as :class:`SamplingParams`.

    ``s_k = 1 + cfg · k / (K − 1)`` → ``guidance_scale = 1 + cfg``, ``GuidanceSchedule.linear(start=1.0)``;
    ``top_k = 0`` and ``top_p = 0`` (VAR's "off") → ``top_k = 0``, ``top_p = 1.0``. With ``vocab_size``, a
    ``top_k >= vocab_size`` (keeps everything) becomes 0, so VAR's ``top_k=900`` also fits small vocabularies.
    VAR's evaluation settings: ``cfg=1.5, top_k=900, top_p=0.96``; its demo: ``cfg=4, top_k=900, top_p=0.95``.
    """
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or cfg < 0:
        raise ValueError(f"cfg must be a finite number >= 0, got {cfg!r}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must lie in [0, 1] (VAR: 0 = off), got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (VAR: 0 = off), got {top_k!r}")
    if vocab_size is not None and top_k >= vocab_size:
        top_k = 0
    return SamplingParams(top_k=top_k, top_p=1.0 if top_p == 0 else float(top_p),
                          guidance_scale=1.0 + float(cfg), guidance_schedule=GuidanceSchedule.linear(start=1.0))


def write_var_pipeline(var_checkpoint: str | os.PathLike | dict, vqvae_checkpoint: str | os.PathLike | dict,
                       out: str | os.PathLike, *, var_config: dict | str | os.PathLike | None = None,
                       vqvae: dict | None = None, ddconfig: dict | None = None, cfg: float = 1.5, top_k: int = 900,
                       top_p: float = 0.96):
    """Convert VAR's VQVAE and transformer into a ``class-to-image`` pipeline folder at ``out`` and return it.

    ``vqvae``/``ddconfig``: the VQVAE constructor arguments (see :mod:`tokenloom.interop.var_vqvae`; None = VAR's
    released ``vae_ch160v4096z32``); ``var_config`` as :func:`convert_var`. The folder's default sampling settings
    are VAR's evaluation settings translated by :func:`var_sampling_params`.
    """
    from tokenloom.interop.var_vqvae import load_var_vqvae
    from tokenloom.pipelines.class_to_image import ClassToImagePipeline

    tokenizer = load_var_vqvae(vqvae_checkpoint, vqvae, ddconfig)
    generator = convert_var(var_checkpoint, var_config)
    if tokenizer.spec != generator.spec:
        raise ValueError(f"the VQVAE's tokens {tokenizer.spec} do not fit the transformer's {generator.spec}")
    generator.bind_tokenizer(tokenizer)
    params = var_sampling_params(cfg, top_k, top_p, vocab_size=generator.spec.vocab_size)
    from tokenloom.pipelines.base import params_to_dict

    pipe = ClassToImagePipeline(tokenizer, generator, sampling_defaults=params_to_dict(params))
    pipe.save_pretrained(str(out))
    return pipe


__all__ = ["VAR_PRESETS", "convert_var", "load_state_dict", "load_var_folder", "next_scale_config",
           "read_var_config", "rename_state_dict", "var_sampling_params", "write_var_pipeline"]
