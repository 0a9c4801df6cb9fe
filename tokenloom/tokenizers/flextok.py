"""FlexTok-style 1D tokenizer: an image becomes an ordered sequence of up to ``N`` FSQ tokens; any prefix decodes.

``spec = TokenSpec(kind="index", vocab_size=prod(fsq_levels), layout=Sequence(N))``; ``decode`` accepts every
prefix length ``1..N`` (``Tokens`` with a ``Sequence`` spec may be shorter than ``N``).

Encoder (:class:`FlexTokEncoder`): the image is cut into ``P = (S/p)²`` patches of ``p×p`` pixels (patch vector
order: channel, row, column), each linearly embedded plus a learned position embedding; ``N`` learned register
tokens are appended, and timm ViT blocks (``timm.models.vision_transformer.Block``) run with FlexTok's attention
mask: patches attend to patches only, register ``i`` attends to every patch and to registers ``0..i`` (causal).
So register ``i`` never sees later registers, and the first ``k`` tokens of an image do not depend on ``N``.
The registers' outputs are projected to ``len(fsq_levels)`` channels and quantised with FSQ
(:class:`~tokenloom.tokenizers.quantizers.fsq.FiniteScalarQuantizer`).

Nested dropout (training only): each image keeps a random prefix of ``k`` tokens, ``k`` drawn uniformly from
``{1, 2, 4, ..., N}`` (``nested_dropout="pow2"``, FlexTok's choice; ``N`` itself is always included) or from
``1..N`` (``"uniform"``); ``"none"`` keeps all ``N``. The decoder never attends to dropped tokens, which is
exactly what decoding a ``k``-token prefix does at inference.

Decoders (``decoder_type``, see :mod:`tokenloom.tokenizers.flextok_decoder`): the FSQ codes of the prefix are
projected to the decoder width plus a learned per-position embedding, then

* ``"flow"`` (FlexTok): a rectified-flow transformer denoises image patches conditioned on the prefix;
  training loss ``||v_pred - (ε - x)||²`` with ``t`` drawn from a logit-normal(0, 1) (SD3); ``decode`` runs
  ``num_sampling_steps`` Euler steps from noise (``generator`` seeds it).
* ``"regression"``: learned patch queries read the prefix and predict pixels directly; loss L1 or MSE.
  Deterministic; predicts the conditional-mean image for each prefix.

``embed(tokens)`` returns the FSQ codes ``[B, L, len(fsq_levels)]`` (values in ``[-1, 1]``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence as SequenceType

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from tokenloom.tokenizers import register
from tokenloom.tokenizers.base import ImageTokenizer
from tokenloom.tokenizers.flextok_decoder import FlowDecoder, RegressionDecoder, frequency_basis
from tokenloom.tokenizers.quantizers.fsq import FiniteScalarQuantizer, check_levels
from tokenloom.tokens import Sequence, Tokens, TokenSpec

DECODER_TYPES = ("flow", "regression")
NESTED_DROPOUT = ("pow2", "uniform", "none")
RECON_LOSSES = ("l1", "mse")


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``[B, 3, H, W]`` → ``[B, (H/p)(W/p), 3·p·p]`` (patches row-major; inside: channel, row, column)."""
    return rearrange(images, "b c (h p) (w q) -> b (h w) (c p q)", p=patch_size, q=patch_size)


def unpatchify(patches: Tensor, patch_size: int, side: int) -> Tensor:
    """Inverse of :func:`patchify` for a square ``side × side`` image."""
    n = side // patch_size
    return rearrange(patches, "b (h w) (c p q) -> b c (h p) (w q)", h=n, w=n, p=patch_size, q=patch_size)


