"""Content-addressed stage cache: each stage's output is stored once under the hash of its inputs.

A stage instance is a `StageRef`: its name, a code version, its own config inputs (plain JSON
values) and the refs of the stages it reads. Its key is the sha256 of the canonical JSON of
(name, version, inputs, upstream keys), so a change anywhere upstream changes every key below it.

Layout under the storage root::

    cache/<stage>/<key>/...files...   the artefacts (safetensors, JSON, checkpoints)
    cache/<stage>/<key>/_COMPLETE     written last: a folder without it is not an entry; it
                                      holds the ref and its manifest (each file's size)
    cache/_records/<stage>-<key>-<ns>-<pid>.json   one build record per build

When several processes need the same entry, the holder of the build lease (`orchestrator.locks`)
builds it and the others poll for `_COMPLETE` until a bounded timeout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from orchestrator.locks import build_lease
from orchestrator.storage import Storage

log = logging.getLogger(__name__)

CACHE_DIR = "cache"
RECORDS_DIR = f"{CACHE_DIR}/_records"
LOCKS_DIR = f"{CACHE_DIR}/_locks"
COMPLETE = "_COMPLETE"
MANIFEST_KEY = "files"
LOCAL_CACHE_ENV = "LFM_LOCAL_CACHE"
# Waiting for another process's build: FM training can take hours on a real cluster.
DEFAULT_WAIT_TIMEOUT_S = 6 * 3600.0
DEFAULT_POLL_S = 1.0

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


def default_local_root() -> Path:
    """Where entries of a remote (S3) cache are mirrored on this machine."""
    return Path(os.environ.get(LOCAL_CACHE_ENV, Path(tempfile.gettempdir(), "lfm-cache")))


class StageCache:
    """Get-or-build of stage entries, shared safely by concurrent processes.

    Args:
        storage: the storage root (local folder or S3).
        local_root: this machine's mirror of remote entries and its build scratch space.
        wait_timeout_s: how long to wait for an entry another process is building.
        poll_s: seconds between checks while waiting.
    """

    def __init__(
        self,
        storage: Storage,
        local_root: Path | None = None,
        wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
        poll_s: float = DEFAULT_POLL_S,
    ) -> None:
        self.storage = storage
        self.local_root = Path(local_root) if local_root is not None else default_local_root()
        self.wait_timeout_s = wait_timeout_s
        self.poll_s = poll_s

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return (StageCache, (self.storage, self.local_root, self.wait_timeout_s, self.poll_s))

    def is_complete(self, ref: StageRef) -> bool:
        """True when the entry exists with its `_COMPLETE` marker."""
        return self.storage.exists(f"{ref.rel}/{COMPLETE}")

    def get(self, ref: StageRef, build: BuildFn) -> Path:
        """The entry's local folder, built first by `build(folder)` unless it is complete.

        `build` writes the stage's files into the empty folder it is given. Exactly one process
        builds a missing entry; the others wait for its `_COMPLETE` marker.

        Raises:
            TimeoutError: another process held the build lease longer than wait_timeout_s.
        """
        deadline = time.monotonic() + self.wait_timeout_s
        lock_dir = self.storage.local_path(LOCKS_DIR) or self.local_root / "_locks"
        while True:
            if self.is_complete(ref):
                return self.local_dir(ref)
            with build_lease(f"{ref.stage}/{ref.key}", lock_dir) as granted:
                if granted:
                    # Checked again under the lease: the previous holder may just have finished.
                    if not self.is_complete(ref):
                        self._build(ref, build)
                    return self.local_dir(ref)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"stage {ref.stage} {ref.key[:12]}: another process has been building it for "
                    f"over {self.wait_timeout_s:.0f}s; raise cache.wait_timeout_s or check that process"
                )
            time.sleep(self.poll_s)

    def local_dir(self, ref: StageRef) -> Path:
        """The local folder of a complete entry (downloaded once when the storage is remote)."""
        local = self.storage.local_path(ref.rel)
        if local is not None:
            return local
        mirror = self.local_root / ref.stage / ref.key
        if not (mirror / COMPLETE).is_file():
            scratch = self._scratch()
            self.storage.download_dir(ref.rel, scratch)
            self._move_into_place(scratch, mirror)
        return mirror

    def records(self) -> list[dict[str, Any]]:
        """Every build record written so far (stage, key, start, end, seconds, host, pid)."""
        return [
            self.storage.read_json(f"{RECORDS_DIR}/{name}")
            for name in self.storage.list(RECORDS_DIR)
            if name.endswith(".json")
        ]

    def _scratch(self) -> Path:
        # Scratch folders sit next to their destination so the final move is a rename.
        root = self.storage.local_path(CACHE_DIR) or self.local_root
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".build-", dir=root))

    @staticmethod
    def _move_into_place(scratch: Path, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)  # leftovers of a build that died before its marker
        scratch.rename(final)

    def _publish(self, ref: StageRef, scratch: Path, marker: str) -> None:
        """Upload a built folder to remote storage, its marker last.

        Raises:
            OSError: one line naming the stage and the storage (the remote did not answer
                within pyarrow's bounded retries); the entry is left without its marker.
        """
        try:
            self.storage.delete(ref.rel)
            self.storage.upload_dir(scratch, ref.rel)
            self.storage.write_text(f"{ref.rel}/{COMPLETE}", marker)
        except OSError as err:
            raise OSError(
                f"stage {ref.stage} {ref.key[:12]}: storing it under {self.storage.uri_of(ref.rel)} "
                f"failed, left incomplete: {err}"
            ) from err

    def _build(self, ref: StageRef, build: BuildFn) -> None:
        log.info("building stage %s %s", ref.stage, ref.key[:12])
        start = time.time()
        scratch = self._scratch()
        try:
            build(scratch)
            marker = canonical_json({**ref.describe(), MANIFEST_KEY: manifest(scratch)})
            local = self.storage.local_path(ref.rel)
            if local is not None:
                self._move_into_place(scratch, local)
                self.storage.write_text(f"{ref.rel}/{COMPLETE}", marker)
            else:
                self._publish(ref, scratch, marker)
                # The freshly built folder becomes this machine's mirror: no download needed.
                (scratch / COMPLETE).write_text(marker)
                self._move_into_place(scratch, self.local_root / ref.stage / ref.key)
        finally:
            if scratch.exists():
                shutil.rmtree(scratch)
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
