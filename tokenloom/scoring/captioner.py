"""A caption scorer: how likely is this prompt as a caption of this image? Used to rerank a generator's candidates.

``score(images, prompts)`` is ``log p(prompt | image)`` under a small captioner: a CNN turns the image into an
``h/2^s × w/2^s`` grid of tokens, and a decoder-only transformer reads them as a prefix (bidirectional among
themselves) before predicting the prompt's BPE tokens left to right. Trained by plain teacher-forced captioning
on (image, caption) pairs: no negatives to mine, no contrastive batch.

Why a captioner and not a CLIP-style matcher: reranking compares *images* for one fixed prompt, so
``argmax_x log p(c | x)`` is exactly the right criterion (the caption's prior ``p(c)`` is the same for every
candidate). Generative scores are known to be compositional where dual encoders act as bags of words (Lin et
al., "Revisiting the role of language priors in vision-language models", 2023): to give "a red circle and a
blue square" a high likelihood the model must see a red circle *and* a blue square, so swapped colours, a
missing object, a wrong count or a wrong relation all cost probability. A binary image–text matcher trained
here first stayed at chance for hundreds of steps; the captioner learns from the first steps.

Tokens: open_clip's BPE (no download) with a compact vocabulary (:func:`compact_id_table`).
Shapes: ``images: [B, 3, H, W]`` in ``[-1, 1]``, ``ids: [B, Lc]`` → ``logits: [B, Lc - 1, V]`` (token ``t+1``
predicted at position ``t``); :meth:`score` → ``[B]``.
"""

from __future__ import annotations

import open_clip
import torch
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn
from torch.nn import functional as F

from tokenloom.conditioning.openclip_text import check_prompts, compact_id_table
from tokenloom.generators.layers.block import TransformerBlock
from tokenloom.generators.layers.masks import prefix_mask
from tokenloom.modeling import TokenloomModel
from tokenloom.scoring import register


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    groups = min(8, c_out)
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.GELU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.GELU())


@register("caption_scorer")
class CaptionScorer(TokenloomModel):
    """Image → caption log-likelihood (see the module docstring).

    Args:
        image_size: side of the (square) input images; the image grid is ``image_size / 2^(len(channels)-1)``.
        channels: CNN channels per stage; every stage after the first halves the resolution.
        width, layers, heads: the transformer over image and caption tokens.
        context_length: caption tokens (with ``<sot>``/``<eot>``; longer prompts are truncated).
        token_ids: compact vocabulary (the BPE ids to keep; others share ``<unk>``), None = all 49,408.
    """

    @register_to_config
    def __init__(self, image_size: int = 32, channels: tuple[int, ...] = (16, 32, 64, 128), width: int = 128,
                 layers: int = 3, heads: int = 4, context_length: int = 16, token_ids: list[int] | None = None):
        super().__init__()
        if not channels:
            raise ValueError("channels must name at least one stage, got an empty list")
        scale = 2 ** (len(channels) - 1)
        if image_size % scale:
            raise ValueError(f"image_size={image_size} must be divisible by 2^(len(channels)-1) = {scale}")
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=context_length)
        table, vocab_size = compact_id_table(token_ids, self.tokenizer.sot_token_id, self.tokenizer.eot_token_id)
        self.register_buffer("id_table", table, persistent=False)
        stages, c_in = [], 3
        for i, c in enumerate(channels):
            if i:
                stages.append(nn.Conv2d(c_in, c_in, 3, stride=2, padding=1))
            stages.append(_conv_block(c_in, c))
            c_in = c
        self.cnn = nn.Sequential(*stages, nn.Conv2d(c_in, width, 1))
        self.num_image_tokens = (image_size // scale) ** 2
        self.image_pos = nn.Parameter(torch.randn(1, self.num_image_tokens, width) * 0.02)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.text_pos = nn.Parameter(torch.randn(1, context_length - 1, width) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp="gelu", norm="layer") for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def tokenize(self, prompts) -> Tensor:
        """Prompts → ``[B, Lc]`` compact ids (0 = padding after ``<eot>``)."""
        ids = self.tokenizer(check_prompts(prompts))
        return self.id_table[ids.to(self.id_table.device)]

    def forward(self, images: Tensor, ids: Tensor) -> Tensor:
        """``images: [B, 3, H, W]``, ``ids: [B, Lc]`` → next-token logits ``[B, Lc - 1, V]``."""
        x_BGC = self.cnn(images).flatten(2).transpose(1, 2) + self.image_pos
        t_BLC = self.token_embedding(ids[:, :-1]) + self.text_pos
        h = torch.cat([x_BGC, t_BLC], dim=1)
        g = x_BGC.shape[1]
        mask = prefix_mask(h.shape[1], g, device=h.device)
        for block in self.blocks:
            h = block(h, mask=mask)
        return self.head(self.norm(h[:, g:]))

    def token_log_probs(self, images: Tensor, ids: Tensor) -> Tensor:
        """``log p`` of each caption token after ``<sot>`` (0 at padding) → ``[B, Lc - 1]``."""
        logp = F.log_softmax(self(images, ids).float(), dim=-1)
        target = ids[:, 1:]
        return logp.gather(-1, target[..., None]).squeeze(-1) * (target != 0)

    def loss(self, images: Tensor, ids: Tensor) -> Tensor:
        """Mean negative log-likelihood per caption token (training objective)."""
        target = ids[:, 1:]
        return -self.token_log_probs(images, ids).sum() / (target != 0).sum().clamp(min=1)

    @torch.no_grad()
    def score(self, images: Tensor, prompts) -> Tensor:
        """``images: [B, 3, H, W]`` in ``[-1, 1]`` and one prompt per image → ``log p(prompt | image)`` ``[B]``."""
        prompts = check_prompts(prompts)
        if images.dim() != 4 or images.shape[1] != 3 or len(images) != len(prompts):
            raise ValueError(f"images must be [B, 3, H, W] with B = len(prompts) = {len(prompts)}, "
                             f"got {tuple(images.shape)}")
        size = self.config.image_size
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"images must be {size}x{size} for this scorer, got {tuple(images.shape[-2:])}")
        param = next(self.parameters())
        return self.token_log_probs(images.to(param.device, param.dtype), self.tokenize(prompts).to(param.device)
                                    ).sum(dim=1)


__all__ = ["CaptionScorer"]
