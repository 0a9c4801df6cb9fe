"""Block diffusion (ACDiT, BD3-LM): blocks generated autoregressively, each block denoised by a diffusion process.

The ``L`` tokens are cut into ``L / K`` blocks of ``block_size = K`` positions (raster order for a ``Grid``, prefix
order for a ``Sequence``). A Llama-style decoder (tokenloom's :class:`TransformerBlock`, 1D or 2D RoPE, a class/text
/start prefix) reads a clean copy and a noisy copy of the tokens under the skip-causal mask
(:mod:`~tokenloom.generators.block_diffusion_layers`): noisy block ``i`` sees the prefix, the clean blocks ``< i``
and itself; clean blocks see the prefix and the clean blocks up to their own. ``K = 1`` is a pure AR model (one
step per block equals sampling position by position from a causal pass); ``K = L`` is full-sequence diffusion.

Inside a block, by token kind and head:

* ``index`` + ``"categorical"``: masked (absorbing-state) discrete diffusion, MDLM/BD3-LM. Noisy tokens are the
  token embeddings with a learned ``[MASK]`` row (``tok_embeddings`` row ``vocab_size``); no time input.
* ``continuous`` + ``"diffusion"`` (MAR's DDPM head) or ``"flow"`` (rectified flow): the noisy block holds ``x_t``
  (one noise level per block in training) embedded as ``in_proj(x_t) + level_embedding(level)``; clean tokens use
  level 0. The head, conditioned on the backbone's ``z`` of each noisy position, predicts the noise/velocity and
  takes one denoising step per backbone pass, with every token of the block at the same level (the heads' per-row
  timestep APIs). ACDiT conditions its blocks on ``t`` by adaLN; here ``t`` enters as an input embedding and through
  the head's own adaLN.

Training (``forward``): one pass over ``[prefix ; clean tokens 0..L−K−1 ; noisy tokens 0..L−1]`` (BD3-LM's
vectorised trick, the last clean block dropped because nothing attends to it); the loss is the process's
(:class:`~tokenloom.generators.block_diffusion_layers.MaskedProcess` for the masked loss weighting).

Generation (``generate``): for each block, ``S = params.num_steps`` backbone passes over the block's ``K`` noisy
positions against a KV cache of the prefix and the finished clean blocks. The cache is extended *in the same pass*
as the first denoising step of the next block (the new clean block and the noisy block are one input), so a whole
image takes exactly ``blocks × S`` passes. Guidance doubles the batch (null condition rows); step ``s`` of block
``i`` uses ``params.at_step(i·S + s, blocks·S)``. ``use_cache=False`` recomputes ``[prefix ; clean so far ; noisy
block]`` at every step instead (same tokens, for benchmarks and tests).

Two equivalent paths, compared in the tests: :meth:`BlockDiffusion.hidden` (full) and
:meth:`BlockDiffusion.cached_hidden` (block by block).

Our own module on tokenloom's shared layers: BD3-LM and ACDiT ship research code for their own tokens (text, DiT
latents), not a library; the skip-causal mask, the fused cache extension and the per-head processes need the shared
attention/KV-cache layers and the heads' per-row timestep APIs.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn
from tqdm.auto import tqdm

from tokenloom.config import SamplingParams
from tokenloom.generators import register
from tokenloom.generators.base import TokenGenerator
from tokenloom.generators.block_diffusion_layers import (
    CLEAN,
    NOISY,
    REVEALS,
    WEIGHTINGS,
    FlowProcess,
    GaussianProcess,
    Layout,
    LevelEmbedding,
    MaskedProcess,
    cat_layouts,
    check_block_size,
    check_fraction,
    check_masked_steps,
    prefix_layout,
    skip_causal_mask,
    token_layout,
)
from tokenloom.generators.condition import Condition, as_condition
from tokenloom.generators.layers.block import TransformerBlock
from tokenloom.generators.layers.kv_cache import KVCache
from tokenloom.generators.layers.masks import with_key_padding
from tokenloom.generators.layers.norms import make_norm
from tokenloom.generators.layers.prefix import Prefix, cat_prefixes, make_prefix
from tokenloom.generators.layers.rope import rope_table_1d, rope_table_2d
from tokenloom.heads import HEADS
from tokenloom.heads.categorical import CategoricalHead
from tokenloom.heads.diffusion import DiffusionHead
from tokenloom.heads.flow import FlowHead
from tokenloom.tokens import Grid, Sequence, Tokens, TokenSpec

ROPES = ("2d", "1d")
HEADS_BY_KIND = {"index": ("categorical",), "continuous": ("diffusion", "flow")}


@register("block_diffusion")
class BlockDiffusion(TokenGenerator):
    """Block diffusion generator; see the module docstring.

    Args:
        token_spec: ``TokenSpec.to_dict()``: ``index`` (depth 1) or ``continuous`` tokens on a Grid or Sequence.
        block_size: ``K``, tokens per block; must divide ``L`` (1 = AR, ``L`` = full-sequence diffusion).
        width, depth, num_heads, num_kv_heads, mlp, multiple_of, ffn_dim_multiplier, mlp_ratio, norm_type, norm_eps,
            fused_qkv, dropout: the Llama decoder (as :class:`~tokenloom.generators.raster_ar.RasterAR`).
        rope_type: ``"2d"`` (Grid rows/columns) or ``"1d"`` (position index); None = 2d on a Grid, 1d on a Sequence.
            ``rope_base``; ``prefix_rope``: ``"identity"`` or ``"zero"`` (LlamaGen) on the prefix rows.
        condition: ``"class"`` (``num_classes``), ``"text"`` (``cond_dim``, ``cond_len``, ``text_hidden``) or
            ``"none"``; ``cond_dropout``: training probability of the null condition.
        head: ``"categorical"`` (index tokens) or ``"diffusion"``/``"flow"`` (continuous); ``head_options``: its
            extra arguments. The module is ``self.output_head`` (diffusers' ``__getattr__`` prefers config keys).
        num_steps: denoising steps per block when ``params.num_steps`` is None (None: ``K`` for masked blocks — one
            token per step —, the head's ``num_sampling_steps`` for continuous ones).
        reveal: masked blocks: ``"random"`` (MDLM) or ``"confidence"`` (MaskGIT, with ``remask_temperature``).
        mask_ratio_min, mask_ratio_max: masked training ratios ``t ~ U[min, max]`` per block (BD3-LM's clipped
            schedule; the defaults are MDLM's ``[1e-3, 1]``). Clipping lowers the variance of the 1/t-weighted loss:
            measured on digits (block 4, 400 steps) 0.65 classifier accuracy with ``[0.3, 0.8]`` vs 0.43 with the
            defaults. With ``block_size = 1``, ``[1, 1]`` makes the loss exactly the AR negative log-likelihood.
        loss_weighting: masked loss ``"elbo"`` (cross entropy ``· 1/t``, per token: MDLM/BD3-LM's NELBO) or ``"mean"``
            (plain mean over masked tokens).
        initializer_range: std of the normal init of the backbone's Linear/Embedding weights (a categorical head
            starts at zero; diffusion/flow heads keep their own init).
    """

    @register_to_config
    def __init__(
        self,
        token_spec: dict,
        block_size: int = 16,
        width: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        mlp: str = "swiglu",
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        mlp_ratio: float = 4.0,
        norm_type: str = "rms",
        norm_eps: float = 1e-5,
        rope_type: str | None = None,
        rope_base: float = 10000.0,
        prefix_rope: str = "identity",
        fused_qkv: bool = True,
        dropout: float = 0.0,
        condition: str = "class",
        num_classes: int | None = None,
        cond_dim: int | None = None,
        cond_len: int | None = None,
        cond_dropout: float = 0.1,
        text_hidden: int | None = None,
        head: str = "categorical",
        head_options: dict | None = None,
        num_steps: int | None = None,
        reveal: str = "random",
        remask_temperature: float = 4.5,
        mask_ratio_min: float = 1e-3,
        mask_ratio_max: float = 1.0,
        loss_weighting: str = "elbo",
        initializer_range: float = 0.02,
    ):
        super().__init__()
        spec = TokenSpec.from_dict(token_spec)
        if isinstance(token_spec, TokenSpec):  # keep the config JSON-serialisable
            self.register_to_config(token_spec=spec.to_dict())
        head_cls = HEADS.get(head)
        if spec.kind not in head_cls.kinds:
            raise ValueError(f"head {head!r} ({head_cls.__name__}) models {head_cls.kinds} tokens but token_spec "
                             f"has kind={spec.kind!r}: {spec}")
        if spec.kind not in HEADS_BY_KIND or head not in HEADS_BY_KIND[spec.kind]:
            raise ValueError(f"BlockDiffusion denoises 'index' tokens with head 'categorical' (masked diffusion) and "
                             f"'continuous' tokens with head 'diffusion' or 'flow'; got head {head!r} for token_spec "
                             f"kind={spec.kind!r}: {spec}")
        if spec.kind == "index" and spec.depth != 1:
            raise ValueError(f"BlockDiffusion needs index tokens of depth 1, got token_spec depth={spec.depth}")
        if not isinstance(spec.layout, (Grid, Sequence)):
            raise ValueError(f"BlockDiffusion generates tokens on a Grid or Sequence layout, got {spec.layout}")
        length = spec.length
        check_block_size(block_size, length)
        rope_type = rope_type or ("2d" if isinstance(spec.layout, Grid) else "1d")
        if rope_type not in ROPES or (rope_type == "2d" and not isinstance(spec.layout, Grid)):
            raise ValueError(f"rope_type must be one of {ROPES} ('2d' needs a Grid layout), got {rope_type!r} for "
                             f"layout {spec.layout}")
        if width % num_heads:
            raise ValueError(f"width must be divisible by num_heads, got width={width}, num_heads={num_heads}")
        if reveal not in REVEALS:
            raise ValueError(f"reveal must be one of {REVEALS}, got {reveal!r}")
        if loss_weighting not in WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {WEIGHTINGS}, got {loss_weighting!r}")
        check_fraction("mask_ratio_min", mask_ratio_min)
        check_fraction("mask_ratio_max", mask_ratio_max)
        if not 0 < mask_ratio_min <= mask_ratio_max:
            raise ValueError(f"mask ratios need 0 < mask_ratio_min <= mask_ratio_max <= 1, got "
                             f"mask_ratio_min={mask_ratio_min}, mask_ratio_max={mask_ratio_max}")
        check_fraction("remask_temperature", remask_temperature, 0.0, float("inf"))
        if num_steps is not None and spec.kind == "index":
            check_masked_steps(num_steps, block_size)

        self.prefix = make_prefix(condition, width, num_classes=num_classes, cond_dim=cond_dim, cond_len=cond_len,
                                  dropout=cond_dropout, text_hidden=text_hidden)
        if spec.kind == "index":
            self.tok_embeddings = nn.Embedding(spec.vocab_size + 1, width)  # last row: [MASK]
        else:
            self.in_proj = nn.Linear(spec.dim, width)
            self.level_embedding = LevelEmbedding(width)
        self.layers = nn.ModuleList(
            TransformerBlock(width, num_heads, num_kv_heads, mlp=mlp, multiple_of=multiple_of,
                             ffn_dim_multiplier=ffn_dim_multiplier, mlp_ratio=mlp_ratio, norm=norm_type,
                             norm_eps=norm_eps, fused_qkv=fused_qkv, dropout=dropout)
            for _ in range(depth)
        )
        self.norm = make_norm(norm_type, width, norm_eps)
        head_dim, p = width // num_heads, self.prefix.length
        if rope_type == "2d":
            table = rope_table_2d(spec.layout.h, spec.layout.w, head_dim, rope_base, p, prefix_rope)
        else:
            table = rope_table_1d(length, head_dim, rope_base, p, prefix_rope)
        self.register_buffer("rope_table", table, persistent=False)  # [P + L, head_dim/2, 2]
        self._init_backbone(initializer_range)
        self.output_head = HEADS.build(head, spec=spec, width=width, **(head_options or {}))
        if isinstance(self.output_head, CategoricalHead):
            nn.init.zeros_(self.output_head.proj.weight)
        if num_steps is not None and isinstance(self.output_head, DiffusionHead):
            self.output_head.chain(num_steps)  # validates num_steps against the head's training chain
        self._process = self._make_process()

    def _init_backbone(self, std: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)

    def _make_process(self):
        head, cfg = self.output_head, self.config
        if isinstance(head, CategoricalHead):
            return MaskedProcess(head, self.mask_id, cfg.reveal, cfg.remask_temperature, cfg.mask_ratio_min,
                                 cfg.mask_ratio_max, cfg.loss_weighting)
        if isinstance(head, DiffusionHead):
            return GaussianProcess(head)
        if isinstance(head, FlowHead):
            return FlowProcess(head)
        raise ValueError(f"no block denoising process for head {type(head).__name__}")

    # ---------------------------------------------------------------- sizes
    @property
    def device(self) -> torch.device:
        """The parameters' device (diffusers' ``ModelMixin.device`` walks every parameter on each call)."""
        return self.rope_table.device

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].attention.wo.weight.dtype

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def num_blocks(self) -> int:
        return self.spec.length // self.config.block_size

    @property
    def prefix_length(self) -> int:
        """``P``: number of prefix positions."""
        return self.prefix.length

    @property
    def mask_id(self) -> int:
        """Index tokens: the ``[MASK]`` id (``vocab_size``)."""
        return self.spec.vocab_size

    @property
    def default_num_steps(self) -> int:
        if self.config.num_steps is not None:
            return self.config.num_steps
        return self.block_size if self.spec.kind == "index" else self.output_head.num_sampling_steps

    # ---------------------------------------------------------------- conditions
    @property
    def condition_kind(self) -> str:
        return self.config.condition

    def as_condition(self, cond, batch_size: int | None = None) -> Condition:
        """Accept a Condition, ``[B]`` labels, ``[B, Lc, Cc]`` features or None; check it fits this model."""
        if cond is None and batch_size is None:
            raise TypeError("cond must be a Condition (Condition(batch=B) for condition='none'), got None")
        return self.prefix.check(as_condition(cond, batch_size))

    def embed_prefix(self, cond: Condition, guided: bool = False, drop: bool | None = None) -> Prefix:
        """Prefix ``[B, P, C]`` (``[2B, P, C]`` with the null rows appended when ``guided``)."""
        cond = self.prefix.check(cond.to(self.device))
        prefix = self.prefix(cond, drop=drop)
        if guided:
            if cond.uncond_features is not None:
                null = self.prefix(Condition(features=cond.uncond_features, mask=cond.uncond_mask), drop=False)
            else:
                null = self.prefix.null(cond.batch_size, self.device)
            prefix = cat_prefixes(prefix, null)
        return prefix

    # ---------------------------------------------------------------- embeddings
    def embed(self, values: Tensor, level: Tensor | float | None = None) -> Tensor:
        """Token inputs → ``[B, T, C]``.

        ``index``: ``values: [B, T]`` long in ``[0, vocab_size]`` (``vocab_size`` = [MASK]); ``level`` unused.
        ``continuous``: ``values: [B, T, D]``, ``level``: ``[B, T]`` or a number in ``[0, 1]`` (None/0 = clean).
        """
        if self.spec.kind == "index":
            return self.tok_embeddings(values)
        x = values.to(self.dtype)
        level = torch.as_tensor(0.0 if level is None else level, dtype=self.dtype, device=x.device)
        return self.in_proj(x) + self.level_embedding(level.expand(x.shape[:2]))

    def embed_clean(self, data: Tensor) -> Tensor:
        """Clean ``Tokens.data``-shaped ``[B, T, channels]`` → ``[B, T, C]``."""
        return self.embed(data[..., 0].long() if self.spec.kind == "index" else data)

    # ---------------------------------------------------------------- backbone
    def _run(self, x: Tensor, layout: Layout, mask: Tensor, cache: KVCache | None = None, advance: int = 0) -> Tensor:
        """Blocks + final norm over ``x: [B, T, C]`` laid out as ``layout`` → ``[B, T, C]``.

        With a ``cache``, keys/values of all ``T`` positions are written after the cached ones, and the cache then
        keeps the first ``advance`` of them (the rest — a noisy block — is overwritten by the next pass).
        """
        rope = self.rope_table[layout.rope_rows(self.prefix_length)]
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.advance(advance)
        return self.norm(x)

    def hidden(self, prefix: Prefix, clean_x: Tensor, noisy_x: Tensor, noisy_start: int = 0) -> Tensor:
        """Full (uncached) skip-causal pass → ``z: [B, Tn, C]`` of the noisy positions.

        Args:
            prefix: ``x: [B, P, C]`` (+ key validity).
            clean_x: ``[B, Tc, C]`` embedded clean tokens of positions ``0..Tc−1`` (``Tc`` a multiple of ``K``).
            noisy_x: ``[B, Tn, C]`` embedded noisy tokens of positions ``noisy_start..noisy_start+Tn−1`` (whole
                blocks). Training: ``Tc = L − K``, ``noisy_start = 0``, ``Tn = L``.
        """
        k, length = self.block_size, self.spec.length
        b, tc, tn = clean_x.shape[0], clean_x.shape[1], noisy_x.shape[1]
        if tc % k or noisy_start % k or tn % k or tn < 1 or noisy_start + tn > length or tc > length:
            raise ValueError(f"hidden needs whole blocks of {k} inside L={length}: got {tc} clean tokens and {tn} "
                             f"noisy tokens from position {noisy_start}")
        device = noisy_x.device
        layout = cat_layouts(prefix_layout(self.prefix_length, device), token_layout(CLEAN, 0, tc, k, device),
                             token_layout(NOISY, noisy_start, tn, k, device))
        mask = skip_causal_mask(layout, layout)
        if prefix.key_valid is not None:
            mask = with_key_padding(mask, torch.cat([prefix.key_valid, prefix.key_valid.new_ones(b, tc + tn)], 1))
        x = torch.cat([prefix.x, clean_x.to(prefix.x.dtype), noisy_x.to(prefix.x.dtype)], dim=1)
        return self._run(x, layout, mask)[:, self.prefix_length + tc:]

    def new_cache(self, batch_size: int, device=None, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache for ``batch_size`` rows: the prefix, the clean blocks and one noisy block (``P + L``)."""
        attn = self.layers[0].attention
        return KVCache(len(self.layers), batch_size, attn.num_kv_heads, self.prefix_length + self.spec.length,
                       attn.head_dim, dtype=dtype or self.dtype, device=device or self.device)

    def cached_hidden(self, noisy_x: Tensor, block: int, cache: KVCache,
                      new_clean: Prefix | Tensor | None = None) -> Tensor:
        """One cached pass → ``z: [B, K, C]`` of noisy block ``block`` (embedded ``noisy_x: [B, K, C]``).

        ``new_clean`` is appended to the cache in the same pass: the :class:`Prefix` when the cache is empty (then
        ``block`` is 0), or the embedded clean block ``block − 1`` (``[B, K, C]``). Without it the cache must already
        hold the prefix and blocks ``0..block−1``.
        """
        k, p = self.block_size, self.prefix_length
        start, device = cache.length, noisy_x.device
        if noisy_x.shape[:2] != (cache.batch_size, k) or not 0 <= block < self.num_blocks:
            raise ValueError(f"cached_hidden needs noisy_x [{cache.batch_size}, {k}, C] of a block in "
                             f"[0, {self.num_blocks}), got {tuple(noisy_x.shape)} for block {block}")
        if isinstance(new_clean, Prefix):
            want, new_layout, new_x = 0, prefix_layout(p, device), new_clean.x
            if block != 0:
                raise ValueError(f"the prefix is prefilled with block 0, got block {block}")
            if new_clean.key_valid is not None:
                cache.key_valid = torch.ones(cache.batch_size, cache.max_length, dtype=torch.bool, device=device)
                cache.key_valid[:, :p] = new_clean.key_valid
        elif new_clean is not None:
            if block < 1 or new_clean.shape != noisy_x.shape:
                raise ValueError(f"a clean block is appended before noisy block >= 1 and has shape "
                                 f"{tuple(noisy_x.shape)}, got block {block} and shape {tuple(new_clean.shape)}")
            want, new_layout, new_x = p + (block - 1) * k, token_layout(CLEAN, (block - 1) * k, k, k, device), new_clean
        else:
            want, new_layout, new_x = p + block * k, token_layout(CLEAN, 0, 0, k, device), noisy_x[:, :0]
        if start != want:
            raise ValueError(f"the cache holds {start} positions but this pass for block {block} needs {want} "
                             f"(prefix {p} + whole clean blocks before it)")
        cached = cat_layouts(prefix_layout(p, device), token_layout(CLEAN, 0, start - p, k, device)) if start \
            else token_layout(CLEAN, 0, 0, k, device)
        queries = cat_layouts(new_layout, token_layout(NOISY, block * k, k, k, device))
        mask = skip_causal_mask(queries, cat_layouts(cached, queries))
        if cache.key_valid is not None:
            mask = with_key_padding(mask, cache.key_valid[:, :start + queries.length])
        x = torch.cat([new_x.to(cache.k.dtype), noisy_x.to(cache.k.dtype)], dim=1)
        return self._run(x, queries, mask, cache, advance=new_layout.length)[:, new_layout.length:]

    # ---------------------------------------------------------------- the two verbs
    def forward(self, tokens: Tokens, cond: Condition | Tensor | None = None, return_logits: bool = False,
                generator: torch.Generator | None = None) -> dict:
        """Training pass: noise every block, one skip-causal pass, the process's loss.

        Returns ``{"loss": scalar, "z": [B, L, C]}`` (+ ``"logits": [B, L, 1, V]`` of the noisy stream for index
        tokens when ``return_logits``). ``generator`` seeds the noise levels, masks and noise.
        """
        self.check_tokens(tokens)
        b = tokens.batch_size
        cond = self.as_condition(cond, b if self.condition_kind == "none" else None)
        if cond.batch_size != b:
            raise ValueError(f"cond has batch size {cond.batch_size} but tokens have {b}")
        k, length = self.block_size, self.spec.length
        data = tokens.data.to(self.device)
        clean = data[..., 0] if self.spec.kind == "index" else data.to(self.dtype)
        noisy, level, info = self._process.noise(clean, k, generator)
        z = self.hidden(self.embed_prefix(cond), self.embed_clean(data[:, :length - k]), self.embed(noisy, level))
        out = {"loss": self._process.loss(z, clean, info), "z": z}
        if return_logits and self.spec.kind == "index":
            out["logits"] = self.output_head.logits(z.flatten(0, 1)).unflatten(0, (b, length))
        return out

    def _check_generate_args(self, cond, params, generator, decoding) -> tuple[Condition, SamplingParams, int]:
        if decoding is not None:
            raise ValueError(f"decoding must be None for BlockDiffusion, got {decoding!r}")
        cond, params = self.check_generate_args(cond, params, generator)
        steps = self.default_num_steps if params.num_steps is None else params.num_steps
        if self.spec.kind == "index":
            check_masked_steps(steps, self.block_size)
        elif isinstance(self.output_head, DiffusionHead):
            self.output_head.chain(steps)
        total = steps * self.num_blocks
        if params.guidance_schedule.kind == "steps" and len(params.guidance_schedule.values) != total:
            raise ValueError(f"GuidanceSchedule.values has {len(params.guidance_schedule.values)} entries but the "
                             f"generation takes blocks × num_steps = {self.num_blocks} × {steps} = {total} steps")
        return cond, params, steps

    @torch.no_grad()
    def generate(
        self,
        cond: Condition | Tensor | None,
        params: SamplingParams | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        decoding=None,
        progress: bool = False,
        use_cache: bool = True,
    ) -> Tokens:
        """Sample ``Tokens`` block by block, ``params.num_steps`` denoising passes per block.

        Args:
            cond: labels ``[B]``, text features or a :class:`Condition` (``Condition(batch=B)`` when unconditional).
            params: sampling params: ``num_steps`` per block (masked blocks: ``<= block_size``); guidance at global
                step ``i·S + s`` of ``blocks·S`` is ``params.at_step``; temperature/top-k/top-p/min-p act on index
                logits (continuous heads use their own ``noise_temperature``).
            generator: one ``torch.Generator`` or a list of ``B`` (row ``i`` then depends only on its own).
            decoding: must be None.
            progress: show a tqdm bar over the ``blocks × num_steps`` passes.
            use_cache: KV cache across blocks (default) or a full recomputation per pass.
        """
        cond, params, steps = self._check_generate_args(cond, params, generator, decoding)
        was_training = self.training
        self.eval()  # no dropout while sampling, whatever mode the caller left the model in
        try:
            data = self._decode(cond, params, generator, steps, progress, use_cache)
        finally:
            self.train(was_training)
        return Tokens(data, self.spec)

    def _decode(self, cond: Condition, params: SamplingParams, generator, steps: int, progress: bool,
                use_cache: bool) -> Tensor:
        """Blocks × steps passes → ``Tokens.data`` ``[B, L, channels]``."""
        b, k, nb = cond.batch_size, self.block_size, self.num_blocks
        guided = params.uses_guidance
        prefix = self.embed_prefix(cond, guided, drop=False)
        rows = prefix.x.shape[0]
        cache = self.new_cache(rows) if use_cache else None
        pending: Prefix | Tensor | None = prefix  # what the next cached pass appends to the cache
        clean_x = prefix.x.new_zeros(rows, 0, prefix.x.shape[2])  # uncached path: clean blocks so far
        out, total = [], nb * steps
        bar = tqdm(total=total, disable=not progress, desc="block_diffusion", leave=False)
        process = self._process
        for blk in range(nb):
            state = process.start(b, k, steps, generator, prefix.x)
            for s in range(steps):
                noisy_x = self.embed(*process.noisy_input(state, s))
                if guided:
                    noisy_x = torch.cat([noisy_x, noisy_x])
                if use_cache:
                    z = self.cached_hidden(noisy_x, blk, cache, pending)
                    pending = None
                else:
                    z = self.hidden(prefix, clean_x, noisy_x, blk * k)
                p = params.at_step(blk * steps + s, total)
                z_uncond = z[b:] if guided and p.guidance_scale != 1.0 else None
                state = process.step(state, z[:b], z_uncond, p, s, generator)
                bar.update(1)
            values = process.result(state)  # [b, K, channels]
            out.append(values)
            if blk + 1 < nb:
                pending = self.embed_clean(torch.cat([values, values]) if guided else values)
                if not use_cache:
                    clean_x = torch.cat([clean_x, pending], dim=1)
        bar.close()
        return torch.cat(out, dim=1)


__all__ = ["BlockDiffusion"]
