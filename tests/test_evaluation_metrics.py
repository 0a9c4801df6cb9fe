"""FID (clean-fid), Inception Score, precision/recall, CLIP score, class-balanced plans, feature extractors.

The bars use the built-in shapes extractor, trained once per module (a few seconds): FID between
the shapes training split and its held-out split is near zero and far below the FID of a shifted
set. Run with ``-s`` to see the measured numbers.
"""

import importlib.util
import json
import os
import types
import urllib.request
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from filelock import FileLock
from torch import nn

from tokenloom.data.shapes import ShapesDataset
from tokenloom.evaluation.class_balanced import (
    class_balanced_plan,
    image_seed,
    plan_for_accelerator,
    save_images,
    torch_generators,
)
from tokenloom.evaluation.features import (
    CNNFeatureExtractor,
    FeatureCNN,
    builtin_dataset,
    extract_folder,
    load_feature_extractor,
    load_inception,
    stack_dataset,
    train_feature_cnn,
)
from tokenloom.evaluation.fid import FeatureStats, compute_fid, folder_stats, frechet_distance
from tokenloom.evaluation.inception_score import inception_score
from tokenloom.evaluation.precision_recall import in_manifold, knn_radii, precision_recall

N_IMAGES = 1000  # per folder: 64-dim features need > 64; more images shrink FID's finite-sample bias
ROOT = Path(__file__).resolve().parents[1]


def _to_255(x):
    """[-1, 1] → 0..255 float, rounded as the PNGs are."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round()


def _names(n):
    return [f"{i:06d}.png" for i in range(n)]


def _no_download(*args, **kwargs):
    raise AssertionError("a download was attempted")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """A folder shared by all pytest-xdist workers of this run, so each expensive fixture is built once."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return tmp_path_factory.mktemp("evaluation_shared")
    root = tmp_path_factory.getbasetemp().parent / "evaluation_shared"  # this run's root, not earlier runs'
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def shapes_extractor(shared_dir):
    weights = shared_dir / "shapes_feature_cnn.safetensors"
    with FileLock(str(shared_dir / "extractor.lock")):
        if not weights.exists():
            train_feature_cnn("shapes", progress=False).save_safetensors(weights)
    return load_feature_extractor("shapes", weights)


@pytest.fixture(scope="session")
def shapes_folders(shared_dir):
    """PNG folders: shapes train / held-out test, and shifted copies of the held-out images."""
    root = shared_dir / "shapes_fid"
    names = ("train", "test", "channels_permuted", "colours_mixed", "inverted")
    with FileLock(str(shared_dir / "folders.lock")):
        if not (root / "complete").exists():
            train, _ = stack_dataset(ShapesDataset("train", num_samples=N_IMAGES))
            test, _ = stack_dataset(ShapesDataset("test", num_samples=N_IMAGES))
            sets = {
                "train": train,
                "test": test,
                "channels_permuted": test[:, [1, 2, 0]],  # R,G,B → G,B,R: the palette maps onto itself
                "colours_mixed": (test + test[:, [1, 2, 0]]) / 2,  # off-palette colours: a real shift
                "inverted": -test,  # white background, complementary colours: disjoint from the data
            }
            for name in names:
                save_images(sets[name], root / name, _names(N_IMAGES))
            (root / "complete").touch()
    return {name: root / name for name in names}


@pytest.fixture(scope="session")
def shapes_features(shapes_folders, shapes_extractor):
    return {
        name: extract_folder(path, shapes_extractor, verbose=False)[0]
        for name, path in shapes_folders.items()
    }


# ----------------------------------------------------------------------------- FID bars
def test_fid_heldout_near_zero_and_far_below_shifted(shapes_folders, shapes_extractor):
    ref = folder_stats(shapes_folders["train"], shapes_extractor, verbose=False)
    held_out = compute_fid(shapes_folders["test"], ref, shapes_extractor, verbose=False)
    shifted = compute_fid(shapes_folders["colours_mixed"], ref, shapes_extractor, verbose=False)
    scale = np.trace(ref.sigma)  # FID's natural scale: the total variance of the features
    print(f"\n{held_out}\n{shifted}\n(trace of the reference covariance: {scale:.1f})")
    assert held_out.implementation.startswith("clean-fid 0.")
    assert held_out.features == shapes_extractor.name and held_out.features.startswith(
        "tokenloom-shapes-cnn-v1:"
    )
    assert (held_out.n_gen, held_out.n_ref) == (N_IMAGES, N_IMAGES)
    assert held_out.value < 0.02 * scale
    assert shifted.value > 20 * held_out.value


