"""Images and masks in, as diffusers takes them; token masks out.

Images: a ``PIL.Image``, a numpy array ``[H, W, 3]`` / ``[B, H, W, 3]`` (uint8 in 0..255 or float in [0, 1]), a torch
tensor ``[3, H, W]`` / ``[B, 3, H, W]`` (float in [0, 1]), or a list of any of these → ``[B, 3, H, W]`` float in
``[-1, 1]``, the tokenizers' range.

Masks (diffusers' inpainting convention): **white / 1 / True = repaint, black / 0 / False = keep**. A ``PIL.Image``
(converted to grey, > 127 = repaint), a numpy array or torch tensor ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``
(bool, or numbers: > 0.5 = repaint), or a list of them → ``[B, H, W]`` bool, True = repaint.

Token masks: a token is **known** (kept) when every pixel of its patch is kept; a token whose patch touches the
repaint region is generated. A patch is the pixel region a token covers: on a ``Grid(h, w)`` of an ``H × W`` image,
``H/h × W/w`` pixels; on each scale of a ``Scales`` layout, the cells of ``adaptive_max_pool2d`` (rows
``floor(i·H/h) .. ceil((i+1)·H/h)``), so a coarse token is known only if its whole (larger) region is.
``Sequence`` layouts (1D tokenizers) have no patches and are refused.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from tokenloom.tokens import Grid, Scales, TokenSpec


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _image_tensor(item, name: str) -> Tensor:
    """One entry → ``[B, 3, H, W]`` float in [0, 1]."""
    if isinstance(item, Image.Image):
        arr = np.asarray(item.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1)[None]
    if isinstance(item, np.ndarray):
        arr = item
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"{name} as a numpy array must be [H, W, 3] or [B, H, W, 3], got shape {item.shape}")
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"{name} as a numpy array must be uint8 (0..255) or float (0..1), got dtype {arr.dtype}")
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(0, 3, 1, 2)
    if isinstance(item, Tensor):
        t = item[None] if item.dim() == 3 else item
        if t.dim() != 4 or t.shape[1] != 3:
            raise ValueError(f"{name} as a tensor must be [3, H, W] or [B, 3, H, W], got shape {tuple(item.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} as a tensor must be float in [0, 1], got dtype {t.dtype}")
        return t.detach().float().cpu()
    raise TypeError(f"{name} must be a PIL.Image, a numpy array, a torch tensor or a list of them, "
                    f"got {type(item).__name__}")


def load_images(image, name: str = "image") -> Tensor:
    """Images in any accepted form (module docstring) → ``[B, 3, H, W]`` float in ``[-1, 1]``."""
    items = _as_list(image)
    if not items:
        raise ValueError(f"{name} must be an image or a non-empty list of images, got an empty list")
    parts = [_image_tensor(x, name) for x in items]
    sizes = {tuple(p.shape[-2:]) for p in parts}
    if len(sizes) > 1:
        raise ValueError(f"{name}: all images must have the same size, got sizes (H, W) {sorted(sizes)}")
    images = torch.cat(parts)
    lo, hi = float(images.min()), float(images.max())
    if not torch.isfinite(images).all() or lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{name} values must lie in [0, 1] (uint8 arrays and PIL images are scaled), got range "
                         f"[{lo:.3f}, {hi:.3f}]")
    return images.clamp(0, 1) * 2 - 1


def _mask_tensor(item, name: str) -> Tensor:
    """One entry → ``[B, H, W]`` bool, True = repaint."""
    if isinstance(item, Image.Image):
        return torch.from_numpy(np.asarray(item.convert("L")) > 127)[None]
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(np.ascontiguousarray(item))
    if not isinstance(item, Tensor):
        raise TypeError(f"{name} must be a PIL.Image, a numpy array, a torch tensor or a list of them (white/1 = "
                        f"repaint), got {type(item).__name__}")
    t = item
    if t.dim() == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3:
        raise ValueError(f"{name} must be [H, W], [B, H, W] or [B, 1, H, W], got shape {tuple(item.shape)}")
    return t.cpu() if t.dtype == torch.bool else t.cpu().float() > 0.5


def load_masks(mask, name: str = "mask_image") -> Tensor:
    """Masks in any accepted form (module docstring) → ``[B, H, W]`` bool, True = repaint."""
    items = _as_list(mask)
    if not items:
        raise ValueError(f"{name} must be a mask or a non-empty list of masks, got an empty list")
    parts = [_mask_tensor(x, name) for x in items]
    sizes = {tuple(p.shape[-2:]) for p in parts}
    if len(sizes) > 1:
        raise ValueError(f"{name}: all masks must have the same size, got sizes (H, W) {sorted(sizes)}")
    return torch.cat(parts)


def image_size(tokenizer, spec: TokenSpec) -> tuple[int, int]:
    """Pixel size ``(H, W)`` whose tokens fill ``spec``'s layout."""
    size = getattr(tokenizer, "image_size", None)
    if isinstance(size, int):
        return size, size
    f = getattr(tokenizer, "downsample_factor", None)
    layout = spec.layout
    if isinstance(layout, Grid) and f:
        return layout.h * f, layout.w * f
    if isinstance(layout, Scales) and f:
        return layout.sizes[-1][0] * f, layout.sizes[-1][1] * f
    raise ValueError(f"cannot tell the image size of {type(tokenizer).__name__} (no image_size, layout {layout})")


def check_size(tensor: Tensor, size: tuple[int, int], name: str) -> None:
    if tuple(tensor.shape[-2:]) != tuple(size):
        h, w = tensor.shape[-2:]
        raise ValueError(f"{name} must be {size[0]}x{size[1]} pixels (H x W) for this model, got {h}x{w}; "
                         f"resize it first")


def known_token_mask(repaint: Tensor, spec: TokenSpec) -> Tensor:
    """``repaint: [B, H, W]`` bool (True = repaint) → ``[B, L]`` bool, True where the token's whole patch is kept."""
    layout = spec.layout
    grids = [(layout.h, layout.w)] if isinstance(layout, Grid) else \
        list(layout.sizes) if isinstance(layout, Scales) else None
    if grids is None:
        raise ValueError(f"editing needs tokens with a spatial layout (Grid or Scales); {layout} is 1D, so a token "
                         f"has no pixel patch to keep")
    r = repaint.float()[:, None]
    parts = [F.adaptive_max_pool2d(r, (h, w)).flatten(1) == 0 for h, w in grids]
    return torch.cat(parts, dim=1)


def to_pil(images: Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` in [0, 1] → PIL images."""
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


__all__ = ["check_size", "image_size", "known_token_mask", "load_images", "load_masks", "to_pil"]
