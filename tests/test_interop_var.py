"""VAR transformer checkpoints → NextScaleAR, proven against the fixtures' recorded outputs.

Fixtures are read at run time from ``$TOKENLOOM_FIXTURES`` (default ``../shared/fixtures``) and from
``tests/fixtures/alt_sizes`` (other sizes, kept small), directory ``var/var`` (and ``var/vqvae`` for the tokenizer
the transformer was fed with, where present); every size comes from the checkpoint and its config.json, so fixture
sets of other sizes run unchanged. Tolerance (fixtures README §0):
float32 ``max|got − ref| <= 2e-5 · max(1, max|ref|)``, integers exactly.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tokenloom.generators.condition import Condition
from tokenloom.interop.var import (
    VAR_PRESETS,
    convert_var,
    load_state_dict,
    load_var_folder,
    next_scale_config,
    read_var_config,
    var_sampling_params,
    write_var_pipeline,
)
from tokenloom.tokens import Tokens

ROOTS = {"env": Path(os.environ["TOKENLOOM_FIXTURES"]), "alt_sizes": Path(__file__).parent / "fixtures" / "alt_sizes"}
ROOT_PARAMS = [pytest.param(root, id=name, marks=pytest.mark.skipif(
    not (root / "var" / "var" / "io.safetensors").is_file(), reason=f"no VAR fixture under {root}"))
    for name, root in ROOTS.items()]


def checkpoint_path(folder: Path) -> Path:
    """The fixture's checkpoint: config.json's ``checkpoint.file``, else the folder's only ``*.pth``."""
    config = json.loads((folder / "config.json").read_text())
    name = config.get("checkpoint", {}).get("file")
    return folder / name if name else next(folder.glob("*.pth"))


