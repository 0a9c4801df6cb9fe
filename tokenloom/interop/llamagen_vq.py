"""Load LlamaGen VQ tokenizer checkpoints (``tokenizer/tokenizer_image/vq_model.py::VQModel``) as ``"vq"`` tokenizers.

LlamaGen's VQModel is our :class:`~tokenloom.tokenizers.vq.VQTokenizer` (same encoder/decoder, 1×1 quant convs,
l2-normalised low-dimensional codebook, first-index argmin); only the autoencoder's names differ
(fixtures README §1–2):

===============================================  ===============================================
LlamaGen key                                     tokenloom key
===============================================  ===============================================
``encoder.conv_blocks.{i}.res.{k}.*``            ``encoder.down.{i}.block.{k}.*``
``encoder.conv_blocks.{i}.attn.{k}.*``           ``encoder.down.{i}.attn.{k}.*``
``encoder.conv_blocks.{i}.downsample.conv.*``    ``encoder.down.{i}.downsample.conv.*``
``{encoder,decoder}.mid.{0,1,2}.*``              ``{encoder,decoder}.mid.{block_1,attn_1,block_2}.*``
``decoder.conv_blocks.{j}.res.{k}.*`` etc.       ``decoder.up.{n-1-j}.block.{k}.*`` (j = 0 is the lowest resolution)
``quantize.codebook_used``                       dropped (a training usage history)
===============================================  ===============================================

Checkpoints are read with ``torch.load(weights_only=True)``; ``{"model": state_dict}`` containers (DDP
releases) and bare state dicts (FSDP releases) are both accepted.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from tokenloom.tokenizers.vq import VQTokenizer

# LlamaGen ModelArgs defaults, and the Encoder/Decoder sizes VQModel hard-codes (the released VQ-16's).
LLAMAGEN_VQ_DEFAULTS = {
    "codebook_size": 16384, "codebook_embed_dim": 8, "codebook_l2_norm": True, "codebook_show_usage": True,
    "commit_loss_beta": 0.25, "entropy_loss_ratio": 0.0, "encoder_ch_mult": [1, 1, 2, 2, 4],
    "decoder_ch_mult": [1, 1, 2, 2, 4], "z_channels": 256, "dropout_p": 0.0,
}
LLAMAGEN_ENCODER_DECODER_DEFAULTS = {"ch": 128, "num_res_blocks": 2, "norm_type": "group", "resamp_with_conv": True}
DROPPED_KEYS = ("quantize.codebook_used",)


def vq_config_from_llamagen(model_args: dict | None = None, encoder_decoder: dict | None = None,
                            image_size: int = 256) -> dict:
    """``VQTokenizer`` arguments for ``VQModel(ModelArgs(**model_args))`` with optional encoder/decoder sizes.

    Args:
        model_args: LlamaGen ``ModelArgs`` fields (missing ones take LlamaGen's defaults).
        encoder_decoder: ``ch``, ``num_res_blocks`` (LlamaGen hard-codes 128 and 2), ``norm_type`` (only
            ``"group"``), ``resamp_with_conv`` (only True).
        image_size: the image side the tokenizer's ``spec`` describes.
    """
    args = {**LLAMAGEN_VQ_DEFAULTS, **(model_args or {})}
    ed = {**LLAMAGEN_ENCODER_DECODER_DEFAULTS, **(encoder_decoder or {})}
    unknown = sorted(set(args) - set(LLAMAGEN_VQ_DEFAULTS)) + sorted(
        set(ed) - set(LLAMAGEN_ENCODER_DECODER_DEFAULTS) - {"dropout"})
    if unknown:
        raise ValueError(f"unknown LlamaGen VQ arguments {unknown}")
    if ed["norm_type"] != "group" or not ed["resamp_with_conv"]:
        raise ValueError(f"only norm_type='group' with resamp_with_conv=True converts, got "
                         f"norm_type={ed['norm_type']!r}, resamp_with_conv={ed['resamp_with_conv']!r}")
    return {
        "image_size": image_size, "ch": ed["ch"], "ch_mult": list(args["encoder_ch_mult"]),
        "decoder_ch_mult": list(args["decoder_ch_mult"]), "num_res_blocks": ed["num_res_blocks"],
        "z_channels": args["z_channels"], "norm_groups": 32, "mid_attn": True,
        "codebook_size": args["codebook_size"], "codebook_dim": args["codebook_embed_dim"],
        "codebook_l2_norm": bool(args["codebook_l2_norm"]), "beta": args["commit_loss_beta"],
    }


_MID = {"0": "block_1", "1": "attn_1", "2": "block_2"}


def convert_llamagen_vq_state_dict(state_dict: dict[str, Tensor], num_levels: int) -> dict[str, Tensor]:
    """Rename a LlamaGen VQModel state dict to :class:`VQTokenizer` keys (``num_levels = len(ch_mult)``)."""
    out = {}
    for key, value in state_dict.items():
        if key in DROPPED_KEYS:
            continue
        new = key
        m = re.match(r"(encoder|decoder)\.conv_blocks\.(\d+)\.(res|attn|downsample|upsample)(.*)", key)
        if m:
            part, index, child, rest = m.groups()
            level = int(index) if part == "encoder" else num_levels - 1 - int(index)
            new = f"{part}.{'down' if part == 'encoder' else 'up'}.{level}.{'block' if child == 'res' else child}{rest}"
        m = re.match(r"(encoder|decoder)\.mid\.([012])\.(.*)", key)
        if m:
            new = f"{m[1]}.mid.{_MID[m[2]]}.{m[3]}"
        out[new] = value
    return out


def _read_state_dict(checkpoint) -> dict[str, Tensor]:
    if isinstance(checkpoint, (str, Path)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise ValueError("checkpoint must be a LlamaGen VQModel state dict or a {'model': state_dict} container")
    return checkpoint


def load_llamagen_vq(checkpoint, model_args: dict | None = None, encoder_decoder: dict | None = None,
                     image_size: int = 256) -> VQTokenizer:
    """A :class:`VQTokenizer` (eval mode) holding a LlamaGen VQModel checkpoint.

    Args:
        checkpoint: path to the ``.pt`` file, or the loaded container / state dict.
        model_args, encoder_decoder, image_size: as :func:`vq_config_from_llamagen`.

    Raises:
        ValueError: naming missing, unexpected and mis-shaped keys when the checkpoint does not fit the config.
    """
    config = vq_config_from_llamagen(model_args, encoder_decoder, image_size)
    model = VQTokenizer(**config)
    state = convert_llamagen_vq_state_dict(_read_state_dict(checkpoint), len(config["ch_mult"]))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or mis_shaped:
        raise ValueError(f"LlamaGen VQ checkpoint does not fit the config {config}: missing keys {missing}, "
                         f"unexpected keys {unexpected}, mis-shaped keys {mis_shaped}")
    model.load_state_dict(state, strict=True)
    return model.eval()


__all__ = ["convert_llamagen_vq_state_dict", "load_llamagen_vq", "vq_config_from_llamagen"]
