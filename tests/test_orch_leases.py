"""Build leases in the storage: separate processes (no Ray) on one local folder or one moto S3
bucket build an entry once, take over a killed holder's lease after its TTL, wait for a live
holder for as long as it renews, fail in one line on a holder that stopped renewing, and never
see a half-published entry.

The racing processes run this file as a script (`_worker`), so each has its own lease state.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator.cache import COMPLETE, MANIFEST_KEY, StageCache, StageRef, report_progress
from orchestrator.locks import LEASES_DIR, LeaseStaleError, ObjectLease
from orchestrator.storage import Storage

REPO = Path(__file__).resolve().parents[1]
REF = StageRef("race", "1", {"n": 1})
LEASE_REL = f"{LEASES_DIR}/{REF.stage}-{REF.key}.json"
TTL_S = 1.0
POLL_S = 0.05
START_LIMIT_S = 20.0


def _build_slowly(seconds: float) -> object:
    def build(folder: Path) -> None:
        deadline = time.monotonic() + seconds
        step = 0
        while time.monotonic() < deadline:
            step += 1
            report_progress(f"step {step}")
            time.sleep(POLL_S)
        (folder / "out.txt").write_text(f"built by {os.getpid()}")
        (folder / "sub").mkdir()
        (folder / "sub" / "more.bin").write_bytes(bytes(range(256)))

    return build


def _contents(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes().hex()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _worker(root: str, local_root: str, build_s: float, ttl_s: float, start_at: float) -> None:
    """Get REF (building it in `build_s` seconds); print the folder's contents as JSON."""
    cache = StageCache(Storage(root), Path(local_root), poll_s=POLL_S, lease_ttl_s=ttl_s)
    time.sleep(max(0.0, start_at - time.time()))
    print(json.dumps(_contents(cache.get(REF, _build_slowly(build_s)))), flush=True)


def _spawn(root: str, local_root: Path, build_s: float, start_at: float = 0.0) -> subprocess.Popen:
    args = [root, str(local_root), str(build_s), str(TTL_S), str(start_at)]
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen) -> dict[str, str]:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def _wait_for_lease(storage: Storage, proc: subprocess.Popen) -> dict:
    deadline = time.monotonic() + START_LIMIT_S
    while time.monotonic() < deadline and proc.poll() is None:
        found = storage.read_tagged(LEASE_REL)
        if found is not None:
            return json.loads(found[0])
        time.sleep(POLL_S)
    raise AssertionError("the holder never took its lease")


def test_two_processes_build_once_and_see_the_same_entry(storage_root: str, tmp_path: Path) -> None:
    start_at = time.time() + 1.0
    procs = [_spawn(storage_root, tmp_path / f"machine{i}", 0.5, start_at) for i in range(2)]
    first, second = (_result(proc) for proc in procs)
    assert first == second and set(first) == {COMPLETE, "out.txt", "sub/more.bin"}
    (record,) = StageCache(Storage(storage_root), tmp_path / "check").records()
    assert bytes.fromhex(first["out.txt"]).decode() == f"built by {record['pid']}"


def test_killed_holder_is_taken_over_after_its_ttl(storage_root: str, tmp_path: Path) -> None:
    storage = Storage(storage_root)
    holder = _spawn(storage_root, tmp_path / "holder", build_s=120.0)
    taken = _wait_for_lease(storage, holder)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    cache = StageCache(storage, tmp_path / "taker", poll_s=POLL_S, lease_ttl_s=TTL_S)
    started = time.monotonic()
    folder = cache.get(REF, _build_slowly(0.0))
    elapsed = time.monotonic() - started
    # S3 judges staleness by watching the record for a TTL; locally the kernel frees the lock.
    assert elapsed < 4 * TTL_S
    assert elapsed >= (0.0 if storage.is_local else TTL_S)
    assert (folder / "out.txt").read_text() == f"built by {os.getpid()}"
    (record,) = cache.records()
    assert record["pid"] == os.getpid() != taken["pid"]
    assert not storage.exists(LEASE_REL)


