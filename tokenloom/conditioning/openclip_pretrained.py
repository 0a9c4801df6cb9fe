"""A frozen, pretrained open_clip text tower (architecture by name or config, weights from a local path).

``open_clip.create_model(name, pretrained=path)`` builds and loads the *whole* CLIP, image tower included, and
resolves unknown names against the Hugging Face Hub. A conditioner needs only the text tower and must never
download, so we build open_clip's own ``TextTransformer`` from the model config and load just its keys from the
checkpoint (open_clip's ``CLIP`` stores the text tower unprefixed, ``CustomTextCLIP`` under ``text.``; both load).
The tokenizer is open_clip's CLIP BPE, whose vocabulary ships inside the package.

A shorter ``context_length`` than the tower's (77 for CLIP) computes the same function for causal towers (position
``i`` only attends to positions ``<= i``, so the first ``Lc`` outputs do not depend on later ones); results agree
with the full-length tower up to float rounding (different matrix sizes), not bit for bit.
"""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path

import open_clip
import torch
from diffusers.configuration_utils import register_to_config
from open_clip.factory import load_state_dict
from open_clip.model import CLIPTextCfg, _build_text_tower
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import save_file
from torch import Tensor

from tokenloom.conditioning import register
from tokenloom.conditioning.base import (
    OUTPUTS,
    SAVE_MODES,
    PretrainedTextConditioner,
    check_choice,
    check_context_length,
    check_prompts,
    existing_path,
    pooled_as_condition_features,
)
from tokenloom.generators.condition import Condition
from tokenloom.modeling import _format_problems

# Weight files looked for, in order, when ``pretrained`` is a folder (open_clip's Hub layout first).
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
                "pytorch_model.bin", "open_clip_text.safetensors")
FOLDER_CONFIG = "open_clip_config.json"
COPY_FILE = "open_clip_text.safetensors"
_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection", "cls_emb")


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise ValueError(f"pretrained folder {str(path)!r} holds none of the weight files {list(WEIGHT_FILES)}")


def resolve_model_cfg(model_name: str | None, model_cfg: dict | None, pretrained: Path) -> dict:
    """The open_clip model config: ``model_cfg`` if given, else the built-in config of ``model_name``, else the
    ``open_clip_config.json`` of a ``pretrained`` folder."""
    if model_cfg is not None:
        if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("text_cfg"), dict):
            raise ValueError(f"model_cfg must be an open_clip model config dict with a 'text_cfg' dict, got "
                             f"{model_cfg!r}")
        return deepcopy(model_cfg)
    if model_name is not None:
        if not isinstance(model_name, str) or model_name.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(f"model_name must be a built-in open_clip architecture name such as 'ViT-B-32' "
                             f"(for a local open_clip folder pass pretrained=<folder>), got {model_name!r}")
        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            raise ValueError(f"model_name {model_name!r} is not a built-in open_clip architecture; available: "
                             f"{len(open_clip.list_models())} names such as {open_clip.list_models()[:5]} "
                             "(see open_clip.list_models())")
        return cfg
    folder_cfg = (pretrained if pretrained.is_dir() else pretrained.parent) / FOLDER_CONFIG
    if folder_cfg.is_file():
        cfg = json.loads(folder_cfg.read_text())
        return cfg.get("model_cfg", cfg)
    raise ValueError(f"open_clip architecture unknown: pass model_name (e.g. 'ViT-B-32') or model_cfg, or a "
                     f"pretrained folder with {FOLDER_CONFIG} (got pretrained={str(pretrained)!r})")


