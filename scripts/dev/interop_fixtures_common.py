"""What every interop-fixture maker shares: reference commits, tolerances, the size variants, seeding,
randomised parameters and the fixture writer (see make_interop_fixtures.py)."""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn

COMMITS = {"llamagen": ("FoundationVision/LlamaGen", "ce98ec41803a74a90ce68c40ababa9eaeffeb4ec"),
           "var": ("FoundationVision/VAR", "78b95394fc5896192e3a003e4b295f8ea743c48f"),
           "mar": ("LTH14/mar", "fe470ac24afbee924668d8c5c83e9fec60af3a73")}
TOL = ("float32 tensors: max|got-ref| <= 2e-5 * max(1, max|ref|); integer/bool tensors: exact equality; "
       "float64 schedule tensors: <= 1e-12 absolute.")
MODE = "eval(), float32, CPU, torch.no_grad"

# ------------------------------------------------------------------ variants (every README size changes)
VARIANTS = {
    "v1": {
        "llamagen_vq": dict(model_args=dict(codebook_size=200, codebook_embed_dim=6, encoder_ch_mult=[1, 2, 2],
                                            decoder_ch_mult=[1, 2, 2], z_channels=12),
                            ed=dict(ch=32, num_res_blocks=2), grid=5),
        "llamagen_gpt": dict(dim=48, n_layer=3, n_head=3, num_classes=7, multiple_of=256),
        "var_vqvae": dict(vqvae=dict(vocab_size=50, z_channels=6, ch=32, share_quant_resi=4,
                                     v_patch_nums=[1, 2, 3, 4, 5, 6]),
                          dd=dict(ch_mult=[1, 2, 2], num_res_blocks=2)),
        "var_var": dict(num_classes=5, depth=3, embed_dim=48, num_heads=3, mlp_ratio=4.0),
        "mar_vae": dict(embed_dim=6, ch_mult=[1, 2, 2], ed=dict(ch=32, num_res_blocks=2, resolution=16,
                                                                encoder_attn_resolutions=[4],
                                                                decoder_attn_resolutions=[])),
        "mar_mar": dict(img_size=16, vae_stride=4, patch_size=1, encoder_embed_dim=48, encoder_depth=2,
                        encoder_num_heads=3, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
                        mlp_ratio=4.0, class_num=7, buffer_size=6, diffloss_d=3, diffloss_w=48,
                        num_sampling_steps="50"),
    },
    "v2": {
        "llamagen_vq": dict(model_args=dict(codebook_size=64, codebook_embed_dim=4, encoder_ch_mult=[1, 1, 2, 1],
                                            decoder_ch_mult=[1, 2, 1, 1], z_channels=7),
                            ed=dict(ch=32, num_res_blocks=3), grid=3),
        "llamagen_gpt": dict(dim=32, n_layer=1, n_head=2, num_classes=13, multiple_of=32),
        "var_vqvae": dict(vqvae=dict(vocab_size=120, z_channels=4, ch=32, share_quant_resi=3,
                                     v_patch_nums=[1, 2, 3, 5]),
                          dd=dict(ch_mult=[1, 1, 2, 1], num_res_blocks=3)),
        "var_var": dict(num_classes=17, depth=1, embed_dim=32, num_heads=2, mlp_ratio=2.5),
        "mar_vae": dict(embed_dim=4, ch_mult=[1, 1, 2, 1], ed=dict(ch=32, num_res_blocks=1, resolution=32,
                                                                   encoder_attn_resolutions=[8, 4],
                                                                   decoder_attn_resolutions=[4])),
        "mar_mar": dict(img_size=48, vae_stride=8, patch_size=2, encoder_embed_dim=32, encoder_depth=1,
                        encoder_num_heads=2, decoder_embed_dim=48, decoder_depth=2, decoder_num_heads=3,
                        mlp_ratio=2.0, class_num=3, buffer_size=2, diffloss_d=1, diffloss_w=32,
                        num_sampling_steps="25"),
    },
    # VAR only: the other phi layouts (non-shared with 4 convs hits VAR's 1/(3K) tick rule; fully shared) and no
    # encoder/decoder attention
    "v3": {
        "var_vqvae": dict(vqvae=dict(vocab_size=70, z_channels=5, ch=32, share_quant_resi=0, default_qresi_counts=4,
                                     v_patch_nums=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
                          dd=dict(ch_mult=[1, 2], num_res_blocks=1)),
        "var_var": dict(num_classes=4, depth=2, embed_dim=64, num_heads=4, mlp_ratio=3.0),
    },
    "v4": {
        "var_vqvae": dict(vqvae=dict(vocab_size=33, z_channels=3, ch=32, share_quant_resi=1,
                                     v_patch_nums=[2, 3, 4, 6, 8]),
                          dd=dict(ch_mult=[1, 1, 2], num_res_blocks=1, using_sa=False, using_mid_sa=False)),
        "var_var": dict(num_classes=6, depth=2, embed_dim=32, num_heads=1, mlp_ratio=4.0),
    },
    # small enough to keep in the repository (< 1 MB in all): one level-3 autoencoder per project at width 32
    "small": {
        "llamagen_vq": dict(model_args=dict(codebook_size=40, codebook_embed_dim=4, encoder_ch_mult=[1, 1, 1],
                                            decoder_ch_mult=[1, 1, 1], z_channels=5),
                            ed=dict(ch=32, num_res_blocks=1), grid=3),
        "llamagen_gpt": dict(dim=32, n_layer=1, n_head=2, num_classes=3, multiple_of=32),
        "var_vqvae": dict(vqvae=dict(vocab_size=24, z_channels=4, ch=32, share_quant_resi=4,
                                     v_patch_nums=[1, 2, 3, 4, 5, 6]),
                          dd=dict(ch_mult=[1, 1, 1], num_res_blocks=1)),
        "var_var": dict(num_classes=3, depth=1, embed_dim=32, num_heads=2, mlp_ratio=2.0),
        "mar_vae": dict(embed_dim=4, ch_mult=[1, 1, 1], ed=dict(ch=32, num_res_blocks=1, resolution=24,
                                                                encoder_attn_resolutions=[6],
                                                                decoder_attn_resolutions=[])),
        "mar_mar": dict(img_size=24, vae_stride=4, patch_size=2, encoder_embed_dim=32, encoder_depth=1,
                        encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=1,
                        mlp_ratio=2.0, class_num=3, buffer_size=3, diffloss_d=1, diffloss_w=32,
                        num_sampling_steps="10"),
    },
}


# ------------------------------------------------------------------ helpers
def gen(seed):
    return torch.Generator().manual_seed(seed)


def randomize(model: nn.Module, seed: int, norm_types=()) -> None:
    """Overwrite every parameter as README section 0 describes."""
    g = gen(seed)
    norm_types = (nn.GroupNorm, nn.LayerNorm, *norm_types)
    done = set()
    with torch.no_grad():
        for _, m in model.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                if id(p) in done:
                    continue
                done.add(id(p))
                if isinstance(m, (nn.Linear, nn.Conv2d)) and pname == "weight":
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
                elif isinstance(m, norm_types) and pname == "weight":
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
                elif isinstance(m, nn.Embedding):
                    p.copy_(torch.randn(p.shape, generator=g))
                elif pname == "bias" or pname.endswith("_bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))


def sd_list(sd):
    return [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in sd.items()]


def write(folder, ckpt_name, container_obj, config, tensors, meta):
    """tensors: dict name -> tensor; meta: dict name -> dict(role, meaning, produced_by, ...)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    torch.save(container_obj, os.path.join(folder, ckpt_name))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, os.path.join(folder, "io.safetensors"))
    entries = []
    for name, t in tensors.items():
        entries.append({"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                        **meta[name]})
    with open(os.path.join(folder, "io.json"), "w") as f:
        json.dump({"file": "io.safetensors", "tensors": entries, "model": config.get("model", ""), "mode": MODE,
                   "generation": f"reference classes, torch {torch.__version__}, CPU, 2 intra-op threads "
                                 f"(tokenloom alt-size generator)",
                   "recommended_tolerance": TOL}, f, indent=1)


def ckpt_info(file, container, sd):
    return {"file": file, "container": container, "num_tensors": len(sd),
            "bytes_float32": int(sum(v.numel() * 4 for v in sd.values() if v.is_floating_point()))}


def margin_of(d):
    """Smallest gap between best and second-best distance over rows of d [N, V]."""
    two = d.topk(2, dim=1, largest=False).values
    return float((two[:, 1] - two[:, 0]).min())