def assert_within_tolerance(name: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs recorded {tuple(ref.shape)}"
    if not ref.is_floating_point():
        assert torch.equal(got, ref), f"{name}: integer tensor differs"
        return 0.0
    diff = (got.double() - ref.double()).abs().max().item()
    bound = 2e-5 * max(1.0, ref.abs().max().item())
    assert diff <= bound, f"{name}: max|got - ref| = {diff:.3g} > {bound:.3g}"
    return diff


@pytest.fixture(scope="module", params=ROOT_PARAMS)
def root(request) -> Path:
    return request.param


@pytest.fixture(scope="module")
def fixture(root):
    var_dir = root / "var" / "var"
    io = load_file(str(var_dir / "io.safetensors"))
    meta = json.loads((var_dir / "io.json").read_text())
    config = json.loads((var_dir / "config.json").read_text())
    model = load_var_folder(var_dir)
    return model, io, meta, config


def needs_vae(root: Path) -> Path:
    """The fixture set's VQVAE folder (skips when the set has none)."""
    vae_dir = root / "var" / "vqvae"
    if not (vae_dir / "io.safetensors").is_file():
        pytest.skip(f"no VAR VQVAE fixture in {vae_dir}")
    return vae_dir


def cached_logits(model, labels: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
    """VAR's inference path: one cached forward pass per scale, fed the recorded next-scale inputs."""
    state = model.condition_state(Condition(labels=labels))
    ada, cache = model.modulations(state.vec), model.new_cache(len(labels))
    off, x, zs = model.spec.layout.offsets(), model.start_tokens(state.vec), []
    first = model.first_l
    for k in range(len(off) - 1):
        zs.append(model.step(x, k, state, ada, cache))
        if k + 2 < len(off):
            x = model.input_tokens(x_in[:, off[k + 1] - first:off[k + 2] - first], off[k + 1])
    z = torch.cat(zs, 1)
    return model.output_head.logits(z.flatten(0, 1)).unflatten(0, z.shape[:2])[..., 0, :]


@torch.no_grad()
def test_var_reproduces_every_recorded_output(fixture):
    model, io, meta, _ = fixture
    labels, x_in = io["labels"], io["x_BLCv_wo_first_l"]
    outputs = {"logits": lambda: model.full_logits(labels, x_in)[..., 0, :]}
    recorded = [t["name"] for t in meta["tensors"] if t["role"] == "output"]
    assert recorded and set(recorded) <= set(outputs), f"unhandled recorded outputs {set(recorded) - set(outputs)}"
    for name in recorded:
        assert_within_tolerance(name, outputs[name](), io[name])


@torch.no_grad()
def test_var_cached_per_scale_inference_reproduces_recorded_logits(fixture):
    model, io, _, _ = fixture
    got = cached_logits(model, io["labels"], io["x_BLCv_wo_first_l"])
    assert_within_tolerance("logits (cached)", got, io["logits"])


@torch.no_grad()
def test_var_training_loss_is_cross_entropy_of_recorded_logits(fixture):
    model, io, _, _ = fixture
    tokens = Tokens(io["gt_idx_BL"][..., None], model.spec)
    loss = model(tokens, io["labels"], inputs=io["x_BLCv_wo_first_l"])["loss"]
    want = F.cross_entropy(io["logits"].flatten(0, 1), io["gt_idx_BL"].flatten())
    assert abs(loss.item() - want.item()) <= 2e-5 * max(1.0, want.item())


@torch.no_grad()
def test_bound_vqvae_gives_the_recorded_teacher_inputs(root, fixture):
    from tokenloom.interop.var_vqvae import load_var_vqvae_folder

    model, io, _, _ = fixture
    vae = load_var_vqvae_folder(needs_vae(root))
    model.bind_tokenizer(vae)
    x = vae.teacher_inputs(Tokens(io["gt_idx_BL"][..., None], model.spec))
    assert_within_tolerance("x_BLCv_wo_first_l", x, io["x_BLCv_wo_first_l"])


def test_sizes_come_from_the_checkpoint_and_agree_with_config(root, fixture):
    var_dir = root / "var" / "var"
    model, io, _, config = fixture
    sd = load_state_dict(checkpoint_path(var_dir))
    from_checkpoint = next_scale_config(sd)
    from_config = next_scale_config(sd, var_dir / "config.json")
    var = config["VAR"]
    assert from_checkpoint["token_spec"] == from_config["token_spec"] == model.config.token_spec
    for key in ("width", "depth", "num_heads", "num_classes", "input_dim", "attn_l2_norm", "shared_adaln"):
        assert from_checkpoint[key] == from_config[key] == model.config[key]
    assert model.config.width == var["embed_dim"] and model.config.depth == var["depth"]
    assert model.config.num_heads == var["num_heads"] and model.config.num_classes == var["num_classes"]
    assert [h for h, _ in model.spec.layout.sizes] == var["patch_nums"]
    assert model.spec.vocab_size == io["logits"].shape[-1]
    assert model.config.input_dim == io["x_BLCv_wo_first_l"].shape[-1]


def test_conversion_errors_name_keys_and_shapes(root, fixture, tmp_path):
    _, _, _, config = fixture
    sd = load_state_dict(checkpoint_path(root / "var" / "var"))
    last = config["VAR"]["depth"] - 1
    with pytest.raises(ValueError, match="unknown VAR checkpoint container.*training checkpoint"):
        convert_var({"trainer": {"x": 1}, "args": {}})
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="unknown VAR checkpoint container.*got list"):
        convert_var(tmp_path / "list.pth")
    bad = dict(sd)
    del bad[f"blocks.{last}.attn.q_bias"]
    bad["extra.weight"] = torch.zeros(3)
    proj = bad[f"blocks.{last}.attn.proj.weight"]  # not a size the converter reads
    bad[f"blocks.{last}.attn.proj.weight"] = proj[:-2]
    with pytest.raises(ValueError) as err:
        convert_var(bad)
    msg = str(err.value)
    assert f"missing keys: ['blocks.{last}.attn.q_bias']" in msg and "unexpected keys: ['extra.weight']" in msg
    assert f"blocks.{last}.attn.proj.weight: checkpoint {tuple(proj[:-2].shape)} vs model {tuple(proj.shape)}" in msg
    wrong_depth = config["VAR"]["depth"] + 1
    with pytest.raises(ValueError, match=f"config says depth={wrong_depth} but the checkpoint has depth="):
        convert_var(sd, {**config["VAR"], "depth": wrong_depth})
    with pytest.raises(ValueError, match="patch_nums"):
        convert_var(sd, {**config["VAR"], "patch_nums": config["VAR"]["patch_nums"][:-1]})
    with pytest.raises(ValueError, match="zero_k_bias must be all zeros"):
        convert_var({**sd, "blocks.0.attn.zero_k_bias": torch.ones_like(sd["blocks.0.attn.zero_k_bias"])})
    with pytest.raises(ValueError, match="missing key 'word_embed.weight'"):
        convert_var({k: v for k, v in sd.items() if k != "word_embed.weight"})
    with pytest.raises(ValueError, match="unknown VAR arguments"):
        read_var_config({"VAR": {"depht": 2}})


def test_var_sampling_params_reproduce_vars_cfg_ramp():
    params = var_sampling_params(cfg=4.0, top_k=900, top_p=0.0)
    assert params.top_k == 900 and params.top_p == 1.0  # VAR's top_p = 0 means off
    for k in range(10):  # VAR: logits = (1 + t)·cond − t·uncond, t = cfg·k/(K − 1)
        t = 4.0 * k / 9
        assert math.isclose(params.at_step(k, 10).guidance_scale, 1 + t, rel_tol=1e-12)
    assert var_sampling_params(cfg=1.5, top_p=0.96).top_p == 0.96
    with pytest.raises(ValueError, match="top_p"):
        var_sampling_params(top_p=1.5)


def test_presets_are_the_released_sizes():
    for depth in (16, 20, 24, 30):
        p = read_var_config(f"d{depth}")
        assert p == VAR_PRESETS[f"d{depth}"] and p["embed_dim"] == 64 * depth and p["num_heads"] == depth
        assert p["patch_nums"] == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16] and p["attn_l2_norm"] and not p["shared_aln"]