def text_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The text-tower entries of an open_clip checkpoint, keyed as ``TextTransformer`` keys them."""
    if "token_embedding.weight" not in state and "text.token_embedding.weight" in state:
        state = {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    return {k: v for k, v in state.items() if k.startswith(_TEXT_KEYS)}


@register("openclip_pretrained")
class OpenCLIPTextEncoder(PretrainedTextConditioner):
    """Prompts → features of a pretrained open_clip text tower (frozen).

    ``encode(prompts)`` gives ``features: [B, Lc, width]`` (the final-LayerNorm outputs of every position) and
    ``mask: [B, Lc]`` (False on padding), or with ``output="pooled"`` the projected pooled embedding
    ``[B, 1, embed_dim]`` (what ``CLIP.encode_text`` returns, unnormalised).

    Args:
        pretrained: a checkpoint file (``.safetensors``, or ``.bin``/``.pt`` read with ``weights_only=True``) or a
            folder holding one of ``WEIGHT_FILES`` (e.g. an open_clip Hub snapshot). Must exist: nothing downloads.
        model_name: a built-in open_clip architecture (``open_clip.list_models()``), e.g. ``"ViT-B-32"``.
        model_cfg: an open_clip model config dict (``{"embed_dim": ..., "text_cfg": {...}, ...}``); overrides
            ``model_name``. With neither, the folder's ``open_clip_config.json`` is read. The resolved config is
            stored in this model's config, so a saved folder does not depend on open_clip's name table.
        context_length: tokens per prompt ``Lc`` (padded with 0); None = the tower's own (77 for CLIP).
        truncation: cut prompts longer than ``Lc`` (keeping the end token, as open_clip does); False raises.
        output: ``"tokens"`` or ``"pooled"``.
        save_mode: ``"copy"`` (weights copied into saved folders) or ``"reference"`` (path recorded).
    """

    @register_to_config
    def __init__(
        self,
        pretrained: str | None = None,
        model_name: str | None = None,
        model_cfg: dict | None = None,
        context_length: int | None = None,
        truncation: bool = True,
        output: str = "tokens",
        save_mode: str = "copy",
    ):
        super().__init__()
        check_choice("output", output, OUTPUTS)
        check_choice("save_mode", save_mode, SAVE_MODES)
        if not isinstance(truncation, bool):
            raise TypeError(f"truncation must be a bool, got {truncation!r}")
        path = existing_path(pretrained)
        cfg = resolve_model_cfg(model_name, model_cfg, path)
        text_cfg = CLIPTextCfg(**cfg["text_cfg"])
        if text_cfg.hf_model_name or text_cfg.hf_tokenizer_name:
            raise ValueError(f"open_clip text towers built on Hugging Face models/tokenizers are not supported here "
                             f"(text_cfg names {text_cfg.hf_model_name or text_cfg.hf_tokenizer_name!r}); use the "
                             "'transformers_text' conditioner with a local folder")
        if text_cfg.embed_cls:
            raise ValueError("open_clip text towers with a class token (CoCa, embed_cls=True) are not supported")
        full_length = text_cfg.context_length
        if context_length is None:
            context_length = full_length
        check_context_length(context_length, full_length)
        if context_length != full_length and text_cfg.no_causal_mask:
            raise ValueError(f"context_length {context_length} differs from the tower's {full_length}, which is only "
                             "exact for causal text towers; this one is bidirectional (no_causal_mask)")
        self.register_to_config(model_cfg=cfg, context_length=context_length)

        text_cfg.context_length = context_length
        text_cfg.output_tokens = True
        self.text = _build_text_tower(int(cfg["embed_dim"]), text_cfg, quick_gelu=bool(cfg.get("quick_gelu", False)))
        self._load(_weights_file(path), full_length)
        self.tokenizer = SimpleTokenizer(context_length=context_length, **(text_cfg.tokenizer_kwargs or {}))
        self._freeze()

    def _load(self, file: Path, full_length: int) -> None:
        try:
            state = load_state_dict(str(file), weights_only=True)
        except Exception as err:  # pickles that need code (TorchScript, arbitrary objects) are refused
            raise ValueError(f"could not read open_clip weights {str(file)!r} as safetensors or a weights-only "
                             f"torch checkpoint: {err}") from err
        state = text_state_dict(state)
        pos = state.get("positional_embedding")
        if pos is not None and pos.shape[0] == full_length:
            state["positional_embedding"] = pos[: self.config.context_length]
        want = self.text.state_dict()
        missing = set(want) - set(state)
        unexpected = set(state) - set(want)
        mismatched = [(k, state[k].shape, want[k].shape) for k in set(want) & set(state)
                      if state[k].shape != want[k].shape]
        if missing or unexpected or mismatched:
            raise ValueError(_format_problems(f"open_clip text tower from {str(file)!r}", missing, unexpected,
                                              mismatched))
        self.text.load_state_dict(state)

    @property
    def feature_dim(self) -> int:
        if self.config.output == "tokens":
            return self.text.width
        return self.text.output_dim if self.text.text_projection is not None else self.text.width

    def tokenize(self, prompts) -> Tensor:
        """Prompts → ``[B, Lc]`` long ids (0 = padding)."""
        prompts = check_prompts(prompts)
        lc = self.config.context_length
        if not self.config.truncation and self.tokenizer.reduction_fn is None:
            for p in prompts:
                n = len(self.tokenizer.encode(p)) + 2
                if n > lc:
                    raise ValueError(f"prompt {p!r} has {n} tokens, more than context_length={lc}, and "
                                     "truncation=False")
        return self.tokenizer(prompts, context_length=lc)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``ids: [B, Lc]`` → (features ``[B, Lc, width]``, mask ``[B, Lc]`` bool, pooled ``[B, embed_dim]``)."""
        pooled, tokens = self.text(ids)
        return tokens, ids != self.text.pad_id, pooled

    @torch.no_grad()
    def encode(self, prompts) -> Condition:
        """Prompts → a :class:`Condition` (per-token or pooled features, see the class docstring)."""
        features, mask, pooled = self(self.tokenize(prompts).to(self.device))
        if self.config.output == "pooled":
            features, mask = pooled_as_condition_features(pooled)
        return Condition(features=features, mask=mask)

    def _copy_weights(self, folder: Path) -> dict[str, str]:
        state = {k: v.detach().contiguous().cpu() for k, v in self.text.state_dict().items()}
        save_file(state, str(folder / COPY_FILE))
        return {"pretrained": COPY_FILE}
