"""open_clip conditioners: a pretrained text tower from local weights (exact features), saving, bad input."""

import json

import open_clip
import pytest
import torch
from open_clip.model import CLIP
from safetensors.torch import save_file

from tokenloom import conditioning
from tokenloom.conditioning.openclip_pretrained import OpenCLIPTextEncoder, resolve_model_cfg
from tokenloom.conditioning.openclip_text import OpenCLIPTextConditioner

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a white circle"]
TINY_CFG = {
    "embed_dim": 8,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
}


def tiny_clip() -> CLIP:
    """A tiny open_clip CLIP, frozen (nn.MultiheadAttention's fast path, taken only when no weight needs a
    gradient, rounds differently from the slow path: compare frozen with frozen)."""
    torch.manual_seed(0)
    model = CLIP(**TINY_CFG).eval().requires_grad_(False)
    with torch.no_grad():  # open_clip initialises LayerNorms to 1/0: perturb them so a mix-up would show
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_openclip_folder(path):
    """An open_clip Hub-style folder (open_clip_config.json + open_clip_model.safetensors); returns the model."""
    model = tiny_clip()
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    return model


def reference_tokens(model: CLIP, ids):
    """open_clip's per-token text features: ``encode_text`` before pooling."""
    x = model.token_embedding(ids) + model.positional_embedding
    return model.ln_final(model.transformer(x, attn_mask=model.attn_mask))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("openclip") / "tiny"
    return path, tiny_openclip_folder(path)


def bpe(prompts, length=12):
    return open_clip.get_tokenizer("ViT-B-32", context_length=length)(prompts)


def test_features_equal_open_clip_exactly(folder):
    path, ref = folder
    ids = bpe(PROMPTS)
    with torch.no_grad():
        want_tokens, want_pooled = reference_tokens(ref, ids), ref.encode_text(ids)
    tokens = OpenCLIPTextEncoder(pretrained=str(path))
    cond = tokens.encode(PROMPTS)
    assert torch.equal(cond.features, want_tokens)
    assert torch.equal(cond.mask, ids != 0)
    assert (tokens.feature_dim, tokens.feature_length) == (16, 12)
    pooled = OpenCLIPTextEncoder(pretrained=str(path), output="pooled")
    cond = pooled.encode(PROMPTS)
    assert torch.equal(cond.features[:, 0], want_pooled)
    assert cond.mask.shape == (3, 1) and bool(cond.mask.all())
    assert (pooled.feature_dim, pooled.feature_length) == (8, 1)


def test_training_checkpoint_file_with_model_cfg(folder, tmp_path):
    """A ``.pt`` training checkpoint ({"state_dict": {"module.text.*": ...}}, CustomTextCLIP layout) and a model
    config dict load to the same features (read with weights_only=True)."""
    path, ref = folder
    state = {f"module.text.{k}": v for k, v in ref.state_dict().items() if not k.startswith("visual.")}
    state["module.logit_scale"] = ref.logit_scale.detach()
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "epoch_3.pt")
    enc = OpenCLIPTextEncoder(pretrained=str(tmp_path / "epoch_3.pt"), model_cfg=TINY_CFG)
    with torch.no_grad():
        assert torch.equal(enc.encode(PROMPTS).features, reference_tokens(ref, bpe(PROMPTS)))


def test_architecture_by_name():
    cfg = resolve_model_cfg("ViT-B-32", None, None)
    assert (cfg["embed_dim"], cfg["text_cfg"]["width"], cfg["text_cfg"]["layers"]) == (512, 512, 12)
    with pytest.raises(ValueError, match="not a built-in open_clip architecture"):
        resolve_model_cfg("ViT-Q-99", None, None)
    with pytest.raises(ValueError, match="built-in open_clip architecture name"):
        resolve_model_cfg("hf-hub:laion/CLIP-ViT-B-32", None, None)


def test_weights_that_do_not_fit_the_named_architecture(folder):
    path, _ = folder
    with pytest.raises(ValueError, match=r"mis-shaped key token_embedding.weight: checkpoint \(49408, 16\) vs model "
                                         r"\(49408, 512\)"):
        OpenCLIPTextEncoder(pretrained=str(path), model_name="ViT-B-32", context_length=12)


