"""The embedded default feature network: a small CNN digit classifier, trained and cached here.

`load_or_train_mnist_classifier(cache_dir)` trains `DigitClassifier` on the mnist5k train split
(or loads it from `<cache_dir>/mnist_classifier`) and returns `ClassifierFeatures`, whose
embedding is the classifier's 128-d penultimate (post-ReLU) layer. The checkpoint folder's
config holds the held-out accuracy. `lfm_core.features.build_feature_extractor("mnist_classifier")`
is the registry's way to it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from lfm_core.checkpoint import CONFIG_FILE, load_config, load_into, load_state, save_checkpoint
from lfm_core.data import load_dataset
from lfm_core.features import FEATURE_BATCH_SIZE, FeatureExtractor

MNIST_CLASSIFIER_DIR = "mnist_classifier"


@dataclass(frozen=True)
class ClassifierConfig:
    """A small two-conv CNN; `feature_dim` is the width of the penultimate (feature) layer."""

    in_channels: int = 1
    num_classes: int = 10
    width: int = 16
    feature_dim: int = 128
    pooled_side: int = 8  # spatial side before the feature layer (32 / 4 for mnist5k)
    dropout: float = 0.3  # before the head only: the features themselves are deterministic


class DigitClassifier(nn.Module):
    """(conv-bn-relu-maxpool) x2 -> linear-relu (the feature) -> dropout -> linear (logits)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.body = nn.Sequential(
            nn.Conv2d(config.in_channels, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            # Any input size maps to the same feature layer (identity for 32 x 32 inputs).
            nn.AdaptiveAvgPool2d(config.pooled_side),
            nn.Flatten(),
            nn.Linear(2 * w * config.pooled_side**2, config.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Dropout(config.dropout), nn.Linear(config.feature_dim, config.num_classes)
        )

    def features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, feature_dim), non-negative."""
        return self.body(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


@dataclass(frozen=True)
class ClassifierTraining:
    """Adam with a one-cycle schedule; light augmentation: random shifts and rotations."""

    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    max_shift: int = 2  # pixels
    max_rotation: float = 10.0  # degrees


def _augment(images: Tensor, cfg: ClassifierTraining, generator: torch.Generator) -> Tensor:
    """Rotate and translate each image at random, filling with the border (the background)."""
    n, _, h, w = images.shape
    angle = (2 * torch.rand(n, generator=generator) - 1) * math.radians(cfg.max_rotation)
    cos, sin = angle.cos(), angle.sin()
    shift = torch.randint(-cfg.max_shift, cfg.max_shift + 1, (n, 2), generator=generator)
    # affine_grid works in [-1, 1] units: one pixel is 2 / side.
    shift = shift.float() * 2 / torch.tensor([w, h])
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


def train_classifier(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    epochs: int = ClassifierTraining.epochs,
    seed: int = 0,
    progress: bool = True,
) -> DigitClassifier:
    """Train a DigitClassifier on images (N, C, H, W) in [-1, 1] with labels (N,)."""
    cfg = ClassifierTraining(epochs=epochs)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(images) / cfg.batch_size)
    # Initialisation and dropout draw from the global generator: seed it without leaking out.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitClassifier(
            ClassifierConfig(in_channels=images.shape[1], num_classes=num_classes)
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=steps)
        model.train()
        for _ in tqdm(range(epochs), desc="classifier epochs", disable=not progress):
            for batch in torch.randperm(len(images), generator=generator).split(cfg.batch_size):
                x = _augment(images[batch], cfg, generator)
                loss = F.cross_entropy(model(x), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of model on images (N, C, H, W) with labels (N,)."""
    model.eval()
    predictions = torch.cat([model(x).argmax(1) for x in images.split(FEATURE_BATCH_SIZE)])
    return (predictions == labels).double().mean().item()


class ClassifierFeatures(FeatureExtractor):
    """Penultimate-layer features of a DigitClassifier.

    Attributes:
        classifier: the network. heldout_accuracy: its accuracy on the held-out split.
    """

    def __init__(self, classifier: DigitClassifier, heldout_accuracy: float):
        super().__init__("mnist_classifier", classifier.config.feature_dim)
        self.classifier = classifier.eval().requires_grad_(False)
        self.heldout_accuracy = heldout_accuracy

    def embed(self, images: Tensor) -> Tensor:
        return self.classifier.features(images)


def load_classifier_features(directory: str | Path) -> ClassifierFeatures:
    """Load a classifier checkpoint folder written by `load_or_train_mnist_classifier`."""
    config = load_config(directory)
    model = DigitClassifier(ClassifierConfig(**config["classifier"]))
    load_into(model, load_state(directory, "classifier"), directory)
    return ClassifierFeatures(model, config["heldout_accuracy"])


def load_or_train_mnist_classifier(
    cache_dir: str | Path, seed: int = 0, progress: bool = True
) -> ClassifierFeatures:
    """The mnist5k classifier's features, from `<cache_dir>/mnist_classifier` or trained now.

    Training uses the train split (4,000 digits); the accuracy on the held-out split (1,000)
    is measured and saved in the checkpoint's config next to the weights.
    """
    directory = Path(cache_dir).expanduser() / MNIST_CLASSIFIER_DIR
    # config.json is written last: a folder without it is an interrupted save, so retrain.
    if (directory / CONFIG_FILE).is_file():
        return load_classifier_features(directory)
    train, heldout = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "heldout")
    model = train_classifier(
        train.images, train.labels, train.num_classes, seed=seed, progress=progress
    )
    accuracy = classifier_accuracy(model, heldout.images, heldout.labels)
    config = {
        "classifier": asdict(model.config),
        "training": {**asdict(ClassifierTraining()), "seed": seed, "dataset": "mnist5k"},
        "heldout_accuracy": accuracy,
    }
    save_checkpoint(directory, {"classifier": model}, config)
    return ClassifierFeatures(model, accuracy)