def test_channel_permutation_is_not_a_shift_for_shapes(shapes_features):
    """R,G,B → G,B,R maps the 7-colour palette onto itself and colours are uniform: same distribution."""
    stats = {k: FeatureStats.from_features(v) for k, v in shapes_features.items()}
    held_out = frechet_distance(stats["test"], stats["train"])
    permuted = frechet_distance(stats["channels_permuted"], stats["train"])
    mixed = frechet_distance(stats["colours_mixed"], stats["train"])
    print(
        f"\nFID train vs held-out {held_out:.3f}, vs channel-permuted {permuted:.3f}, "
        f"vs colours mixed {mixed:.3f}"
    )
    assert permuted < 3 * held_out and permuted < 0.1 * mixed


def test_fid_equals_cleanfid_compute_fid(shapes_folders, shapes_features, shapes_extractor):
    """Our folder path is clean-fid's: same number as cleanfid.fid.compute_fid with the custom extractor."""
    from cleanfid import fid as cfid

    ours = frechet_distance(
        FeatureStats.from_features(shapes_features["colours_mixed"]),
        FeatureStats.from_features(shapes_features["test"]),
    )
    theirs = cfid.compute_fid(
        str(shapes_folders["colours_mixed"]),
        str(shapes_folders["test"]),
        custom_feat_extractor=shapes_extractor,
        custom_fn_resize=shapes_extractor.resize,
        mode="clean",
        device=torch.device("cpu"),
        num_workers=0,
        verbose=False,
    )
    assert ours == pytest.approx(theirs, rel=1e-5)  # we average in float64, clean-fid in float32


