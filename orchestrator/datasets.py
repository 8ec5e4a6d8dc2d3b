"""Image folders as Ray Data streams, the encoding and feature actor pools, and sharded outputs.

An image folder (flat, or one subfolder per class; local or ``s3://bucket/prefix``) is listed,
never loaded: `source_of` turns a dataset stage's inputs into an `ImageSource` (its split's
files in the data set's order, labels from the listing). `ImageSource.dataset` reads the files
as uint8 with ``ray.data.read_images`` and squares them in the read tasks; `stream` runs an
actor class over them with ``map_batches`` (one model load per actor; GPU actors when asked)
and yields the results in the listing's order, which it checks row by row.

Outputs as large as the data set are numpy shards, row-aligned across arrays::

    <stage folder>/shards/index.json            {"names": [...], "rows": [rows per shard]}
    <stage folder>/shards/<name>-00000.npy      rows 0 .. rows[0] - 1 of array <name>

`ShardWriter` writes them from a stream (memory: one shard), `load_shards` reads them whole
(for consumers that need every row, e.g. k-means over all features), `iter_shards` streams
them, and `ShardedLatents` gives training workers random access to their own rows without
loading the rest. Ray is imported only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import posixpath
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
from PIL import Image
from torch import Tensor

from lfm_core.data import (
    FolderListing,
    ImageDataset,
    folder_mode,
    folder_split,
    list_folder,
    listing_of,
    square_uint8,
    unit_images,
)
from lfm_core.errors import ConfigError
from orchestrator.cache import StageCache, StageRef

SHARDS_DIR = "shards"
SHARDS_INDEX = f"{SHARDS_DIR}/index.json"
# Rows per shard are chosen so that a shard of the widest array holds about this many bytes.
SHARD_BYTES = 64 * 2**20
S3_SCHEME = "s3://"
_KIB_PER_MIB = 1024


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / _KIB_PER_MIB


# ---- sources ------------------------------------------------------------------------------------


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's file system of a root (honours AWS_ENDPOINT_URL for S3) and its base path."""
    fs, base = pafs.FileSystem.from_uri(root if root.startswith(S3_SCHEME) else str(Path(root)))
    return fs, base


def _listing(root: str, classes: tuple[str, ...] | None) -> FolderListing:
    if not root.startswith(S3_SCHEME):
        return list_folder(Path(root), classes)
    fs, base = _filesystem(root)
    selector = pafs.FileSelector(base, allow_not_found=True, recursive=True)
    files = [
        posixpath.relpath(info.path, base)
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File
    ]
    listing = listing_of(files, classes)
    if not listing.files:
        raise ConfigError(f"dataset 'folder': no images under {root!r} or its class folders")
    return listing


@functools.lru_cache(maxsize=16)
def _split_listing(root: str, heldout_root: str | None, split: str) -> FolderListing:
    """One split's listing: all of root and of heldout_root, or root's fixed held-out split."""
    train = _listing(root, None)
    if heldout_root is None:
        return train.take(folder_split(train, root)[split])
    return train if split == "train" else _listing(heldout_root, train.classes)


@functools.lru_cache(maxsize=16)
def _mode(root: str, first_file: str) -> str:
    fs, base = _filesystem(root)
    with (
        fs.open_input_file(posixpath.join(base, first_file)) as handle,
        Image.open(handle) as image,
    ):
        return folder_mode(image.mode)


@dataclass(frozen=True)
class ImageSource:
    """One split of an image folder, listed: the files Ray Data reads, in the data set's order.

    Attributes:
        root: the folder the files are under (local absolute path or s3://bucket/prefix).
        listing: the split's files (relative to root) and labels, cut to the split's limit.
        mode: "L" or "RGB" (the mode of the training folder's first image).
        image_size: images are resized and center-cropped to (C, image_size, image_size).
    """

    root: str
    listing: FolderListing
    mode: str
    image_size: int

    def __len__(self) -> int:
        return len(self.listing)

    def paths(self) -> list[str]:
        """The files as the file system of `root` names them (what read_images reports)."""
        _, base = _filesystem(self.root)
        return [posixpath.join(base, name) for name in self.listing.files]

    def dataset(self, cpus: float = 1.0) -> Any:
        """A ray.data.Dataset of {"path", "image": (C, S, S) uint8} rows, in listing order,
        read and squared by tasks of `cpus` CPUs each."""
        import ray.data

        fs, _ = _filesystem(self.root)
        read = ray.data.read_images(
            self.paths(),
            filesystem=fs,
            include_paths=True,
            mode=self.mode,
            num_cpus=cpus,
        )
        square = functools.partial(_squares, size=self.image_size)
        return read.map_batches(square, batch_format="numpy", num_cpus=cpus)


