"""FID (clean-fid), the feature extractors and their scripts (evaluate_fid, train_feature_extractor).

The bars use the built-in shapes extractor, trained once per module (a few seconds): FID between
the shapes training split and its held-out split is near zero and far below the FID of a shifted
set. Run with ``-s`` to see the measured numbers.

Inception, precision/recall, CLIP score and class-balanced plans are tested in ``test_evaluation_*.py``; the
shared session fixtures live in ``evaluation_fixtures.py``.
"""

import importlib.util
import json
import types

import numpy as np
import pytest
import torch
from evaluation_helpers import N_IMAGES, ROOT, _names, _to_255

from tokenloom.data.shapes import ShapesDataset
from tokenloom.evaluation.class_balanced import save_images
from tokenloom.evaluation.features import (
    CNNFeatureExtractor,
    FeatureCNN,
    builtin_dataset,
    extract_folder,
    load_feature_extractor,
    stack_dataset,
    train_feature_cnn,
)
from tokenloom.evaluation.fid import FeatureStats, compute_fid, folder_stats, frechet_distance

pytest_plugins = ("evaluation_fixtures",)  # the session fixtures on the shapes folders, built once per run


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
