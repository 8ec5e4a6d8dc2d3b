"""Feature extractors: images (N, C, H, W) in [-1, 1] -> embeddings (N, D), one interface.

`build_feature_extractor(name)` with name in FEATURE_EXTRACTORS:
- "mnist_classifier" (default, offline): the 128-d penultimate (post-ReLU) layer of the small
  CNN of `lfm_core.classifier`, trained there on the mnist5k train split and cached as a
  checkpoint folder with the held-out accuracy in its config.
- "dinov2": DINOv2 CLS token, ViT-S/14 (facebook/dinov2-small; the embedded default).
- "dinov2-base": DINOv2 ViT-B/14 CLS token (facebook/dinov2-base), the paper's stability
  features on ImageNet (src/evaluate/evaluate_dino_similarity.py: dinov2_vitb14, 224 px).
- "arcface": insightface IResNet embeddings from a local state dict (`lfm_core.arcface`), the
  paper's stability features on faces.
- "clip": CLIP ViT-B/32 image embeddings (the paper's clustering features).
- "inception": the FID Inception-v3 pool features via torchmetrics / torch-fidelity.
Hub models need transformers (the `hub` extra) and downloaded weights; when either is missing
the builder raises a one-line ConfigError that names the model and what to do.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from lfm_core.errors import ConfigError, check_choice

FEATURE_BATCH_SIZE = 256
DEFAULT_CACHE_DIR = Path("~/.cache/lfm/features")
DINOV2_ID = "facebook/dinov2-small"
DINOV2_BASE_ID = "facebook/dinov2-base"  # ViT-B/14, the paper's
DINOV2_RESOLUTION = 224  # the paper resizes to 224 for DINOv2 (evaluate_dino_similarity.py)
CLIP_ID = "openai/clip-vit-base-patch32"
INCEPTION_DIM = 2048  # pool3 features, the standard FID layer
UINT8_MAX = 255.0


class FeatureExtractor(nn.Module, ABC):
    """Batched, gradient-free embedding of images in [-1, 1].

    Subclasses implement `embed` for one batch. `num_features` (= dim) lets torchmetrics'
    FrechetInceptionDistance(feature=extractor) size its state without a probe image.

    Attributes:
        name: registry name. dim: feature dimension D. batch_size: images per forward pass.
    """

    def __init__(self, name: str, dim: int, batch_size: int = FEATURE_BATCH_SIZE):
        super().__init__()
        self.name, self.dim, self.batch_size = name, dim, batch_size

    @property
    def num_features(self) -> int:
        return self.dim

    @abstractmethod
    def embed(self, images: Tensor) -> Tensor:
        """One batch: (B, C, H, W) in [-1, 1] on the extractor's device -> (B, D)."""

    @torch.no_grad()
    def forward(self, images: Tensor, progress: bool = False) -> Tensor:
        """Embed images (N, C, H, W) in [-1, 1] batch by batch -> (N, D) float32 on the CPU."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(
                f"{self.name}: expected images (N, 1 or 3, H, W), got {tuple(images.shape)}"
            )
        device = next(self.parameters()).device
        batches = tqdm(
            images.split(self.batch_size), desc=f"{self.name} features", disable=not progress
        )
        return torch.cat([self.embed(batch.to(device)).float().cpu() for batch in batches])


def to_unit_rgb(images: Tensor, size: int) -> Tensor:
    """[-1, 1] (N, 1 or 3, H, W) -> [0, 1] (N, 3, size, size): gray to RGB, bicubic resize."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)


# ---- hub models -------------------------------------------------------------------------------


