"""Build leases that live in the storage itself: one builder per cache entry, across processes,
sweeps and clusters that share the storage.

A lease is a small JSON record (`LeaseInfo`: holder, host, pid, when taken, when last renewed,
expiry, progress) at ``cache/_leases/<stage>-<key>.json``; its holder renews it `RENEWALS_PER_TTL`
times per `ttl_s` from a heartbeat thread and writes the build's progress into it.

- S3 (`ObjectLease`): the record is created with a conditional write (``If-None-Match: *``): of
  racing creators exactly one succeeds. Renewal overwrites it with ``If-Match: <etag>``, so a
  holder whose lease was taken over finds out (its renewal fails) instead of overwriting the
  new holder. A waiter that sees the same version for longer than `ttl_s` on its own monotonic
  clock (no clock skew between machines matters) takes it over with ``If-Match`` on that
  version: of several waiters exactly one wins.
- Local storage (`FileLease`): an exclusive ``fcntl.flock`` on ``cache/_leases/<name>.lock`` in
  the storage folder, so processes of different Ray clusters (or none) on one machine exclude
  each other; the kernel drops the lock when its holder dies, so a killed holder is taken over
  at once. The JSON record next to it carries the same fields for waiters to read. A holder that
  is alive but no longer renews (stopped) keeps its lock: it cannot be taken over.

`acquire_or_wait` is the waiting policy: poll until the entry is done or the lease is ours;
wait for as long as the holder renews (an optional overall limit aside); fail in one line when
the lease has been stale for longer than its TTL and cannot be taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import IO

from orchestrator.storage import Storage

log = logging.getLogger(__name__)

LEASES_DIR = "cache/_leases"
# A lease lives this long without renewal; its holder renews it three times per period.
LEASE_TTL_S = 60.0
RENEWALS_PER_TTL = 3
# A waiter repeats its "waiting for ..." line at most this often (in TTLs).
LOG_EVERY_TTLS = 5

_LIVE: set[str] = set()  # holders whose heartbeat runs in this process
_LIVE_GUARD = threading.Lock()
_PROCESS: dict[int, str] = {}  # pid -> this process's id (a forked child gets its own)


class LeaseStaleError(TimeoutError):
    """The holder of a build lease stopped renewing it and the lease cannot be taken over."""


def process_id() -> str:
    """host:pid:token of this process, unique across machines and pid reuse."""
    pid = os.getpid()
    return _PROCESS.setdefault(pid, f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}")


def holder_id() -> str:
    """A fresh holder name: this process's id and a token per lease."""
    return f"{process_id()}:{uuid.uuid4().hex[:6]}"


def _forget(holder: str) -> None:
    with _LIVE_GUARD:
        _LIVE.discard(holder)


