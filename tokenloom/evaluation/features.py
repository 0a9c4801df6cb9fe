"""Feature extractors for FID, IS and precision/recall, and the clean-fid folder pass that feeds them.

Two families, one interface (:class:`FeatureExtractor`: images in 0..255 → features and class logits):

* **Built-in CNN** (:class:`FeatureCNN`): a small classifier the project trains itself on its own
  data sets (``shapes``: :class:`~tokenloom.data.shapes.SingleShapeDataset`, 21 shape×colour
  classes at 32 px; ``digits``: :class:`~tokenloom.data.digits.DigitsDataset`, 10 classes at
  16 px). Its *penultimate* layer (``feature_dim``, 64 by default) gives the FID/PR features, its
  logits give the Inception-Score class posterior. Features are kept small on purpose: the
  covariance of ``D``-dim features is singular with ``N <= D`` images, so 64 dims make FID
  meaningful from a few hundred images. A FID computed with it is comparable only with FIDs from
  the same weights, so its label carries a fingerprint of them (``tokenloom-shapes-cnn-v1:1a2b3c4d``).
* **Inception-v3 from a local file** (nothing is downloaded here, ever): either the TorchScript
  ``inception-2015-12-05.pt`` that clean-fid and StyleGAN use, or the PyTorch port's state dict
  ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid / torch-fidelity). Features are the
  2048-d pool features exactly as clean-fid's "clean" mode computes them; logits are the
  1008-way head *without its bias*, as StyleGAN's and torch-fidelity's Inception Score do.

Why some code of our own: clean-fid only loads Inception from a fixed file name in a folder and
downloads it when absent, and builds its PyTorch Inception by downloading the state dict; we need
any local path and a clear error instead of a download. The forward computations are clean-fid's
own (its ``InceptionV3`` blocks; the TorchScript model's ``layers`` with clean-fid's normalisation).

Images reach an extractor the way clean-fid hands them to its ``custom_feat_extractor`` hook:
float ``[B, 3, S, S]`` in 0..255, already resized to ``S = extractor.image_size`` by
:meth:`FeatureExtractor.resize` (clean-fid's PIL-bicubic "clean" resizer, identity when the image
already has that size).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn
from tqdm.auto import tqdm

from tokenloom.modeling import TokenloomModel

BUILTIN_KINDS = ("shapes", "digits")
FEATURE_KINDS = (*BUILTIN_KINDS, "inception")
CPU = torch.device("cpu")


# ============================================================================ the interface
class FeatureExtractor(nn.Module):
    """Images in 0..255 → features ``[B, dim]`` (and class logits ``[B, num_classes]``).

    Subclasses set ``name`` (the label every result carries), ``dim``, ``image_size`` and
    ``num_classes`` (0 when there are no logits) and implement :meth:`features_and_logits`.
    Calling the extractor returns features only: that is clean-fid's ``custom_feat_extractor`` hook.
    """

    name: str
    dim: int
    image_size: int
    num_classes: int

    def features_and_logits(self, x_B3SS: Tensor) -> tuple[Tensor, Tensor | None]:
        """``x: [B, 3, S, S]`` float in 0..255 → (features ``[B, dim]``, logits ``[B, K]`` or None)."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x_B3SS: Tensor) -> Tensor:
        return self.features_and_logits(x_B3SS)[0]

    @torch.no_grad()
    def features_with_logits(self, x_B3SS: Tensor) -> Tensor:
        """``[B, dim + K]``: features then logits, one tensor (what the folder pass hands to clean-fid)."""
        feats, logits = self.features_and_logits(x_B3SS)
        if logits is None:
            raise ValueError(
                f"feature extractor {self.name!r} has no class logits (needed for Inception Score)"
            )
        return torch.cat([feats, logits], dim=1)

    def resize(self, image_HW3: np.ndarray) -> np.ndarray:
        """clean-fid's ``custom_fn_resize``: uint8/float ``[H, W, 3]`` → float32 ``[S, S, 3]`` in 0..255.

        Uses clean-fid's "clean" resizer (PIL bicubic on float channels, no quantisation) at this
        extractor's size; an image that already has that size passes through unchanged.
        """
        if image_HW3.shape[:2] == (self.image_size, self.image_size):
            return image_HW3.astype(np.float32)
        if not hasattr(self, "_resizer"):
            from cleanfid.resize import make_resizer

            self._resizer = make_resizer("PIL", False, "bicubic", (self.image_size, self.image_size))
        return self._resizer(image_HW3)