@torch.no_grad()
def test_converted_var_generates_images_through_the_class_to_image_pipeline(root, fixture, tmp_path):
    model, _, _, config = fixture
    var_dir, vae_dir = root / "var" / "var", needs_vae(root)
    vae_config = json.loads((vae_dir / "config.json").read_text())
    pipe = write_var_pipeline(checkpoint_path(var_dir), checkpoint_path(vae_dir),
                              tmp_path, var_config=var_dir / "config.json", vqvae=vae_config["VQVAE"],
                              ddconfig=vae_config["ddconfig_overrides"])
    index = json.loads((tmp_path / "model_index.json").read_text())
    defaults = index["sampling_defaults"]  # VAR's evaluation settings cfg=1.5, top_k=900, top_p=0.96
    assert defaults["guidance_scale"] == 2.5 and defaults["top_p"] == 0.96
    assert defaults["guidance_schedule"]["kind"] == "linear" and defaults["guidance_schedule"]["start"] == 1.0
    assert defaults["top_k"] == (900 if model.spec.vocab_size > 900 else 0)  # top_k >= V keeps everything
    pipe.set_progress_bar_config(disable=True)
    n = config["VAR"]["num_classes"]
    a, b = min(1, n - 1), n - 1  # two valid class labels of this fixture
    run = lambda: pipe([a, b], generator=torch.Generator().manual_seed(0), output_type="pt")
    out = run()
    side = config["VAR"]["patch_nums"][-1] * pipe.image_tokenizer.downsample_factor
    assert out.images.shape == (2, 3, side, side) and torch.isfinite(out.images).all()
    assert out.tokens.spec == model.spec
    assert torch.equal(out.tokens.data, run().tokens.data)
    alone = pipe([b], generator=[torch.Generator().manual_seed(5)], output_type="tokens").tokens
    batch = pipe([a, b], generator=[torch.Generator().manual_seed(4), torch.Generator().manual_seed(5)],
                 output_type="tokens").tokens
    assert torch.equal(batch.data[1:], alone.data)
    import tokenloom

    loaded = tokenloom.pipeline("class-to-image", model=str(tmp_path))  # the written folder loads and samples
    loaded.set_progress_bar_config(disable=True)
    if not loaded.token_generator._codec:  # the pipeline should bind when built (reported to the lead)
        loaded.token_generator.bind_tokenizer(loaded.image_tokenizer)
    again = loaded([a, b], generator=torch.Generator().manual_seed(0), output_type="pt")
    assert torch.equal(again.tokens.data, out.tokens.data) and torch.equal(again.images, out.images)


