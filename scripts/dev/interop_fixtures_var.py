"""VAR checkpoint-parity fixtures from the reference classes (see make_interop_fixtures.py)."""

from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F
from interop_fixtures_common import COMMITS, VARIANTS, ckpt_info, gen, margin_of, randomize, sd_list, write


# ------------------------------------------------------------------ VAR
def make_var(ref, out, var, seed0):
    sys.path.insert(0, os.path.join(ref, "var"))
    import numpy as np
    from models.basic_vae import Decoder, Encoder
    from models.var import VAR
    from models.vqvae import VQVAE

    repo, commit = COMMITS["var"]
    v = VARIANTS[var]["var_vqvae"]
    vq_args = dict(vocab_size=v["vqvae"]["vocab_size"], z_channels=v["vqvae"]["z_channels"], ch=v["vqvae"]["ch"],
                   dropout=0.0, beta=0.25, using_znorm=False, quant_conv_ks=3, quant_resi=0.5,
                   share_quant_resi=v["vqvae"]["share_quant_resi"],
                   default_qresi_counts=v["vqvae"].get("default_qresi_counts", 0),
                   v_patch_nums=list(v["vqvae"]["v_patch_nums"]), test_mode=True)
    dd = dict(ch_mult=v["dd"]["ch_mult"], num_res_blocks=v["dd"]["num_res_blocks"],
              using_sa=v["dd"].get("using_sa", True), using_mid_sa=v["dd"].get("using_mid_sa", True),
              in_channels=3, dropout=0.0)
    torch.manual_seed(seed0 + 3)
    vae = VQVAE(**{**vq_args, "v_patch_nums": tuple(vq_args["v_patch_nums"])})
    common = dict(ch=vq_args["ch"], ch_mult=dd["ch_mult"], num_res_blocks=dd["num_res_blocks"], dropout=0.0,
                  in_channels=3, z_channels=vq_args["z_channels"], using_sa=dd["using_sa"],
                  using_mid_sa=dd["using_mid_sa"])
    vae.encoder = Encoder(double_z=False, **common)
    vae.decoder = Decoder(**common)
    randomize(vae, seed0 + 13)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.5)
        vae.decoder.conv_out.bias.mul_(0.5)
    vae.eval()
    pn = vq_args["v_patch_nums"]
    SN = len(pn)
    factor = 2 ** (len(dd["ch_mult"]) - 1)
    size = pn[-1] * factor
    C = vq_args["z_channels"]
    E = vae.quantize.embedding.weight
    with torch.no_grad():
        seed, best = seed0 + 23, None
        while True:
            image = torch.rand(2, 3, size, size, generator=gen(seed)) * 2 - 1
            f = vae.quant_conv(vae.encoder(image))
            fhats = vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)
            margins = []
            for si, p in enumerate(pn):
                rest = f - (fhats[si - 1] if si else 0)
                z = F.interpolate(rest, size=(p, p), mode="area") if si != SN - 1 else rest
                z = z.permute(0, 2, 3, 1).reshape(-1, C)
                d = (z ** 2).sum(1, keepdim=True) + (E ** 2).sum(1) - 2 * z @ E.T
                margins.append(margin_of(d))
            if min(margins) >= 2e-3:
                break
            if best is None or min(margins) > best[0]:
                best = (min(margins), seed)
            seed += 1
            if seed - (seed0 + 23) >= 300:  # no seed reaches 2e-3: take the best one seen (margin recorded)
                seed = best[1]
                image = torch.rand(2, 3, size, size, generator=gen(seed)) * 2 - 1
                f = vae.quant_conv(vae.encoder(image))
                margins = None
                break
        if margins is None:
            fhats = vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)
            margins = []
            for si, p in enumerate(pn):
                rest = f - (fhats[si - 1] if si else 0)
                z = F.interpolate(rest, size=(p, p), mode="area") if si != SN - 1 else rest
                z = z.permute(0, 2, 3, 1).reshape(-1, C)
                d = (z ** 2).sum(1, keepdim=True) + (E ** 2).sum(1) - 2 * z @ E.T
                margins.append(margin_of(d))
            print(f"warning: smallest argmin margin {min(margins):.2e} < 2e-3 (seed {seed})")
        idx = vae.img_to_idxBl(image)
        gt = torch.cat(idx, 1)
        f_hat_enc = vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)[-1]
        hs = [vae.quantize.embedding(i).transpose(1, 2).reshape(2, C, p, p) for i, p in zip(idx, pn)]
        f_hat_idx = vae.quantize.embed_to_fhat(hs, all_to_max_scale=True, last_one=True)
        dec_un = vae.decoder(vae.post_quant_conv(f_hat_idx))
        decoded = vae.idxBl_to_img(idx, same_shape=True, last_one=True)
        var_input = vae.quantize.idxBl_to_var_input(idx)
    K = vq_args["share_quant_resi"] or vq_args["default_qresi_counts"] or SN  # 0 = non-shared: one per scale
    if vq_args["share_quant_resi"] == 1:
        K = 1
    ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)
    phi_index = [0] * SN if K == 1 else [int(np.argmin(np.abs(ticks - si / (SN - 1)))) for si in range(SN)]
    sd = vae.state_dict()
    L = sum(p * p for p in pn)
    config = {
        "reference": {"repo": repo, "commit": commit, "file": "models/vqvae.py", "class": "VQVAE(...)",
                      "note": "encoder/decoder replaced by models/basic_vae.py Encoder/Decoder with "
                              "ddconfig_overrides"},
        "VQVAE": vq_args, "ddconfig_overrides": dd,
        "derived": {"downsample_factor": factor, "image_size": size, "L": L, "phi_ticks": ticks.tolist(),
                    "phi_index_per_scale": phi_index, "groupnorm_groups": 32, "groupnorm_eps": 1e-06},
        "checkpoint": ckpt_info("vae_tiny.pth", "torch.save(state_dict)", sd),
        "seeds": {"torch.manual_seed_before_construction": seed0 + 3, "weights_generator_seed": seed0 + 13,
                  "inputs_generator_seed": seed, "post_randomization_edit": "decoder.conv_out weight and bias * 0.5"},
        "state_dict": sd_list(sd), "model": "VAR VQVAE",
    }
    tensors = {"image": image, "f": f}
    meta = {"image": {"role": "input"},
            "f": {"role": "intermediate", "produced_by": "vae.quant_conv(vae.encoder(image))"}}
    for si, i in enumerate(idx):
        tensors[f"idx_scale{si}"] = i
        meta[f"idx_scale{si}"] = {"role": "output", "produced_by": f"vae.img_to_idxBl(image)[{si}]",
                                  "argmin_min_margin": margins[si], "phi_index": phi_index[si]}
    tensors.update({"gt_idx_BL": gt, "f_hat_encode_path": f_hat_enc, "f_hat_from_idx": f_hat_idx,
                    "decoded_unclamped": dec_un, "decoded": decoded, "var_input": var_input})
    meta.update({"gt_idx_BL": {"role": "output"}, "f_hat_encode_path": {"role": "intermediate"},
                 "f_hat_from_idx": {"role": "intermediate"}, "decoded_unclamped": {"role": "intermediate"},
                 "decoded": {"role": "output"}, "var_input": {"role": "output"}})
    write(os.path.join(out, "var", "vqvae"), "vae_tiny.pth", sd, config, tensors, meta)

    # ---- VAR transformer
    tv = VARIANTS[var]["var_var"]
    vargs = dict(num_classes=tv["num_classes"], depth=tv["depth"], embed_dim=tv["embed_dim"],
                 num_heads=tv["num_heads"], mlp_ratio=tv["mlp_ratio"], drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.1 * tv["depth"] / 24, norm_eps=1e-06, shared_aln=False, cond_drop_rate=0.1,
                 attn_l2_norm=True, patch_nums=list(pn), flash_if_available=True, fused_if_available=True)
    torch.manual_seed(seed0 + 4)
    model = VAR(vae_local=vae, **{**vargs, "patch_nums": tuple(pn)})
    randomize(model, seed0 + 14)
    g = gen(seed0 + 15)
    with torch.no_grad():
        for b in model.blocks:
            b.attn.scale_mul_1H11.copy_(math.log(4) + 0.5 * torch.randn(b.attn.scale_mul_1H11.shape, generator=g))
        model.blocks[0].attn.scale_mul_1H11[0, 0, 0, 0] = math.log(150)
    model.eval()
    model.cond_drop_rate = 0.0
    B = 3
    g = gen(seed0 + 24)
    labels = torch.randint(0, vargs["num_classes"], (B,), generator=g)
    labels[-1] = vargs["num_classes"]
    extra = torch.randint(0, vq_args["vocab_size"], (1, L), generator=g)
    gt3 = torch.cat([gt, extra])
    with torch.no_grad():
        splits = list(torch.split(gt3, [p * p for p in pn], dim=1))
        x_in = vae.quantize.idxBl_to_var_input(splits)
        logits = model(labels, x_in)
    sd = model.state_dict()
    config = {
        "reference": {"repo": repo, "commit": commit, "file": "models/var.py", "class": "VAR(vae_local=..., ...)",
                      "note": "cond_drop_rate set to 0 before the forward"},
        "VAR": vargs, "vae_local": "the VQVAE of ../vqvae",
        "derived": {"L": L, "first_l": pn[0] ** 2, "head_dim": tv["embed_dim"] // tv["num_heads"],
                    "ffn_hidden": round(tv["embed_dim"] * tv["mlp_ratio"]), "class_emb_rows": tv["num_classes"] + 1,
                    "cfg_null_class_index": tv["num_classes"]},
        "checkpoint": ckpt_info("var_tiny.pth", "torch.save(state_dict)", sd),
        "seeds": {"torch.manual_seed_before_construction": seed0 + 4, "weights_generator_seed": seed0 + 14,
                  "inputs_generator_seed": seed0 + 24},
        "state_dict": sd_list(sd), "model": "VAR transformer",
    }
    tensors = {"labels": labels, "gt_idx_BL": gt3, "x_BLCv_wo_first_l": x_in, "logits": logits}
    meta = {"labels": {"role": "input"}, "gt_idx_BL": {"role": "input"},
            "x_BLCv_wo_first_l": {"role": "input", "produced_by": "vqvae.quantize.idxBl_to_var_input(...)"},
            "logits": {"role": "output", "produced_by": "var(labels, x_BLCv_wo_first_l)"}}
    write(os.path.join(out, "var", "var"), "var_tiny.pth", sd, config, tensors, meta)