# ============================================================================ built-in CNN
def _fingerprint(state_dict: dict[str, Tensor]) -> str:
    """First 8 hex digits of a SHA-256 over the state dict (names, shapes, values), machine-independent."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:8]


class FeatureCNN(TokenloomModel):
    """A small CNN classifier whose penultimate layer is a feature space for FID.

    ``images: [B, 3, image_size, image_size]`` in [-1, 1] → ``features: [B, feature_dim]`` →
    ``logits: [B, num_classes]``. One stride-2 3×3 conv + GroupNorm + SiLU per entry of
    ``channels``; then the mean *and* the max over positions, concatenated (max pooling detects a
    shape's corners wherever it is, which average pooling alone learns slowly; the mean keeps
    how much of each there is); a linear map to ``feature_dim`` — the features, with no
    activation so no dimension is clamped to zero; then SiLU and a linear classifier.

    Args:
        dataset: which data it was trained on (``"shapes"`` or ``"digits"``); part of its label.
        num_classes, image_size, feature_dim, channels: architecture.
        version: bumped whenever the architecture or training recipe changes meaning.
    """

    @register_to_config
    def __init__(
        self,
        dataset: str = "shapes",
        num_classes: int = 21,
        image_size: int = 32,
        feature_dim: int = 64,
        channels: list[int] | tuple[int, ...] = (16, 32, 64),
        version: int = 1,
    ):
        super().__init__()
        if dataset not in BUILTIN_KINDS:
            raise ValueError(f"dataset={dataset!r} is not one of {BUILTIN_KINDS}")
        for arg, value in (
            ("num_classes", num_classes),
            ("image_size", image_size),
            ("feature_dim", feature_dim),
        ):
            if not isinstance(value, int) or value < 2:
                raise ValueError(f"{arg}={value!r} must be an int >= 2")
        if not channels or any(not isinstance(c, int) or c < 8 or c % 8 for c in channels):
            raise ValueError(f"channels={channels!r} must be a non-empty list of positive multiples of 8")
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.trunk = nn.Sequential(*layers)
        self.to_features = nn.Linear(2 * c_in, feature_dim)
        self.classifier = nn.Sequential(nn.SiLU(), nn.Linear(feature_dim, num_classes))

    @property
    def label(self) -> str:
        """``tokenloom-<dataset>-cnn-v<version>:<weights fingerprint>``: the label of FIDs made with it."""
        return f"tokenloom-{self.config.dataset}-cnn-v{self.config.version}:{_fingerprint(self.state_dict())}"

    def features(self, images_B3HW: Tensor) -> Tensor:
        """``[B, 3, S, S]`` in [-1, 1] → ``[B, feature_dim]``."""
        h_BCHW = self.trunk(images_B3HW)
        return self.to_features(torch.cat([h_BCHW.mean((2, 3)), h_BCHW.amax((2, 3))], dim=1))

    def forward(self, images_B3HW: Tensor) -> Tensor:
        """``[B, 3, S, S]`` in [-1, 1] → logits ``[B, num_classes]``."""
        return self.classifier(self.features(images_B3HW))

    def save_safetensors(self, path: str | os.PathLike) -> None:
        """One ``.safetensors`` file with the config in its metadata (the alternative to save_pretrained)."""
        from safetensors.torch import save_file

        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"tokenloom_config": json.dumps(config)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureCNN:
        """A ``save_pretrained`` folder or a ``.safetensors`` file from :meth:`save_safetensors`."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"feature-extractor weights not found: {str(path)!r} (train them with "
                "`python scripts/train_feature_extractor.py --dataset shapes --out DIR`)"
            )
        if path.is_dir():
            return cls.from_pretrained(str(path)).eval()
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "tokenloom_config" not in meta:
            raise ValueError(
                f"{str(path)!r} has no 'tokenloom_config' metadata: not a FeatureCNN safetensors file "
                "(expected a save_pretrained folder or a file written by FeatureCNN.save_safetensors)"
            )
        model = cls(**json.loads(meta["tokenloom_config"]))
        state = load_file(str(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{str(path)!r} does not fit FeatureCNN: missing keys {sorted(missing)}, "
                f"unexpected keys {sorted(unexpected)}"
            )
        return model.eval()


class CNNFeatureExtractor(FeatureExtractor):
    """A trained :class:`FeatureCNN` behind the 0..255 interface."""

    def __init__(self, model: FeatureCNN):
        super().__init__()
        self.model = model.eval()
        self.name = model.label
        self.dim = model.config.feature_dim
        self.image_size = model.config.image_size
        self.num_classes = model.config.num_classes

    def features_and_logits(self, x_B3SS: Tensor) -> tuple[Tensor, Tensor]:
        _check_batch(x_B3SS, self.image_size)
        feats = self.model.features(x_B3SS.float() / 127.5 - 1.0)
        return feats, self.model.classifier(feats)


def builtin_dataset(kind: str, split: str, num_samples: int = 4000, seed: int = 0):
    """The data set a built-in extractor of ``kind`` is trained and checked on (items with image/label)."""
    if kind == "shapes":
        from tokenloom.data.shapes import SingleShapeDataset

        return SingleShapeDataset(split=split, image_size=32, num_samples=num_samples, seed=seed)
    if kind == "digits":
        from tokenloom.data.digits import DigitsDataset

        return DigitsDataset(split=split, image_size=16)
    raise ValueError(f"kind={kind!r} is not one of {BUILTIN_KINDS}")


def stack_dataset(dataset, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """All (or the first ``limit``) items → (images ``[N, 3, H, W]`` in [-1, 1], labels ``[N]``)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    items = [dataset[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), torch.tensor([int(it["label"]) for it in items])


def train_feature_cnn(
    kind: str,
    *,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 3e-3,
    num_samples: int = 3000,
    feature_dim: int = 64,
    channels: tuple[int, ...] = (16, 32, 64),
    seed: int = 0,
    progress: bool = True,
) -> FeatureCNN:
    """Train the built-in extractor for ``kind`` (``"shapes"`` or ``"digits"``) on its training split.

    AdamW with a one-cycle schedule (10% warm-up, cosine decay), cross-entropy on the class
    labels; random horizontal flips for shapes (a flipped shape keeps its class). Same seed and
    thread count → same weights (the label's fingerprint tells runs apart).
    """
    if kind not in BUILTIN_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {BUILTIN_KINDS}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive int")
    dataset = builtin_dataset(kind, "train", num_samples=num_samples, seed=seed)
    images, labels = stack_dataset(dataset)
    torch.manual_seed(seed)
    model = FeatureCNN(
        dataset=kind,
        num_classes=dataset.num_classes,
        image_size=images.shape[-1],
        feature_dim=feature_dim,
        channels=list(channels),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc=f"train {kind} feature CNN", disable=not progress):
        idx = torch.randint(len(images), (min(batch_size, len(images)),), generator=gen)
        x = images[idx]
        if kind == "shapes":
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def classifier_accuracy(
    model: FeatureCNN, images_N3HW: Tensor, labels_N: Tensor, batch_size: int = 512
) -> float:
    """Top-1 accuracy of ``model`` on images in [-1, 1]."""
    model.eval()
    preds = torch.cat(
        [model(images_N3HW[i : i + batch_size]).argmax(1) for i in range(0, len(images_N3HW), batch_size)]
    )
    return float((preds == labels_N).float().mean())


# ============================================================================ Inception-v3
def _check_weights_path(weights: str | os.PathLike | None, what: str) -> Path:
    if weights is None:
        raise ValueError(f"weights=None: {what} needs a local weights path (nothing is downloaded)")
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} weights not found at {str(path)!r}; pass a local file (nothing is downloaded)"
        )
    return path


def _check_batch(x: Tensor, size: int) -> None:
    if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (size, size):
        raise ValueError(
            f"images of shape {tuple(x.shape)}: expected [B, 3, {size}, {size}] in 0..255 "
            "(resize them with FeatureExtractor.resize)"
        )


class InceptionTorchScript(FeatureExtractor):
    """clean-fid's Inception (the TorchScript ``inception-2015-12-05.pt``) loaded from any local path.

    Features are what ``cleanfid.inception_torchscript.InceptionV3W(resize_inside=False)``
    returns: ``layers((x - 128) / 128)`` on a 299×299 image. Logits: the model's 1008-way
    ``output`` layer without its bias (StyleGAN's ``no_output_bias=True``).
    """

    def __init__(self, weights: str | os.PathLike):
        super().__init__()
        path = _check_weights_path(weights, "Inception TorchScript")
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice: the file *is* TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            self.base = torch.jit.load(str(path), map_location="cpu").eval()
        if not hasattr(self.base, "layers"):
            raise ValueError(
                f"{str(path)!r} is TorchScript but has no 'layers' submodule: not clean-fid's "
                "inception-2015-12-05.pt"
            )
        self.name, self.dim, self.image_size = "inception-v3-2015-12-05/torchscript", 2048, 299
        self.num_classes = int(self.base.output.weight.shape[0]) if hasattr(self.base, "output") else 0

    def features_and_logits(self, x_B3SS: Tensor) -> tuple[Tensor, Tensor | None]:
        _check_batch(x_B3SS, self.image_size)
        feats = self.base.layers.forward((x_B3SS.float() - 128) / 128).view(x_B3SS.shape[0], 2048)
        logits = feats @ self.base.output.weight.t() if self.num_classes else None
        return feats, logits


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"{str(path)!r} is neither TorchScript nor a loadable state dict: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


class InceptionStateDict(FeatureExtractor):
    """The PyTorch port of TF Inception (``pt_inception-2015-12-05-6726825d.pth``) from a local state dict.

    Built with clean-fid's own ``cleanfid.inception_pytorch.InceptionV3`` (FID blocks, pool3
    output), which fetches its weights through ``load_state_dict_from_url``; we hand it the local
    file instead, so no download is attempted. Input scaling as clean-fid's: ``x / 255`` then
    ``2x - 1`` inside. Logits: ``fc`` without its bias (torch-fidelity's ``logits_unbiased``).
    """

    def __init__(self, weights: str | os.PathLike):
        super().__init__()
        path = _check_weights_path(weights, "Inception state dict")
        state = _load_state_dict(path)
        from cleanfid import inception_pytorch

        def local_weights(url, *args, **kwargs):
            return state

        with (
            mock.patch.object(inception_pytorch, "load_state_dict_from_url", local_weights),
            warnings.catch_warnings(),
        ):  # torchvision's notices about clean-fid's `pretrained=False`
            warnings.simplefilter("ignore", UserWarning)
            try:
                self.net = inception_pytorch.InceptionV3(output_blocks=[3], resize_input=False).eval()
            except RuntimeError as err:
                raise ValueError(f"{str(path)!r} does not fit the FID Inception-v3: {err}") from err
        fc = state.get("fc.weight")
        self.register_buffer(
            "fc_weight", fc.float() if fc is not None else torch.empty(0, 2048), persistent=False
        )
        self.name, self.dim, self.image_size = "inception-v3-2015-12-05/pytorch-port", 2048, 299
        self.num_classes = int(self.fc_weight.shape[0])

    def features_and_logits(self, x_B3SS: Tensor) -> tuple[Tensor, Tensor | None]:
        _check_batch(x_B3SS, self.image_size)
        feats = self.net(x_B3SS.float() / 255)[0].flatten(1)
        return feats, (feats @ self.fc_weight.t() if self.num_classes else None)


def load_inception(weights: str | os.PathLike) -> FeatureExtractor:
    """Inception-v3 from a local TorchScript file or state dict (``.pt``/``.pth``/``.safetensors``)."""
    path = _check_weights_path(weights, "Inception")
    if path.suffix != ".safetensors":
        try:
            return InceptionTorchScript(path)
        except RuntimeError:  # not TorchScript: a state dict
            pass
    return InceptionStateDict(path)


def load_feature_extractor(kind: str, weights: str | os.PathLike) -> FeatureExtractor:
    """``kind``: ``"shapes"``/``"digits"`` (a :class:`FeatureCNN` folder/safetensors) or ``"inception"``."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {FEATURE_KINDS}")
    if kind == "inception":
        return load_inception(weights)
    if weights is None:
        raise ValueError(
            f"weights=None: the {kind} extractor needs a trained FeatureCNN (train one with "
            f"`python scripts/train_feature_extractor.py --dataset {kind} --out DIR`)"
        )
    model = FeatureCNN.load(weights)
    if model.config.dataset != kind:
        raise ValueError(f"weights {str(weights)!r} are a {model.config.dataset!r} extractor, not {kind!r}")
    return CNNFeatureExtractor(model)


# ============================================================================ folder pass
def _check_folder(folder: str | os.PathLike) -> list[Path]:
    from cleanfid.utils import EXTENSIONS

    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder not found: {str(path)!r}")
    files = [Path(d) / f for d, _, names in os.walk(path) for f in names if Path(f).suffix[1:] in EXTENSIONS]
    if not files:
        raise ValueError(f"image folder {str(path)!r} has no images (extensions: {sorted(EXTENSIONS)})")
    return files


def _readable(files: list[Path]) -> list[Path]:
    """Files PIL can open; the others are skipped with one warning that counts them."""
    from PIL import Image

    good, bad = [], []
    for f in files:
        if f.suffix == ".npy":
            good.append(f)
            continue
        try:
            with Image.open(f) as im:
                im.verify()
            good.append(f)
        except Exception:  # any decoding failure means "unreadable"
            bad.append(f)
    if bad:
        warnings.warn(
            f"skipped {len(bad)} unreadable image(s) of {len(files)}, e.g. {str(bad[0])!r}", stacklevel=3
        )
    if not good:
        raise ValueError(f"none of the {len(files)} image files could be read, e.g. {str(bad[0])!r}")
    return good


@torch.no_grad()
def extract_folder(
    folder: str | os.PathLike,
    extractor: FeatureExtractor,
    *,
    with_logits: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = CPU,
    verbose: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Every image under ``folder`` (recursively, sorted) → (features ``[N, dim]``, logits ``[N, K]``/None).

    Decoding and resizing are clean-fid's (``cleanfid.fid.get_files_features`` with
    :meth:`FeatureExtractor.resize`), so these are exactly the features clean-fid's
    ``compute_fid(..., custom_feat_extractor=extractor)`` would use. Unreadable files are skipped,
    counted and warned about.
    """
    from cleanfid import fid as cfid

    files = sorted(_readable(_check_folder(folder)))
    device = torch.device(device)
    extractor = extractor.to(device).eval()
    model: Callable[[Tensor], Tensor] = extractor.features_with_logits if with_logits else extractor
    out = cfid.get_files_features(
        [str(f) for f in files],
        model,
        num_workers=num_workers,
        batch_size=batch_size,
        device=device,
        mode="clean",
        custom_fn_resize=extractor.resize,
        description=f"features {Path(folder).name}",
        verbose=verbose,
    )
    out = out.astype(np.float64)
    if not np.isfinite(out).all():
        raise ValueError(f"feature extractor {extractor.name!r} gave non-finite outputs on {str(folder)!r}")
    if with_logits:
        return out[:, : extractor.dim], out[:, extractor.dim :]
    return out, None
