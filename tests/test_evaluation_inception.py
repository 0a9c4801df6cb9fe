"""Inception: clean-fid's TorchScript and torchvision weights (local files only) and the Inception Score."""

import urllib.request
from unittest import mock

import numpy as np
import pytest
import torch
from evaluation_helpers import _no_download, _to_255
from torch import nn

from tokenloom.evaluation.features import (
    builtin_dataset,
    load_feature_extractor,
    load_inception,
    stack_dataset,
)
from tokenloom.evaluation.inception_score import inception_score

pytest_plugins = ("evaluation_fixtures",)  # the session fixtures on the shapes folders, built once per run


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
