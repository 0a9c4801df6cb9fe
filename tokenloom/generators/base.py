"""Base class of every generator: a backbone + a head + a generation order, over one TokenSpec."""

from __future__ import annotations

import torch

from tokenloom.config import SamplingParams
from tokenloom.generators.condition import Condition
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
