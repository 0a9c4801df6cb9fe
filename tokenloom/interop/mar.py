"""Load MAR's checkpoints (LTH14/mar): the KL-16 VAE as a ``kl_vae`` tokenizer, MAR-B/L/H as :class:`MaskedAR`.

**MAR transformer** (``checkpoint-last.pth``, ``torch.save({"model": sd, "model_ema": sd_ema, ...})``). The released
models are used through ``model_ema`` (MAR's demo), so that entry is read by default (``entry="model"`` picks the
other). :class:`~tokenloom.generators.masked_ar.MaskedAR` carries MAR's module names, so every key keeps its name
except the DiffLoss MLP: ``diffloss.net.*`` → ``output_head.net.*`` renamed by
:func:`tokenloom.heads.mlp_denoiser.from_mar_state_dict`. MAR's conventions reproduced by configuration: buffer of
``buffer_size`` copies of the class embedding, ``fake_latent`` as the null class, encoder keeps buffer + visible
tokens, mask tokens in the decoder, three learned position tables, timm ViT blocks with LayerNorm eps from
``norm_layer``, ``z_proj_ln`` eps 1e-6, MAR's ``patchify``.

Sizes come from the checkpoint: widths, depths, MLP width, ``L`` (``diffusion_pos_embed_learned``), ``buffer_size``
(the encoder table's extra rows), classes, token dim, DiffLoss depth and width. A state dict cannot say the number of
heads, the LayerNorm eps, ``patch_size`` or the sampling steps: they come from a MAR config — the constructor
arguments as a dict (e.g. the fixtures' ``config.json`` section ``"MAR"``), a ``config.json`` path, a preset of
:data:`MAR_PRESETS`, or the checkpoint's own ``args`` (MAR's training script saves its argparse Namespace) — and
every size the config states is cross-checked against the checkpoint.

**KL-16 VAE** (``kl16.ckpt``, ``torch.save({"model": sd})``): keys load under ``autoencoder.`` into
:class:`~tokenloom.tokenizers.kl_vae.KLVAETokenizer` with ``architecture="ldm"``; ``ch``, ``ch_mult``,
``num_res_blocks``, the latent channels and which encoder/decoder levels have attention are read from the keys and
cross-checked against an optional config (``AutoencoderKL`` arguments plus the encoder/decoder overrides of the
fixtures, with MAR's ``resolution``/``attn_resolutions`` rule). Tokens are the posterior scaled by MAR's 0.2325.
LDM training-loss weights (keys under ``loss.``), which MAR's ``strict=False`` load would skip, are dropped.

**Sampling** (MAR's ``sample_tokens(num_iter, cfg, cfg_schedule, temperature)``) in tokenloom's vocabulary
(:func:`mar_sampling_params`):

* ``num_iter`` → ``SamplingParams.num_steps`` (masked AR iterations; at most ``L``);
* ``cfg`` with ``cfg_schedule="linear"`` → ``GuidanceSchedule.steps`` of MAR's ramp ``1 + (cfg − 1)·(L −
  mask_len_s)/L`` (:func:`~tokenloom.generators.masked_ar_layers.mar_guidance_values`): it follows the cosine mask
  schedule, so tokenloom's generic ``linear`` (progress ``s/(N − 1)``) would differ; the values depend on ``num_iter``
  and ``L``, so changing ``num_steps`` needs new values. ``"constant"`` → ``guidance_scale = cfg``. ``cfg = 1`` → no
  guidance (no batch doubling, as MAR);
* ``temperature`` → the diffusion head's ``noise_temperature`` (multiplies the per-step DDPM noise, not the initial
  noise, as MAR's ``p_sample``): a head option set at conversion (``convert_mar(temperature=...)``) or later as
  ``generator.output_head.noise_temperature``. ``SamplingParams.temperature`` does not act on continuous heads;
* ``num_sampling_steps`` (the DiffLoss respacing, ``"100"``) → the head's ``num_sampling_steps``.

MAR's sampling randomness (``np.random.shuffle`` orders, ``torch.randn`` noise) cannot be matched bit for bit; the
fixtures check every deterministic part.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

from tokenloom.config import GuidanceSchedule, SamplingParams
from tokenloom.generators.masked_ar import MaskedAR
from tokenloom.generators.masked_ar_layers import check_num_steps, mar_guidance_values
from tokenloom.heads.mlp_denoiser import from_mar_state_dict
from tokenloom.tokenizers.kl_vae import KLVAETokenizer
from tokenloom.tokens import Grid, TokenSpec

# MAR's constructor arguments and their defaults (models/mar.py); "model" names a preset (main_mar.py's --model).
MAR_DEFAULTS = {
    "img_size": 256, "vae_stride": 16, "patch_size": 1, "mlp_ratio": 4.0, "vae_embed_dim": 16,
    "mask_ratio_min": 0.7, "label_drop_prob": 0.1, "class_num": 1000, "attn_dropout": 0.1, "proj_dropout": 0.1,
    "buffer_size": 64, "diffloss_d": 3, "diffloss_w": 1024, "num_sampling_steps": "100", "diffusion_batch_mul": 4,
}
MAR_ARGS = set(MAR_DEFAULTS) | {"encoder_embed_dim", "encoder_depth", "encoder_num_heads", "decoder_embed_dim",
                                "decoder_depth", "decoder_num_heads", "norm_layer", "grad_checkpointing"}
_EPS_1E6 = "partial(nn.LayerNorm, eps=1e-6)"
# The released ImageNet-256 models (README: MAR-B/L/H with their DiffLoss sizes and evaluation settings).
MAR_PRESETS = {
    "mar_base": {"encoder_embed_dim": 768, "encoder_depth": 12, "encoder_num_heads": 12, "decoder_embed_dim": 768,
                 "decoder_depth": 12, "decoder_num_heads": 12, "norm_layer": _EPS_1E6, "diffloss_d": 6,
                 "diffloss_w": 1024},
    "mar_large": {"encoder_embed_dim": 1024, "encoder_depth": 16, "encoder_num_heads": 16,
                  "decoder_embed_dim": 1024, "decoder_depth": 16, "decoder_num_heads": 16, "norm_layer": _EPS_1E6,
                  "diffloss_d": 8, "diffloss_w": 1280},
    "mar_huge": {"encoder_embed_dim": 1280, "encoder_depth": 20, "encoder_num_heads": 16,
                 "decoder_embed_dim": 1280, "decoder_depth": 20, "decoder_num_heads": 16, "norm_layer": _EPS_1E6,
                 "diffloss_d": 12, "diffloss_w": 1536},
}
#: MAR's evaluation settings per preset (README): ``sample_tokens(num_iter, cfg, "linear", temperature)``.
MAR_EVAL_SETTINGS = {"mar_base": {"num_iter": 256, "cfg": 2.9, "temperature": 1.0},
                     "mar_large": {"num_iter": 256, "cfg": 3.0, "temperature": 1.0},
                     "mar_huge": {"num_iter": 256, "cfg": 3.2, "temperature": 1.0}}
MAR_LATENT_SCALE = 0.2325
VAE_DEFAULTS = {"embed_dim": 16, "ch_mult": [1, 1, 2, 2, 4], "ch": 128, "num_res_blocks": 2, "resolution": 256,
                "encoder_attn_resolutions": [16], "decoder_attn_resolutions": []}
VAE_GROUPNORM_GROUPS = 32  # MAR's Normalize: GroupNorm(32, C, eps=1e-6)
_VAE_IGNORED_PREFIXES = ("loss.",)


# ---------------------------------------------------------------- reading checkpoints
def _torch_load(path: str | os.PathLike):
    """``torch.load(weights_only=True)``; argparse Namespaces (MAR's ``args``) are allowed, nothing else."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} holds objects that weights_only=True refuses to unpickle ({err}); MAR checkpoints "
                         f"are dicts of tensors (plus an argparse Namespace 'args')") from err


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor)
                                                       for k, v in obj.items())