@dataclass(frozen=True)
class LeaseInfo:
    """The lease record. Times are the holder's wall clock (seconds since the epoch)."""

    holder: str
    host: str
    pid: int
    process: str
    acquired: float
    renewed: float
    expires: float
    progress: str = ""

    @classmethod
    def parse(cls, data: bytes) -> LeaseInfo | None:
        """The record in `data`, or None when it is not one (e.g. a foreign file)."""
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def encode(self) -> bytes:
        """The record as JSON bytes."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    def describe(self) -> str:
        """One line: who holds the lease, since when, and the progress it reported."""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.acquired))
        text = f"{self.holder} (host {self.host}, pid {self.pid}) since {since}"
        return f"{text}, {self.progress}" if self.progress else text


class Lease(ABC):
    """One build lease. `try_acquire` never waits; `hold` renews it until the block ends.

    Args:
        storage: the storage the lease lives in.
        name: the lease name, e.g. "<stage>-<key>" (no slashes).
        ttl_s: how long the lease lives without renewal.
    """

    can_take_over = True

    def __init__(self, storage: Storage, name: str, ttl_s: float = LEASE_TTL_S) -> None:
        self.storage, self.name, self.ttl_s = storage, name, ttl_s
        self.rel = f"{LEASES_DIR}/{name}.json"
        self.holder = holder_id()
        self.acquired = 0.0
        self.lost = False  # set when a renewal found the lease taken over

    def _granted(self) -> None:
        """Mark this holder live in this process (an orphan check must never take it over)."""
        self.lost = False
        with _LIVE_GUARD:
            _LIVE.add(self.holder)

    @abstractmethod
    def try_acquire(self, stale_tag: str | None = None) -> bool:
        """Take the lease if it is free (or is the version `stale_tag`, seen stale)."""

    @abstractmethod
    def renew(self, progress: str) -> bool:
        """Extend the lease and record `progress`; False when it is no longer ours."""

    @abstractmethod
    def release(self) -> None:
        """Give the lease up."""

    def peek(self) -> tuple[str | None, LeaseInfo | None]:
        """The current record's version tag and content (None, None when there is none)."""
        found = self.storage.read_tagged(self.rel)
        return (None, None) if found is None else (found[1], LeaseInfo.parse(found[0]))

    def where(self) -> str:
        """The lease record's URI, for messages."""
        return self.storage.uri_of(self.rel)

    def record(self, progress: str = "") -> LeaseInfo:
        """This holder's record, renewed now."""
        now = time.time()
        return LeaseInfo(
            self.holder,
            socket.gethostname(),
            os.getpid(),
            process_id(),
            self.acquired or now,
            now,
            now + self.ttl_s,
            progress,
        )

    @contextlib.contextmanager
    def hold(self, progress: Callable[[], str] = str) -> Iterator[None]:
        """Renew the (acquired) lease from a heartbeat thread while the block runs, then release.

        Args:
            progress: called at each renewal; its text goes into the record.
        """
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.ttl_s / RENEWALS_PER_TTL):
                try:
                    if not self.renew(progress()):
                        self.lost = True
                        log.warning("build lease %s was taken over by another process", self.name)
                        return
                except OSError as err:  # an outage: keep trying, the lease may still be ours
                    log.warning("renewing build lease %s failed: %s", self.name, err)

        beater = threading.Thread(target=beat, name=f"lease-{self.name}", daemon=True)
        beater.start()
        try:
            yield
        finally:
            stop.set()
            beater.join()
            try:
                self.release()
            except OSError as err:
                log.warning("releasing build lease %s failed (it expires): %s", self.name, err)


class ObjectLease(Lease):
    """A lease as an S3 object, kept by conditional writes (see the module docstring)."""

    def __init__(self, storage: Storage, name: str, ttl_s: float = LEASE_TTL_S) -> None:
        super().__init__(storage, name, ttl_s)
        self._tag = ""

    def try_acquire(self, stale_tag: str | None = None) -> bool:
        self.acquired = time.time()
        tag = self.storage.create_if_absent(self.rel, self.record().encode())
        if tag is None:
            stale_tag = stale_tag or self._orphan_of_this_process()
            if stale_tag is None:
                return False
            tag = self.storage.replace_if_match(self.rel, self.record().encode(), stale_tag)
            if tag is None:
                return False
            log.warning("took over the stale build lease %s", self.where())
        self._tag = tag
        self._granted()
        return True

    def _orphan_of_this_process(self) -> str | None:
        """The tag of a lease left by this very process whose holder is gone (e.g. its release
        failed during an outage): stale at once, no need to wait a TTL."""
        tag, info = self.peek()
        if tag is None or info is None or info.process != process_id():
            return None
        with _LIVE_GUARD:
            return None if info.holder in _LIVE else tag

    def renew(self, progress: str) -> bool:
        tag = self.storage.replace_if_match(self.rel, self.record(progress).encode(), self._tag)
        if tag is None:
            return False
        self._tag = tag
        return True

    def release(self) -> None:
        try:
            if self._tag and not self.lost:
                self.storage.delete_if_match(self.rel, self._tag)
        finally:
            self._tag = ""
            _forget(self.holder)