def register_attention_mask(num_patches: int, num_registers: int) -> Tensor:
    """``[S, S]`` additive bias (``S = P + N``; 0 = attend, -inf = not): patches see patches; register ``i`` sees
    all patches and registers ``0..i``."""
    s = num_patches + num_registers
    allowed = torch.zeros(s, s, dtype=torch.bool)
    allowed[:, :num_patches] = True
    allowed[num_patches:, num_patches:] = torch.ones(num_registers, num_registers, dtype=torch.bool).tril()
    return torch.zeros(s, s).masked_fill(~allowed, float("-inf"))


class FlexTokEncoder(nn.Module):
    """``images: [B, 3, S, S]`` → register outputs ``[B, K, code_dim]`` (before FSQ) for the first ``K`` registers.

    Args:
        image_size: ``S``; patch_size: ``p``; num_tokens: ``N`` registers; width, depth, num_heads, mlp_ratio:
        timm ViT block sizes; code_dim: output channels (``len(fsq_levels)``).
    """

    def __init__(self, image_size: int, patch_size: int, num_tokens: int, width: int, depth: int, num_heads: int,
                 mlp_ratio: float, code_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Linear(3 * patch_size * patch_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, width))
        self.registers = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.patch_to_register = nn.Parameter(frequency_basis(image_size // patch_size, num_tokens))
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.proj = nn.Linear(width, code_dim)
        self.register_buffer("attn_bias", register_attention_mask(self.num_patches, num_tokens), persistent=False)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.registers, std=0.02)

    def forward(self, images: Tensor, num_registers: int | None = None) -> Tensor:
        k = self.registers.shape[1] if num_registers is None else num_registers
        x = self.patch_embed(patchify(images, self.patch_size)) + self.pos_embed
        registers = self.registers[:, :k] + torch.einsum("kp,bpd->bkd", self.patch_to_register[:k], x)
        x = torch.cat([x, registers], dim=1)
        s = self.num_patches + k
        bias = self.attn_bias[:s, :s].to(x.dtype)
        for block in self.blocks:
            x = block(x, attn_mask=bias)
        return self.proj(self.norm(x[:, self.num_patches:]))


@register("flextok")
class FlexTokTokenizer(ImageTokenizer):
    """1D tokenizer with ordered, prefix-decodable FSQ tokens (``spec``: ``index``, ``Sequence(num_tokens)``).

    Args:
        image_size: square image side ``S`` (divisible by ``patch_size``).
        patch_size: ``p``, pixels per patch side (the tokenizer's ``downsample_factor``).
        num_tokens: ``N``, the longest token sequence.
        fsq_levels: FSQ levels per code channel; ``vocab_size = prod(fsq_levels)``.
        width, encoder_depth, decoder_depth, num_heads, mlp_ratio: transformer sizes (shared width).
        decoder_type: ``"flow"`` (rectified flow, FlexTok) or ``"regression"`` (direct pixel prediction).
        nested_dropout: ``"pow2"``, ``"uniform"`` or ``"none"`` (see the module docstring).
        recon_loss: pixel loss of the regression decoder, ``"l1"`` or ``"mse"``.
        num_sampling_steps: default Euler steps of the flow decoder's ``decode``.
    """

    @register_to_config
    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        num_tokens: int = 32,
        fsq_levels: SequenceType[int] = (8, 5, 5, 5),
        width: int = 128,
        encoder_depth: int = 4,
        decoder_depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        decoder_type: str = "regression",
        nested_dropout: str = "pow2",
        recon_loss: str = "mse",
        num_sampling_steps: int = 25,
    ):
        super().__init__()
        for name, value in (("image_size", image_size), ("patch_size", patch_size), ("num_tokens", num_tokens),
                            ("width", width), ("encoder_depth", encoder_depth),
                            ("decoder_depth", decoder_depth), ("num_heads", num_heads),
                            ("num_sampling_steps", num_sampling_steps)):
            _check_positive_int(name, value)
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch_size, got {patch_size}")
        if width % num_heads:
            raise ValueError(f"width ({width}) must be divisible by num_heads, got {num_heads}")
        if decoder_type not in DECODER_TYPES:
            raise ValueError(f"decoder_type must be one of {DECODER_TYPES}, got {decoder_type!r}")
        if nested_dropout not in NESTED_DROPOUT:
            raise ValueError(f"nested_dropout must be one of {NESTED_DROPOUT}, got {nested_dropout!r}")
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
        levels = check_levels(list(fsq_levels))
        self.image_size = image_size
        self.downsample_factor = patch_size
        self.patch_size = patch_size
        self.num_tokens = num_tokens
        self.patch_dim = 3 * patch_size * patch_size
        self.quantize = FiniteScalarQuantizer(levels)
        self.encoder = FlexTokEncoder(image_size, patch_size, num_tokens, width, encoder_depth, num_heads,
                                      mlp_ratio, len(levels))
        self.token_proj = nn.Linear(len(levels), width)
        self.token_pos_embed = nn.Parameter(torch.zeros(1, num_tokens, width))
        decoder_cls = FlowDecoder if decoder_type == "flow" else RegressionDecoder
        self.decoder = decoder_cls(self.encoder.num_patches, num_tokens, width, decoder_depth, num_heads, mlp_ratio,
                                   self.patch_dim)
        self.decoder_type = decoder_type
        self.nested_dropout = nested_dropout
        self.recon_loss_name = recon_loss
        self.num_sampling_steps = num_sampling_steps
        nn.init.trunc_normal_(self.token_pos_embed, std=0.02)

    @property
    def spec(self) -> TokenSpec:
        return TokenSpec(kind="index", vocab_size=self.quantize.codebook_size, layout=Sequence(self.num_tokens))

    # ---- pieces ----
    def encode_codes(self, images: Tensor, num_tokens: int | None = None) -> Tensor:
        """``images`` → FSQ codes ``[B, K, len(levels)]`` of the first ``K`` tokens (straight-through; no checks)."""
        return self.quantize.quantize(self.encoder(images, num_tokens)).to(images.dtype)

    def condition(self, codes: Tensor) -> Tensor:
        """FSQ codes ``[B, K, len(levels)]`` → decoder registers ``[B, K, width]``."""
        return self.token_proj(codes) + self.token_pos_embed[:, : codes.shape[1]]

    def sample_prefix_lengths(self, batch_size: int, device: torch.device | None = None) -> Tensor:
        """Nested dropout: ``[B]`` long prefix lengths ``k`` in ``1..N`` (all ``N`` when ``nested_dropout="none"``)."""
        n = self.num_tokens
        if self.nested_dropout == "none":
            return torch.full((batch_size,), n, dtype=torch.long, device=device)
        if self.nested_dropout == "uniform":
            return torch.randint(1, n + 1, (batch_size,), device=device)
        choices = sorted({2**i for i in range(int(math.log2(n)) + 1)} | {n})
        pick = torch.randint(0, len(choices), (batch_size,), device=device)
        return torch.tensor(choices, device=device)[pick]

    def decode_codes(self, codes: Tensor, num_steps: int | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
        """FSQ codes of a prefix ``[B, K, len(levels)]`` → images ``[B, 3, S, S]`` (no checks)."""
        registers = self.condition(codes)
        if self.decoder_type == "regression":
            patches = self.decoder(registers)
        else:
            patches = self.decoder.sample(registers, self.patch_dim, num_steps or self.num_sampling_steps, generator)
        return unpatchify(patches, self.patch_size, self.image_size)

    # ---- the contract ----
    def check_tokens(self, tokens: Tokens, name: str = "tokens") -> None:
        """Tokens must carry this spec, or the spec of a shorter sequence of the same vocabulary (a prefix)."""
        if isinstance(tokens, Tokens) and tokens.spec != self.spec:
            got, want = tokens.spec, self.spec
            is_prefix_spec = (got.kind, got.vocab_size, got.depth) == (want.kind, want.vocab_size, want.depth) \
                and isinstance(got.layout, Sequence) and got.layout.length <= want.length
            if not is_prefix_spec:
                raise ValueError(f"{name}.spec {got} does not match this tokenizer's spec {want} (nor a prefix "
                                 f"of it: Sequence(k <= {want.length}) with the same kind and vocabulary)")
        super().check_tokens(tokens, name)

    def encode(self, images: Tensor, num_tokens: int | None = None) -> Tokens:
        """``images: [B, 3, S, S]`` in ``[-1, 1]`` → ``Tokens`` ``[B, K, 1]`` long, ``K = num_tokens`` (default
        ``N``); the first ``K`` tokens are the same whatever ``K`` is (causal registers)."""
        self.check_images(images)
        k = self.num_tokens if num_tokens is None else num_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_tokens:
            raise ValueError(f"num_tokens must be an int in [1, {self.num_tokens}] or None, got {num_tokens!r}")
        codes = self.encode_codes(images, k)
        return Tokens(self.quantize.codes_to_indices(codes.detach())[..., None], self.spec)

    def decode(self, tokens: Tokens, num_steps: int | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """``Tokens`` with any prefix length ``1..N`` → images ``[B, 3, S, S]`` (not clamped).

        Args:
            num_steps: Euler steps of the flow decoder (default ``num_sampling_steps``; ignored by regression).
            generator: seeds the flow decoder's starting noise.
        """
        self.check_tokens(tokens)
        if num_steps is not None:
            _check_positive_int("num_steps", num_steps)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        codes = self.quantize.indices_to_codes(tokens.data[..., 0]).to(self.token_proj.weight.dtype)
        return self.decode_codes(codes, num_steps, generator)

    def embed(self, tokens: Tokens) -> Tensor:
        """``Tokens`` → FSQ codes ``[B, L, len(fsq_levels)]`` in ``[-1, 1]``."""
        self.check_tokens(tokens)
        return self.quantize.indices_to_codes(tokens.data[..., 0])

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Training step with nested dropout: ``images: [B, 3, S, S]`` → dict with ``loss``, ``recon``
        ``[B, 3, S, S]`` (regression: the prediction; flow: the one-step estimate ``x_t - t·v``, detached),
        ``mean_prefix`` (mean kept tokens) and, for flow, ``flow_loss``; for regression ``recon_loss``."""
        self.check_images(images)
        b = images.shape[0]
        keep_len = self.sample_prefix_lengths(b, images.device)  # [B]
        k_max = int(keep_len.max())  # later registers cannot influence kept ones: skip computing them
        codes = self.encode_codes(images, k_max)
        key_mask = torch.arange(k_max, device=images.device)[None] < keep_len[:, None]  # [B, k_max]
        registers = self.condition(codes)
        target = patchify(images, self.patch_size)
        out = {"mean_prefix": keep_len.float().mean()}
        if self.decoder_type == "regression":
            pred = self.decoder(registers, key_mask)
            loss = F.l1_loss(pred, target) if self.recon_loss_name == "l1" else F.mse_loss(pred, target)
            out.update(loss=loss, recon_loss=loss.detach(), recon=unpatchify(pred, self.patch_size, self.image_size))
            return out
        t = torch.sigmoid(torch.randn(b, device=images.device))  # logit-normal(0, 1)
        noise = torch.randn_like(target)
        x_t = (1 - t)[:, None, None] * target + t[:, None, None] * noise
        v = self.decoder(x_t, t, registers, key_mask)
        loss = F.mse_loss(v, noise - target)
        x0 = (x_t - t[:, None, None] * v).detach()
        out.update(loss=loss, flow_loss=loss.detach(), recon=unpatchify(x0, self.patch_size, self.image_size))
        return out


__all__ = ["DECODER_TYPES", "FlexTokEncoder", "FlexTokTokenizer", "NESTED_DROPOUT", "patchify",
           "register_attention_mask", "unpatchify"]
