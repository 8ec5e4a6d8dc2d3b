"""One storage root for every artefact: a local absolute path or ``s3://bucket/prefix``.

All access goes through ``pyarrow.fs.FileSystem.from_uri``, which honours ``AWS_ENDPOINT_URL``
(and ``AWS_ENDPOINT_URL_S3``) so the same code talks to AWS, MinIO or a moto server. Writes are
atomic per file: locally a file is written under a temporary name and then renamed; an S3 object
appears whole or not at all. Directory-level atomicity (a stage is complete only when all its
files are there) is the cache's job: it writes a ``_COMPLETE`` marker last.

Conditional writes, for build leases and markers that must be created once: on S3 through boto3
(``If-None-Match: *`` creates only when absent; ``If-Match: <etag>`` overwrites or deletes only the
version read), locally by hard-linking a finished temporary file (``link`` fails when the name
exists). boto3 honours ``AWS_ENDPOINT_URL`` like pyarrow.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import threading
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from lfm_core.errors import ConfigError

S3_SCHEME = "s3://"
# boto3 (conditional writes): bounded retries and timeouts, so an outage fails in seconds.
S3_ATTEMPTS = 3
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 20.0
# S3 error codes that mean "the condition did not hold" (not an outage).
_CONDITION_FAILED = frozenset(
    {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "409", "412"}
)
_CLIENT_GUARD = threading.Lock()  # boto3's default session is not thread-safe


def check_storage_uri(uri: str) -> str:
    """Return the storage URI without a trailing slash, or raise ConfigError.

    Raises:
        ConfigError: when ``uri`` is neither an absolute path nor an ``s3://bucket[/prefix]`` URI.
    """
    if uri.startswith(S3_SCHEME):
        if not uri[len(S3_SCHEME) :].strip("/"):
            raise ConfigError(f"storage: {uri!r} names no bucket; use s3://bucket/prefix")
        return uri.rstrip("/")
    if os.path.isabs(uri):
        return os.path.normpath(uri)
    raise ConfigError(f"storage: {uri!r} must be an absolute path or an s3://bucket/prefix URI")


class Storage:
    """Read, write and list files under one root URI.

    Paths given to the methods are relative to the root and use ``/`` separators. The object
    pickles as its URI, so it can be sent to Ray workers and re-opens the file system there.

    Args:
        uri: an absolute local path or ``s3://bucket/prefix``.
    """

    def __init__(self, uri: str) -> None:
        self.uri = check_storage_uri(uri)
        if self.is_local:
            Path(self.uri).mkdir(parents=True, exist_ok=True)
        self._fs, self._root = pafs.FileSystem.from_uri(self.uri)
        self._client: Any = None

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (Storage, (self.uri,))

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    @property
    def is_local(self) -> bool:
        """True for a local directory, False for S3."""
        return not self.uri.startswith(S3_SCHEME)

    def uri_of(self, rel: str) -> str:
        """The full URI (or absolute path) of ``rel``."""
        return posixpath.join(self.uri, rel) if rel else self.uri

    def local_path(self, rel: str) -> Path | None:
        """The local path of ``rel`` when the storage is local, else None."""
        return Path(self.uri, rel) if self.is_local else None

    def _path(self, rel: str) -> str:
        return posixpath.join(self._root, rel) if rel else self._root

    def exists(self, rel: str) -> bool:
        """True when a file or directory exists at ``rel``."""
        return self._fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        """The content of the file at ``rel``.

        Raises:
            FileNotFoundError: when there is no such file.
        """
        try:
            with self._fs.open_input_stream(self._path(rel)) as stream:
                return stream.read()
        except FileNotFoundError as err:
            raise FileNotFoundError(f"no file {self.uri_of(rel)}") from err

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` atomically (readers see the old file or the whole new one)."""
        path = self._path(rel)
        parent = posixpath.dirname(path)
        if parent:
            self._fs.create_dir(parent, recursive=True)
        if not self.is_local:
            with self._fs.open_output_stream(path) as stream:
                stream.write(data)
            return
        # A rename within one directory is atomic on POSIX file systems.
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self._fs.open_output_stream(tmp) as stream:
            stream.write(data)
        self._fs.move(tmp, path)

    def read_text(self, rel: str) -> str:
        """The UTF-8 text of the file at ``rel``."""
        return self.read_bytes(rel).decode("utf-8")

    def write_text(self, rel: str, text: str) -> None:
        """Write UTF-8 ``text`` to ``rel`` atomically."""
        self.write_bytes(rel, text.encode("utf-8"))

    def read_json(self, rel: str) -> Any:
        """The parsed JSON file at ``rel``."""
        return json.loads(self.read_text(rel))

    def write_json(self, rel: str, value: Any) -> None:
        """Write ``value`` as indented, key-sorted JSON to ``rel`` atomically."""
        self.write_text(rel, json.dumps(value, indent=2, sort_keys=True))

    def list(self, rel: str) -> list[str]:
        """Sorted names of the direct children of directory ``rel`` ([] when it does not exist)."""
        selector = pafs.FileSelector(self._path(rel), allow_not_found=True, recursive=False)
        return sorted(posixpath.basename(info.path) for info in self._fs.get_file_info(selector))

    def delete(self, rel: str) -> None:
        """Remove the file or directory tree at ``rel`` if it exists."""
        info = self._fs.get_file_info(self._path(rel))
        if info.type == pafs.FileType.Directory:
            self._fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self._fs.delete_file(info.path)

    def upload_dir(self, local_dir: Path, rel: str) -> None:
        """Copy every file under ``local_dir`` (recursively) to ``rel``, each write atomic."""
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            self.write_bytes(
                posixpath.join(rel, path.relative_to(local_dir).as_posix()), path.read_bytes()
            )

    def download_dir(self, rel: str, local_dir: Path) -> None:
        """Copy every file under ``rel`` (recursively) into ``local_dir``."""
        root = self._path(rel)
        selector = pafs.FileSelector(root, allow_not_found=False, recursive=True)
        for info in self._fs.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            target = Path(local_dir, posixpath.relpath(info.path, root))
            target.parent.mkdir(parents=True, exist_ok=True)
            with self._fs.open_input_stream(info.path) as stream:
                target.write_bytes(stream.read())

    def create_if_absent(self, rel: str, data: bytes) -> str | None:
        """Create the file ``rel`` holding ``data`` unless it exists; its tag, or None if it existed.

        Atomic: of several concurrent callers exactly one gets a tag, and readers see the whole
        content or no file.

        Raises:
            OSError: the storage did not answer (one line naming the file).
        """
        if not self.is_local:
            reply = self._conditional("put_object", rel, Body=data, IfNoneMatch="*")
            return None if reply is None else str(reply["ETag"])
        path = Path(self.uri, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None
        finally:
            tmp.unlink()
        return hashlib.sha256(data).hexdigest()

    def read_tagged(self, rel: str) -> tuple[bytes, str] | None:
        """The content of ``rel`` and its tag (S3: the ETag; locally: a sha256), or None."""
        if not self.is_local:
            reply = self._conditional("get_object", rel)
            return None if reply is None else (reply["Body"].read(), str(reply["ETag"]))
        try:
            data = Path(self.uri, rel).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def replace_if_match(self, rel: str, data: bytes, tag: str) -> str | None:
        """S3 only: overwrite ``rel`` if it is still the version ``tag``; the new tag, or None."""
        self._require_s3("replace_if_match")
        reply = self._conditional("put_object", rel, Body=data, IfMatch=tag)
        return None if reply is None else str(reply["ETag"])

    def delete_if_match(self, rel: str, tag: str) -> bool:
        """S3 only: delete ``rel`` if it is still the version ``tag``; whether it was deleted."""
        self._require_s3("delete_if_match")
        return self._conditional("delete_object", rel, IfMatch=tag) is not None

    def _require_s3(self, what: str) -> None:
        if self.is_local:
            # Local storage takes its leases with flock (locks.FileLease), never through this.
            raise ValueError(f"{what}: conditional overwrites are an S3 call; {self.uri} is local")

    def _conditional(self, call: str, rel: str, **kwargs: Any) -> Any:
        """One boto3 call on the object ``rel``; None when its condition did not hold."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _, prefix = self.uri[len(S3_SCHEME) :].partition("/")
        try:
            return getattr(self._s3(), call)(
                Bucket=bucket, Key=posixpath.join(prefix, rel) if prefix else rel, **kwargs
            )
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in _CONDITION_FAILED:
                return None
            raise OSError(f"{self.uri_of(rel)}: {err}") from err
        except BotoCoreError as err:
            raise OSError(f"{self.uri_of(rel)}: {err}") from err

    def _s3(self) -> Any:
        with _CLIENT_GUARD:
            if self._client is None:
                self._client = _s3_client()
            return self._client


def _s3_client() -> Any:
    """A boto3 S3 client with bounded retries and timeouts."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"},
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        read_timeout=S3_READ_TIMEOUT_S,
    )
    return boto3.client("s3", config=config)