def _describe(obj) -> str:
    if isinstance(obj, dict):
        return f"a dict with entries {{{', '.join(f'{k!r}: {type(v).__name__}' for k, v in list(obj.items())[:8])}}}"
    return type(obj).__name__


def read_mar_checkpoint(checkpoint: str | os.PathLike | dict, entry: str = "model_ema"
                        ) -> tuple[dict[str, Tensor], dict | None]:
    """A MAR checkpoint → (state dict of ``entry``, the saved ``args`` as a dict or None).

    Accepts MAR's container ``{"model", "model_ema", [optimizer, epoch, scaler, args]}`` (path or loaded dict).
    Raises ``ValueError`` for any other container or a missing ``entry``.
    """
    if entry not in ("model_ema", "model"):
        raise ValueError(f"entry must be 'model_ema' (the released weights) or 'model', got {entry!r}")
    where = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "the given object"
    obj = _torch_load(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    if not isinstance(obj, dict) or not any(k in obj for k in ("model", "model_ema")):
        hint = " (a bare state dict: wrap it as {'model_ema': sd})" if _is_state_dict(obj) else ""
        raise ValueError(f"unknown MAR checkpoint container in {where}: expected MAR's dict with 'model' and "
                         f"'model_ema' state dicts, got {_describe(obj)}{hint}")
    if entry not in obj:
        raise ValueError(f"MAR checkpoint {where} has no {entry!r} entry (entries: {sorted(obj)}); the released "
                         f"models are used through 'model_ema'")
    sd = obj[entry]
    if not _is_state_dict(sd):
        raise ValueError(f"MAR checkpoint {where}: entry {entry!r} is not a state dict of tensors, got {_describe(sd)}")
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return sd, args if isinstance(args, dict) else None


def read_mar_vae_checkpoint(checkpoint: str | os.PathLike | dict) -> dict[str, Tensor]:
    """MAR's VAE checkpoint ``{"model": state_dict}`` (path or dict) → the state dict."""
    where = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "the given object"
    obj = _torch_load(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    if not isinstance(obj, dict) or not _is_state_dict(obj.get("model")):
        raise ValueError(f"unknown MAR VAE checkpoint container in {where}: expected {{'model': state_dict}}, got "
                         f"{_describe(obj)}")
    return obj["model"]


def _read_json(config) -> dict:
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"config must be a dict, a preset name or a config.json path, got {str(config)!r}")
        config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, a preset name or a path, got {type(config).__name__}")
    return config


def read_mar_config(config: dict | str | os.PathLike | None) -> dict:
    """MAR constructor arguments from a dict, a preset name (``"mar_base"`` …), a ``config.json`` path or folder
    (section ``"MAR"`` if present), or None (nothing known). A ``"model"`` key names a preset to start from (as in
    MAR's saved ``args``); other keys that are not MAR arguments are ignored when they come from saved ``args``."""
    if config is None:
        return {}
    if isinstance(config, str) and config in MAR_PRESETS:
        return dict(MAR_PRESETS[config])
    raw = _read_json(config)
    args = dict(raw.get("MAR", raw))
    preset = args.pop("model", None)
    from_saved_args = preset is not None
    base = {}
    if preset is not None:
        if preset not in MAR_PRESETS:
            raise ValueError(f"unknown MAR model {preset!r}; presets: {sorted(MAR_PRESETS)}")
        base = dict(MAR_PRESETS[preset])
    unknown = sorted(set(args) - MAR_ARGS)
    if unknown and not from_saved_args:
        raise ValueError(f"unknown MAR arguments {unknown}; known: {sorted(MAR_ARGS)}")
    return {**base, **{k: v for k, v in args.items() if k in MAR_ARGS}}


def layer_norm_eps(norm_layer) -> float:
    """The eps of MAR's ``norm_layer`` argument: ``"partial(nn.LayerNorm, eps=1e-6)"`` → 1e-6, ``nn.LayerNorm`` →
    1e-5 (torch's default), a number → itself."""
    if norm_layer is None:
        return 1e-6
    if isinstance(norm_layer, (int, float)) and not isinstance(norm_layer, bool):
        return float(norm_layer)
    text = str(norm_layer)
    found = re.search(r"eps\s*=\s*([0-9.eE+-]+)", text)
    if found:
        return float(found.group(1))
    if "LayerNorm" in text:
        return 1e-5
    raise ValueError(f"cannot read a LayerNorm eps from norm_layer={norm_layer!r}")


def _need(sd: dict[str, Tensor], key: str, what: str = "MAR") -> Tensor:
    if key not in sd:
        raise ValueError(f"{what} checkpoint is missing key {key!r}, needed to read the model sizes")
    return sd[key]


def _count(sd: dict[str, Tensor], pattern: str) -> int:
    """Number of distinct ``i`` in keys matching ``pattern`` (a regex with one ``(\\d+)`` group)."""
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    if found and found != set(range(len(found))):
        raise ValueError(f"checkpoint indices for {pattern!r} are not 0..n-1: {sorted(found)}")
    return len(found)


def _agree(what: str, name: str, stated, found):
    """The checkpoint's value, after checking that the config's (if any) agrees."""
    if stated is not None and stated != found:
        raise ValueError(f"{what} config says {name}={stated!r} but the checkpoint has {name}={found!r}")
    return found


# ---------------------------------------------------------------- MAR transformer
def masked_ar_config(state_dict: dict[str, Tensor], config: dict | str | os.PathLike | None = None, *,
                     temperature: float = 1.0, num_iter: int | None = None) -> dict:
    """``MaskedAR`` arguments for a MAR state dict (sizes from the checkpoint, the rest from ``config``)."""
    args = read_mar_config(config)
    sd = state_dict
    de, token_dim = (int(n) for n in _need(sd, "z_proj.weight").shape)
    de = _agree("MAR", "encoder_embed_dim", args.get("encoder_embed_dim"), de)
    dd = _agree("MAR", "decoder_embed_dim", args.get("decoder_embed_dim"),
                int(_need(sd, "decoder_embed.weight").shape[0]))
    enc_depth = _agree("MAR", "encoder_depth", args.get("encoder_depth"), _count(sd, r"encoder_blocks\.(\d+)\."))
    dec_depth = _agree("MAR", "decoder_depth", args.get("decoder_depth"), _count(sd, r"decoder_blocks\.(\d+)\."))
    if not enc_depth or not dec_depth:
        raise ValueError(f"MAR checkpoint has encoder_depth={enc_depth}, decoder_depth={dec_depth}; both must be >= 1")
    seq_len = int(_need(sd, "diffusion_pos_embed_learned").shape[1])
    buffer_size = _agree("MAR", "buffer_size", args.get("buffer_size"),
                         int(_need(sd, "encoder_pos_embed_learned").shape[1]) - seq_len)
    class_num = _agree("MAR", "class_num", args.get("class_num"), int(_need(sd, "class_emb.weight").shape[0]))
    diff_w = _agree("MAR", "diffloss_w", args.get("diffloss_w"),
                    int(_need(sd, "diffloss.net.input_proj.weight").shape[0]))
    diff_d = _agree("MAR", "diffloss_d", args.get("diffloss_d"), _count(sd, r"diffloss\.net\.res_blocks\.(\d+)\."))

    hidden = int(_need(sd, "encoder_blocks.0.mlp.fc1.weight").shape[0])
    dec_hidden = int(_need(sd, "decoder_blocks.0.mlp.fc1.weight").shape[0])
    mlp_ratio = float(args.get("mlp_ratio", hidden / de))
    if int(de * mlp_ratio) != hidden or int(dd * mlp_ratio) != dec_hidden:
        raise ValueError(f"MAR mlp_ratio={mlp_ratio} gives MLP widths {int(de * mlp_ratio)} / {int(dd * mlp_ratio)} "
                         f"but the checkpoint has {hidden} / {dec_hidden}")
    heads = {}
    for side, width in (("encoder", de), ("decoder", dd)):
        name = f"{side}_num_heads"
        if args.get(name) is None:
            match = [p for p, v in MAR_PRESETS.items() if v[f"{side}_embed_dim"] == width
                     and v[f"{side}_depth"] == (enc_depth if side == "encoder" else dec_depth)]
            if not match:
                raise ValueError(f"MAR checkpoints do not store {name}; pass a config with it (or a preset name in "
                                 f"{sorted(MAR_PRESETS)})")
            heads[name] = MAR_PRESETS[match[0]][name]
        else:
            heads[name] = int(args[name])

    p = int(args.get("patch_size", MAR_DEFAULTS["patch_size"]))
    if token_dim % (p * p):
        raise ValueError(f"MAR token dim {token_dim} (z_proj input) is not vae_embed_dim · patch_size² for "
                         f"patch_size={p}")
    vae_dim = _agree("MAR", "vae_embed_dim", args.get("vae_embed_dim"), token_dim // (p * p))
    seq_h = math.isqrt(seq_len)
    if seq_h * seq_h != seq_len:
        raise ValueError(f"MAR checkpoint has {seq_len} token positions, not a square grid")
    if "img_size" in args or "vae_stride" in args:
        img = int(args.get("img_size", MAR_DEFAULTS["img_size"]))
        stride = int(args.get("vae_stride", MAR_DEFAULTS["vae_stride"]))
        _agree("MAR", "img_size // vae_stride // patch_size", img // stride // p, seq_h)
    spec = TokenSpec(kind="continuous", dim=vae_dim, layout=Grid(seq_h * p, seq_h * p))
    if num_iter is not None:
        check_num_steps(num_iter, seq_len)
    head_options = {"depth": diff_d, "mlp_width": diff_w,
                    "num_sampling_steps": int(args.get("num_sampling_steps", MAR_DEFAULTS["num_sampling_steps"])),
                    "diffusion_batch_mul": int(args.get("diffusion_batch_mul", MAR_DEFAULTS["diffusion_batch_mul"])),
                    "noise_temperature": float(temperature)}
    return dict(
        token_spec=spec.to_dict(), patch_size=p, encoder_width=de, encoder_depth=enc_depth, decoder_width=dd,
        decoder_depth=dec_depth, mlp_ratio=mlp_ratio, norm_eps=layer_norm_eps(args.get("norm_layer")),
        attn_dropout=float(args.get("attn_dropout", MAR_DEFAULTS["attn_dropout"])),
        proj_dropout=float(args.get("proj_dropout", MAR_DEFAULTS["proj_dropout"])), buffer_size=buffer_size,
        condition="class", num_classes=class_num,
        cond_dropout=float(args.get("label_drop_prob", MAR_DEFAULTS["label_drop_prob"])),
        mask_ratio_min=float(args.get("mask_ratio_min", MAR_DEFAULTS["mask_ratio_min"])), reveal="order",
        num_steps=num_iter, head="diffusion", head_options=head_options, **heads,
    )


def rename_mar_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """MAR keys → MaskedAR keys: ``diffloss.net.*`` → ``output_head.net.*`` (renamed), the rest unchanged."""
    out = {k: v for k, v in state_dict.items() if not k.startswith("diffloss.")}
    if any(k.startswith("diffloss.net.") for k in state_dict):
        out.update({f"output_head.net.{k}": v for k, v in from_mar_state_dict(state_dict).items()})
    out.update({k: v for k, v in state_dict.items() if k.startswith("diffloss.") and not k.startswith("diffloss.net.")})
    return out


def _load_strict(model: torch.nn.Module, state: dict[str, Tensor], what: str) -> None:
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    mis_shaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(want[k].shape)}"
                  for k in sorted(set(want) & set(state)) if state[k].shape != want[k].shape]
    if missing or unexpected or mis_shaped:
        lines = [f"{what} checkpoint does not fit the model built from its sizes:"]
        if missing:
            lines.append(f"  missing keys: {missing}")
        if unexpected:
            lines.append(f"  unexpected keys: {unexpected}")
        if mis_shaped:
            lines.append(f"  mis-shaped keys: {mis_shaped}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def convert_mar(checkpoint: str | os.PathLike | dict, config: dict | str | os.PathLike | None = None, *,
                entry: str = "model_ema", temperature: float = 1.0, num_iter: int | None = None) -> MaskedAR:
    """Build a :class:`MaskedAR` (diffusion head) for a MAR checkpoint and load it (strict), in eval mode.

    Args:
        checkpoint: ``checkpoint-last.pth`` (loaded with ``weights_only=True``) or the loaded dict.
        config: MAR constructor arguments (dict, preset name, ``config.json``); None = the checkpoint's saved
            ``args`` if any, else what the checkpoint and the presets say.
        entry: ``"model_ema"`` (the released weights, default) or ``"model"``.
        temperature: MAR's sampling ``temperature`` → the head's ``noise_temperature``.
        num_iter: MAR's ``num_iter`` as the generator's default ``num_steps`` (None: ``min(64, L)``).

    Raises:
        ValueError: unknown container; missing, unexpected or mis-shaped keys (each key with both shapes); a config
            that contradicts the checkpoint.
    """
    sd, saved_args = read_mar_checkpoint(checkpoint, entry)
    model = MaskedAR(**masked_ar_config(sd, config if config is not None else saved_args,
                                        temperature=temperature, num_iter=num_iter))
    _load_strict(model, rename_mar_state_dict(sd), "MAR")
    return model.eval()


def mar_sampling_params(cfg: float = 1.0, num_iter: int = 64, seq_len: int = 256,
                        cfg_schedule: str = "linear") -> SamplingParams:
    """MAR's ``sample_tokens(num_iter, cfg, cfg_schedule)`` as :class:`SamplingParams` (see the module docstring).

    ``seq_len`` is the model's number of token positions ``L`` (``generator.seq_len``; 256 for the released models).
    """
    check_num_steps(num_iter, seq_len)
    if cfg_schedule not in ("linear", "constant"):
        raise ValueError(f"cfg_schedule must be 'linear' or 'constant' (MAR's), got {cfg_schedule!r}")
    values = mar_guidance_values(cfg, seq_len, num_iter)  # also validates cfg
    if cfg == 1.0:
        return SamplingParams(num_steps=num_iter)
    if cfg_schedule == "constant":
        return SamplingParams(num_steps=num_iter, guidance_scale=float(cfg))
    return SamplingParams(num_steps=num_iter, guidance_scale=float(cfg),
                          guidance_schedule=GuidanceSchedule.steps(values))


# ---------------------------------------------------------------- KL-16 VAE
def _attn_levels_from_resolutions(resolution: int, levels: int, attn_resolutions, decoder: bool) -> list[int]:
    """MAR's rule: level ``i`` has attention when its resolution is listed (encoder: ``resolution`` halved per level;
    decoder: ``resolution // 2^(n-1)`` doubled per level from the lowest)."""
    listed = {int(r) for r in attn_resolutions}
    if decoder:
        lowest = resolution // 2 ** (levels - 1)
        return [i for i in range(levels) if lowest * 2 ** (levels - 1 - i) in listed]
    out, res = [], resolution
    for i in range(levels):
        if res in listed:
            out.append(i)
        if i != levels - 1:
            res //= 2
    return out


def vae_tokenizer_config(state_dict: dict[str, Tensor], config: dict | str | os.PathLike | None = None,
                         image_size: int | None = None) -> dict:
    """``KLVAETokenizer`` arguments for MAR's VAE state dict (sizes from the keys, cross-checked with ``config``:
    ``{"AutoencoderKL": {...}, "encoder_decoder_overrides": {...}}`` as in the fixtures, or a flat dict)."""
    raw = {} if config is None else _read_json(config)
    args = {**raw.get("AutoencoderKL", {}), **raw.get("encoder_decoder_overrides", {})} \
        if ("AutoencoderKL" in raw or "encoder_decoder_overrides" in raw) else dict(raw)
    sd = state_dict
    what = "MAR VAE"
    embed_dim = _agree(what, "embed_dim", args.get("embed_dim"),
                       int(_need(sd, "post_quant_conv.weight", what).shape[0]))
    ch = _agree(what, "ch", args.get("ch"), int(_need(sd, "encoder.conv_in.weight", what).shape[0]))
    levels = _count(sd, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise ValueError("MAR VAE checkpoint has no encoder.down.* keys")
    widths = [int(_need(sd, f"encoder.down.{i}.block.0.conv1.weight", what).shape[0]) for i in range(levels)]
    if any(w % ch for w in widths):
        raise ValueError(f"MAR VAE level widths {widths} are not multiples of ch={ch}")
    ch_mult = _agree(what, "ch_mult", None if args.get("ch_mult") is None else list(args["ch_mult"]),
                     [w // ch for w in widths])
    blocks = _agree(what, "num_res_blocks", args.get("num_res_blocks"), _count(sd, r"encoder\.down\.0\.block\.(\d+)\."))
    enc_attn = [i for i in range(levels) if f"encoder.down.{i}.attn.0.norm.weight" in sd]
    dec_attn = [i for i in range(levels) if f"decoder.up.{i}.attn.0.norm.weight" in sd]
    resolution = args.get("resolution")
    if resolution is not None:
        enc_res = args.get("encoder_attn_resolutions", args.get("attn_resolutions",
                                                                 VAE_DEFAULTS["encoder_attn_resolutions"]))
        dec_res = args.get("decoder_attn_resolutions", VAE_DEFAULTS["decoder_attn_resolutions"])
        _agree(what, "encoder attention levels", _attn_levels_from_resolutions(resolution, levels, enc_res, False),
               enc_attn)
        _agree(what, "decoder attention levels", _attn_levels_from_resolutions(resolution, levels, dec_res, True),
               dec_attn)
    if args.get("use_variational", True) is not True:
        raise ValueError("only MAR's variational VAE (use_variational=True) converts")
    if image_size is None:
        image_size = int(resolution) if resolution is not None else VAE_DEFAULTS["resolution"]
    autoencoder = {"ch": ch, "ch_mult": ch_mult, "num_res_blocks": blocks, "latent_channels": embed_dim,
                   "attn_levels": enc_attn, "decoder_attn_levels": dec_attn, "mid_attn": True,
                   "norm_groups": VAE_GROUPNORM_GROUPS}
    return dict(image_size=int(image_size), architecture="ldm", autoencoder_config=autoencoder,
                scaling_factor=MAR_LATENT_SCALE, shift_factor=0.0)


def convert_mar_vae(checkpoint: str | os.PathLike | dict, config: dict | str | os.PathLike | None = None,
                    image_size: int | None = None) -> KLVAETokenizer:
    """MAR's KL VAE (``kl16.ckpt``) → a ``kl_vae`` tokenizer (``architecture="ldm"``, scale 0.2325), eval mode.

    ``image_size`` (the tokenizer's spec) defaults to the config's ``resolution``, else 256.
    """
    sd = read_mar_vae_checkpoint(checkpoint)
    tok = KLVAETokenizer(**vae_tokenizer_config(sd, config, image_size))
    state = {f"autoencoder.{k}": v for k, v in sd.items() if not k.startswith(_VAE_IGNORED_PREFIXES)}
    _load_strict(tok, state, "MAR VAE")
    return tok.eval()


# ---------------------------------------------------------------- pipeline
def mar_pipeline(mar_checkpoint, vae_checkpoint, mar_config=None, vae_config=None, *, cfg: float = 1.0,
                 num_iter: int | None = None, temperature: float = 1.0, cfg_schedule: str = "linear"):
    """A ``class-to-image`` pipeline of a converted MAR and its VAE, with MAR's sampling settings as defaults.

    ``num_iter`` None = ``min(64, L)``; the VAE's image size is MAR's grid × the VAE's downsampling factor.
    """
    from tokenloom.pipelines.base import params_to_dict
    from tokenloom.pipelines.class_to_image import ClassToImagePipeline

    generator = convert_mar(mar_checkpoint, mar_config, temperature=temperature, num_iter=num_iter)
    sd = read_mar_vae_checkpoint(vae_checkpoint)
    probe = vae_tokenizer_config(sd, vae_config)
    factor = 2 ** (len(probe["autoencoder_config"]["ch_mult"]) - 1)
    tokenizer = convert_mar_vae({"model": sd}, vae_config, image_size=generator.spec.layout.h * factor)
    steps = generator.default_num_steps
    params = mar_sampling_params(cfg, steps, generator.seq_len, cfg_schedule)
    return ClassToImagePipeline(tokenizer, generator, sampling_defaults=params_to_dict(params))


__all__ = ["MAR_EVAL_SETTINGS", "MAR_LATENT_SCALE", "MAR_PRESETS", "convert_mar", "convert_mar_vae",
           "layer_norm_eps", "mar_pipeline", "mar_sampling_params", "masked_ar_config", "read_mar_checkpoint",
           "read_mar_config", "read_mar_vae_checkpoint", "rename_mar_state_dict", "vae_tokenizer_config"]
