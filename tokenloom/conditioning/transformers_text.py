"""Hugging Face ``transformers`` text encoders (T5 and CLIP text models) from a local folder, frozen.

One conditioner for both families, because what differs is only which model class reads the folder and what
"pooled" means; the folder's ``config.json`` says which family it is:

* ``t5``, ``mt5``, ``umt5`` → ``T5EncoderModel`` (``MT5EncoderModel``, ``UMT5EncoderModel``); pooled = mean of
  the unmasked per-token features (T5 has no pooler).
* ``clip_text_model`` → ``CLIPTextModel``, or ``CLIPTextModelWithProjection`` when the folder's
  ``architectures`` say so; pooled = ``pooler_output`` (the end-token state) or the projected ``text_embeds``.
* ``clip`` (a whole CLIP folder, image tower included) → its text tower as ``CLIPTextModelWithProjection`` with
  the model's ``projection_dim``; pooled = ``text_embeds`` (what ``CLIPModel.get_text_features`` gives).

Everything is read with ``local_files_only=True``: a folder that lacks a file is a ValueError naming the folder,
and nothing is downloaded. ``transformers`` is imported only when such a conditioner is built, so the registry
(which imports every conditioner module) works without it; install it with ``pip install tokenloom[text]``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from diffusers.configuration_utils import register_to_config
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

FAMILIES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
            "clip_text_model": "CLIPTextModel", "clip": "CLIPTextModelWithProjection"}
COPY_FOLDER = "text_encoder"
_UNBOUNDED = 100_000  # tokenizers without a length limit report model_max_length ~1e30


def import_transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError as err:
        raise ImportError("the 'transformers_text' conditioner needs the transformers package: "
                          "pip install 'tokenloom[text]'") from err


def _model_class_name(config) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"pretrained folder holds a {model_type!r} model; the transformers_text conditioner reads "
                         f"model types {sorted(FAMILIES)} (T5 encoders and CLIP text models)")
    name = FAMILIES[model_type]
    if model_type == "clip_text_model" and "CLIPTextModelWithProjection" in (config.architectures or []):
        name = "CLIPTextModelWithProjection"
    return name


def masked_mean(features: Tensor, mask: Tensor) -> Tensor:
    """``features: [B, L, C]``, ``mask: [B, L]`` bool → ``[B, C]`` mean over the True positions."""
    w = mask.to(features.dtype)[..., None]
    return (features * w).sum(1) / w.sum(1).clamp_min(1)


@register("transformers_text")
class TransformersTextConditioner(PretrainedTextConditioner):
    """Prompts → features of a frozen transformers T5 encoder or CLIP text model read from a local folder.

    ``encode(prompts)`` gives ``features: [B, Lc, hidden]`` and the tokenizer's attention mask ``[B, Lc]`` (False
    on padding; the mask is also given to the encoder), or with ``output="pooled"`` one vector ``[B, 1, D]`` (see
    the module docstring for what "pooled" is per family).

    Args:
        pretrained: folder with the model's ``config.json`` and weights (``save_pretrained`` layout). Must exist.
        tokenizer_path: folder with the tokenizer files; None = ``pretrained`` (diffusers-style pipeline folders
            keep them apart, e.g. ``.../text_encoder`` and ``.../tokenizer``).
        context_length: tokens per prompt ``Lc`` (padded to it); None = the tokenizer's ``model_max_length``, or
            the model's position count when the tokenizer has no limit.
        truncation: cut longer prompts to ``Lc`` (the tokenizer keeps its end token); False raises instead.
        output: ``"tokens"`` or ``"pooled"``.
        hidden_layer: None = the model's final output (after its final layer norm); an int ``k`` = transformers'
            ``hidden_states[k]`` (e.g. ``-2``, the penultimate layer, as Stable Diffusion XL uses). Ignored for
            ``output="pooled"``.
        save_mode: ``"copy"`` (model + tokenizer copied into ``text_encoder/`` of saved folders) or
            ``"reference"`` (absolute paths recorded).
    """

    path_keys = ("pretrained", "tokenizer_path")

    @register_to_config
    def __init__(
        self,
        pretrained: str | None = None,
        tokenizer_path: str | None = None,
        context_length: int | None = None,
        truncation: bool = True,
        output: str = "tokens",
        hidden_layer: int | None = None,
        save_mode: str = "copy",
    ):
        super().__init__()
        check_choice("output", output, OUTPUTS)
        check_choice("save_mode", save_mode, SAVE_MODES)
        if not isinstance(truncation, bool):
            raise TypeError(f"truncation must be a bool, got {truncation!r}")
        path = existing_path(pretrained)
        if not (path / "config.json").is_file():
            raise ValueError(f"pretrained must be a transformers model folder with config.json, got {str(path)!r}")
        tok_path = existing_path(tokenizer_path if tokenizer_path is not None else pretrained, "tokenizer_path")
        transformers = import_transformers()

        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        model_cls = getattr(transformers, _model_class_name(config))
        extra = {}
        if config.model_type == "clip":  # a full CLIP folder: its text tower, projected to the shared dimension
            extra["config"] = config.text_config
            extra["config"].projection_dim = config.projection_dim
        try:
            model, info = model_cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True,
                                                    dtype=torch.float32, **extra)
        except (OSError, RuntimeError) as err:  # no weights file; weights of the wrong shape
            raise ValueError(f"could not read {model_cls.__name__} weights from pretrained {str(path)!r}: {err}") \
                from err
        missing, mismatched = info.get("missing_keys", ()), info.get("mismatched_keys", ())
        if missing or mismatched:
            raise ValueError(f"weights in {str(path)!r} do not fit {model_cls.__name__}: missing keys "
                             f"{sorted(missing)}, mis-shaped keys {sorted(mismatched)}")
        self.encoder = model
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"no tokenizer could be read from tokenizer_path {str(tok_path)!r}: {err}") from err
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer in {str(tok_path)!r} has no padding token; prompts cannot be batched")

        limit = getattr(model.config, "max_position_embeddings", None)  # CLIP: learned positions; T5: relative
        if context_length is None:
            context_length = self.tokenizer.model_max_length
            if context_length is None or context_length > _UNBOUNDED:
                if limit is None:
                    raise ValueError("context_length must be given: neither the tokenizer nor the model in "
                                     f"{str(path)!r} sets a length limit")
                context_length = limit
        check_context_length(context_length, limit)
        n_states = model.config.num_hidden_layers + 1  # embeddings + one per layer
        if hidden_layer is not None and (isinstance(hidden_layer, bool) or not isinstance(hidden_layer, int)
                                         or not -n_states <= hidden_layer < n_states):
            raise ValueError(f"hidden_layer must be None or an int in [{-n_states}, {n_states - 1}] (this model has "
                             f"{n_states} hidden states), got {hidden_layer!r}")
        self.register_to_config(context_length=context_length)
        self._freeze()

    def _tokenizer_fingerprint(self) -> str:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return repr(sorted(self.tokenizer.get_vocab().items()))
        state = json.loads(backend.to_str())
        for key in ("padding", "truncation"):  # set per call by tokenize(): not part of what the tokenizer is
            state.pop(key, None)
        return json.dumps(state, sort_keys=True)

    @property
    def feature_dim(self) -> int:
        cfg = self.encoder.config
        if self.config.output == "pooled" and hasattr(self.encoder, "text_projection"):
            return cfg.projection_dim
        return cfg.hidden_size

    def tokenize(self, prompts) -> tuple[Tensor, Tensor]:
        """Prompts → (ids ``[B, Lc]`` long, mask ``[B, Lc]`` bool)."""
        prompts = check_prompts(prompts)
        lc = self.config.context_length
        if not self.config.truncation:
            for p, ids in zip(prompts, self.tokenizer(prompts)["input_ids"]):
                if len(ids) > lc:
                    raise ValueError(f"prompt {p!r} has {len(ids)} tokens, more than context_length={lc}, and "
                                     "truncation=False")
        enc = self.tokenizer(prompts, padding="max_length", max_length=lc, truncation=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"].bool()

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``ids, mask: [B, Lc]`` → (features ``[B, Lc, hidden]``, mask ``[B, Lc]``, pooled ``[B, D]``)."""
        layer = self.config.hidden_layer
        out = self.encoder(input_ids=ids, attention_mask=mask.long(), output_hidden_states=layer is not None)
        features = out.last_hidden_state if layer is None else out.hidden_states[layer]
        if getattr(out, "text_embeds", None) is not None:
            pooled = out.text_embeds
        elif getattr(out, "pooler_output", None) is not None:
            pooled = out.pooler_output
        else:
            pooled = masked_mean(out.last_hidden_state, mask)
        return features, mask, pooled

    @torch.no_grad()
    def encode(self, prompts) -> Condition:
        """Prompts → a :class:`Condition` (per-token or pooled features, see the class docstring)."""
        ids, mask = self.tokenize(prompts)
        features, mask, pooled = self(ids.to(self.device), mask.to(self.device))
        if self.config.output == "pooled":
            features, mask = pooled_as_condition_features(pooled)
        return Condition(features=features, mask=mask)

    def _copy_weights(self, folder: Path) -> dict[str, str]:
        self.encoder.save_pretrained(str(folder / COPY_FOLDER))
        self.tokenizer.save_pretrained(str(folder / COPY_FOLDER))
        return {"pretrained": COPY_FOLDER, "tokenizer_path": None}
