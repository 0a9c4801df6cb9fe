"""A text conditioner built from open_clip's text tower, trainable from scratch.

open_clip gives the BPE tokenizer (its vocabulary ships inside the package: no download) and
the ``TextTransformer`` architecture. We add one thing open_clip lacks: an optional *compact
vocabulary*. A from-scratch model for a small caption set needs only the BPE ids its captions use;
keeping the full 49,408-row embedding table would make a tiny model mostly embedding. With
``token_ids`` set, BPE ids are remapped to rows of a small table (unknown ids share one row) and the
end-of-text id keeps the largest index, so open_clip's argmax pooling still finds it.
"""

from __future__ import annotations

from collections.abc import Iterable

import open_clip
import torch
from diffusers.configuration_utils import register_to_config
from open_clip.transformer import TextTransformer
from torch import Tensor

from tokenloom.conditioning import register
from tokenloom.conditioning.base import (
    OUTPUTS,
    TextConditioner,
    check_choice,
    check_prompts,
    pooled_as_condition_features,
)
from tokenloom.generators.condition import Condition

# check_prompts: kept importable from here for pipelines
__all__ = ["OpenCLIPTextConditioner", "caption_token_ids", "check_prompts", "compact_id_table"]


def caption_token_ids(captions: Iterable[str], tokenizer_name: str = "ViT-B-32", context_length: int = 16
                      ) -> list[int]:
    """The sorted BPE ids ``captions`` use (truncated to ``context_length``): a compact vocabulary's ``token_ids``."""
    tok = open_clip.get_tokenizer(tokenizer_name, context_length=context_length)
    return torch.unique(tok(list(captions))).tolist()


def compact_id_table(token_ids, sot: int, eot: int) -> tuple[Tensor, int]:
    """BPE id → row of a compact table keeping ``token_ids`` (None: keep all) → ``(table [eot + 1], rows)``.

    Row 0 is padding, then the kept ids, then one shared ``<unk>``, ``<sot>``, and ``<eot>`` last (so open_clip's
    argmax pooling still finds it).
    """
    if token_ids is None:
        return torch.arange(eot + 1), eot + 1
    keep = sorted(set(int(t) for t in token_ids) - {0, sot, eot})
    table = torch.full((eot + 1,), len(keep) + 1, dtype=torch.long)
    table[0] = 0
    table[torch.tensor(keep, dtype=torch.long)] = torch.arange(1, len(keep) + 1)
    table[sot] = len(keep) + 2
    table[eot] = len(keep) + 3
    return table, len(keep) + 4


@register("openclip_text")
class OpenCLIPTextConditioner(TextConditioner):
    """Prompts → per-token features ``[B, Lc, C]``, a mask ``[B, Lc]`` and pooled features ``[B, C]``.

    Args:
        tokenizer_name: open_clip model name whose tokenizer to use (all share the CLIP BPE).
        context_length: tokens per prompt (padded/truncated), ``Lc``.
        width, heads, layers, mlp_ratio: text transformer size.
        token_ids: optional compact vocabulary (sorted BPE ids to keep); see the module docstring.
        output: ``"tokens"`` (per-token features ``[B, Lc, width]``) or ``"pooled"`` (``[B, 1, width]``).
    """

    @register_to_config
    def __init__(
        self,
        tokenizer_name: str = "ViT-B-32",
        context_length: int = 16,
        width: int = 128,
        heads: int = 4,
        layers: int = 2,
        mlp_ratio: float = 4.0,
        token_ids: list[int] | None = None,
        output: str = "tokens",
    ):
        super().__init__()
        check_choice("output", output, OUTPUTS)
        self.tokenizer = open_clip.get_tokenizer(tokenizer_name, context_length=context_length)
        sot, eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        table, vocab_size = compact_id_table(token_ids, sot, eot)
        self.register_buffer("id_table", table, persistent=False)
        self.text = TextTransformer(
            context_length=context_length,
            vocab_size=vocab_size,
            width=width,
            heads=heads,
            layers=layers,
            mlp_ratio=mlp_ratio,
            output_dim=width,
            output_tokens=True,
            eos_id=int(table[eot]),
        )

    @classmethod
    def for_captions(cls, captions: Iterable[str], **config) -> OpenCLIPTextConditioner:
        """A conditioner whose compact vocabulary covers the BPE ids of ``captions``."""
        ids = caption_token_ids(captions, config.get("tokenizer_name", "ViT-B-32"), config.get("context_length", 16))
        return cls(token_ids=ids, **config)

    @property
    def feature_dim(self) -> int:
        return self.config.width

    def tokenize(self, prompts) -> Tensor:
        """Prompts → ``[B, Lc]`` long ids (remapped to this model's vocabulary)."""
        ids = self.tokenizer(check_prompts(prompts))
        return self.id_table[ids.to(self.id_table.device)]

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``ids: [B, Lc]`` → (features ``[B, Lc, C]``, mask ``[B, Lc]`` bool, pooled ``[B, C]``)."""
        pooled, tokens = self.text(ids)
        mask = ids != 0
        # open_clip's output_tokens omits nothing here (no cls token): tokens is [B, Lc, width].
        return tokens, mask, pooled

    def encode(self, prompts) -> Condition:
        """Prompts → a :class:`Condition`: per-token features and mask, or pooled features (``output``)."""
        features, mask, pooled = self(self.tokenize(prompts).to(self.device))
        if self.config.output == "pooled":
            features, mask = pooled_as_condition_features(pooled)
        return Condition(features=features, mask=mask)