def test_waiter_follows_a_live_builder_for_several_ttls(
    storage_root: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = Storage(storage_root)
    builder = _spawn(storage_root, tmp_path / "builder", build_s=3 * TTL_S)
    held = _wait_for_lease(storage, builder)
    cache = StageCache(storage, tmp_path / "waiter", poll_s=POLL_S, lease_ttl_s=TTL_S)
    with caplog.at_level(logging.INFO, logger="orchestrator.locks"):
        folder = cache.get(REF, lambda f: pytest.fail("a live builder's entry is not rebuilt"))
    assert _contents(folder) == _result(builder)
    (record,) = cache.records()
    assert record["pid"] == held["pid"] == builder.pid
    (line, *_) = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert f"stage race {REF.key[:12]}: waiting for the build by {held['holder']}" in line
    assert f"pid {builder.pid}" in line and " since " in line


def test_waiter_on_a_holder_that_stopped_renewing_fails_in_one_line(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    holder = _spawn(root, tmp_path / "holder", build_s=120.0)
    try:
        _wait_for_lease(Storage(root), holder)
        holder.send_signal(signal.SIGSTOP)  # alive, lock held, no more renewals
        cache = StageCache(Storage(root), tmp_path / "w", poll_s=POLL_S, lease_ttl_s=TTL_S)
        started = time.monotonic()
        with pytest.raises(LeaseStaleError) as info:
            cache.get(REF, lambda f: pytest.fail("a locked entry must not be built"))
        assert time.monotonic() - started < 4 * TTL_S
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"stage race {REF.key[:12]}: the build lease ")
    assert f"pid {holder.pid}" in message and "has not been renewed" in message


def test_s3_zombie_holder_loses_to_the_taker_and_adopts_its_entry(
    s3_server: str, tmp_path: Path
) -> None:
    root = f"{s3_server}/{tmp_path.name}"
    storage = Storage(root)
    zombie = _spawn(root, tmp_path / "zombie", build_s=2 * TTL_S)
    _wait_for_lease(storage, zombie)
    zombie.send_signal(signal.SIGSTOP)  # looks dead: a long partition or pause
    cache = StageCache(storage, tmp_path / "taker", poll_s=POLL_S, lease_ttl_s=TTL_S)
    mine = _contents(cache.get(REF, _build_slowly(0.0)))
    zombie.send_signal(signal.SIGCONT)
    # The zombie finishes its build, finds the marker taken and returns the taker's entry.
    assert _result(zombie) == mine
    (record,) = cache.records()
    assert record["pid"] == os.getpid()
    marker = storage.read_json(f"{REF.rel}/{COMPLETE}")
    assert storage.list(REF.rel) == sorted([COMPLETE, marker["folder"]])


def _check_whenever_complete(storage: Storage, ref: StageRef, stop: threading.Event) -> list[str]:
    """Poll the entry until `stop`; each poll's verdict: "absent", "partial", "complete", or
    "broken <file>" when a marked entry lacks a listed file or holds it at another size."""
    seen = []
    while not stop.is_set():
        if not storage.exists(f"{ref.rel}/{COMPLETE}"):
            seen.append("partial" if storage.list(ref.rel) else "absent")
            continue
        marker = storage.read_json(f"{ref.rel}/{COMPLETE}")
        for name, size in marker[MANIFEST_KEY].items():
            try:
                whole = len(storage.read_bytes(f"{ref.rel}/{name}")) == size
            except FileNotFoundError:
                whole = False
            seen.append("complete" if whole else f"broken {name}")
    return seen


def test_a_reader_never_sees_a_partial_entry(storage_root: str, tmp_path: Path) -> None:
    storage = Storage(storage_root)
    ref = StageRef("publish", "1", {"files": 30})
    stop, verdicts = threading.Event(), []
    reader = threading.Thread(
        target=lambda: verdicts.extend(_check_whenever_complete(Storage(storage_root), ref, stop))
    )
    reader.start()

    def build(folder: Path) -> None:
        for i in range(30):
            (folder / f"part-{i:02d}.bin").write_bytes(bytes([i]) * 50_000)
            time.sleep(0.01)

    try:
        StageCache(storage, tmp_path / "mirror", poll_s=POLL_S).get(ref, build)
        time.sleep(0.2)
    finally:
        stop.set()
        reader.join()
    assert verdicts[0] == "absent" and verdicts[-1] == "complete"
    # Once marked, it stays whole: every listed file at its size, at every poll.
    assert set(verdicts[verdicts.index("complete") :]) == {"complete"}
    if not storage.is_local:
        assert "partial" in verdicts  # the poll did overlap the upload


def test_s3_lease_conditional_writes(s3_server: str, tmp_path: Path) -> None:
    storage = Storage(f"{s3_server}/{tmp_path.name}")
    first, second = ObjectLease(storage, "x", TTL_S), ObjectLease(storage, "x", TTL_S)
    assert first.try_acquire() and not second.try_acquire()
    assert first.renew("step 1/3")
    tag, info = second.peek()
    assert info is not None and info.holder == first.holder and info.progress == "step 1/3"
    assert tag is not None and second.try_acquire(stale_tag=tag)  # taken over at that version
    assert not first.renew("step 2/3")  # the old holder finds out
    assert not first.try_acquire(stale_tag=tag)  # and cannot take it back with its stale tag
    second.release()
    assert second.peek() == (None, None)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