def _squares(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """A read batch's images squared to (B, C, size, size) uint8 (lfm_core's folder transform)."""
    squares = np.stack([square_uint8(np.asarray(image), size) for image in batch["image"]])
    return {"path": batch["path"], "image": squares}


def source_of(inputs: dict[str, Any], split: str) -> ImageSource:
    """The image source of a "folder" dataset stage's split ("train" or "heldout")."""
    root, heldout_root = inputs["root"], inputs.get("heldout_root")
    if root is None:
        raise ConfigError("dataset 'folder' needs data.root=<image folder or s3:// prefix>")
    listing = _split_listing(root, heldout_root, split)
    limit = inputs["limit"] if split == "train" else inputs["heldout_limit"]
    if limit is not None and limit < len(listing):
        listing = listing.take(np.arange(limit))
    train_first = _split_listing(root, heldout_root, "train").files[0]
    folder = heldout_root if split == "heldout" and heldout_root is not None else root
    return ImageSource(folder, listing, _mode(root, train_first), inputs["image_size"])


def seeded_rows(count: int, size: int, seed: int) -> np.ndarray:
    """(min(size, count),) sorted int64 row indices of a seeded random subset of `count` rows
    (all rows, in order, when `size` >= count)."""
    if size >= count:
        return np.arange(count)
    chosen = np.random.default_rng(seed).choice(count, size=size, replace=False)
    return np.sort(chosen).astype(np.int64)


# ---- actor pools -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActorPool:
    """How a stream runs: actors (one model load each; a GPU each with use_gpu), images per
    call, and the CPUs each actor and each read task reserves (fractions let a stream run
    beside a 1-CPU trial driver on a small cluster)."""

    actors: int = 1
    use_gpu: bool = False
    batch_size: int = 256
    cpus: float = 0.5


@contextlib.contextmanager
def _ordered() -> Iterator[None]:
    """Ray Data's preserve_order for this driver, restored afterwards."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = before


def stream(
    source: ImageSource, actor: type, args: tuple[Any, ...], pool: ActorPool
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `actor(*args)(batch)` over the source's images, in the listing's order.

    Raises:
        RuntimeError: a batch came back out of order (the rows would not match the labels).
    """
    with _ordered():  # a dataset keeps the context it was made in: make it inside
        mapped = source.dataset(pool.cpus).map_batches(
            actor,
            fn_constructor_args=args,
            batch_size=pool.batch_size,
            concurrency=pool.actors,
            num_cpus=pool.cpus,
            num_gpus=1 if pool.use_gpu else 0,
            batch_format="numpy",
        )
        yield from _in_order(mapped, source)


def _in_order(dataset: Any, source: ImageSource) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's batches, checked to hold the source's files in the listing's order."""
    expected, seen = source.paths(), 0
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        paths = [str(p) for p in batch["path"]]
        if paths != expected[seen : seen + len(paths)]:
            raise RuntimeError(f"{source.root}: Ray Data returned rows out of order at {seen}")
        seen += len(paths)
        yield batch
    if seen != len(expected):
        raise RuntimeError(f"{source.root}: {seen} of {len(expected)} images came back")


def _device(use_gpu: bool) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


class Encoder:
    """Actor: scaled latents of a batch of images (and of their mirror images with hflip)."""

    def __init__(
        self,
        cache: StageCache,
        autoencoder: StageRef,
        hflip: bool,
        batch_size: int,
        autocast: str,
        use_gpu: bool,
    ) -> None:
        from lfm_core.autoencoder import load_autoencoder

        self.vae = load_autoencoder(cache.local_dir(autoencoder) / "vae")
        torch.nn.Module.to(self.vae, _device(use_gpu))
        self.hflip, self.batch_size, self.autocast = hflip, batch_size, autocast

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from lfm_core.autoencoder import encode

        images = unit_images(batch["image"])
        out = {"path": batch["path"]}
        out["latents"] = encode(self.vae, images, self.batch_size, False, self.autocast).numpy()
        if self.hflip:
            flipped = images.flip(-1)
            out["latents_flip"] = encode(
                self.vae, flipped, self.batch_size, False, self.autocast
            ).numpy()
        out["peak_rss_mb"] = _rss(len(images))
        return out


class Featurizer:
    """Actor: features (B, D) float32 of a batch of images by an extractor stage's model."""

    def __init__(self, cache: StageCache, extractor: StageRef, batch_size: int, use_gpu: bool):
        from lfm_core.features import build_feature_extractor

        inputs = extractor.inputs
        model = build_feature_extractor(inputs["name"], cache.local_dir(extractor), inputs["path"])
        model.batch_size = batch_size
        self.model = model.to(_device(use_gpu))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        features = self.model(unit_images(batch["image"])).float().cpu().numpy()
        return {"path": batch["path"], "features": features, "peak_rss_mb": _rss(len(features))}


def _rss(n: int) -> np.ndarray:
    return np.full(n, peak_rss_mb())


def collect(source: ImageSource, cpus: float = ActorPool.cpus) -> ImageDataset:
    """The source's images as one tensor (N, C, S, S) in [-1, 1]: for small folders only
    (autoencoder training, a bounded PSNR subset); large stages stream instead."""
    with _ordered():
        batches = _in_order(source.dataset(cpus), source)
        images = torch.cat([unit_images(batch["image"]) for batch in batches])
    labels = torch.from_numpy(source.listing.labels.copy())
    return ImageDataset(images, labels, source.listing.num_classes, "folder")


# ---- shards ------------------------------------------------------------------------------------


def shard_path(folder: Path, name: str, shard: int) -> Path:
    return folder / SHARDS_DIR / f"{name}-{shard:05d}.npy"


def is_sharded(folder: Path) -> bool:
    """True when a stage folder holds shards (a streamed stage) rather than one tensor file."""
    return (folder / SHARDS_INDEX).is_file()


def shard_index(folder: Path) -> dict[str, Any]:
    """{"names": array names, "rows": rows per shard} of a sharded stage folder."""
    return json.loads((folder / SHARDS_INDEX).read_text())


class ShardWriter:
    """Writes a stream of row-aligned arrays as numpy shards of a fixed number of rows.

    Args:
        folder: the stage folder (shards go to folder/shards/).
        rows_per_shard: rows per shard; None: SHARD_BYTES worth of the widest array.
    """

    def __init__(self, folder: Path, rows_per_shard: int | None = None) -> None:
        self.folder, self.rows_per_shard = folder, rows_per_shard
        self.buffer: dict[str, list[np.ndarray]] = {}
        self.buffered, self.rows = 0, list[int]()
        (folder / SHARDS_DIR).mkdir(parents=True, exist_ok=True)

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        """Append rows (every array has the same first dimension)."""
        if self.rows_per_shard is None:
            widest = max(array[:1].nbytes for array in arrays.values())
            self.rows_per_shard = max(1, SHARD_BYTES // max(1, widest))
        for name, array in arrays.items():
            self.buffer.setdefault(name, []).append(np.ascontiguousarray(array))
        self.buffered += len(next(iter(arrays.values())))
        while self.buffered >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, count: int) -> None:
        whole = {name: np.concatenate(parts) for name, parts in self.buffer.items()}
        for name, array in whole.items():
            np.save(shard_path(self.folder, name, len(self.rows)), array[:count])
        self.buffer = {name: [array[count:]] for name, array in whole.items()}
        self.buffered -= count
        self.rows.append(count)

    def close(self) -> dict[str, Any]:
        """Write the last shard and the index; the index."""
        if self.buffered:
            self._flush(self.buffered)
        index = {"names": sorted(self.buffer), "rows": self.rows}
        (self.folder / SHARDS_INDEX).write_text(json.dumps(index))
        return index


def iter_shards(folder: Path, names: list[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The shards of a sharded stage folder one at a time (memory: one shard)."""
    index = shard_index(folder)
    for shard in range(len(index["rows"])):
        yield {name: np.load(shard_path(folder, name, shard)) for name in names or index["names"]}


def load_shards(folder: Path, names: list[str] | None = None) -> dict[str, Tensor]:
    """Every array (or those of `names`, the others not read) of a sharded stage folder,
    whole: (N, ...) tensors."""
    parts: dict[str, list[np.ndarray]] = {}
    for shard in iter_shards(folder, names):
        for name, array in shard.items():
            parts.setdefault(name, []).append(array)
    return {name: torch.from_numpy(np.concatenate(arrays)) for name, arrays in parts.items()}


class ShardedLatents:
    """Random access to some rows of sharded latents: a `lfm_core.train.LatentSource`.

    Each `take` opens only the shards its rows lie in, as read-only memory maps dropped after
    the copy, so a worker's memory is its batch (and `rows`), not the data set.

    Args:
        folder: a latents stage folder with shards "latents", "labels" (and "latents_flip").
        rows: the global row indices this source draws from (a subset, or one rank's part).
        conditional: return labels with the rows.
    """

    def __init__(self, folder: str | Path, rows: np.ndarray, conditional: bool) -> None:
        self.folder, self.rows, self.conditional = Path(folder), np.asarray(rows), conditional
        index = shard_index(self.folder)
        self.starts = np.concatenate([[0], np.cumsum(index["rows"])])
        self.flips = "latents_flip" in index["names"]

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return (ShardedLatents, (str(self.folder), self.rows, self.conditional))

    def __len__(self) -> int:
        return len(self.rows)

    def for_rank(self, rank: int, world: int) -> ShardedLatents:
        """This rank's part: the rank-th of `world` contiguous chunks of `rows` (contiguous
        shards when the rows are sorted); world 1 keeps every row in its order."""
        return ShardedLatents(self.folder, np.array_split(self.rows, world)[rank], self.conditional)

    def _gather(self, name: str, rows: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        out: np.ndarray | None = None
        for s in np.unique(shard):
            mapped = np.load(shard_path(self.folder, name, int(s)), mmap_mode="r")
            if out is None:
                out = np.empty((len(rows), *mapped.shape[1:]), dtype=mapped.dtype)
            mask = shard == s
            out[mask] = mapped[rows[mask] - self.starts[s]]
            del mapped  # unmapped: the pages leave this process's resident set
        assert out is not None
        return out

    def take(self, index: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """Rows at `index` into `rows`; with flips, each is the mirrored one with p = 1/2 (the
        same draw as `lfm_core.train.TensorLatents`)."""
        rows = self.rows[index.numpy()]
        latents = torch.from_numpy(self._gather("latents", rows))
        if self.flips:
            flipped = torch.from_numpy(self._gather("latents_flip", rows))
            flip = torch.rand(len(rows), generator=generator) < 0.5
            latents = torch.where(flip[:, None, None, None], flipped, latents)
        labels = torch.from_numpy(self._gather("labels", rows)) if self.conditional else None
        return latents, labels


# ---- streamed stages ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoding:
    """What the latents of a folder are made with: the autoencoder stage and its settings."""

    cache: StageCache
    autoencoder: StageRef
    hflip: bool
    autocast: str


def write_latents(
    source: ImageSource, encoding: Encoding, pool: ActorPool, folder: Path
) -> dict[str, Any]:
    """Encode a folder split on an actor pool into shards latents / labels (/ latents_flip).

    Returns:
        The latents stage's info: shape [N, c, h, w], num_classes, shards, and the encoding
        actors' peak RSS (encode_peak_rss_mb).
    """
    args = (
        encoding.cache,
        encoding.autoencoder,
        encoding.hflip,
        pool.batch_size,
        encoding.autocast,
        pool.use_gpu,
    )
    writer, done, peak, shape = ShardWriter(folder), 0, 0.0, None
    for batch in stream(source, Encoder, args, pool):
        n = len(batch["latents"])
        arrays = {"latents": batch["latents"], "labels": source.listing.labels[done : done + n]}
        if encoding.hflip:
            arrays["latents_flip"] = batch["latents_flip"]
        writer.add(arrays)
        done, peak = done + n, max(peak, float(batch["peak_rss_mb"].max()))
        shape = list(batch["latents"].shape[1:])
    index = writer.close()
    return {
        "shape": [done, *(shape or [])],
        "num_classes": source.listing.num_classes,
        "shards": len(index["rows"]),
        "encode_peak_rss_mb": peak,
    }


def write_features(
    source: ImageSource, cache: StageCache, extractor: StageRef, pool: ActorPool, folder: Path
) -> dict[str, Any]:
    """Features (N, D) float32 of a folder split, by the extractor on an actor pool, as shards
    "features"; the stage's info (shape, shards, the actors' peak RSS)."""
    args = (cache, extractor, pool.batch_size, pool.use_gpu)
    writer, done, peak, dim = ShardWriter(folder), 0, 0.0, 0
    for batch in stream(source, Featurizer, args, pool):
        writer.add({"features": batch["features"]})
        done, peak = done + len(batch["features"]), max(peak, float(batch["peak_rss_mb"].max()))
        dim = int(batch["features"].shape[1])
    index = writer.close()
    return {"shape": [done, dim], "shards": len(index["rows"]), "features_peak_rss_mb": peak}
