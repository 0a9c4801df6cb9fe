"""The text-embedding cache: encode once, read back bit-identical, extend, refuse a different encoder."""

import json

import pytest
import torch
from safetensors import safe_open

from tokenloom.conditioning.embedding_cache import TextEmbeddingCache, caption_key
from tokenloom.conditioning.openclip_text import OpenCLIPTextConditioner
from tokenloom.tokenizers.vq import VQTokenizer
from tokenloom.training.generator_trainer import pretokenize

CAPTIONS = ["a red circle", "two blue squares", "a green triangle above a white circle", "a white square"]


def frozen_text(seed=0):
    torch.manual_seed(seed)
    return OpenCLIPTextConditioner.for_captions(CAPTIONS + ["a blue circle", "three"], width=16, heads=2, layers=1,
                                                context_length=10).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def text():
    return frozen_text()


def test_read_back_identical_and_sharded(text, tmp_path):
    cache = TextEmbeddingCache.build(text, CAPTIONS + CAPTIONS[:2], tmp_path, batch_size=8, shard_size=3,
                                     progress=False)
    want = text.encode(CAPTIONS)  # one batch, as the cache was built
    assert len(cache) == 4 and cache.index["shards"] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    order = [2, 0, 3, 1, 0]
    features, mask = cache([CAPTIONS[i] for i in order])
    assert torch.equal(features, want.features[order]) and torch.equal(mask, want.mask[order])
    cond = cache.condition(CAPTIONS)
    assert torch.equal(cond.features, want.features) and torch.equal(cond.mask, want.mask)
    assert (cache.feature_dim, cache.feature_length) == (16, 10)
    with safe_open(str(tmp_path / "shard-00000.safetensors"), framework="pt") as f:  # keyed by caption hash
        assert json.loads(f.metadata()["keys"]) == [caption_key(c) for c in CAPTIONS[:3]]
    assert "a red circle" in cache and "a purple circle" not in cache
    with pytest.raises(KeyError, match="1 caption.* not in the cache .* 'a purple circle'"):
        cache(["a red circle", "a purple circle"])


def test_extending_encodes_only_new_captions(text, tmp_path):
    TextEmbeddingCache.build(text, CAPTIONS[:2], tmp_path, progress=False)
    first = TextEmbeddingCache(tmp_path)(CAPTIONS[:2])
    cache = TextEmbeddingCache.build(text, CAPTIONS, tmp_path, progress=False)
    assert len(cache.index["shards"]) == 2 and len(cache) == 4
    with safe_open(str(tmp_path / "shard-00001.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["keys"]) == [caption_key(c) for c in CAPTIONS[2:]]
    assert all(torch.equal(a, b) for a, b in zip(cache(CAPTIONS[:2]), first))
    assert torch.equal(cache(CAPTIONS[2:])[0], text.encode(CAPTIONS[2:]).features)


def test_a_different_encoder_is_refused(text, tmp_path):
    TextEmbeddingCache.build(text, CAPTIONS, tmp_path, progress=False)
    other = frozen_text(seed=1)
    with pytest.raises(ValueError, match="built with another text encoder"):
        TextEmbeddingCache(tmp_path, conditioner=other)
    with pytest.raises(ValueError, match="built with another text encoder"):
        TextEmbeddingCache.build(other, ["a blue circle"], tmp_path, progress=False)
    assert len(TextEmbeddingCache(tmp_path, conditioner=text)) == 4


def test_bad_input(text, tmp_path):
    with pytest.raises(ValueError, match="is not a text embedding cache"):
        TextEmbeddingCache(tmp_path)
    with pytest.raises(TypeError, match="not one string"):
        TextEmbeddingCache.build(text, "a red circle", tmp_path)
    with pytest.raises(ValueError, match="shard_size must be a positive int, got 0"):
        TextEmbeddingCache.build(text, CAPTIONS, tmp_path, shard_size=0)
    with pytest.raises(ValueError, match="dtype must be None or a float torch.dtype"):
        TextEmbeddingCache.build(text, CAPTIONS, tmp_path, dtype=torch.int8)


def test_half_precision_storage(text, tmp_path):
    cache = TextEmbeddingCache.build(text, CAPTIONS, tmp_path, dtype=torch.bfloat16, progress=False)
    features, _ = cache(CAPTIONS)
    assert features.dtype == torch.bfloat16
    assert torch.equal(features, text.encode(CAPTIONS).features.to(torch.bfloat16))


def test_cache_is_a_trainer_text_encoder(text, tmp_path):
    """``pretokenize(..., text_encoder=cache)`` stores the cached features next to the image tokens."""
    cache = TextEmbeddingCache.build(text, CAPTIONS, tmp_path, progress=False)
    torch.manual_seed(0)
    vq = VQTokenizer(image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, norm_groups=4,
                     codebook_size=16, codebook_dim=4).eval()
    data = [{"image": torch.rand(3, 8, 8) * 2 - 1, "caption": c} for c in CAPTIONS[::-1]]
    tokens, features, mask = pretokenize(vq, data, condition="text", batch_size=3, text_encoder=cache,
                                         progress=False).tensors
    want = text.encode(CAPTIONS[::-1])
    assert tokens.shape[0] == 4 and torch.equal(features, want.features) and torch.equal(mask, want.mask)
