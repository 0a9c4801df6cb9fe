"""The one shape contract: what a token sequence is, whatever made it.

A tokenizer turns images into :class:`Tokens`; a generator learns and samples them. Neither asks
which class made the other: they agree on a :class:`TokenSpec`.

* ``Tokens.data`` is always flattened to ``[B, L, ...]``:
  ``index`` → ``[B, L, depth]`` long, ``bits`` → ``[B, L, bits]`` long 0/1,
  ``continuous`` → ``[B, L, dim]`` float.
* ``spec.layout`` says how ``L`` maps to positions: :class:`Grid` in raster order,
  :class:`Scales` scale after scale (each scale in raster order), :class:`Sequence` in prefix order.

This module imports nothing of the package.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

KINDS = ("index", "bits", "continuous")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclass(frozen=True)
class Grid:
    """A 2D token grid of ``h`` rows and ``w`` columns, flattened row-major."""

    h: int
    w: int

    def __post_init__(self):
        _positive_int("Grid.h", self.h)
        _positive_int("Grid.w", self.w)

    @property
    def length(self) -> int:
        return self.h * self.w

    def positions(self) -> Tensor:
        """``[L, 2]`` long: (row, column) of each flattened position."""
        rows, cols = torch.meshgrid(torch.arange(self.h), torch.arange(self.w), indexing="ij")
        return torch.stack([rows.flatten(), cols.flatten()], dim=-1)


@dataclass(frozen=True)
class Sequence:
    """An ordered 1D sequence of ``length`` tokens; any prefix is meaningful (FlexTok)."""

    length: int

    def __post_init__(self):
        _positive_int("Sequence.length", self.length)

    def positions(self) -> Tensor:
        """``[L, 1]`` long: the index of each position."""
        return torch.arange(self.length)[:, None]


@dataclass(frozen=True)
class Scales:
    """A coarse-to-fine pyramid of grids (VAR): scale ``k`` is an ``h_k × w_k`` grid.

    Tokens are flattened scale after scale, each scale row-major.
    """

    sizes: tuple[tuple[int, int], ...]

    def __post_init__(self):
        sizes = tuple((int(h), int(w)) for h, w in self.sizes)
        if not sizes:
            raise ValueError("Scales.sizes must hold at least one (h, w) pair, got ()")
        for h, w in sizes:
            _positive_int("Scales.sizes[*][0]", h)
            _positive_int("Scales.sizes[*][1]", w)
        object.__setattr__(self, "sizes", sizes)

    @property
    def length(self) -> int:
        return sum(h * w for h, w in self.sizes)

    @property
    def num_scales(self) -> int:
        return len(self.sizes)

    def offsets(self) -> list[int]:
        """Start of each scale in the flattened sequence, plus the total length at the end."""
        out = [0]
        for h, w in self.sizes:
            out.append(out[-1] + h * w)
        return out

    def scale_of_position(self) -> Tensor:
        """``[L]`` long: which scale each flattened position belongs to."""
        return torch.cat([torch.full((h * w,), k) for k, (h, w) in enumerate(self.sizes)])

    def positions(self) -> Tensor:
        """``[L, 3]`` long: (scale, row, column) of each flattened position."""
        parts = []
        for k, (h, w) in enumerate(self.sizes):
            pos = Grid(h, w).positions()
            parts.append(torch.cat([torch.full((h * w, 1), k), pos], dim=-1))
        return torch.cat(parts)


Layout = Grid | Sequence | Scales
_LAYOUTS = {"grid": Grid, "sequence": Sequence, "scales": Scales}


def layout_to_dict(layout: Layout) -> dict:
    name = {Grid: "grid", Sequence: "sequence", Scales: "scales"}[type(layout)]
    d = asdict(layout)
    if name == "scales":
        d["sizes"] = [list(s) for s in layout.sizes]
    return {"type": name, **d}


def layout_from_dict(d: dict) -> Layout:
    d = dict(d)
    name = d.pop("type", None)
    if name not in _LAYOUTS:
        raise ValueError(f"layout type must be one of {sorted(_LAYOUTS)}, got {name!r}")
    if name == "scales":
        d["sizes"] = tuple(tuple(s) for s in d["sizes"])
    return _LAYOUTS[name](**d)


@dataclass(frozen=True, kw_only=True)
class TokenSpec:
    """What a token sequence holds and how it is laid out.

    Args:
        kind: ``"index"`` (codebook indices), ``"bits"`` (0/1 per bit) or ``"continuous"`` (vectors).
        vocab_size: codes per codebook (``index`` only).
        depth: codebooks per position (RVQ depth; ``index`` only).
        bits: bits per position (``bits`` only).
        dim: channels per position (``continuous`` only).
        layout: :class:`Grid`, :class:`Sequence` or :class:`Scales`.
    """

    kind: Literal["index", "bits", "continuous"]
    vocab_size: int | None = None
    depth: int = 1
    bits: int | None = None
    dim: int | None = None
    layout: Layout = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"TokenSpec.kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.layout, (Grid, Sequence, Scales)):
            raise TypeError(f"TokenSpec.layout must be a Grid, Sequence or Scales, got {self.layout!r}")
        _positive_int("TokenSpec.depth", self.depth)
        need = {"index": "vocab_size", "bits": "bits", "continuous": "dim"}[self.kind]
        for name in ("vocab_size", "bits", "dim"):
            value = getattr(self, name)
            if name == need:
                _positive_int(f"TokenSpec.{name} (kind={self.kind!r})", value)
            elif value is not None:
                raise ValueError(f"TokenSpec.{name} must be None for kind={self.kind!r}, got {value!r}")
        if self.kind != "index" and self.depth != 1:
            raise ValueError(f"TokenSpec.depth must be 1 for kind={self.kind!r}, got {self.depth}")

    @property
    def length(self) -> int:
        """``L``: positions in the flattened sequence."""
        return self.layout.length

    @property
    def channels(self) -> int:
        """Size of the trailing dimension of ``Tokens.data``."""
        return {"index": self.depth, "bits": self.bits, "continuous": self.dim}[self.kind]

    def to_dict(self) -> dict:
        """A JSON-serialisable form (for ``ConfigMixin`` configs)."""
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "depth": self.depth,
            "bits": self.bits,
            "dim": self.dim,
            "layout": layout_to_dict(self.layout),
        }

    @classmethod
    def from_dict(cls, d: dict | TokenSpec) -> TokenSpec:
        if isinstance(d, TokenSpec):
            return d
        d = dict(d)
        d["layout"] = layout_from_dict(d["layout"])
        return cls(**d)

    def validate(self, data: Tensor, name: str = "tokens") -> None:
        """Raise ``TypeError``/``ValueError`` unless ``data`` is a valid ``[B, L, C]`` tensor of this spec.

        A shorter ``L`` is allowed for :class:`Sequence` layouts (a prefix decodes).
        """
        if not isinstance(data, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(data).__name__}")
        if data.dim() != 3:
            raise ValueError(f"{name} must have shape [B, L, {self.channels}], got {tuple(data.shape)}")
        b, length, c = data.shape
        ok_length = 1 <= length <= self.length if isinstance(self.layout, Sequence) else length == self.length
        if not ok_length or c != self.channels:
            raise ValueError(
                f"{name} must have shape [B, {self.length}, {self.channels}] for {self.kind!r} tokens with "
                f"layout {self.layout}, got {tuple(data.shape)}"
            )
        if self.kind == "continuous":
            if not data.is_floating_point():
                raise TypeError(f"{name} must be a float tensor for continuous tokens, got {data.dtype}")
            return
        if data.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool):
            raise TypeError(f"{name} must be an integer tensor for {self.kind!r} tokens, got {data.dtype}")
        high = self.vocab_size if self.kind == "index" else 2
        if data.numel() and (int(data.min()) < 0 or int(data.max()) >= high):
            raise ValueError(
                f"{name} values must lie in [0, {high - 1}] for {self.kind!r} tokens, "
                f"got range [{int(data.min())}, {int(data.max())}]"
            )


@dataclass
class Tokens:
    """A batch of token sequences and the spec they obey.

    Args:
        data: ``[B, L, C]`` (see module docstring for dtype by kind).
        spec: the :class:`TokenSpec` they follow; ``data`` is validated against it.
    """

    data: Tensor
    spec: TokenSpec

    def __post_init__(self):
        if not isinstance(self.spec, TokenSpec):
            raise TypeError(f"Tokens.spec must be a TokenSpec, got {type(self.spec).__name__}")
        self.spec.validate(self.data, "Tokens.data")
        if self.spec.kind != "continuous":
            self.data = self.data.long()

    @property
    def batch_size(self) -> int:
        return self.data.shape[0]

    def to(self, *args, **kwargs) -> Tokens:
        return Tokens(self.data.to(*args, **kwargs), self.spec)

    def __getitem__(self, index) -> Tokens:
        """Select along the batch dimension."""
        data = self.data[index]
        return Tokens(data if data.dim() == 3 else data[None], self.spec)
