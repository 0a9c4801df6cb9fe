"""Load VAR's multi-scale VQVAE checkpoints (``vae_ch160v4096z32.pth`` and the like) as ``"msvq"`` tokenizers.

VAR publishes a raw ``state_dict`` (``torch.save``) of ``models/vqvae.py::VQVAE``. Its module tree is ours
(:class:`~tokenloom.tokenizers.multiscale.MultiScaleVQTokenizer` with ``fused_qkv=True``, ``quant_conv_kernel=3``,
``codebook_dim = z_channels``) except for the quantiser's names:

==========================================  ==============================================
VAR key                                     tokenloom key
==========================================  ==============================================
``quantize.embedding.weight``               ``quantize.quantizer.vq.embedding.weight``
``quantize.quant_resi.qresi_ls.{i}.*``      ``quantize.phi.{i}.*`` (partially shared, ``share_quant_resi > 1``)
``quantize.quant_resi.qresi.*``             ``quantize.phi.0.*`` (shared, ``share_quant_resi = 1``)
``quantize.quant_resi.{i}.*``               ``quantize.phi.{i}.*`` (non-shared, ``share_quant_resi = 0``)
``quantize.ema_vocab_hit_SV``               dropped (a training statistic)
==========================================  ==============================================

The non-shared variant (``PhiNonShared``, ``n = default_qresi_counts or len(v_patch_nums)`` convs) picks its conv
with the same tick rule as the partially shared one (``1/(3n)`` ticks when ``n = 4``, else ``1/(2n)``), so its
scale → φ map is :func:`~tokenloom.tokenizers.quantizers.multiscale.phi_index_per_scale`; it is passed as
``phi_index`` to make it explicit.
``using_znorm=True`` (cosine search but raw-row decoding) is not supported. VAR's ``idxBl_to_img`` clamps the
decoded image to ``[-1, 1]``; our ``decode`` does not (clamp afterwards to match it).
"""

from __future__ import annotations

import json
import os
import re

import torch

from tokenloom.tokenizers.multiscale import MultiScaleVQTokenizer
from tokenloom.tokenizers.quantizers.multiscale import PHI_RATIO_EPS, phi_index_per_scale

# VAR's VQVAE constructor defaults and the ddconfig it hard-codes (the released checkpoint's sizes).
VAR_VQVAE_DEFAULTS = {
    "vocab_size": 4096, "z_channels": 32, "ch": 128, "beta": 0.25, "using_znorm": False, "quant_conv_ks": 3,
    "quant_resi": 0.5, "share_quant_resi": 4, "default_qresi_counts": 0,
    "v_patch_nums": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16],
}
VAR_DDCONFIG_DEFAULTS = {"ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "using_sa": True, "using_mid_sa": True,
                         "in_channels": 3}
_IGNORED = {"dropout", "test_mode", "in_channels"}


def _phi_layout(vqvae: dict) -> tuple[int, str, list[int] | None]:
    """(number of φ convs, VAR's key style, explicit scale → φ map or None) for a VQVAE config."""
    num_scales = len(vqvae["v_patch_nums"])
    if abs(vqvae["quant_resi"]) <= PHI_RATIO_EPS:
        return 0, "none", None
    share = vqvae["share_quant_resi"]
    if share == 1:
        return 1, "shared", None
    if share == 0:
        n = vqvae["default_qresi_counts"] or num_scales
        return n, "non_shared", phi_index_per_scale(num_scales, n)
    return share, "partially_shared", None


