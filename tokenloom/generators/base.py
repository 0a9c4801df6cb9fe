"""Base class of every generator: a backbone + a head + a generation order, over one TokenSpec."""

from __future__ import annotations

import torch

from tokenloom.config import SamplingParams
from tokenloom.generators.condition import Condition
from tokenloom.kernels.checks import PER_ROW_FIELDS, check_generator
from tokenloom.modeling import TokenloomModel
from tokenloom.tokens import Tokens, TokenSpec


class TokenGenerator(TokenloomModel):
    """Two verbs: ``forward(tokens, cond) -> {"loss": ...}`` and ``generate(cond, params, ...) -> Tokens``.

    Subclasses keep their ``TokenSpec`` in the config as a dict (``token_spec``) so that
    ``save_pretrained``/``from_pretrained`` round-trip; ``self.spec`` is the parsed form.
    """

    @property
    def spec(self) -> TokenSpec:
        return TokenSpec.from_dict(self.config.token_spec)

    @property
    def condition_kind(self) -> str:
        """``"class"``, ``"text"`` or ``"none"``: what ``cond`` this generator expects."""
        raise NotImplementedError

    def forward(self, tokens: Tokens, cond: Condition | torch.Tensor | None = None) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def generate(
        self,
        cond: Condition | torch.Tensor | None,
        params: SamplingParams | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        decoding=None,
        progress: bool = False,
    ) -> Tokens:
        raise NotImplementedError

    def check_tokens(self, tokens: Tokens, name: str = "tokens") -> None:
        if not isinstance(tokens, Tokens):
            raise TypeError(f"{name} must be a tokenloom.Tokens, got {type(tokens).__name__}")
        if tokens.spec != self.spec:
            raise ValueError(f"{name}.spec {tokens.spec} does not match the generator's spec {self.spec}")

    def check_known(self, known: Tokens | None, known_mask, b: int) -> tuple[Tokens | None, torch.Tensor | None]:
        """Inpainting inputs (``known`` tokens and ``known_mask``: ``[B, L]`` bool, True = known) checked against
        the batch size ``b`` → ``(known, known_mask on the model's device)``, or ``(None, None)`` without them."""
        if known is None and known_mask is None:
            return None, None
        if known is None or known_mask is None:
            raise ValueError("known and known_mask go together: pass both (inpainting) or neither")
        self.check_tokens(known, "known")
        length = self.spec.length
        if known.batch_size != b:
            raise ValueError(f"known has {known.batch_size} rows but cond has {b}")
        if (not isinstance(known_mask, torch.Tensor) or known_mask.dtype != torch.bool
                or known_mask.shape != (b, length)):
            raise ValueError(f"known_mask must be a bool tensor of shape [{b}, {length}] (True = known), got "
                             f"{getattr(known_mask, 'dtype', type(known_mask).__name__)} "
                             f"{tuple(getattr(known_mask, 'shape', ()))}")
        return known, known_mask.to(self.device)

    def check_generate_args(self, cond, params: SamplingParams | None, generator) -> tuple[Condition, SamplingParams]:
        """The checks every ``generate`` runs before any compute → ``(cond, params)``.

        ``params`` None becomes ``SamplingParams()``; ``cond`` goes through the subclass's ``as_condition``;
        ``generator`` must be None, one ``torch.Generator`` or a list of one per row; per-row ``SamplingParams``
        tensors must have one value per row; guidance needs a conditional generator. (Each generator refuses the
        ``decoding`` values it does not support itself.)
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        cond = self.as_condition(cond)
        b = cond.batch_size
        check_generator(generator, b)
        for name in PER_ROW_FIELDS:
            value = getattr(params, name)
            if isinstance(value, torch.Tensor) and value.shape != (b,):
                raise ValueError(f"SamplingParams.{name} has {value.numel()} per-row values but cond has {b} rows")
        if params.uses_guidance and self.condition_kind == "none":
            raise ValueError(f"guidance needs a conditional generator; this one has condition='none' "
                             f"(guidance_scale={params.guidance_scale})")
        return cond, params