def test_npz_statistics_round_trip(shapes_folders, shapes_features, shapes_extractor, tmp_path):
    stats = FeatureStats.from_features(shapes_features["train"], shapes_extractor.name)
    stats.save(tmp_path / "ref.npz")
    loaded = FeatureStats.load(tmp_path / "ref.npz")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert (loaded.n, loaded.features) == (N_IMAGES, shapes_extractor.name)
    from_npz = compute_fid(shapes_folders["test"], tmp_path / "ref.npz", shapes_extractor, verbose=False)
    in_memory = frechet_distance(FeatureStats.from_features(shapes_features["test"]), stats)
    assert from_npz.value == pytest.approx(in_memory, rel=1e-12)
    assert from_npz.reference == str(tmp_path / "ref.npz")

    # ADM's reference batches: mu, sigma (and images), no labels → accepted when the dimension fits
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=stats.mu, sigma=stats.sigma)
    adm = FeatureStats.load(tmp_path / "adm.npz")
    assert (adm.features, adm.n) == ("", 0)
    assert compute_fid(stats, tmp_path / "adm.npz", shapes_extractor).value == pytest.approx(0.0, abs=1e-6)

    np.savez(tmp_path / "no_sigma.npz", mu=stats.mu)
    with pytest.raises(ValueError, match="sigma"):
        FeatureStats.load(tmp_path / "no_sigma.npz")
    FeatureStats(stats.mu, stats.sigma, 10, "inception-v3-2015-12-05/torchscript").save(
        tmp_path / "other.npz"
    )
    with pytest.raises(ValueError, match="inception-v3"):
        compute_fid(shapes_folders["test"], tmp_path / "other.npz", shapes_extractor, verbose=False)
    np.savez(tmp_path / "wrong_dim.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="3-dim"):
        compute_fid(stats, tmp_path / "wrong_dim.npz", shapes_extractor)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        FeatureStats.load(tmp_path / "missing.npz")


def test_fid_refuses_singular_covariance():
    feats = np.random.default_rng(0).normal(size=(64, 64))
    with pytest.raises(ValueError, match="singular"):
        FeatureStats.from_features(feats, "x")
    assert FeatureStats.from_features(np.vstack([feats, feats[:1] + 1]), "x").n == 65


def test_frechet_distance_of_known_gaussians():
    """Diagonal Gaussians: ||mu1 - mu2||² + Σ (s1 + s2 - 2 sqrt(s1 s2))."""
    a = FeatureStats(np.zeros(3), np.diag([1.0, 4.0, 9.0]))
    b = FeatureStats(np.array([1.0, 0.0, 2.0]), np.diag([4.0, 4.0, 1.0]))
    assert frechet_distance(a, b) == pytest.approx(5 + (1 + 4 - 4) + 0 + (9 + 1 - 6), rel=1e-9)


def test_folder_errors_and_unreadable_images(tmp_path, shapes_extractor):
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        extract_folder(tmp_path / "no_such_folder", shapes_extractor, verbose=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        extract_folder(tmp_path / "empty", shapes_extractor, verbose=False)
    images, _ = stack_dataset(ShapesDataset("test", num_samples=5))
    save_images(images, tmp_path / "mixed", _names(5))
    (tmp_path / "mixed" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        feats, _ = extract_folder(tmp_path / "mixed", shapes_extractor, verbose=False)
    assert feats.shape == (5, shapes_extractor.dim)


def test_extractor_resize_is_cleanfids(shapes_extractor):
    from cleanfid.resize import build_resizer, make_resizer

    rng = np.random.default_rng(0)
    same = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(shapes_extractor.resize(same), same.astype(np.float32))
    big = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        shapes_extractor.resize(big), make_resizer("PIL", False, "bicubic", (32, 32))(big)
    )
    inception_like = types.SimpleNamespace(image_size=299)
    np.testing.assert_array_equal(
        type(shapes_extractor).resize(inception_like, big), build_resizer("clean")(big)
    )


# ----------------------------------------------------------------------------- built-in extractors
def test_builtin_extractor_saves_and_loads(shapes_extractor, tmp_path):
    model = shapes_extractor.model
    model.save_pretrained(tmp_path / "folder")
    model.save_safetensors(tmp_path / "fe.safetensors")
    x = _to_255(stack_dataset(ShapesDataset("test", num_samples=8))[0])
    for weights in (tmp_path / "folder", tmp_path / "fe.safetensors"):
        loaded = load_feature_extractor("shapes", weights)
        assert loaded.name == shapes_extractor.name
        torch.testing.assert_close(loaded(x), shapes_extractor(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="'shapes' extractor, not 'digits'"):
        load_feature_extractor("digits", tmp_path / "folder")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_feature_extractor("shapes", tmp_path / "nope")
    with pytest.raises(ValueError, match="kind="):
        load_feature_extractor("clip", tmp_path / "folder")
    with pytest.raises(ValueError, match=r"images of shape \(8, 3, 16, 16\)"):
        shapes_extractor(x[:, :, :16, :16])


def test_builtin_extractor_label_tracks_weights():
    a = FeatureCNN(dataset="digits", num_classes=10, image_size=16)
    b = FeatureCNN(dataset="digits", num_classes=10, image_size=16)
    b.load_state_dict(a.state_dict())
    assert a.label == b.label and a.label.startswith("tokenloom-digits-cnn-v1:")
    with torch.no_grad():
        b.classifier[1].bias.add_(1e-3)
    assert a.label != b.label
    with pytest.raises(ValueError, match="dataset="):
        FeatureCNN(dataset="cifar")


def test_digits_extractor_fid_held_out_vs_mirrored():
    extractor = CNNFeatureExtractor(train_feature_cnn("digits", steps=120, progress=False))
    train, _ = stack_dataset(builtin_dataset("digits", "train"))
    test, _ = stack_dataset(builtin_dataset("digits", "test"))
    ref = FeatureStats.from_features(extractor(_to_255(train)).double().numpy())

    def fid(x):
        return frechet_distance(FeatureStats.from_features(extractor(_to_255(x)).double().numpy()), ref)

    held_out, mirrored = fid(test), fid(test.flip(-1))
    print(
        f"\ndigits ({extractor.name}): FID train vs held-out {held_out:.3f}, "
        f"vs mirrored held-out {mirrored:.3f}"
    )
    assert held_out < 0.05 * np.trace(ref.sigma)
    assert mirrored > 5 * held_out


# ----------------------------------------------------------------------------- Inception (local weights only)
class _FakeTorchScriptInception(nn.Module):
    """The interface of clean-fid's inception-2015-12-05.pt (layers, output, return_features), tiny."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 2048))
        self.output = nn.Linear(2048, 1008)
        nn.init.zeros_(self.output.bias)  # so that softmax(forward) can be compared with bias-free logits

    def forward(self, x, return_features: bool = False):
        feats = self.layers((x - 128) / 128)
        return feats if return_features else self.output(feats).softmax(dim=1)


def test_inception_torchscript_matches_cleanfid(tmp_path, monkeypatch):
    from cleanfid.inception_torchscript import InceptionV3W

    monkeypatch.setattr(urllib.request, "urlopen", _no_download)
    torch.manual_seed(0)
    torch.jit.script(_FakeTorchScriptInception()).save(str(tmp_path / "inception-2015-12-05.pt"))
    ours = load_inception(tmp_path / "inception-2015-12-05.pt")
    theirs = InceptionV3W(str(tmp_path), download=False, resize_inside=False)
    x = torch.rand(2, 3, 299, 299) * 255
    feats, logits = ours.features_and_logits(x)
    with torch.no_grad():
        torch.testing.assert_close(feats, theirs(x), rtol=0, atol=0)
        torch.testing.assert_close(logits.softmax(1), theirs.base(x), rtol=1e-5, atol=1e-7)
    assert (ours.name, ours.dim, ours.image_size, ours.num_classes) == (
        "inception-v3-2015-12-05/torchscript",
        2048,
        299,
        1008,
    )


def test_inception_missing_weights_fail_without_download(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        load_feature_extractor("inception", missing)
    with pytest.raises(ValueError, match="weights=None"):
        load_feature_extractor("inception", None)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth"):
        load_inception(tmp_path / "junk.pth")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # torchvision's notices about clean-fid's `pretrained=`
def test_inception_state_dict_matches_torchvision_forward(tmp_path, monkeypatch):
    """A (random) pytorch-fid state dict: pool features and bias-free logits match the network's forward."""
    import torchvision
    from cleanfid import inception_pytorch

    monkeypatch.setattr(urllib.request, "urlopen", _no_download)
    captured = {}

    def capture(self, state_dict, *args, **kwargs):
        captured["model"] = self

    torch.manual_seed(0)
    with (
        mock.patch.object(inception_pytorch, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(torchvision.models.Inception3, "load_state_dict", capture),
    ):
        inception_pytorch.fid_inception_v3()
    net = captured["model"].eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    ours = load_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    x = torch.rand(2, 3, 299, 299) * 255
    feats, logits = ours.features_and_logits(x)
    with torch.no_grad():
        logits_with_bias = net(2 * (x / 255) - 1)
        fc = net.fc
        net.fc = nn.Identity()
        torch.testing.assert_close(feats, net(2 * (x / 255) - 1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logits, logits_with_bias - fc.bias, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- Inception Score
def test_inception_score_exact_values():
    k = 5
    assert inception_score(torch.zeros(100, k), splits=4).mean == pytest.approx(1.0)
    confident_balanced = 50.0 * torch.eye(k).repeat(20, 1)  # each split holds every class equally
    assert inception_score(confident_balanced, splits=4).mean == pytest.approx(k, rel=1e-6)
    one_class = 50.0 * torch.eye(k)[torch.zeros(100, dtype=torch.long)]
    assert inception_score(one_class, splits=4).mean == pytest.approx(1.0, abs=1e-6)
    # two equiprobable classes, predicted with probabilities (0.9, 0.1) / (0.1, 0.9): exp(log 2 − H(0.9))
    p = torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=torch.float64).repeat(10, 1)
    h = -(0.9 * np.log(0.9) + 0.1 * np.log(0.1))
    assert inception_score(p.log(), splits=1).mean == pytest.approx(np.exp(np.log(2) - h), rel=1e-9)
    with pytest.raises(ValueError, match="splits="):
        inception_score(torch.zeros(3, k), splits=4)
    with pytest.raises(ValueError, match="non-finite"):
        inception_score(torch.full((3, k), float("nan")), splits=1)


def test_inception_score_of_builtin_classifier(shapes_extractor):
    dataset = builtin_dataset("shapes", "test", num_samples=1500)
    images, labels = stack_dataset(dataset)
    per_class = 30
    balanced = torch.cat([torch.nonzero(labels == c)[:per_class, 0] for c in range(dataset.num_classes)])
    assert len(balanced) == per_class * dataset.num_classes
    _, logits = shapes_extractor.features_and_logits(_to_255(images))
    score_balanced = inception_score(logits[balanced], splits=1, classifier=shapes_extractor.name)
    score_one = inception_score(logits[labels == 3], splits=1)
    print(f"\n{score_balanced}\nIS of one class: {score_one.mean:.4f}")
    assert score_balanced.mean > 0.85 * dataset.num_classes
    assert score_one.mean < 1.1


# ----------------------------------------------------------------------------- precision / recall
def test_precision_recall_hand_example():
    ref = np.array([[0.0], [1.0], [2.0], [10.0]])
    # k=1 radii: 1, 1, 1, 8 (10's nearest other point is 2)
    np.testing.assert_allclose(knn_radii(ref, k=1).numpy(), [1, 1, 1, 8])
    gen = np.array(
        [[2.5], [30.0], [-1.0], [19.0]]
    )  # inside: 2.5 (ball of 2), -1 (ball of 0); 19 outside (10+8=18)
    assert in_manifold(gen, ref, knn_radii(ref, k=1)).tolist() == [True, False, True, False]
    pr = precision_recall(gen, ref, k=1)
    assert pr.precision == 0.5
    # gen k=1 radii: 2.5→3.5 (to -1), 30→11 (to 19), -1→3.5, 19→11 (to 30):
    # ref 0, 1, 2 lie in the balls of -1 and 2.5; 10 lies in 19's ball
    assert pr.recall == 1.0
    with pytest.raises(ValueError, match="k="):
        knn_radii(ref, k=4)


def test_precision_recall_on_shapes(shapes_features):
    f = shapes_features
    itself = precision_recall(f["test"], f["test"], features="shapes")
    held_out = precision_recall(f["test"], f["train"])
    disjoint = precision_recall(f["inverted"], f["train"])
    print(f"\nitself: {itself}\nheld-out vs train: {held_out}\ninverted vs train: {disjoint}")
    assert itself.precision == 1.0 and itself.recall == 1.0
    assert held_out.precision > 0.8 and held_out.recall > 0.8
    assert disjoint.precision < 0.2 and disjoint.recall < 0.2


# ----------------------------------------------------------------------------- class-balanced plans
@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_class_balanced_plan_is_complete_and_disjoint(world_size):
    num_classes, n_per_class = 5, 7
    plans = [
        class_balanced_plan(num_classes, n_per_class, world_size=world_size, rank=r, base_seed=3)
        for r in range(world_size)
    ]
    items = [it for plan in plans for it in plan]
    assert sorted(it.index for it in items) == list(range(num_classes * n_per_class))
    assert (
        np.bincount([it.label for it in items], minlength=num_classes).tolist() == [n_per_class] * num_classes
    )
    assert max(map(len, plans)) - min(map(len, plans)) <= 1
    assert len({it.seed for it in items}) == len(items)
    assert len({it.filename for it in items}) == len(items)
    single = {it.index: it for it in class_balanced_plan(num_classes, n_per_class, base_seed=3)}
    assert all(single[it.index] == it for it in items)  # same image whatever the number of processes


def test_class_balanced_plan_seeds_and_errors():
    a = class_balanced_plan(3, 2, base_seed=0)
    b = class_balanced_plan(3, 2, base_seed=1)
    assert not {it.seed for it in a} & {it.seed for it in b}
    assert a[4].seed == image_seed(0, 4) and 0 <= a[4].seed < 2**63
    assert [it.label for it in a] == [0, 1, 2, 0, 1, 2]
    fake_accelerator = types.SimpleNamespace(num_processes=2, process_index=1)
    assert plan_for_accelerator(fake_accelerator, 3, 2) == class_balanced_plan(3, 2, world_size=2, rank=1)
    gens = torch_generators(a[:2])
    assert (
        torch.rand(1, generator=gens[0]).item()
        == torch.rand(1, generator=torch.Generator().manual_seed(a[0].seed)).item()
    )
    for kwargs, match in [
        (dict(world_size=2, rank=2), "rank="),
        (dict(world_size=0), "world_size="),
        (dict(base_seed=-1), "base_seed="),
    ]:
        with pytest.raises(ValueError, match=match):
            class_balanced_plan(3, 2, **kwargs)
    with pytest.raises(ValueError, match="n_per_class="):
        class_balanced_plan(3, 0)


# ----------------------------------------------------------------------------- CLIP score
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised tiny open_clip model (under a test-only name) and its weights file."""
    import open_clip

    root = tmp_path_factory.mktemp("tiny_clip")
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (root / "tokenloom-test-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / "tokenloom-test-tiny-clip.json")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("tokenloom-test-tiny-clip", pretrained=None)
    torch.save(model.state_dict(), root / "tiny_clip.pt")
    return model, preprocess, open_clip.get_tokenizer("tokenloom-test-tiny-clip"), root / "tiny_clip.pt"


def test_clip_score_mechanics(tiny_clip, monkeypatch):
    from tokenloom.evaluation.clip_score import CLIPScorer, _to_pil, clip_score

    monkeypatch.setattr(urllib.request, "urlopen", _no_download)
    model, preprocess, tokenizer, weights = tiny_clip
    scorer = CLIPScorer.from_model(model, preprocess, tokenizer, "tiny")
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    captions = [f"a photo of {n} circles" for n in range(6)]
    scores = scorer(images, captions)
    with torch.no_grad():
        pixels = torch.stack([preprocess(im) for im in _to_pil(images)])
        cos = torch.nn.functional.cosine_similarity(
            model.encode_image(pixels), model.encode_text(tokenizer(captions))
        )
    torch.testing.assert_close(scores, (100 * cos).clamp(min=0))
    assert ((scores >= 0) & (scores <= 100)).all()
    result = clip_score(images, captions, scorer, batch_size=4)
    assert result.value == pytest.approx(scores.mean().item(), rel=1e-5) and result.n == 6
    from_file = CLIPScorer("tokenloom-test-tiny-clip", pretrained=weights)  # the local-path route
    torch.testing.assert_close(from_file(images, captions), scores)
    assert from_file.name == "tokenloom-test-tiny-clip:tiny_clip.pt"
    with pytest.raises(FileNotFoundError, match="missing_clip.bin"):
        CLIPScorer("ViT-B-32", pretrained=weights.parent / "missing_clip.bin")
    with pytest.raises(ValueError, match="captions"):
        scorer(images, captions[:2])


# ----------------------------------------------------------------------------- scripts
def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_fid_script(shapes_folders, shapes_extractor, tmp_path, capsys):
    shapes_extractor.model.save_pretrained(tmp_path / "fe")
    script = _load_script("evaluate_fid")
    out = script.main(
        [
            str(shapes_folders["test"]),
            str(shapes_folders["train"]),
            "--features",
            "shapes",
            "--weights",
            str(tmp_path / "fe"),
            "--is",
            "--pr",
            "--quiet",
            "--json",
            str(tmp_path / "fid.json"),
            "--save-ref-stats",
            str(tmp_path / "ref.npz"),
        ]
    )
    printed = capsys.readouterr().out
    assert "FID " in printed and "clean-fid" in printed and shapes_extractor.name in printed
    written = json.loads((tmp_path / "fid.json").read_text())
    assert written == json.loads(json.dumps(out))
    assert written["fid"]["features"] == shapes_extractor.name and written["fid"]["n_gen"] == N_IMAGES
    assert {"inception_score", "precision_recall"} <= written.keys()
    again = script.main(
        [
            str(shapes_folders["test"]),
            str(tmp_path / "ref.npz"),
            "--features",
            "shapes",
            "--weights",
            str(tmp_path / "fe"),
            "--quiet",
        ]
    )
    assert again["fid"]["value"] == pytest.approx(out["fid"]["value"], rel=1e-12)
    with pytest.raises(SystemExit):
        script.main(
            [
                str(shapes_folders["test"]),
                str(tmp_path / "ref.npz"),
                "--features",
                "shapes",
                "--weights",
                str(tmp_path / "fe"),
                "--pr",
            ]
        )


def test_train_feature_extractor_script(tmp_path):
    script = _load_script("train_feature_extractor")
    summary = script.main(
        [
            "--dataset",
            "digits",
            "--out",
            str(tmp_path / "fe"),
            "--steps",
            "3",
            "--safetensors",
            str(tmp_path / "fe.safetensors"),
            "--no-progress",
        ]
    )
    folder = load_feature_extractor("digits", tmp_path / "fe")
    single = load_feature_extractor("digits", tmp_path / "fe.safetensors")
    assert folder.name == single.name == summary["label"]
    assert 0.0 <= summary["test_accuracy"] <= 1.0