def tokenizer_config_from_var(vqvae: dict | None = None, ddconfig: dict | None = None) -> dict:
    """``MultiScaleVQTokenizer`` arguments for ``VQVAE(**vqvae)`` built with ``ddconfig`` overrides.

    Args:
        vqvae: VQVAE constructor arguments (missing ones take VAR's defaults).
        ddconfig: encoder/decoder arguments VAR hard-codes (``ch_mult``, ``num_res_blocks``, ``using_sa``,
            ``using_mid_sa``); missing ones take VAR's values.
    """
    v = {**VAR_VQVAE_DEFAULTS, **(vqvae or {})}
    dd = {**VAR_DDCONFIG_DEFAULTS, **(ddconfig or {})}
    unknown = sorted(set(v) - set(VAR_VQVAE_DEFAULTS) - _IGNORED) + sorted(
        set(dd) - set(VAR_DDCONFIG_DEFAULTS) - _IGNORED)
    if unknown:
        raise ValueError(f"unknown VAR VQVAE arguments {unknown}")
    if v["using_znorm"]:
        raise ValueError("using_znorm=True is not supported (VAR searches normalised codes but decodes raw rows)")
    if dd["in_channels"] != 3:
        raise ValueError(f"in_channels must be 3, got {dd['in_channels']!r}")
    num_phi, _, phi_index = _phi_layout(v)
    levels = len(dd["ch_mult"])
    patch_nums = [int(p) for p in v["v_patch_nums"]]
    return {
        "image_size": patch_nums[-1] * 2 ** (levels - 1),
        "ch": int(v["ch"]),
        "ch_mult": [int(m) for m in dd["ch_mult"]],
        "num_res_blocks": int(dd["num_res_blocks"]),
        "z_channels": int(v["z_channels"]),
        "attn_levels": [levels - 1] if dd["using_sa"] else [],
        "mid_attn": bool(dd["using_mid_sa"]),
        "norm_groups": 32,
        "fused_qkv": True,
        "quant_conv_kernel": int(v["quant_conv_ks"]),
        "codebook_size": int(v["vocab_size"]),
        "codebook_dim": int(v["z_channels"]),
        "scales": patch_nums,
        "num_phi": num_phi,
        "phi_ratio": abs(float(v["quant_resi"])),
        "phi_index": phi_index,
        "upsample_mode": "bicubic",
        "beta": float(v["beta"]),
    }


def convert_var_state_dict(state_dict: dict, phi_style: str) -> dict:
    """VAR VQVAE keys → tokenloom keys (see the module table); ``phi_style`` from the VQVAE config."""
    out = {}
    patterns = {"partially_shared": r"quantize\.quant_resi\.qresi_ls\.(\d+)\.(.+)",
                "non_shared": r"quantize\.quant_resi\.(\d+)\.(.+)", "shared": r"quantize\.quant_resi\.qresi\.()(.+)"}
    for key, value in state_dict.items():
        if key == "quantize.ema_vocab_hit_SV":
            continue
        if key == "quantize.embedding.weight":
            out["quantize.quantizer.vq.embedding.weight"] = value
            continue
        m = re.fullmatch(patterns.get(phi_style, r"(?!)"), key)
        if m:
            out[f"quantize.phi.{m.group(1) or 0}.{m.group(2)}"] = value
            continue
        out[key] = value
    return out


def load_var_vqvae(checkpoint: str | dict, vqvae: dict | None = None, ddconfig: dict | None = None
                   ) -> MultiScaleVQTokenizer:
    """Build the tokenizer for ``VQVAE(**vqvae)`` and load VAR's checkpoint into it (strict).

    Args:
        checkpoint: path of the raw ``state_dict`` (loaded with ``weights_only=True``) or the dict itself.
        vqvae, ddconfig: as :func:`tokenizer_config_from_var`.

    Raises:
        ValueError: naming missing, unexpected and mis-shaped keys when the checkpoint does not fit.
    """
    config = tokenizer_config_from_var(vqvae, ddconfig)
    if isinstance(checkpoint, (str, os.PathLike)):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    else:
        state = checkpoint
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint must hold a state_dict (dict of tensors), got {type(state).__name__}")
    _, style, _ = _phi_layout({**VAR_VQVAE_DEFAULTS, **(vqvae or {})})
    state = convert_var_state_dict(state, style)
    model = MultiScaleVQTokenizer(**config)
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    mis_shaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(want[k].shape)}"
                  for k in sorted(set(want) & set(state)) if state[k].shape != want[k].shape]
    if missing or unexpected or mis_shaped:
        raise ValueError(f"VAR VQVAE checkpoint does not fit the config {config}:\n  missing keys: {missing}\n"
                         f"  unexpected keys: {unexpected}\n  mis-shaped keys: {mis_shaped}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_var_vqvae_folder(folder: str) -> MultiScaleVQTokenizer:
    """A folder with VAR's ``config.json`` (``{"VQVAE": {...}, "ddconfig_overrides": {...}}``, the fixtures' format)
    and one ``*.pth`` checkpoint → the loaded tokenizer."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    if "VQVAE" not in cfg:
        raise ValueError(f"{folder}/config.json must have a 'VQVAE' section, got sections {sorted(cfg)}")
    pths = sorted(p for p in os.listdir(folder) if p.endswith(".pth"))
    if len(pths) != 1:
        raise ValueError(f"{folder} must hold exactly one .pth checkpoint, found {pths}")
    return load_var_vqvae(os.path.join(folder, pths[0]), cfg["VQVAE"], cfg.get("ddconfig_overrides"))


__all__ = ["VAR_DDCONFIG_DEFAULTS", "VAR_VQVAE_DEFAULTS", "convert_var_state_dict", "load_var_vqvae",
           "load_var_vqvae_folder", "tokenizer_config_from_var"]
