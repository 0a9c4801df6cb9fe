"""Reconstruction quality of a tokenizer: PSNR, SSIM, codebook usage and perplexity over a data set.

Conventions: images are ``[B, 3, H, W]`` in ``[-1, 1]``; metrics are computed on the ``[0, 1]`` scale
(``(x + 1) / 2``, reconstructions clamped), PSNR and SSIM per image and then averaged over images.
SSIM uses an 11×11 Gaussian window (σ = 1.5), constants ``(0.01)²`` and ``(0.03)²``, "valid" borders,
averaged over channels (Wang et al. 2004); images smaller than the window use a window of their size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from tokenloom.tokens import Sequence, Tokens

MIN_MSE = 1e-10


def _to_unit(images: Tensor) -> Tensor:
    return ((images.float().clamp(-1, 1) + 1) / 2)


def _check_pair(a: Tensor, b: Tensor) -> None:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"images must be torch.Tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"images must be two [B, C, H, W] tensors of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def psnr(reconstructions: Tensor, images: Tensor) -> Tensor:
    """Per-image PSNR in dB on the ``[0, 1]`` scale: ``[B, C, H, W]`` × 2 → ``[B]``.

    The MSE is floored at 1e-10, so identical images score 100 dB instead of infinity.
    """
    _check_pair(reconstructions, images)
    mse = (_to_unit(reconstructions) - _to_unit(images)).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp(min=MIN_MSE))


def _gaussian_window(size: int, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(reconstructions: Tensor, images: Tensor, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM on the ``[0, 1]`` scale (Gaussian window, valid borders): ``[B, C, H, W]`` × 2 → ``[B]``."""
    _check_pair(reconstructions, images)
    x, y = _to_unit(reconstructions), _to_unit(images)
    c = x.shape[1]
    size = min(window_size, x.shape[-2], x.shape[-1])
    g = _gaussian_window(size, sigma).to(x.device)
    window = (g[:, None] * g[None, :]).expand(c, 1, size, size).contiguous()

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, window, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def code_usage(counts: Tensor) -> dict[str, float]:
    """``counts: [depth, K]`` (or ``[K]``) code histogram → usage (fraction of codes seen, mean over depth)
    and perplexity (``exp(entropy)`` of the code distribution, mean over depth)."""
    counts = counts.reshape(-1, counts.shape[-1]).double()
    probs = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    entropy = -(probs * probs.clamp(min=1e-300).log()).sum(dim=1)
    return {"codebook_usage": float((counts > 0).double().mean(dim=1).mean()),
            "perplexity": float(entropy.exp().mean())}


def _images_of(batch) -> Tensor:
    if isinstance(batch, dict):
        return batch["image"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


@torch.no_grad()
def evaluate_reconstruction(tokenizer, dataset, batch_size: int = 64, progress: bool = True,
                            device: torch.device | str | None = None) -> dict[str, float]:
    """Encode and decode every image of ``dataset`` and average the metrics.

    Args:
        tokenizer: an :class:`~tokenloom.tokenizers.ImageTokenizer` (``encode``/``decode``).
        dataset: items are dicts with ``"image"`` ``[3, H, W]`` in ``[-1, 1]`` (or tensors / tuples of them).
        batch_size: images per forward pass.

    Returns:
        ``{"psnr", "ssim", "num_images"}`` plus ``"codebook_usage"`` and ``"perplexity"`` over all tokens
        of the data set when the tokens are ``index`` tokens.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty; nothing to evaluate")
    was_training = tokenizer.training
    tokenizer.eval()
    device = torch.device(device) if device is not None else next(tokenizer.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    spec = tokenizer.spec
    counts = torch.zeros(spec.depth, spec.vocab_size, dtype=torch.long) if spec.kind == "index" else None
    psnrs, ssims = [], []
    try:
        for batch in tqdm(loader, desc="reconstruction", disable=not progress):
            images = _images_of(batch).to(device)
            tokens: Tokens = tokenizer.encode(images)
            recon = tokenizer.decode(tokens)
            psnrs.append(psnr(recon, images).cpu())
            ssims.append(ssim(recon, images).cpu())
            if counts is not None:
                data = tokens.data.reshape(-1, spec.depth).cpu()
                for level in range(spec.depth):
                    counts[level] += torch.bincount(data[:, level], minlength=spec.vocab_size)
    finally:
        tokenizer.train(was_training)
    values = torch.cat(psnrs)
    out = {"psnr": float(values.mean()), "ssim": float(torch.cat(ssims).mean()), "num_images": int(values.numel())}
    if counts is not None:
        out.update(code_usage(counts))
    return out


def prefix_lengths(length: int) -> list[int]:
    """``1, 2, 4, ..., length`` (powers of two below ``length``, then ``length`` itself)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    out, k = [], 1
    while k < length:
        out.append(k)
        k *= 2
    return out + [length]


@torch.no_grad()
def evaluate_prefixes(tokenizer, dataset, lengths: list[int] | None = None, batch_size: int = 64,
                      progress: bool = True, device: torch.device | str | None = None) -> dict[int, dict[str, float]]:
    """PSNR and SSIM of decoding only the first ``k`` tokens, for each ``k`` in ``lengths``.

    For tokenizers with a :class:`~tokenloom.tokens.Sequence` layout (FlexTok-style), whose ``decode`` accepts any
    prefix. Each image is encoded once (all ``N`` tokens); ``tokens.data[:, :k]`` is decoded for every ``k``.

    Args:
        lengths: prefix lengths in ``1..N``; None = :func:`prefix_lengths` ``(N)`` = ``1, 2, 4, ..., N``.

    Returns:
        ``{k: {"psnr", "ssim", "num_images"}}`` (means over images, as :func:`evaluate_reconstruction`).
    """
    spec = tokenizer.spec
    if not isinstance(spec.layout, Sequence):
        raise ValueError(f"evaluate_prefixes needs a tokenizer with a Sequence layout, got layout {spec.layout}")
    lengths = prefix_lengths(spec.length) if lengths is None else list(lengths)
    bad = [k for k in lengths if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= spec.length]
    if not lengths or bad:
        raise ValueError(f"lengths must be ints in [1, {spec.length}], got {lengths!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty; nothing to evaluate")
    was_training = tokenizer.training
    tokenizer.eval()
    device = torch.device(device) if device is not None else next(tokenizer.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    psnrs: dict[int, list[Tensor]] = {k: [] for k in lengths}
    ssims: dict[int, list[Tensor]] = {k: [] for k in lengths}
    try:
        for batch in tqdm(loader, desc="prefix reconstruction", disable=not progress):
            images = _images_of(batch).to(device)
            tokens: Tokens = tokenizer.encode(images)
            for k in lengths:
                recon = tokenizer.decode(Tokens(tokens.data[:, :k], tokens.spec))
                psnrs[k].append(psnr(recon, images).cpu())
                ssims[k].append(ssim(recon, images).cpu())
    finally:
        tokenizer.train(was_training)
    return {k: {"psnr": float(torch.cat(psnrs[k]).mean()), "ssim": float(torch.cat(ssims[k]).mean()),
                "num_images": int(torch.cat(psnrs[k]).numel())} for k in lengths}


__all__ = ["code_usage", "evaluate_prefixes", "evaluate_reconstruction", "prefix_lengths", "psnr", "ssim"]
