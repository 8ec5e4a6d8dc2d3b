"""Content-addressed stage cache: each stage's output is stored once under the hash of its inputs.

A stage instance is a `StageRef`: its name, a code version, its own config inputs (plain JSON
values) and the refs of the stages it reads. Its key is the sha256 of the canonical JSON of
(name, version, inputs, upstream keys), so a change anywhere upstream changes every key below it.

Layout under the storage root::

    cache/<stage>/<key>/...files...   local storage: the artefacts (safetensors, JSON, ...)
    cache/<stage>/<key>/<build>/...   S3: the artefacts of one build, in a folder of its own
    cache/<stage>/<key>/_COMPLETE     written last: a folder without it is not an entry; it
                                      holds the ref, its manifest (each file's size, relative to
                                      the entry) and, on S3, the name of its build folder
    cache/_leases/<stage>-<key>.json  the build lease while a build runs (`orchestrator.locks`)
    cache/_records/<stage>-<key>-<ns>-<pid>.json   one build record per published build

When several processes need the same entry, the holder of its build lease builds it and the
others poll for `_COMPLETE` for as long as the holder renews its lease (`locks.acquire_or_wait`).

Why a reader never sees a half-made or half-replaced entry:
- A complete entry is never deleted or rewritten; only an entry without `_COMPLETE` is built.
- Locally, the build is written into a scratch folder next to the entry, renamed into place
  (atomic) and then marked, all under the flock lease, which the kernel holds for exactly as long
  as its holder lives: no two builders ever write one entry.
- On S3 a lease can be taken over from a holder that looks dead but is not (a long network
  partition), so two builders may overlap; each uploads into its own build folder, and the
  marker is created with ``If-None-Match: *``: the first marker wins, is never overwritten, and
  names the one folder whose files it lists. The loser discards its build. Folders that no
  marker names are deleted only after the marker exists, so no file a marker lists is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from orchestrator.locks import LEASE_TTL_S, acquire_or_wait, storage_lease
from orchestrator.storage import Storage

log = logging.getLogger(__name__)

CACHE_DIR = "cache"
RECORDS_DIR = f"{CACHE_DIR}/_records"
COMPLETE = "_COMPLETE"
MANIFEST_KEY = "files"
FOLDER_KEY = "folder"
LOCAL_CACHE_ENV = "LFM_LOCAL_CACHE"
DEFAULT_POLL_S = 1.0
MB = 1e6

BuildFn = Callable[[Path], None]


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace; NaN and infinities are refused."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class StageRef:
    """One instance of a stage.

    Attributes:
        stage: the stage name (a folder under cache/).
        version: the stage's code version; bump it when its output would change.
        inputs: the stage's own config inputs, JSON values only.
        upstream: the stages it reads, by role name.
    """

    stage: str
    version: str
    inputs: Mapping[str, Any] = field(default_factory=dict)
    upstream: Mapping[str, StageRef] = field(default_factory=dict)

    @cached_property
    def key(self) -> str:
        """sha256 hex digest of the canonical JSON of (stage, version, inputs, upstream keys)."""
        return hashlib.sha256(canonical_json(self.describe()).encode()).hexdigest()

    @property
    def rel(self) -> str:
        """The entry's folder relative to the storage root."""
        return f"{CACHE_DIR}/{self.stage}/{self.key}"

    def describe(self) -> dict[str, Any]:
        """What the key hashes (written into the `_COMPLETE` marker with the manifest)."""
        return {
            "stage": self.stage,
            "version": self.version,
            "inputs": dict(self.inputs),
            "upstream": {role: ref.key for role, ref in sorted(self.upstream.items())},
        }

    def closure(self) -> dict[str, StageRef]:
        """This ref and everything upstream of it, by key (each entry once)."""
        found = {self.key: self}
        for ref in self.upstream.values():
            found.update(ref.closure())
        return found


def manifest(folder: Path) -> dict[str, int]:
    """Every file under `folder` (posix path relative to it) -> its size in bytes."""
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


class _Progress:
    """What a running build has done so far, for its lease record."""

    def __init__(self) -> None:
        self.text = ""
        self.folder: Path | None = None

    def __call__(self) -> str:
        if self.text or self.folder is None:
            return self.text
        try:
            sizes = [p.stat().st_size for p in self.folder.rglob("*") if p.is_file()]
        except OSError:  # a file moved while the build writes
            return ""
        return f"{len(sizes)} files, {sum(sizes) / MB:.1f} MB written"