# ------------------------------------------------------------------ other sizes vs an independent reference
def random_var_state_dict(patch_nums, width, heads, depth, vocab, c_vae, num_classes, hidden, *, l2=True,
                          shared=False, seed=0) -> dict[str, torch.Tensor]:
    """A VAR state dict with the reference's key names and random weights of the given sizes."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, std=1.0: torch.randn(*shape, generator=g) * std
    lin = lambda o, i: rnd(o, i, std=i ** -0.5)
    level = torch.cat([torch.full((p * p,), k) for k, p in enumerate(patch_nums)])
    length, first = len(level), patch_nums[0] ** 2
    sd = {"pos_start": rnd(1, first, width, std=0.5), "pos_1LC": rnd(1, length, width, std=0.5),
          "lvl_1L": level[None].clone(),
          "attn_bias_for_masking": torch.where(level[:, None] >= level[None, :], 0.0, -math.inf)[None, None],
          "word_embed.weight": lin(width, c_vae), "word_embed.bias": rnd(width, std=0.1),
          "class_emb.weight": rnd(num_classes + 1, width), "lvl_embed.weight": rnd(len(patch_nums), width),
          "head_nm.ada_lin.1.weight": lin(2 * width, width), "head_nm.ada_lin.1.bias": rnd(2 * width, std=0.1),
          "head.weight": lin(vocab, width), "head.bias": rnd(vocab, std=0.1)}
    if shared:
        sd["shared_ada_lin.1.weight"], sd["shared_ada_lin.1.bias"] = lin(6 * width, width), rnd(6 * width, std=0.1)
    for i in range(depth):
        p = f"blocks.{i}."
        if l2:
            sd[p + "attn.scale_mul_1H11"] = math.log(4.0) + rnd(1, heads, 1, 1, std=0.5)
        sd.update({p + "attn.q_bias": rnd(width, std=0.1), p + "attn.v_bias": rnd(width, std=0.1),
                   p + "attn.zero_k_bias": torch.zeros(width), p + "attn.mat_qkv.weight": lin(3 * width, width),
                   p + "attn.proj.weight": lin(width, width), p + "attn.proj.bias": rnd(width, std=0.1),
                   p + "ffn.fc1.weight": lin(hidden, width), p + "ffn.fc1.bias": rnd(hidden, std=0.1),
                   p + "ffn.fc2.weight": lin(width, hidden), p + "ffn.fc2.bias": rnd(width, std=0.1)})
        if shared:
            sd[p + "ada_gss"] = rnd(1, 1, 6, width, std=width ** -0.5)
        else:
            sd[p + "ada_lin.1.weight"], sd[p + "ada_lin.1.bias"] = lin(6 * width, width), rnd(6 * width, std=0.1)
    return sd


def var_reference_logits(sd, patch_nums, heads, eps, labels, x_in, *, l2=True, shared=False):
    """VAR's forward written from the fixtures README §5, in float64 (no tokenloom code)."""
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    level = torch.cat([torch.full((p * p,), k) for k, p in enumerate(patch_nums)])
    first, width = patch_nums[0] ** 2, sd["word_embed.weight"].shape[0]
    hd = width // heads
    cond = sd["class_emb.weight"][labels]
    b = len(labels)
    x = torch.cat([cond[:, None].expand(b, first, width) + sd["pos_start"],
                   x_in.double() @ sd["word_embed.weight"].T + sd["word_embed.bias"]], 1)
    x = x + sd["lvl_embed.weight"][level] + sd["pos_1LC"]
    mask = torch.where(level[:, None] >= level[None, :], 0.0, -math.inf).double()
    ln = lambda t: F.layer_norm(t, (width,), eps=eps)
    shared_mod = (F.silu(cond) @ sd["shared_ada_lin.1.weight"].T + sd["shared_ada_lin.1.bias"]) if shared else None
    i = 0
    while f"blocks.{i}.attn.mat_qkv.weight" in sd:
        p = f"blocks.{i}."
        if shared:
            ada = sd[p + "ada_gss"] + shared_mod.view(b, 1, 6, width)
        else:
            ada = (F.silu(cond) @ sd[p + "ada_lin.1.weight"].T + sd[p + "ada_lin.1.bias"]).view(b, 1, 6, width)
        g1, g2, s1, s2, sh1, sh2 = ada.unbind(2)
        h = ln(x) * (1 + s1) + sh1
        bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros(width).double(), sd[p + "attn.v_bias"]])
        q, k, v = (h @ sd[p + "attn.mat_qkv.weight"].T + bias).view(b, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
        if l2:
            mul = sd[p + "attn.scale_mul_1H11"].clamp_max(4.605170249938965).exp()
            q, k, scale = q / q.norm(dim=-1, keepdim=True) * mul, k / k.norm(dim=-1, keepdim=True), 1.0
        else:
            scale = 0.25 / math.sqrt(hd)
        att = ((q @ k.transpose(-1, -2)) * scale + mask).softmax(-1) @ v
        merged = att.transpose(1, 2).reshape(b, -1, width)
        x = x + g1 * (merged @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"])
        h = ln(x) * (1 + s2) + sh2
        f = F.gelu(h @ sd[p + "ffn.fc1.weight"].T + sd[p + "ffn.fc1.bias"], approximate="tanh")
        x = x + g2 * (f @ sd[p + "ffn.fc2.weight"].T + sd[p + "ffn.fc2.bias"])
        i += 1
    scale, shift = (F.silu(cond) @ sd["head_nm.ada_lin.1.weight"].T + sd["head_nm.ada_lin.1.bias"]).view(
        b, 1, 2, width).unbind(2)
    return (ln(x) * (1 + scale) + shift) @ sd["head.weight"].T + sd["head.bias"]


@pytest.mark.parametrize("sizes", [
    dict(patch_nums=[2, 3, 5], width=48, heads=3, depth=3, vocab=37, c_vae=5, num_classes=7, hidden=120),
    dict(patch_nums=[1, 2, 4, 6], width=32, heads=2, depth=1, vocab=11, c_vae=3, num_classes=2, hidden=80,
         l2=False, shared=True),
])
@torch.no_grad()
def test_other_sizes_match_an_independent_reference(sizes):
    sizes = dict(sizes)
    l2, shared = sizes.pop("l2", True), sizes.pop("shared", False)
    sd = random_var_state_dict(**sizes, l2=l2, shared=shared)
    config = None if l2 else {"num_heads": sizes["heads"], "norm_eps": 1e-6}
    model = convert_var(sd, config)
    labels = torch.tensor([0, sizes["num_classes"], 1])
    length = sum(p * p for p in sizes["patch_nums"])
    g = torch.Generator().manual_seed(1)
    x_in = torch.randn(3, length - sizes["patch_nums"][0] ** 2, sizes["c_vae"], generator=g)
    ref = var_reference_logits(sd, sizes["patch_nums"], sizes["heads"], 1e-6, labels, x_in, l2=l2, shared=shared)
    got = model.full_logits(labels, x_in)[..., 0, :]
    assert_within_tolerance("logits", got, ref.float())
    assert_within_tolerance("logits (cached)", cached_logits(model, labels, x_in), ref.float())


@pytest.mark.parametrize("share,counts,patch_nums,want", [
    # VAR's PhiNonShared picks with the same ticks as PhiPartiallyShared: 1/(3K) when K = 4 (scale 2 of 10 → conv 1)
    (0, 4, list(range(1, 11)), [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]),
    (0, 0, [1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5]),
    (0, 3, [1, 2, 3, 5, 8, 10], [0, 0, 1, 1, 2, 2]),
])
def test_non_shared_phi_map_is_vars(share, counts, patch_nums, want):
    """Expected maps read off the reference ``VectorQuantizer2(share_quant_resi=0)`` (``quant_resi[si / (SN - 1)]``)."""
    from tokenloom.interop.var_vqvae import tokenizer_config_from_var

    cfg = tokenizer_config_from_var({"share_quant_resi": share, "default_qresi_counts": counts,
                                     "v_patch_nums": patch_nums, "vocab_size": 8, "z_channels": 4})
    assert cfg["num_phi"] == (counts or len(patch_nums)) and cfg["phi_index"] == want
