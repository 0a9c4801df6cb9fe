"""The condition buffer of :class:`~tokenloom.generators.masked_ar.MaskedAR` (a mixin of the model).

MAR keeps ``buffer_size`` positions in front of the tokens for the condition. ``"class"``: every position holds the
class embedding (the learned ``fake_latent`` for the null class, label ``num_classes``, or a dropped row);
``"text"``: the projected text features, then copies of their masked mean up to ``buffer_size``; ``"none"``: every
position holds ``fake_latent``. With guidance the null rows are appended (``[2B, P, De]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenloom.generators.condition import Condition, as_condition
from tokenloom.generators.layers.prefix import Prefix

CONDITIONS = ("class", "text", "none")


class MaskedARConditioning:
    """``as_condition`` and ``buffer`` of :class:`~tokenloom.generators.masked_ar.MaskedAR`."""

    def as_condition(self, cond, batch_size: int | None = None) -> Condition:
        """Accept a Condition, ``[B]`` labels, ``[B, Lc, Cc]`` features or None; check it fits this model."""
        if cond is None and batch_size is None:
            raise TypeError("cond must be a Condition (Condition(batch=B) for condition='none'), got None")
        cond = as_condition(cond, batch_size)
        if cond.kind != self.condition_kind:
            need = {"class": "labels=[B] ints", "text": "features=[B, Lc, Cc]", "none": "batch=B only"}
            raise TypeError(f"this generator is conditioned on {self.condition_kind!r} "
                            f"(Condition({need[self.condition_kind]})), but cond has kind {cond.kind!r}")
        if cond.kind == "class":
            labels, n = cond.labels, self.config.num_classes
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > n):
                raise ValueError(f"cond.labels must lie in [0, {n - 1}] (or {n} for the null class), got range "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
        elif cond.kind == "text":
            self.text_prefix.check(cond)
            if cond.mask is not None and not bool(cond.mask.any(dim=1).all()):
                raise ValueError("cond.mask has a row without any valid text token; every row needs at least one")
        return cond

    def class_embedding(self, labels: Tensor, drop: Tensor | None = None) -> Tensor:
        """``[B, De]``: ``class_emb(labels)``, or ``fake_latent`` where ``labels == num_classes`` or ``drop``."""
        null = labels == self.config.num_classes
        if drop is not None:
            null = null | drop
        emb = self.class_emb(labels.clamp_max(self.config.num_classes - 1))
        return torch.where(null[:, None], self.fake_latent.to(emb.dtype), emb)

    def vector_buffer(self, vector: Tensor) -> Prefix:
        """MAR's buffer: every one of the ``buffer_size`` positions holds ``vector: [B, De]`` → ``[B, P, De]``."""
        return Prefix(vector[:, None].expand(-1, self.buffer_size, -1), None)

    def _text_buffer(self, prefix: Prefix) -> Prefix:
        """Projected text ``[B, Lc, De]`` + ``P − Lc`` copies of its masked mean → ``[B, P, De]``."""
        x, valid = prefix
        extra = self.buffer_size - x.shape[1]
        if extra:
            w = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if valid is None else valid.to(x.dtype)
            pooled = (x * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
            x = torch.cat([x, pooled[:, None].expand(-1, extra, -1)], dim=1)
            if valid is not None:
                valid = torch.cat([valid, valid.new_ones(valid.shape[0], extra)], dim=1)
        return Prefix(x, valid)

    def buffer(self, cond: Condition, guided: bool = False, drop: bool | None = None) -> Prefix:
        """The condition buffer ``[B, P, De]`` (``[2B, P, De]`` with the null rows appended when ``guided``).

        ``drop``: apply condition dropout (None = when training).
        """
        cond = self.as_condition(cond.to(self.device))
        b, kind = cond.batch_size, self.condition_kind
        drop = self.training if drop is None else drop
        if kind == "text":
            buf = self._text_buffer(self.text_prefix(cond, drop=drop))
            if guided:
                if cond.uncond_features is not None:
                    null = self.text_prefix(Condition(features=cond.uncond_features, mask=cond.uncond_mask),
                                            drop=False)
                else:
                    null = self.text_prefix.null(b, self.device)
                null = self._text_buffer(null)
                if buf.key_valid is None and null.key_valid is None:
                    return Prefix(torch.cat([buf.x, null.x]), None)
                ones = lambda p: torch.ones(p.x.shape[:2], dtype=torch.bool, device=p.x.device)  # noqa: E731
                valid = [ones(p) if p.key_valid is None else p.key_valid for p in (buf, null)]
                return Prefix(torch.cat([buf.x, null.x]), torch.cat(valid))
            return buf
        if kind == "none":
            if guided:
                raise ValueError("guidance needs a conditional generator; this one has condition='none'")
            return self.vector_buffer(self.fake_latent.expand(b, -1))
        dropped = None
        if drop and self.config.cond_dropout > 0:
            dropped = torch.rand(b, device=self.device) < self.config.cond_dropout
        vec = self.class_embedding(cond.labels, dropped)
        if guided:
            vec = torch.cat([vec, self.fake_latent.expand(b, -1).to(vec.dtype)])
        return self.vector_buffer(vec)


__all__ = ["CONDITIONS", "MaskedARConditioning"]