class FileLease(Lease):
    """A lease as an flock on a file in the local storage folder (see the module docstring)."""

    can_take_over = False  # a locked file is held by a live process

    def __init__(self, storage: Storage, name: str, ttl_s: float = LEASE_TTL_S) -> None:
        super().__init__(storage, name, ttl_s)
        folder = storage.local_path(LEASES_DIR)
        if folder is None:
            raise ValueError(f"FileLease needs local storage, not {storage.uri}")
        folder.mkdir(parents=True, exist_ok=True)
        # The lock file is never deleted: deleting it could let two holders lock two inodes.
        self._lock_path = folder / f"{name}.lock"
        self._handle: IO[str] | None = None

    def try_acquire(self, stale_tag: str | None = None) -> bool:
        handle = self._lock_path.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._handle, self.acquired = handle, time.time()
        self._granted()
        self.storage.write_bytes(self.rel, self.record().encode())
        return True

    def renew(self, progress: str) -> bool:
        self.storage.write_bytes(self.rel, self.record(progress).encode())
        return True

    def release(self) -> None:
        if self._handle is None:
            return
        try:
            self.storage.delete(self.rel)
        finally:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
            _forget(self.holder)


def storage_lease(storage: Storage, name: str, ttl_s: float = LEASE_TTL_S) -> Lease:
    """The lease `name` in `storage`: a file lock locally, a conditional-write object on S3."""
    return (
        FileLease(storage, name, ttl_s) if storage.is_local else ObjectLease(storage, name, ttl_s)
    )


def acquire_or_wait(
    lease: Lease,
    done: Callable[[], bool],
    what: str,
    poll_s: float,
    wait_timeout_s: float | None = None,
) -> bool:
    """Poll until `done()` or the lease is ours; True when it is ours (the caller builds).

    Waits for as long as the holder renews the lease. A lease whose record has not changed for
    longer than its TTL (on this process's clock) is taken over where the mechanism allows it.

    Args:
        lease: the lease to take.
        done: whether the awaited result exists (checked first, at every poll).
        what: what is built, for messages (e.g. "latents 1a2b3c4d5e6f").
        poll_s: seconds between polls.
        wait_timeout_s: an overall limit on waiting (None: none while the holder renews).

    Raises:
        LeaseStaleError: the lease is stale and cannot be taken over (one line).
        TimeoutError: wait_timeout_s passed (one line).
    """
    start = time.monotonic()
    seen: tuple[str | None, float] = ("", start)  # a record version and when it was first seen
    logged, stale_tag = -math.inf, None
    while not done():
        if lease.try_acquire(stale_tag):
            return True
        tag, info = lease.peek()
        now = time.monotonic()
        # The holder's own TTL counts when it is longer than ours.
        ttl = max(lease.ttl_s, info.expires - info.renewed) if info is not None else lease.ttl_s
        if tag != seen[0] or tag is None:
            seen, stale_tag = (tag, now), None
        elif now - seen[1] > ttl:
            if not lease.can_take_over or stale_tag == tag:
                raise LeaseStaleError(_stale_message(lease, what, info, now - seen[1], ttl))
            stale_tag = tag  # the next try takes it over unless its holder renews first
            continue
        holder = info.describe() if info is not None else "another process"
        if now - logged >= LOG_EVERY_TTLS * ttl:
            log.info("stage %s: waiting for the build by %s", what, holder)
            logged = now
        if wait_timeout_s is not None and now - start > wait_timeout_s:
            raise TimeoutError(
                f"stage {what}: another process, {holder}, is still building it; gave up after "
                f"wait_timeout_s={wait_timeout_s:g}s"
            )
        time.sleep(poll_s)
    return False


def _stale_message(lease: Lease, what: str, info: LeaseInfo | None, age: float, ttl: float) -> str:
    holder = info.describe() if info is not None else "an unknown holder"
    return (
        f"stage {what}: the build lease {lease.where()} of {holder} has not been renewed for "
        f"{age:.0f}s (ttl {ttl:g}s) and cannot be taken over while that process lives; "
        "resume or stop it"
    )