def _from_pretrained(
    name: str, class_name: str, model_id: str, cache_dir: str | Path | None
) -> Any:
    """transformers.<class_name>.from_pretrained(model_id), failures as one-line ConfigErrors."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            f"{name}: {model_id!r} needs transformers: pip install 'lfm-stability[hub]'"
        ) from None
    try:
        model = getattr(transformers, class_name).from_pretrained(model_id, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{name}: cannot load {model_id!r} ({reason}); download it with "
            f"`hf download {model_id}` while online, or pass path= a local copy"
        ) from None
    return model.eval().requires_grad_(False)


class _NormalisedHubFeatures(FeatureExtractor):
    """A transformers vision model fed RGB resized to `resolution`, normalised by mean / std."""

    mean: Tensor
    std: Tensor

    def __init__(self, name: str, dim: int, model: nn.Module, resolution: int, mean, std):
        super().__init__(name, dim)
        self.model, self.resolution = model, resolution
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def pixels(self, images: Tensor) -> Tensor:
        return (to_unit_rgb(images, self.resolution) - self.mean) / self.std


class DinoV2Features(_NormalisedHubFeatures):
    """DINOv2 CLS token after the final layer norm (`pooler_output`), D = hidden_size."""

    def __init__(
        self,
        model_id: str = DINOV2_ID,
        cache_dir: str | Path | None = None,
        name: str = "dinov2",
    ):
        from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        model = _from_pretrained(name, "AutoModel", model_id, cache_dir)
        dim = model.config.hidden_size
        super().__init__(
            name, dim, model, DINOV2_RESOLUTION, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        )

    def embed(self, images: Tensor) -> Tensor:
        return self.model(pixel_values=self.pixels(images)).pooler_output


class ClipFeatures(_NormalisedHubFeatures):
    """CLIP image embeddings (after the projection), D = projection_dim, at the model's size."""

    def __init__(self, model_id: str = CLIP_ID, cache_dir: str | Path | None = None):
        from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        model = _from_pretrained("clip", "CLIPVisionModelWithProjection", model_id, cache_dir)
        dim, size = model.config.projection_dim, model.config.image_size
        super().__init__("clip", dim, model, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def embed(self, images: Tensor) -> Tensor:
        return self.model(pixel_values=self.pixels(images)).image_embeds


class InceptionFeatures(FeatureExtractor):
    """FID Inception-v3 pool features (D = 2048) through torchmetrics' NoTrainInceptionV3.

    Needs torch-fidelity and its Inception weights (downloaded on first use, or a local file).
    """

    def __init__(self, weights_path: str | Path | None = None):
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise ConfigError("inception: needs torch-fidelity: pip install torch-fidelity")
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=[str(INCEPTION_DIM)],
                feature_extractor_weights_path=None if weights_path is None else str(weights_path),
            )
        except (OSError, RuntimeError) as err:
            raise ConfigError(
                f"inception: cannot load the FID Inception weights ({type(err).__name__}); "
                "download pt_inception-2015-12-05 while online and pass path= the file"
            ) from None
        super().__init__("inception", INCEPTION_DIM)
        self.net = net

    def embed(self, images: Tensor) -> Tensor:
        # The FID network takes uint8 RGB and resizes to 299 itself.
        rgb = (
            images.clamp(-1, 1).expand(-1, 3, -1, -1)
            if images.shape[1] == 1
            else images.clamp(-1, 1)
        )
        return self.net(((rgb + 1) * UINT8_MAX / 2).round().to(torch.uint8))


# ---- registry ---------------------------------------------------------------------------------

Builder = Callable[[str | Path | None, str | Path | None], FeatureExtractor]


def _mnist_classifier(cache_dir: str | Path | None, path: str | Path | None) -> FeatureExtractor:
    # Imported here: lfm_core.classifier builds on FeatureExtractor, so it imports this module.
    from lfm_core.classifier import load_classifier_features, load_or_train_mnist_classifier

    if path is not None:
        return load_classifier_features(path)
    return load_or_train_mnist_classifier(DEFAULT_CACHE_DIR if cache_dir is None else cache_dir)


def _arcface(cache_dir: str | Path | None, path: str | Path | None) -> FeatureExtractor:
    # Imported here: lfm_core.arcface builds on FeatureExtractor, so it imports this module.
    from lfm_core.arcface import ArcFaceFeatures

    return ArcFaceFeatures(path)


FEATURE_EXTRACTORS: dict[str, Builder] = {
    "mnist_classifier": _mnist_classifier,
    "dinov2": lambda cache_dir, path: DinoV2Features(str(path or DINOV2_ID), cache_dir),
    "dinov2-base": lambda cache_dir, path: DinoV2Features(
        str(path or DINOV2_BASE_ID), cache_dir, name="dinov2-base"
    ),
    "clip": lambda cache_dir, path: ClipFeatures(str(path or CLIP_ID), cache_dir),
    "inception": lambda cache_dir, path: InceptionFeatures(path),
    "arcface": _arcface,
}


def build_feature_extractor(
    name: str, cache_dir: str | Path | None = None, path: str | Path | None = None
) -> FeatureExtractor:
    """Build a feature extractor by registry name.

    Args:
        name: one of FEATURE_EXTRACTORS.
        cache_dir: where the mnist classifier is cached (default ~/.cache/lfm/features) and the
            transformers download cache for hub models.
        path: a local copy of the model: a classifier checkpoint folder, a saved transformers
            model folder (or another hub id), or the Inception weights file.
    """
    check_choice("feature_extractor", name, FEATURE_EXTRACTORS)
    return FEATURE_EXTRACTORS[name](cache_dir, path)