_CURRENT: ContextVar[_Progress | None] = ContextVar("lfm_build_progress", default=None)


def report_progress(text: str) -> None:
    """Record the running build's progress (e.g. "step 1200/3200"); waiters on its lease see it.

    A no-op outside a build. Without it a build's progress is the size of what it has written.
    """
    current = _CURRENT.get()
    if current is not None:
        current.text = text


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def default_local_root() -> Path:
    """Where entries of a remote (S3) cache are mirrored on this machine."""
    return Path(os.environ.get(LOCAL_CACHE_ENV, Path(tempfile.gettempdir(), "lfm-cache")))


class StageCache:
    """Get-or-build of stage entries, shared safely by concurrent processes, sweeps and clusters.

    Args:
        storage: the storage root (local folder or S3).
        local_root: this machine's mirror of remote entries and its build scratch space.
        wait_timeout_s: an overall limit on waiting for an entry another process is building
            (None: wait as long as that process renews its build lease).
        poll_s: seconds between checks while waiting.
        lease_ttl_s: how long a build lease lives without renewal.
    """

    def __init__(
        self,
        storage: Storage,
        local_root: Path | None = None,
        wait_timeout_s: float | None = None,
        poll_s: float = DEFAULT_POLL_S,
        lease_ttl_s: float = LEASE_TTL_S,
    ) -> None:
        self.storage = storage
        self.local_root = Path(local_root) if local_root is not None else default_local_root()
        self.wait_timeout_s = wait_timeout_s
        self.poll_s = poll_s
        self.lease_ttl_s = lease_ttl_s

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        args = (self.storage, self.local_root, self.wait_timeout_s, self.poll_s, self.lease_ttl_s)
        return (StageCache, args)

    def is_complete(self, ref: StageRef) -> bool:
        """True when the entry exists with its `_COMPLETE` marker."""
        return self.storage.exists(f"{ref.rel}/{COMPLETE}")

    def get(self, ref: StageRef, build: BuildFn) -> Path:
        """The entry's local folder, built first by `build(folder)` unless it is complete.

        `build` writes the stage's files into the empty folder it is given. The holder of the
        entry's build lease builds a missing entry; the others wait for its `_COMPLETE` marker
        while the holder renews the lease, and take the lease over (and build afresh) when it
        goes stale.

        Raises:
            TimeoutError: the wait passed wait_timeout_s, or (`locks.LeaseStaleError`) the
                holder stopped renewing its lease and it cannot be taken over; one line each.
        """
        if self.is_complete(ref):
            return self.local_dir(ref)
        what = f"{ref.stage} {ref.key[:12]}"
        lease = storage_lease(self.storage, f"{ref.stage}-{ref.key}", self.lease_ttl_s)
        done = lambda: self.is_complete(ref)  # noqa: E731
        if acquire_or_wait(lease, done, what, self.poll_s, self.wait_timeout_s):
            progress = _Progress()
            with lease.hold(progress):
                # Checked again under the lease: the previous holder may just have finished.
                if not self.is_complete(ref):
                    self._build(ref, build, progress)
        return self.local_dir(ref)

    def local_dir(self, ref: StageRef) -> Path:
        """The local folder of a complete entry (downloaded once when the storage is remote)."""
        local = self.storage.local_path(ref.rel)
        if local is not None:
            return local
        mirror = self.local_root / ref.stage / ref.key
        # One download per machine: processes sharing this mirror take turns.
        with _flocked(self.local_root / f".{ref.stage}-{ref.key}.lock"):
            if not (mirror / COMPLETE).is_file():
                marker = self.storage.read_text(f"{ref.rel}/{COMPLETE}")
                folder = json.loads(marker).get(FOLDER_KEY)
                scratch = self._scratch(ref, "download")
                self.storage.download_dir(f"{ref.rel}/{folder}" if folder else ref.rel, scratch)
                (scratch / COMPLETE).write_text(marker)
                self._move_into_place(scratch, mirror)
        return mirror

    def entry_info(self, stage: str, key: str) -> dict[str, Any]:
        """The `info.json` of a complete entry, read from the storage ({} when it has none)."""
        rel = f"{CACHE_DIR}/{stage}/{key}"
        folder = json.loads(self.storage.read_text(f"{rel}/{COMPLETE}")).get(FOLDER_KEY)
        path = f"{rel}/{folder}/info.json" if folder else f"{rel}/info.json"
        return self.storage.read_json(path) if self.storage.exists(path) else {}

    def records(self) -> list[dict[str, Any]]:
        """Every build record written so far (stage, key, start, end, seconds, host, pid)."""
        return [
            self.storage.read_json(f"{RECORDS_DIR}/{name}")
            for name in self.storage.list(RECORDS_DIR)
            if name.endswith(".json")
        ]

    def _scratch(self, ref: StageRef, kind: str) -> Path:
        # Scratch folders sit next to their destination so the final move is a rename.
        root = self.storage.local_path(CACHE_DIR) or self.local_root
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{kind}-{ref.stage}-{ref.key[:16]}-", dir=root))

    @staticmethod
    def _move_into_place(scratch: Path, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        if (final / COMPLETE).is_file():  # a complete folder is never replaced
            shutil.rmtree(scratch)
            return
        if final.exists():
            shutil.rmtree(final)  # leftovers of a build that died before its marker
        scratch.rename(final)

    def _drop_leftovers(self, ref: StageRef) -> None:
        """Locally, under the (kernel-held) lease: scratch folders of this entry's dead builds."""
        root = self.storage.local_path(CACHE_DIR)
        for old in root.glob(f".build-{ref.stage}-{ref.key[:16]}-*") if root else []:
            shutil.rmtree(old, ignore_errors=True)

    def _publish(self, ref: StageRef, scratch: Path, files: dict[str, int]) -> str | None:
        """Upload a built folder into a build folder of its own, then create the marker once.

        Returns:
            this build's marker, or None when another build published first (ours is dropped).

        Raises:
            OSError: one line naming the stage and the storage (the remote did not answer
                within the bounded retries); the entry is left without its marker.
        """
        folder = uuid.uuid4().hex[:16]
        listed = {f"{folder}/{name}": size for name, size in files.items()}
        marker = canonical_json({**ref.describe(), FOLDER_KEY: folder, MANIFEST_KEY: listed})
        won = True
        try:
            self.storage.upload_dir(scratch, f"{ref.rel}/{folder}")
            if self.storage.create_if_absent(f"{ref.rel}/{COMPLETE}", marker.encode()) is None:
                log.warning("stage %s %s: another build published first", ref.stage, ref.key[:12])
                won, marker = False, self.storage.read_text(f"{ref.rel}/{COMPLETE}")
        except OSError as err:
            raise OSError(
                f"stage {ref.stage} {ref.key[:12]}: storing it under {self.storage.uri_of(ref.rel)} "
                f"failed, left incomplete: {err}"
            ) from err
        keep = {COMPLETE, json.loads(marker)[FOLDER_KEY]}
        try:
            for name in set(self.storage.list(ref.rel)) - keep:
                self.storage.delete(f"{ref.rel}/{name}")  # dead builds' folders, named by none
        except OSError as err:
            log.warning("stage %s: leftovers not deleted: %s", ref.stage, err)
        return marker if won else None

    def _build(self, ref: StageRef, build: BuildFn, progress: _Progress) -> None:
        log.info("building stage %s %s", ref.stage, ref.key[:12])
        start = time.time()
        self._drop_leftovers(ref)
        scratch = progress.folder = self._scratch(ref, "build")
        token = _CURRENT.set(progress)
        try:
            build(scratch)
            files = manifest(scratch)
            marker = canonical_json({**ref.describe(), MANIFEST_KEY: files})
            local = self.storage.local_path(ref.rel)
            if local is not None:
                self._move_into_place(scratch, local)
                self.storage.write_text(f"{ref.rel}/{COMPLETE}", marker)
            else:
                published = self._publish(ref, scratch, files)
                if published is None:
                    return  # another build's entry stands: ours is discarded, not recorded
                marker = published
                # The freshly built folder becomes this machine's mirror: no download needed.
                (scratch / COMPLETE).write_text(marker)
                with _flocked(self.local_root / f".{ref.stage}-{ref.key}.lock"):
                    self._move_into_place(scratch, self.local_root / ref.stage / ref.key)
        finally:
            _CURRENT.reset(token)
            if scratch.exists():
                shutil.rmtree(scratch)
        self._record(ref, start)

    def _record(self, ref: StageRef, start: float) -> None:
        end = time.time()
        record = {
            "stage": ref.stage,
            "key": ref.key,
            "start": start,
            "end": end,
            "seconds": end - start,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        name = f"{ref.stage}-{ref.key[:16]}-{time.time_ns()}-{uuid.uuid4().hex[:6]}.json"
        self.storage.write_json(f"{RECORDS_DIR}/{name}", record)
        log.info("built stage %s %s in %.1fs", ref.stage, ref.key[:12], end - start)
