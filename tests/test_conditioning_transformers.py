"""transformers text conditioners (T5 encoder, CLIP text model) from tiny local folders: exact features, pooling,
masks, lengths, truncation, saving, bad input."""

import json

import pytest
import torch

from tokenloom import conditioning
from tokenloom.conditioning.transformers_text import TransformersTextConditioner, masked_mean

transformers = pytest.importorskip("transformers")

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a white circle"]
WORDS = ["a", "red", "circle", "two", "blue", "squares", "green", "triangle", "above", "white"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_t5_folder(path):
    """A T5 encoder (d_model 32) and a Unigram tokenizer over the caption words; returns the model."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in WORDS] + [(c, -3.0) for c in LETTERS]
    transformers.T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(path))
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0)
    model = transformers.T5EncoderModel(config).eval()
    model.save_pretrained(str(path))
    return model


def tiny_clip_folder(path, projection: bool = True, max_positions: int = 16):
    """A CLIP text model (hidden 32) with an old-style tokenizer: vocab.json + merges.txt (+ tokenizer_config)."""
    path.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(LETTERS) + [c + "</w>" for c in LETTERS] + ["re", "red</w>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer",
                                                            "model_max_length": max_positions}))
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         max_position_embeddings=max_positions, projection_dim=24,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    model = cls(config).eval()
    model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5")
    return path, tiny_t5_folder(path)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    return path, tiny_clip_folder(path)


def reference(model, tok_path, prompts, length, **kw):
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_path))
    enc = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return enc, model(**enc, output_hidden_states=True, **kw)


def test_t5_tokens_and_pooled_equal_transformers(t5):
    path, model = t5
    enc, out = reference(model, path, PROMPTS, 10)
    cond = TransformersTextConditioner(pretrained=str(path), context_length=10).encode(PROMPTS)
    assert torch.equal(cond.features, out.last_hidden_state)
    assert torch.equal(cond.mask, enc["attention_mask"].bool())
    assert not bool(cond.mask.all())  # the short prompts are padded
    pooled = TransformersTextConditioner(pretrained=str(path), context_length=10, output="pooled")
    cond = pooled.encode(PROMPTS)
    assert torch.equal(cond.features[:, 0], masked_mean(out.last_hidden_state, enc["attention_mask"].bool()))
    assert (pooled.feature_dim, pooled.feature_length) == (32, 1)


def test_masked_mean_ignores_padding():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(masked_mean(x, torch.tensor([[True, True, False]])), torch.tensor([[2.0, 3.0]]))


def test_clip_with_projection_tokens_pooled_and_hidden_layer(clip):
    path, model = clip
    enc, out = reference(model, path, PROMPTS, 16)
    tokens = TransformersTextConditioner(pretrained=str(path))  # context length: the tokenizer's 16
    assert (tokens.feature_dim, tokens.feature_length) == (32, 16)
    cond = tokens.encode(PROMPTS)
    assert torch.equal(cond.features, out.last_hidden_state)
    assert torch.equal(cond.mask, enc["attention_mask"].bool())
    pooled = TransformersTextConditioner(pretrained=str(path), output="pooled")
    assert pooled.feature_dim == 24
    assert torch.equal(pooled.encode(PROMPTS).features[:, 0], out.text_embeds)
    penultimate = TransformersTextConditioner(pretrained=str(path), hidden_layer=-2)
    assert torch.equal(penultimate.encode(PROMPTS).features, out.hidden_states[-2])


def test_clip_without_projection_pools_the_end_token(tmp_path):
    model = tiny_clip_folder(tmp_path, projection=False)
    _, out = reference(model, tmp_path, PROMPTS, 16)
    pooled = TransformersTextConditioner(pretrained=str(tmp_path), output="pooled")
    assert isinstance(pooled.encoder, transformers.CLIPTextModel) and pooled.feature_dim == 32
    assert torch.equal(pooled.encode(PROMPTS).features[:, 0], out.pooler_output)


def test_full_clip_folder_gives_its_projected_text_features(clip, tmp_path):
    """A whole CLIPModel folder (text + vision): the text tower with the model's projection dimension."""
    text = dict(vocab_size=56, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                           projection_dim=24)).eval()
    model.save_pretrained(str(tmp_path))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((clip[0] / name).read_bytes())
    pooled = TransformersTextConditioner(pretrained=str(tmp_path), output="pooled")
    assert pooled.feature_dim == 24
    ids, mask = pooled.tokenize(PROMPTS)
    with torch.no_grad():
        want = model.get_text_features(input_ids=ids, attention_mask=mask.long())
    want = want if torch.is_tensor(want) else want.pooler_output  # transformers 5 returns an output object
    assert torch.equal(pooled.encode(PROMPTS).features[:, 0], want)


def test_tokenizer_in_its_own_folder(clip, tmp_path):
    """diffusers-style layout: weights in text_encoder/, tokenizer in tokenizer/."""
    path, model = clip
    model.save_pretrained(str(tmp_path / "text_encoder"))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / "tokenizer").mkdir(exist_ok=True)
        (tmp_path / "tokenizer" / name).write_bytes((path / name).read_bytes())
    cond = TransformersTextConditioner(pretrained=str(tmp_path / "text_encoder"),
                                       tokenizer_path=str(tmp_path / "tokenizer")).encode(PROMPTS)
    assert torch.equal(cond.features, TransformersTextConditioner(pretrained=str(path)).encode(PROMPTS).features)


