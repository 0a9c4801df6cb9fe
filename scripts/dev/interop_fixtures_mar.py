"""MAR checkpoint-parity fixtures from the reference classes (see make_interop_fixtures.py)."""

from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn
from interop_fixtures_common import COMMITS, VARIANTS, ckpt_info, gen, randomize, sd_list, write


# ------------------------------------------------------------------ MAR
def make_mar(ref, out, var, seed0):
    sys.path.insert(0, os.path.join(ref, "mar"))
    from functools import partial

    import timm
    from models.mar import MAR
    from models.vae import AutoencoderKL, Decoder, Encoder

    repo, commit = COMMITS["mar"]
    v = VARIANTS[var]["mar_vae"]
    ed = dict(ch=v["ed"]["ch"], out_ch=3, num_res_blocks=v["ed"]["num_res_blocks"], dropout=0.0,
              resamp_with_conv=True, in_channels=3, resolution=v["ed"]["resolution"],
              encoder_attn_resolutions=v["ed"]["encoder_attn_resolutions"],
              decoder_attn_resolutions=v["ed"]["decoder_attn_resolutions"], encoder_double_z=True)
    E = v["embed_dim"]
    torch.manual_seed(seed0 + 5)
    vae = AutoencoderKL(embed_dim=E, ch_mult=tuple(v["ch_mult"]), use_variational=True, ckpt_path=None)
    common = dict(ch=ed["ch"], out_ch=3, ch_mult=tuple(v["ch_mult"]), num_res_blocks=ed["num_res_blocks"],
                  dropout=0.0, resamp_with_conv=True, in_channels=3, resolution=ed["resolution"], z_channels=E)
    vae.encoder = Encoder(attn_resolutions=tuple(ed["encoder_attn_resolutions"]), double_z=True, **common)
    vae.decoder = Decoder(attn_resolutions=tuple(ed["decoder_attn_resolutions"]), **common)
    randomize(vae, seed0 + 15)
    vae.eval()
    factor = 2 ** (len(v["ch_mult"]) - 1)
    size = ed["resolution"]
    h = size // factor
    g = gen(seed0 + 25)
    image = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    latent_in = torch.randn(2, E, h, h, generator=g)
    with torch.no_grad():
        post = vae.encode(image)
        decoded = vae.decode(latent_in)
    sd = vae.state_dict()
    config = {
        "reference": {"repo": repo, "commit": commit, "file": "models/vae.py",
                      "class": "AutoencoderKL(embed_dim, ch_mult, use_variational=True, ckpt_path=None)",
                      "note": "encoder/decoder replaced by Encoder/Decoder with encoder_decoder_overrides"},
        "AutoencoderKL": {"embed_dim": E, "ch_mult": list(v["ch_mult"]), "use_variational": True, "ckpt_path": None},
        "encoder_decoder_overrides": ed,
        "derived": {"downsample_factor": factor, "image_size": size, "latent_shape": [E, h, h],
                    "groupnorm_groups": 32, "groupnorm_eps": 1e-06, "pipeline_latent_scale": 0.2325},
        "checkpoint": ckpt_info("kl_tiny.ckpt", "torch.save({'model': state_dict})", sd),
        "seeds": {"torch.manual_seed_before_construction": seed0 + 5, "weights_generator_seed": seed0 + 15,
                  "inputs_generator_seed": seed0 + 25},
        "state_dict": sd_list(sd), "model": "MAR KL-VAE (AutoencoderKL)", "timm_version_used": timm.__version__,
    }
    tensors = {"image": image, "latent_in": latent_in, "moments": post.parameters, "posterior_mean": post.mean,
               "posterior_logvar": post.logvar, "posterior_std": post.std, "decoded": decoded}
    meta = {"image": {"role": "input"}, "latent_in": {"role": "input"},
            "moments": {"role": "output", "produced_by": "vae.encode(image).parameters"},
            "posterior_mean": {"role": "output"}, "posterior_logvar": {"role": "output"},
            "posterior_std": {"role": "output"}, "decoded": {"role": "output", "produced_by": "vae.decode(latent_in)"}}
    write(os.path.join(out, "mar", "vae"), "kl_tiny.ckpt", {"model": sd}, config, tensors, meta)

    # ---- MAR
    mv = dict(VARIANTS[var]["mar_mar"])
    margs = dict(img_size=mv["img_size"], vae_stride=mv["vae_stride"], patch_size=mv["patch_size"],
                 encoder_embed_dim=mv["encoder_embed_dim"], encoder_depth=mv["encoder_depth"],
                 encoder_num_heads=mv["encoder_num_heads"], decoder_embed_dim=mv["decoder_embed_dim"],
                 decoder_depth=mv["decoder_depth"], decoder_num_heads=mv["decoder_num_heads"],
                 mlp_ratio=mv["mlp_ratio"], norm_layer="partial(nn.LayerNorm, eps=1e-6)", vae_embed_dim=E,
                 mask_ratio_min=0.7, label_drop_prob=0.1, class_num=mv["class_num"], attn_dropout=0.1,
                 proj_dropout=0.1, buffer_size=mv["buffer_size"], diffloss_d=mv["diffloss_d"],
                 diffloss_w=mv["diffloss_w"], num_sampling_steps=mv["num_sampling_steps"], diffusion_batch_mul=4,
                 grad_checkpointing=False)
    torch.manual_seed(seed0 + 6)
    model = MAR(**{**margs, "norm_layer": partial(nn.LayerNorm, eps=1e-6)})
    randomize(model, seed0 + 16)
    model.eval()
    ema_sd = {k: t.clone() for k, t in model.state_dict().items()}
    g = gen(seed0 + 17)
    noisy = {k: t + 0.05 * torch.randn(t.shape, generator=g) for k, t in ema_sd.items()}
    p = margs["patch_size"]
    seq_h = margs["img_size"] // margs["vae_stride"] // p
    seq_len = seq_h * seq_h
    tok_dim = E * p * p
    B = 3
    g = gen(seed0 + 26)
    latent = torch.randn(B, E, seq_h * p, seq_h * p, generator=g)
    labels = torch.randint(0, margs["class_num"], (B,), generator=g)
    uncond = torch.tensor([False, False, True])
    orders = torch.stack([torch.randperm(seq_len, generator=g) for _ in range(B)])
    n_masked = (3 * seq_len) // 4
    mask_A = torch.zeros(B, seq_len)
    for b in range(B):
        mask_A[b, orders[b, :n_masked]] = 1
    mask_B = torch.ones(B, seq_len)
    N = 6
    steps = int(margs["num_sampling_steps"])
    diff_x_t = torch.randn(N, tok_dim, generator=g)
    diff_t = torch.tensor([0, 1, 250, 500, 998, 999])
    diff_t_spaced = torch.tensor([0, 1, steps // 3, steps // 2, steps - 2, steps - 1])
    diff_x_start = torch.randn(N, tok_dim, generator=g)
    diff_noise = torch.randn(N, tok_dim, generator=g)
    with torch.no_grad():
        tokens = model.patchify(latent)
        class_embedding = torch.where(uncond[:, None], model.fake_latent.expand(B, -1), model.class_emb(labels))
        enc_A = model.forward_mae_encoder(tokens, mask_A, class_embedding)
        z_A = model.forward_mae_decoder(enc_A, mask_A)
        enc_B = model.forward_mae_encoder(tokens, mask_B, class_embedding)
        z_B = model.forward_mae_decoder(enc_B, mask_B)
        unp = model.unpatchify(tokens)
        diff_c = z_A[mask_A.bool()][:N].clone()
        net = model.diffloss.net
        net_out = net(diff_x_t, diff_t, diff_c)
        out_cfg = net.forward_with_cfg(diff_x_t, diff_t, diff_c, cfg_scale=2.5)
        pmv = model.diffloss.gen_diffusion.p_mean_variance(net, diff_x_t, diff_t_spaced, clip_denoised=False,
                                                           model_kwargs=dict(c=diff_c))
        losses = model.diffloss.train_diffusion.training_losses(net, diff_x_start, diff_t, dict(c=diff_c),
                                                                noise=diff_noise)
    gd = model.diffloss.gen_diffusion
    td = model.diffloss.train_diffusion
    derived = {"seq_h": seq_h, "seq_w": seq_h, "seq_len": seq_len, "token_embed_dim": tok_dim,
               "encoder_head_dim": margs["encoder_embed_dim"] // margs["encoder_num_heads"],
               "decoder_head_dim": margs["decoder_embed_dim"] // margs["decoder_num_heads"],
               "mlp_hidden_encoder": int(margs["encoder_embed_dim"] * margs["mlp_ratio"]),
               "mlp_hidden_decoder": int(margs["decoder_embed_dim"] * margs["mlp_ratio"]),
               "diffloss_out_channels": 2 * tok_dim, "timestep_frequency_embedding_size": 256,
               "pipeline_latent_scale": 0.2325}
    config = {
        "reference": {"repo": repo, "commit": commit, "file": "models/mar.py (+ models/diffloss.py, diffusion/)",
                      "class": "MAR(...)", "timm_version_used": timm.__version__},
        "MAR": margs, "derived": derived,
        "checkpoint": ckpt_info("checkpoint-last.pth", "torch.save({'model': ..., 'model_ema': ...}); outputs use "
                                "'model_ema'; 'model' = model_ema + N(0, 0.05^2)", ema_sd),
        "seeds": {"torch.manual_seed_before_construction": seed0 + 6, "weights_generator_seed": seed0 + 16,
                  "model_entry_noise_seed": seed0 + 17, "inputs_generator_seed": seed0 + 26},
        "state_dict": sd_list(ema_sd), "model": "MAR + DiffLoss",
    }
    tensors = {"latent": latent, "labels": labels, "uncond": uncond, "orders": orders, "mask_A": mask_A,
               "mask_B": mask_B, "diff_x_t": diff_x_t, "diff_t": diff_t, "diff_t_spaced": diff_t_spaced,
               "diff_x_start": diff_x_start, "diff_noise": diff_noise, "diff_c": diff_c, "tokens": tokens,
               "class_embedding": class_embedding, "encoder_out_A": enc_A, "z_A": z_A, "encoder_out_B": enc_B,
               "z_B": z_B, "unpatchify_tokens": unp, "diff_net_out": net_out, "diff_net_out_cfg": out_cfg,
               "pmv_mean": pmv["mean"], "pmv_variance": pmv["variance"], "pmv_log_variance": pmv["log_variance"],
               "pmv_pred_xstart": pmv["pred_xstart"], "train_loss": losses["loss"], "train_mse": losses["mse"],
               "train_vb": losses["vb"], "train_betas": torch.from_numpy(td.betas),
               "gen_betas": torch.from_numpy(gd.betas),
               "gen_timestep_map": torch.tensor(gd.timestep_map, dtype=torch.int64)}
    roles = {k: "input" for k in ("latent", "labels", "uncond", "orders", "mask_A", "mask_B", "diff_x_t", "diff_t",
                                  "diff_t_spaced", "diff_x_start", "diff_noise", "diff_c")}
    roles.update({"tokens": "intermediate", "class_embedding": "intermediate"})
    meta = {k: {"role": roles.get(k, "output")} for k in tensors}
    meta["diff_net_out_cfg"]["produced_by"] = ("model.diffloss.net.forward_with_cfg(diff_x_t, diff_t, diff_c, "
                                               "cfg_scale=2.5)")
    write(os.path.join(out, "mar", "mar"), "checkpoint-last.pth", {"model": noisy, "model_ema": ema_sd}, config,
          tensors, meta)
