"""CLIP score with open_clip: how well images match their captions.

Per image: ``100 · max(cos(image embedding, caption embedding), 0)`` — the definition of
torchmetrics' ``CLIPScore`` (Hessel et al. 2021 use ``2.5 · max(cos, 0)``; multiply by 0.025 to
convert). The reported value is the mean over images, in ``[0, 100]``, labelled with the open_clip
model and weights file.

Weights come from a local file only (``open_clip.create_model_and_transforms(name,
pretrained=<path>)``); a missing path is a clear error before open_clip is asked anything, so no
download is ever attempted. :meth:`CLIPScorer.from_model` wraps a model you built yourself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor


@dataclass(frozen=True)
class CLIPScoreResult:
    """Mean CLIP score over ``n`` image-caption pairs and the model that computed it."""

    value: float
    model: str
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"CLIP score {self.value:.4f} (open_clip {self.model}, {self.n} images)"


def _to_pil(images) -> list[Image.Image]:
    """Float ``[B, 3, H, W]`` in [-1, 1] or a list of PIL images → list of RGB PIL images."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images of shape {tuple(images.shape)}: expected [B, 3, H, W] in [-1, 1]")
        arrays = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [Image.fromarray(a) for a in arrays.permute(0, 2, 3, 1).numpy()]
    if isinstance(images, (list, tuple)) and all(isinstance(im, Image.Image) for im in images):
        return [im.convert("RGB") for im in images]
    raise TypeError(
        f"images must be a [B, 3, H, W] tensor in [-1, 1] or a list of PIL images, got {type(images)}"
    )


class CLIPScorer:
    """An open_clip model, its preprocessing and tokenizer; call it on images and captions.

    Args:
        model_name: an open_clip architecture name (e.g. ``"ViT-B-32"``).
        pretrained: path of a local weights file for that architecture (required).
        device: where to run.
    """

    def __init__(self, model_name: str, pretrained: str | os.PathLike, device: torch.device | str = "cpu"):
        import open_clip

        if pretrained is None:
            raise ValueError("pretrained=None: CLIP score needs a local weights file (nothing is downloaded)")
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(
                f"open_clip weights for {model_name!r} not found at {str(path)!r}; pass a "
                "local file (nothing is downloaded)"
            )
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(path), device=device
        )
        self._init(model, preprocess, open_clip.get_tokenizer(model_name), f"{model_name}:{path.name}")

    @classmethod
    def from_model(cls, model, preprocess: Callable, tokenizer: Callable, name: str) -> CLIPScorer:
        """Wrap an already built open_clip model (e.g. a randomly initialised one in tests)."""
        scorer = cls.__new__(cls)
        scorer._init(model, preprocess, tokenizer, name)
        return scorer

    def _init(self, model, preprocess, tokenizer, name: str) -> None:
        self.model, self.preprocess, self.tokenizer, self.name = model.eval(), preprocess, tokenizer, name
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, images, captions: Sequence[str]) -> Tensor:
        """Per-pair scores ``[B]`` in [0, 100]: images (``[B, 3, H, W]`` in [-1, 1] or PIL), captions."""
        pil = _to_pil(images)
        if isinstance(captions, str) or len(captions) != len(pil):
            raise ValueError(
                f"captions must be a list of {len(pil)} strings (one per image), got {captions!r}"
            )
        pixels = torch.stack([self.preprocess(im) for im in pil]).to(self.device)
        img = self.model.encode_image(pixels).float()
        txt = self.model.encode_text(self.tokenizer(list(captions)).to(self.device)).float()
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        return (100 * cos).clamp(min=0).cpu()


def clip_score(images, captions: Sequence[str], scorer: CLIPScorer, batch_size: int = 64) -> CLIPScoreResult:
    """Mean CLIP score of image-caption pairs (batched)."""
    if not isinstance(scorer, CLIPScorer):
        raise TypeError(f"scorer must be a CLIPScorer, got {type(scorer).__name__}")
    n = len(images)
    if n == 0:
        raise ValueError("images is empty")
    scores = torch.cat(
        [scorer(images[i : i + batch_size], captions[i : i + batch_size]) for i in range(0, n, batch_size)]
    )
    return CLIPScoreResult(value=float(scores.mean()), model=scorer.name, n=n)