def test_context_length_and_truncation(t5, clip):
    t5_path, _ = t5
    with pytest.raises(ValueError, match="context_length must be given"):
        TransformersTextConditioner(pretrained=str(t5_path))  # T5: relative positions, tokenizer without a limit
    with pytest.raises(ValueError, match="at most 16"):
        TransformersTextConditioner(pretrained=str(clip[0]), context_length=17)
    cut = TransformersTextConditioner(pretrained=str(t5_path), context_length=4)
    ids, mask = cut.tokenize(PROMPTS[2])  # 8 tokens: cut to 4, the end token kept last
    assert ids.shape == (1, 4) and bool(mask.all()) and int(ids[0, -1]) == cut.tokenizer.eos_token_id
    strict = TransformersTextConditioner(pretrained=str(t5_path), context_length=4, truncation=False)
    assert strict.encode(PROMPTS[0]).features.shape == (1, 4, 32)
    with pytest.raises(ValueError, match="has 8 tokens, more than context_length=4, and truncation=False"):
        strict.encode(PROMPTS)


def test_missing_paths_and_wrong_folders(t5, tmp_path):
    with pytest.raises(ValueError, match=r"pretrained path '/nonexistent/t5' does not exist"):
        TransformersTextConditioner(pretrained="/nonexistent/t5", context_length=8)
    with pytest.raises(ValueError, match=r"tokenizer_path path '/nonexistent/tok' does not exist"):
        TransformersTextConditioner(pretrained=str(t5[0]), tokenizer_path="/nonexistent/tok", context_length=8)
    with pytest.raises(ValueError, match="model folder with config.json"):
        TransformersTextConditioner(pretrained=str(tmp_path), context_length=8)
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_bytes((t5[0] / "config.json").read_bytes())
    with pytest.raises(ValueError, match="could not read T5EncoderModel weights from pretrained .*no_weights"):
        TransformersTextConditioner(pretrained=str(tmp_path / "no_weights"), context_length=8)
    transformers.BertModel(transformers.BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=16)
                           ).save_pretrained(str(tmp_path / "bert"))
    with pytest.raises(ValueError, match=r"holds a 'bert' model; .* model types \['clip', 'clip_text_model', "):
        TransformersTextConditioner(pretrained=str(tmp_path / "bert"), context_length=8)
    with pytest.raises(ValueError, match=r"hidden_layer must be None or an int in \[-3, 2\]"):
        TransformersTextConditioner(pretrained=str(t5[0]), context_length=8, hidden_layer=3)


@pytest.mark.parametrize("save_mode", ["copy", "reference"])
def test_save_and_load_round_trip(t5, tmp_path, save_mode):
    path, _ = t5
    enc = TransformersTextConditioner(pretrained=str(path), context_length=10, save_mode=save_mode)
    enc.save_pretrained(tmp_path / "conditioner")
    saved = json.loads((tmp_path / "conditioner" / "config.json").read_text())
    if save_mode == "copy":
        assert saved["pretrained"] == "text_encoder" and (tmp_path / "conditioner" / "text_encoder").is_dir()
    else:
        assert saved["pretrained"] == str(path.resolve())
        assert not (tmp_path / "conditioner" / "text_encoder").exists()
    loaded = TransformersTextConditioner.from_pretrained(tmp_path, subfolder="conditioner")
    assert torch.equal(loaded.encode(PROMPTS).features, enc.encode(PROMPTS).features)
    assert loaded.fingerprint() == enc.fingerprint()  # where the weights live is not part of the fingerprint
    assert enc.fingerprint() == TransformersTextConditioner(pretrained=str(path), context_length=10).fingerprint()
    assert enc.fingerprint() != TransformersTextConditioner(pretrained=str(path), context_length=9).fingerprint()
    half = TransformersTextConditioner.from_pretrained(tmp_path / "conditioner", torch_dtype=torch.bfloat16)
    assert half.encode(PROMPTS).features.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="has no config.json"):
        TransformersTextConditioner.from_pretrained(tmp_path / "nothing")


def test_registered_and_frozen(t5):
    enc = conditioning.build("transformers_text", pretrained=str(t5[0]), context_length=8)
    assert isinstance(enc, TransformersTextConditioner)
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training


def test_embedding_cache_with_a_t5_encoder(t5, tmp_path):
    """The cache reads back T5 features bit for bit and still recognises the encoder after it has been used
    (a tokenizer's per-call padding/truncation state is not part of its fingerprint)."""
    from tokenloom.conditioning.embedding_cache import TextEmbeddingCache

    enc = TransformersTextConditioner(pretrained=str(t5[0]), context_length=10)
    cache = TextEmbeddingCache.build(enc, PROMPTS, tmp_path, batch_size=8, progress=False)
    want = enc.encode(PROMPTS)
    features, mask = TextEmbeddingCache(tmp_path, conditioner=enc)(PROMPTS)
    assert torch.equal(features, want.features) and torch.equal(mask, want.mask) and len(cache) == 3
