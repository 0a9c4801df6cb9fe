"""LlamaGen checkpoint-parity fixtures from the reference classes (see make_interop_fixtures.py)."""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from interop_fixtures_common import COMMITS, VARIANTS, ckpt_info, gen, margin_of, randomize, sd_list, write


# ------------------------------------------------------------------ LlamaGen
def make_llamagen(ref, out, var, seed0):
    sys.path.insert(0, os.path.join(ref, "llamagen"))
    from autoregressive.models.gpt import ModelArgs as GPTArgs
    from autoregressive.models.gpt import Transformer
    from tokenizer.tokenizer_image.vq_model import Decoder, Encoder, ModelArgs, VQModel

    repo, commit = COMMITS["llamagen"]
    v = VARIANTS[var]["llamagen_vq"]
    margs = dict(codebook_l2_norm=True, codebook_show_usage=True, commit_loss_beta=0.25, entropy_loss_ratio=0.0,
                 dropout_p=0.0, **v["model_args"])
    margs = {k: margs[k] for k in ("codebook_size", "codebook_embed_dim", "encoder_ch_mult", "decoder_ch_mult",
                                   "z_channels", "codebook_l2_norm", "codebook_show_usage", "commit_loss_beta",
                                   "entropy_loss_ratio", "dropout_p")}
    ed = dict(ch=v["ed"]["ch"], num_res_blocks=v["ed"]["num_res_blocks"], norm_type="group", resamp_with_conv=True)
    torch.manual_seed(seed0 + 1)
    cfg = ModelArgs(**margs)
    vq = VQModel(cfg)
    vq.encoder = Encoder(in_channels=3, ch=ed["ch"], ch_mult=cfg.encoder_ch_mult, num_res_blocks=ed["num_res_blocks"],
                         norm_type="group", dropout=cfg.dropout_p, resamp_with_conv=True, z_channels=cfg.z_channels)
    vq.decoder = Decoder(z_channels=cfg.z_channels, ch=ed["ch"], ch_mult=cfg.decoder_ch_mult,
                         num_res_blocks=ed["num_res_blocks"], norm_type="group", dropout=cfg.dropout_p,
                         resamp_with_conv=True, out_channels=3)
    randomize(vq, seed0 + 11)
    vq.eval()
    factor = 2 ** (len(cfg.encoder_ch_mult) - 1)
    grid = v["grid"]
    size = grid * factor
    D = cfg.codebook_embed_dim
    with torch.no_grad():
        seed = seed0 + 21
        while True:
            image = torch.rand(2, 3, size, size, generator=gen(seed)) * 2 - 1
            pre = vq.quant_conv(vq.encoder(image))
            z = F.normalize(pre.permute(0, 2, 3, 1).reshape(-1, D), dim=-1)
            e = F.normalize(vq.quantize.embedding.weight, dim=-1)
            d = (z ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * z @ e.T
            m = margin_of(d)
            if m >= 2e-3:
                break
            seed += 1
        quant, _, info = vq.encode(image)
        codes = info[2]
        decoded = vq.decode_code(codes, shape=(2, D, grid, grid), channel_first=True)
    sd = vq.state_dict()
    folder = os.path.join(out, "llamagen", "vq")
    config = {
        "reference": {"repo": repo, "commit": commit, "file": "tokenizer/tokenizer_image/vq_model.py",
                      "class": "VQModel(ModelArgs(...))",
                      "note": "encoder/decoder replaced by Encoder/Decoder of the same file with the overrides"},
        "ModelArgs": margs, "encoder_decoder_overrides": ed,
        "derived": {"downsample_factor": factor, "image_size": size, "token_grid": [grid, grid],
                    "num_tokens": grid * grid, "groupnorm_groups": 32, "groupnorm_eps": 1e-06},
        "checkpoint": ckpt_info("vq_tiny.pt", "torch.save({'model': state_dict})", sd),
        "seeds": {"torch.manual_seed_before_construction": seed0 + 1, "weights_generator_seed": seed0 + 11,
                  "inputs_generator_seed": seed},
        "state_dict": sd_list(sd), "model": "LlamaGen VQModel",
    }
    tensors = {"image": image, "pre_quant_latent": pre, "quant": quant, "codes": codes, "decoded": decoded}
    meta = {"image": {"role": "input", "meaning": "image (B,3,H,W) uniform in [-1,1]"},
            "pre_quant_latent": {"role": "intermediate", "produced_by": "model.quant_conv(model.encoder(image))"},
            "quant": {"role": "output", "produced_by": "model.encode(image)[0]"},
            "codes": {"role": "output", "produced_by": "model.encode(image)[2][2]", "argmin_min_margin": m},
            "decoded": {"role": "output",
                        "produced_by": f"model.decode_code(codes, shape=(2, {D}, {grid}, {grid}), channel_first=True)"}}
    write(folder, "vq_tiny.pt", {"model": sd}, config, tensors, meta)

    # ---- GPT
    gv = VARIANTS[var]["llamagen_gpt"]
    gargs = dict(dim=gv["dim"], n_layer=gv["n_layer"], n_head=gv["n_head"], multiple_of=gv["multiple_of"],
                 num_classes=gv["num_classes"], vocab_size=cfg.codebook_size, block_size=grid * grid,
                 n_kv_head=None, ffn_dim_multiplier=None, rope_base=10000, norm_eps=1e-05, initializer_range=0.02,
                 token_dropout_p=0.1, attn_dropout_p=0.0, resid_dropout_p=0.1, ffn_dropout_p=0.1, drop_path_rate=0.0,
                 caption_dim=2048, class_dropout_prob=0.1, model_type="c2i", cls_token_num=1, max_batch_size=32,
                 max_seq_len=2048)
    torch.manual_seed(seed0 + 2)
    gpt = Transformer(GPTArgs(**gargs))
    randomize(gpt, seed0 + 12, norm_types=(type(gpt.norm),))
    gpt.eval()
    L = gargs["block_size"]
    B = 3
    g = gen(seed0 + 22)
    codes = torch.randint(0, gargs["vocab_size"], (B, L), generator=g)
    labels = torch.randint(0, gargs["num_classes"], (B,), generator=g)
    labels[-1] = gargs["num_classes"]
    with torch.no_grad():
        logits = gpt(idx=codes[:, :-1], cond_idx=labels, input_pos=torch.arange(L))[0]
        freqs = gpt.freqs_cis.clone()
        sd = {k: t.clone() for k, t in gpt.state_dict().items()}  # before the KV caches become buffers
        gpt.setup_caches(max_batch_size=B, max_seq_length=L + 1, dtype=torch.float32)
        outs = [gpt(None, cond_idx=labels, input_pos=torch.arange(0, 1))[0]]
        for t in range(1, L):
            outs.append(gpt(codes[:, t - 1:t], cond_idx=None, input_pos=torch.tensor([t], dtype=torch.int))[0])
        cached = torch.cat(outs, 1)
    hd = gargs["dim"] // gargs["n_head"]
    config = {
        "reference": {"repo": repo, "commit": commit, "file": "autoregressive/models/gpt.py",
                      "class": "Transformer(ModelArgs(...))"},
        "ModelArgs": gargs,
        "derived": {"head_dim": hd, "ffn_hidden_dim": int(gpt.layers[0].feed_forward.w1.weight.shape[0]),
                    "token_grid": [grid, grid], "cls_embedding_rows": gargs["num_classes"] + 1,
                    "cfg_null_class_index": gargs["num_classes"], "freqs_cis_shape": list(freqs.shape)},
        "checkpoint": ckpt_info("c2i_tiny.pt", "torch.save({'model': state_dict})", sd),
        "seeds": {"torch.manual_seed_before_construction": seed0 + 2, "weights_generator_seed": seed0 + 12,
                  "inputs_generator_seed": seed0 + 22},
        "state_dict": sd_list(sd), "model": "LlamaGen GPT (c2i Transformer)",
    }
    tensors = {"codes": codes, "labels": labels, "input_idx": codes[:, :-1].clone(), "logits": logits,
               "logits_kv_cached": cached, "freqs_cis": freqs}
    meta = {"codes": {"role": "input"}, "labels": {"role": "input", "meaning": "last = num_classes (null)"},
            "input_idx": {"role": "input"},
            "logits": {"role": "output",
                       "produced_by": f"model(idx=codes[:, :-1], cond_idx=labels, input_pos=torch.arange({L}))[0]"},
            "logits_kv_cached": {"role": "output", "produced_by": "setup_caches + prefill + one token per step"},
            "freqs_cis": {"role": "intermediate", "produced_by": "model.freqs_cis"}}
    write(os.path.join(out, "llamagen", "gpt"), "c2i_tiny.pt", {"model": sd}, config, tensors, meta)
