"""Build leases: at most one process builds a given cache entry at a time.

With Ray running, leases come from one named actor (`StageLocks`) shared by every trial driver of
the cluster; a lease expires unless its holder renews it, so a killed builder does not block the
others for ever. Without Ray, an exclusive `fcntl` lock on a file does the same on one machine
(the kernel drops it when the holder dies).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCKS_ACTOR = "lfm-stage-locks"
LOCKS_NAMESPACE = "lfm"
# A lease lives this long without renewal; its holder renews it three times per period.
LEASE_TTL_S = 60.0
RENEWALS_PER_TTL = 3


def holder_id() -> str:
    """A name for this process that is unique across the cluster."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class StageLocks:
    """Lease table of the cluster: lease name -> (holder, expiry on this actor's clock).

    Used as a Ray actor (`lock_actor()`); plain methods so it is testable without Ray.
    """

    def __init__(self) -> None:
        self._leases: dict[str, tuple[str, float]] = {}

    def acquire(self, name: str, holder: str, ttl_s: float) -> bool:
        """Grant (or extend) the lease to `holder` unless someone else holds a live one."""
        now = time.monotonic()
        current = self._leases.get(name)
        if current is not None and current[0] != holder and current[1] > now:
            return False
        self._leases[name] = (holder, now + ttl_s)
        return True

    def release(self, name: str, holder: str) -> None:
        """Drop the lease if `holder` holds it."""
        if self._leases.get(name, ("", 0.0))[0] == holder:
            del self._leases[name]

    def holders(self) -> dict[str, str]:
        """Live leases: name -> holder."""
        now = time.monotonic()
        return {name: holder for name, (holder, expiry) in self._leases.items() if expiry > now}


def lock_actor() -> Any:
    """The cluster's `StageLocks` actor (a Ray ActorHandle), created on first use.

    Detached, so it outlives the trial or job that created it: leases stay valid while other
    jobs of the same cluster still build. It needs no CPU.
    """
    import ray

    remote = ray.remote(num_cpus=0, max_restarts=-1)(StageLocks)
    return remote.options(
        name=LOCKS_ACTOR, namespace=LOCKS_NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()


@contextlib.contextmanager
def _ray_lease(name: str) -> Iterator[bool]:
    import ray

    actor = lock_actor()
    holder = holder_id()
    if not ray.get(actor.acquire.remote(name, holder, LEASE_TTL_S)):
        yield False
        return
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_TTL_S / RENEWALS_PER_TTL):
            ray.get(actor.acquire.remote(name, holder, LEASE_TTL_S))

    renewer = threading.Thread(target=renew, name=f"lease-{name}", daemon=True)
    renewer.start()
    try:
        yield True
    finally:
        stop.set()
        renewer.join()
        ray.get(actor.release.remote(name, holder))


@contextlib.contextmanager
def _file_lease(name: str, lock_dir: Path) -> Iterator[bool]:
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / (name.replace("/", "-") + ".lock")
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def build_lease(name: str, lock_dir: Path) -> Iterator[bool]:
    """Try to take the build lease `name` without waiting; yields whether it was granted.

    Args:
        name: the lease name, e.g. "<stage>/<key>".
        lock_dir: the folder for lock files when Ray is not running.
    """
    import ray

    lease = _ray_lease(name) if ray.is_initialized() else _file_lease(name, lock_dir)
    with lease as granted:
        yield granted
