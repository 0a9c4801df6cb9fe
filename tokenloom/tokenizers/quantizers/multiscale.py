"""Multi-scale residual quantisation (VAR's ``VectorQuantizer2``; Infinity's multi-scale BSQ with ``num_phi=0``).

A latent ``f: [B, D, H, W]`` is explained coarse to fine over a schedule of scales ``(h_k, w_k)``, the last one
``(H, W)``. With ``f_rest = f`` and ``f_hat = 0``, for each scale ``k`` (VAR's ``f_to_idxBl_or_fhat``):

1. ``z_k = area(f_rest, (h_k, w_k))`` (adaptive average pooling; the last scale takes ``f_rest`` itself);
2. quantise ``z_k`` with the per-scale quantiser → codes ``[B, h_k·w_k, C]`` and code vectors ``v_k``;
3. ``c_k = phi_k(up(v_k))``, ``up`` = ``upsample_mode`` interpolation to ``(H, W)`` (``"bicubic"`` in VAR,
   ``"bilinear"`` in Infinity; the last scale is not resampled);
4. ``f_hat += c_k``, ``f_rest -= c_k``.

``phi_k(h) = (1 − r)·h + r·conv3x3(h)`` with ``r = phi_ratio`` (VAR's ``quant_resi``). ``num_phi`` convolutions are
shared over the scales: scale ``k`` uses the conv whose tick is nearest to ``k / (K − 1)``, ticks =
``numpy.linspace(1/(3n), 1 − 1/(3n), n)`` when ``n = 4`` else ``linspace(1/(2n), 1 − 1/(2n), n)``, all in float64
as VAR computes them (so for ``K = 10``, ``n = 4`` the map is ``[0,0,1,1,1,2,2,3,3,3]``: float64 rounding puts
scales 2 and 7 strictly nearer the *later* tick). ``phi_index`` overrides the map (VAR's non-shared variant,
``share_quant_resi=0``, always uses the ``1/(2n)`` ticks). ``num_phi=0`` or ``phi_ratio=0`` = no refinement.

Training loss (VAR): ``mean_k [beta·||sg(f_hat_k) − f||² + ||f_hat_k − sg(f)||²] + mean_k quantiser loss_k`` where
``f_hat_k`` is the running sum after scale ``k``; the output is straight-through, ``f + sg(f_hat − f)``.

Per-scale quantiser protocol (an ``nn.Module``): ``code_dim`` (``D``), ``token_channels`` (``C``: 1 for indices,
``d`` for bits), ``quantize_scale(z: [B, D, h, w]) -> ScaleQuantized`` and
``codes_to_latent(codes: [B, h·w, C], h, w) -> [B, D, h, w]``. :class:`VQScaleQuantizer` adapts
:class:`~tokenloom.tokenizers.quantizers.vq.VectorQuantizer` (nearest code through ``tokenloom.kernels``, raw
codebook rows as VAR, optional EMA and dead-code restarts); LFQ/BSQ quantisers implement it directly.

What a next-scale generator needs (all ``codes`` are the flattened token data ``[B, L, C]``, scale after scale):

* :meth:`MultiScaleResidualQuantizer.teacher_inputs` (teacher forcing, VAR's ``idxBl_to_var_input``):
  for ``k = 0 .. K−2``, ``f_hat += c_k`` and append ``area(f_hat, scale k+1)`` flattened → ``[B, L − h_0·w_0, D]``.
* :meth:`MultiScaleResidualQuantizer.next_input` (one sampling step, VAR's
  ``get_next_autoregressive_input``): ``(f_hat, k, codes_k: [B, h_k·w_k, C]) -> (f_hat + c_k, next)`` where
  ``next`` is ``area(f_hat, scale k+1)`` flattened to ``[B, h_{k+1}·w_{k+1}, D]``, or ``None`` after the last
  scale (then decode ``f_hat``).
* :meth:`MultiScaleResidualQuantizer.quantize_residual` (``(f_rest, k) -> codes_k``, Infinity's bitwise
  self-correction re-quantises what earlier, corrupted scales left over).
* :meth:`MultiScaleResidualQuantizer.codes_to_f_hat` (``idxBl_to_img``'s latent) and
  :meth:`MultiScaleResidualQuantizer.code_vectors` (per-token code vectors ``[B, L, D]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenloom.tokenizers.quantizers.vq import VectorQuantizer

UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest")
PHI_RATIO_EPS = 1e-6  # VAR: |quant_resi| <= 1e-6 means no refinement conv


@dataclass
class ScaleQuantized:
    """One scale's quantisation.

    Attributes:
        values: ``[B, D, h, w]`` code vectors entering ``f_hat`` (differentiable as the quantiser wants:
            w.r.t. the codebook for VQ, straight-through w.r.t. the input for LFQ/BSQ).
        codes: ``[B, h*w, C]`` long tokens of this scale, row-major.
        loss: scalar extra loss of this scale (entropy/commitment for bits; zero for VQ).
        logs: scalar diagnostics.
    """

    values: Tensor
    codes: Tensor
    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class MultiScaleOutput:
    """What :meth:`MultiScaleResidualQuantizer.forward` returns.

    Attributes:
        f_hat: ``[B, D, H, W]`` quantised latent, straight-through (value ``f_hat``, gradient → ``f``).
        codes: ``[B, L, C]`` long tokens, scale after scale.
        loss: scalar VAR loss plus the mean per-scale quantiser loss.
        logs: scalar diagnostics (means over scales).
    """

    f_hat: Tensor
    codes: Tensor
    loss: Tensor
    logs: dict[str, Tensor]


def phi_index_per_scale(num_scales: int, num_phi: int) -> list[int]:
    """Which of ``num_phi`` shared convs each of ``num_scales`` scales uses (VAR's ``PhiPartiallyShared``).

    Ticks and the query ``k / (K − 1)`` are float64; ``argmin`` takes the first on exact ties. ``num_phi = 0``
    gives ``[]`` (no refinement); ``num_scales = 1`` queries 0.
    """
    if isinstance(num_scales, bool) or not isinstance(num_scales, int) or num_scales < 1:
        raise ValueError(f"num_scales must be a positive int, got {num_scales!r}")
    if isinstance(num_phi, bool) or not isinstance(num_phi, int) or num_phi < 0:
        raise ValueError(f"num_phi must be an int >= 0, got {num_phi!r}")
    if num_phi == 0:
        return []
    n = num_phi
    ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)
    out = []
    for k in range(num_scales):
        at = k / (num_scales - 1) if num_scales > 1 else 0.0
        out.append(int(np.argmin(np.abs(ticks - at))))
    return out


def check_scales(scales, name: str = "scales") -> list[tuple[int, int]]:
    """``scales``: ints (square) or ``[h, w]`` pairs, non-decreasing in both sides → list of ``(h, w)``."""
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise ValueError(f"{name} must be a non-empty list of sizes (ints or [h, w] pairs), got {scales!r}")
    out = []
    for s in scales:
        pair = (s, s) if isinstance(s, int) and not isinstance(s, bool) else tuple(s) if isinstance(
            s, Sequence) and not isinstance(s, (str, bytes)) else None
        if pair is None or len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                                 for v in pair):
            raise ValueError(f"{name} entries must be positive ints or [h, w] pairs of them, got {list(scales)!r}")
        out.append(pair)
    for (h0, w0), (h1, w1) in zip(out, out[1:]):
        if h1 < h0 or w1 < w0:
            raise ValueError(f"{name} must grow coarse to fine (non-decreasing), got {list(scales)!r}")
    return out


class Phi(nn.Conv2d):
    """VAR's refinement ``h ↦ (1 − r)·h + r·conv3x3(h)`` (``h: [B, D, H, W]``; keys ``weight``, ``bias``)."""

    def __init__(self, dim: int, ratio: float, kernel_size: int = 3):
        super().__init__(dim, dim, kernel_size, stride=1, padding=kernel_size // 2)
        self.ratio = abs(float(ratio))

    def forward(self, h: Tensor) -> Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


class VQScaleQuantizer(nn.Module):
    """Per-scale protocol over one :class:`VectorQuantizer` (``vq``): codes are ``[B, h*w, 1]`` indices.

    The codebook is trained through ``f_hat`` (VAR's loss), so the wrapped quantiser's own losses are unused;
    its nearest-code search, EMA updates and dead-code restarts (training mode) are used as they are.
    Arguments are :class:`VectorQuantizer`'s (``l2_norm=False``: raw codebook rows, as VAR).
    """

    token_channels = 1

    def __init__(self, num_codes: int, code_dim: int, l2_norm: bool = False, ema_decay: float = 0.0,
                 dead_code_threshold: float = 0.0, usage_decay: float = 0.99, backend: str | None = None):
        super().__init__()
        self.vq = VectorQuantizer(num_codes, code_dim, beta=0.0, l2_norm=l2_norm, ema_decay=ema_decay,
                                  dead_code_threshold=dead_code_threshold, usage_decay=usage_decay, backend=backend)
        self.code_dim = code_dim
        self.num_codes = num_codes

    def quantize_scale(self, z: Tensor) -> ScaleQuantized:
        b, _, h, w = z.shape
        out = self.vq(z)
        values = self.vq.lookup(out.indices).permute(0, 3, 1, 2)
        return ScaleQuantized(values=values, codes=out.indices.reshape(b, h * w, 1), loss=z.new_zeros(()))

    def codes_to_latent(self, codes: Tensor, h: int, w: int) -> Tensor:
        return self.vq.lookup(codes[..., 0]).reshape(codes.shape[0], h, w, -1).permute(0, 3, 1, 2)


class MultiScaleResidualQuantizer(nn.Module):
    """Coarse-to-fine residual quantisation of ``f: [B, D, H, W]`` (see module docstring).

    Args:
        quantizer: the per-scale quantiser (protocol in the module docstring), shared by all scales.
        scales: ``[(h_k, w_k), ...]`` coarse to fine (ints mean squares); the last is the latent size.
        num_phi: shared refinement convs (VAR: 4); 0 = none (Infinity).
        phi_ratio: ``r`` of the refinement (VAR: 0.5).
        phi_index: explicit conv index per scale; None = VAR's tick rule (:func:`phi_index_per_scale`).
        upsample_mode: interpolation of coarse scales to the latent size.
        beta: weight of the commitment term ``||sg(f_hat_k) − f||²``.
    """

    def __init__(self, quantizer: nn.Module, scales, num_phi: int = 4, phi_ratio: float = 0.5,
                 phi_index: Sequence[int] | None = None, upsample_mode: str = "bicubic", beta: float = 0.25):
        super().__init__()
        self.scales = check_scales(scales)
        if upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(f"upsample_mode must be one of {UPSAMPLE_MODES}, got {upsample_mode!r}")
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        self.quantizer = quantizer
        self.code_dim = quantizer.code_dim
        self.token_channels = quantizer.token_channels
        self.upsample_mode, self.beta = upsample_mode, float(beta)
        use_phi = num_phi > 0 and abs(phi_ratio) > PHI_RATIO_EPS
        if phi_index is None:
            self.phi_index = phi_index_per_scale(len(self.scales), num_phi if use_phi else 0)
        else:
            phi_index = [int(i) for i in phi_index]
            if len(phi_index) != len(self.scales) or any(not 0 <= i < num_phi for i in phi_index):
                raise ValueError(f"phi_index must give one conv index in [0, {num_phi}) per scale "
                                 f"({len(self.scales)} scales), got {phi_index!r}")
            self.phi_index = phi_index if use_phi else []
        self.phi = nn.ModuleList(Phi(self.code_dim, phi_ratio) for _ in range(num_phi if use_phi else 0))
        self.offsets = [0]
        for h, w in self.scales:
            self.offsets.append(self.offsets[-1] + h * w)

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.scales[-1]

    @property
    def length(self) -> int:
        """``L``: tokens over all scales."""
        return self.offsets[-1]

    # ---- the pieces ----
    def contribution(self, values: Tensor, scale_index: int) -> Tensor:
        """``c_k = phi_k(up(v_k))``: ``values: [B, D, h_k, w_k]`` → ``[B, D, H, W]``."""
        if scale_index != self.num_scales - 1:
            values = F.interpolate(values, size=self.latent_size, mode=self.upsample_mode)
        if self.phi_index:
            values = self.phi[self.phi_index[scale_index]](values)
        return values

    def _down(self, f: Tensor, scale_index: int) -> Tensor:
        return F.interpolate(f, size=self.scales[scale_index], mode="area")

    def check_latent(self, f: Tensor, name: str) -> None:
        """Raise ValueError unless ``f`` is ``[B, D, H, W]`` at this quantiser's latent size."""
        if f.dim() != 4 or f.shape[1] != self.code_dim or tuple(f.shape[-2:]) != self.latent_size:
            raise ValueError(f"{name} must have shape [B, {self.code_dim}, {self.latent_size[0]}, "
                             f"{self.latent_size[1]}], got {tuple(f.shape)}")

    def _check_codes(self, codes: Tensor, length: int, name: str) -> None:
        if not isinstance(codes, Tensor) or codes.dim() != 3 or codes.shape[1:] != (length, self.token_channels):
            shape = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"{name} must have shape [B, {length}, {self.token_channels}], got {shape}")

    def check_scale_index(self, scale_index) -> None:
        """Raise ValueError unless ``scale_index`` is an int in ``[0, K)``."""
        if isinstance(scale_index, bool) or not isinstance(scale_index, int) \
                or not 0 <= scale_index < self.num_scales:
            raise ValueError(f"scale_index must be an int in [0, {self.num_scales - 1}], got {scale_index!r}")

    def split_codes(self, codes: Tensor) -> list[Tensor]:
        """``codes: [B, L, C]`` → per scale ``[B, h_k·w_k, C]``."""
        self._check_codes(codes, self.length, "codes")
        return [codes[:, a:b] for a, b in zip(self.offsets, self.offsets[1:])]

    # ---- quantise ----
    def forward(self, f: Tensor) -> MultiScaleOutput:
        """``f: [B, D, H, W]`` → :class:`MultiScaleOutput` (per-scale statistics update in training mode)."""
        self.check_latent(f, "f")
        f_rest, f_hat = f, torch.zeros_like(f)
        loss = f.new_zeros(())
        codes, logs = [], {}
        for k in range(self.num_scales):
            z = f_rest if k == self.num_scales - 1 else self._down(f_rest, k)
            q = self.quantizer.quantize_scale(z)
            c = self.contribution(q.values, k)
            f_hat = f_hat + c
            f_rest = f_rest - c.detach()
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach()) + q.loss
            codes.append(q.codes)
            for key, v in q.logs.items():
                logs[key] = logs.get(key, 0.0) + v.detach() / self.num_scales
        return MultiScaleOutput(f_hat=f + (f_hat - f).detach(), codes=torch.cat(codes, dim=1),
                                loss=loss / self.num_scales, logs=logs)

    # ---- from codes ----
    def code_vectors(self, codes: Tensor) -> Tensor:
        """``codes: [B, L, C]`` → ``[B, L, D]`` each token's code vector (before upsampling and phi)."""
        parts = self.split_codes(codes)
        return torch.cat([self.quantizer.codes_to_latent(p, h, w).flatten(2).transpose(1, 2)
                          for p, (h, w) in zip(parts, self.scales)], dim=1)

    def codes_to_f_hat(self, codes: Tensor) -> Tensor:
        """``codes: [B, L, C]`` → ``f_hat: [B, D, H, W]`` = ``Σ_k c_k``."""
        parts = self.split_codes(codes)
        f_hat = None
        for k, (p, (h, w)) in enumerate(zip(parts, self.scales)):
            c = self.contribution(self.quantizer.codes_to_latent(p, h, w), k)
            f_hat = c if f_hat is None else f_hat + c
        return f_hat

    def teacher_inputs(self, codes: Tensor) -> Tensor:
        """Teacher-forcing inputs: ``codes: [B, L, C]`` → ``[B, L − h_0·w_0, D]`` (VAR's ``idxBl_to_var_input``)."""
        parts = self.split_codes(codes)
        b = codes.shape[0]
        f_hat = torch.zeros(b, self.code_dim, *self.latent_size, device=codes.device)
        outs = [f_hat.new_zeros(b, 0, self.code_dim)]
        for k in range(self.num_scales - 1):
            h, w = self.scales[k]
            f_hat = f_hat + self.contribution(self.quantizer.codes_to_latent(parts[k], h, w), k)
            outs.append(self._down(f_hat, k + 1).flatten(2).transpose(1, 2))
        return torch.cat(outs, dim=1)

    def next_input(self, f_hat: Tensor | None, scale_index: int, codes: Tensor) -> tuple[Tensor, Tensor | None]:
        """One sampling step: add scale ``scale_index``'s codes ``[B, h_k·w_k, C]`` to ``f_hat`` ``[B, D, H, W]``
        (None = zeros) → ``(new f_hat, next input [B, h_{k+1}·w_{k+1}, D] or None after the last scale)``."""
        self.check_scale_index(scale_index)
        h, w = self.scales[scale_index]
        self._check_codes(codes, h * w, f"codes of scale {scale_index}")
        if f_hat is None:
            f_hat = torch.zeros(codes.shape[0], self.code_dim, *self.latent_size, device=codes.device)
        else:
            self.check_latent(f_hat, "f_hat")
        f_hat = f_hat + self.contribution(self.quantizer.codes_to_latent(codes, h, w), scale_index)
        if scale_index == self.num_scales - 1:
            return f_hat, None
        return f_hat, self._down(f_hat, scale_index + 1).flatten(2).transpose(1, 2)

    def quantize_residual(self, f_rest: Tensor, scale_index: int) -> Tensor:
        """Codes of scale ``scale_index`` for a residual latent ``f_rest: [B, D, H, W]`` → ``[B, h_k·w_k, C]``
        (area-downsampled unless it is the last scale; call in eval mode to leave codebook statistics alone)."""
        self.check_scale_index(scale_index)
        self.check_latent(f_rest, "f_rest")
        z = f_rest if scale_index == self.num_scales - 1 else self._down(f_rest, scale_index)
        return self.quantizer.quantize_scale(z).codes

    def extra_repr(self) -> str:
        return (f"scales={self.scales}, phi_index={self.phi_index}, upsample_mode={self.upsample_mode!r}, "
                f"beta={self.beta}")


__all__ = ["MultiScaleOutput", "MultiScaleResidualQuantizer", "Phi", "ScaleQuantized", "VQScaleQuantizer",
           "check_scales", "phi_index_per_scale"]