def test_missing_weights_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"pretrained path '/nonexistent/clip' does not exist"):
        OpenCLIPTextEncoder(pretrained="/nonexistent/clip", model_name="ViT-B-32")
    with pytest.raises(ValueError, match="must be a local file or folder"):
        OpenCLIPTextEncoder(model_name="ViT-B-32")
    with pytest.raises(ValueError, match="holds none of the weight files"):
        OpenCLIPTextEncoder(pretrained=str(tmp_path), model_cfg=TINY_CFG)
    with pytest.raises(ValueError, match="open_clip architecture unknown"):
        OpenCLIPTextEncoder(pretrained=str(tmp_path))


def test_bad_settings(folder):
    path, _ = folder
    with pytest.raises(ValueError, match="output must be one of"):
        OpenCLIPTextEncoder(pretrained=str(path), output="mean")
    with pytest.raises(ValueError, match="at most 12"):
        OpenCLIPTextEncoder(pretrained=str(path), context_length=13)
    with pytest.raises(ValueError, match="save_mode must be one of"):
        OpenCLIPTextEncoder(pretrained=str(path), save_mode="link")


def test_shorter_context_and_truncation(folder):
    path, ref = folder
    short = OpenCLIPTextEncoder(pretrained=str(path), context_length=6)
    cond = short.encode(PROMPTS[:2])  # both fit in 6 tokens: same function as the 12-token tower
    with torch.no_grad():
        want = reference_tokens(ref, bpe(PROMPTS[:2]))[:, :6]
    torch.testing.assert_close(cond.features, want, rtol=0, atol=1e-5)
    ids = short.tokenize(PROMPTS[2])  # 9 tokens: cut to 6, the end token kept last
    assert ids.shape == (1, 6) and int(ids[0, -1]) == short.tokenizer.eot_token_id
    strict = OpenCLIPTextEncoder(pretrained=str(path), context_length=6, truncation=False)
    assert strict.encode(PROMPTS[0]).features.shape == (1, 6, 16)
    with pytest.raises(ValueError, match="has 9 tokens, more than context_length=6"):
        strict.encode(PROMPTS)


@pytest.mark.parametrize("save_mode", ["copy", "reference"])
def test_save_and_load_round_trip(folder, tmp_path, save_mode):
    path, _ = folder
    enc = OpenCLIPTextEncoder(pretrained=str(path), context_length=8, save_mode=save_mode)
    enc.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    if save_mode == "copy":
        assert saved["pretrained"] == "open_clip_text.safetensors"
        assert (tmp_path / "saved" / "open_clip_text.safetensors").is_file()
    else:
        assert saved["pretrained"] == str(path.resolve())
        assert not (tmp_path / "saved" / "open_clip_text.safetensors").exists()
    assert saved["model_cfg"] == TINY_CFG  # the resolved architecture travels with the folder
    loaded = OpenCLIPTextEncoder.from_pretrained(tmp_path / "saved")
    assert torch.equal(loaded.encode(PROMPTS).features, enc.encode(PROMPTS).features)
    assert loaded.config.context_length == 8 and loaded.fingerprint() == enc.fingerprint()


def test_registered_frozen_and_built_by_name(folder):
    path, _ = folder
    assert {"openclip_text", "openclip_pretrained", "transformers_text"} <= set(conditioning.available())
    enc = conditioning.build("openclip_pretrained", pretrained=str(path))
    assert isinstance(enc, OpenCLIPTextEncoder)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training  # a frozen encoder ignores train()


def test_scratch_conditioner_pooled_output():
    torch.manual_seed(0)
    tokens = OpenCLIPTextConditioner.for_captions(PROMPTS, width=16, heads=2, layers=1, context_length=12)
    torch.manual_seed(0)
    pooled = OpenCLIPTextConditioner.for_captions(PROMPTS, width=16, heads=2, layers=1, context_length=12,
                                                  output="pooled")
    features, _, want = tokens(tokens.tokenize(PROMPTS))
    cond = pooled.encode(PROMPTS)
    assert (pooled.feature_dim, pooled.feature_length, tokens.feature_length) == (16, 1, 12)
    assert torch.equal(cond.features[:, 0], want) and bool(cond.mask.all())
