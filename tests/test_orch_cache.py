"""Storage and the content-addressed stage cache: keys, atomic entries, one build per entry."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from lfm_core.errors import ConfigError
from orchestrator.cache import COMPLETE, StageCache, StageRef
from orchestrator.storage import Storage


def _ref(value: int = 1, upstream: dict | None = None) -> StageRef:
    return StageRef("latents", "1", {"value": value, "name": "x"}, upstream or {})


def test_key_depends_on_inputs_upstream_and_version_not_on_order() -> None:
    base = _ref()
    assert StageRef("latents", "1", {"name": "x", "value": 1}).key == base.key
    assert _ref(2).key != base.key
    assert StageRef("latents", "2", {"value": 1, "name": "x"}).key != base.key
    child_a = StageRef("subset", "1", {}, {"latents": _ref(1)})
    child_b = StageRef("subset", "1", {}, {"latents": _ref(2)})
    assert child_a.key != child_b.key
    assert set(child_a.closure()) == {child_a.key, _ref(1).key}


def test_storage_round_trip_and_bad_uri(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    storage.write_json("a/b.json", {"x": 1})
    assert storage.read_json("a/b.json") == {"x": 1}
    assert storage.list("a") == ["b.json"]
    assert storage.list("missing") == []
    assert not storage.exists("a/c")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("a/c")
    with pytest.raises(ConfigError, match="storage: 'results' must be an absolute path"):
        Storage("results")
    with pytest.raises(ConfigError, match="names no bucket"):
        Storage("s3://")


def test_get_builds_once_then_reuses(tmp_path: Path) -> None:
    cache = StageCache(Storage(str(tmp_path)))
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "out.txt").write_text("hello")

    ref = _ref()
    first = cache.get(ref, build)
    second = cache.get(ref, build)
    assert first == second == tmp_path / ref.rel
    assert (first / "out.txt").read_text() == "hello"
    assert (first / COMPLETE).is_file()
    assert len(calls) == 1
    (record,) = cache.records()
    assert record["stage"] == "latents" and record["key"] == ref.key and record["seconds"] >= 0


def test_failed_build_leaves_no_entry(tmp_path: Path) -> None:
    cache = StageCache(Storage(str(tmp_path)))

    def broken(folder: Path) -> None:
        (folder / "half.txt").write_text("partial")
        raise RuntimeError("boom")

    ref = _ref()
    with pytest.raises(RuntimeError, match="boom"):
        cache.get(ref, broken)
    assert not cache.is_complete(ref)
    assert not (tmp_path / ref.rel).exists()
    assert cache.records() == []


def test_folder_without_marker_is_rebuilt(tmp_path: Path) -> None:
    cache = StageCache(Storage(str(tmp_path)))
    ref = _ref()
    (tmp_path / ref.rel).mkdir(parents=True)
    (tmp_path / ref.rel / "stale.txt").write_text("from a crashed build")
    folder = cache.get(ref, lambda f: (f / "out.txt").write_text("ok"))
    assert sorted(p.name for p in folder.iterdir()) == [COMPLETE, "out.txt"]


def _slow_build_in_process(root: str, started: float) -> None:
    cache = StageCache(Storage(root), poll_s=0.05)

    def build(folder: Path) -> None:
        time.sleep(0.5)
        (folder / "out.txt").write_text("built")

    # All processes start together so they race for the lease.
    time.sleep(max(0.0, started - time.time()))
    folder = cache.get(_ref(), build)
    assert (folder / "out.txt").read_text() == "built"


def test_concurrent_processes_build_once(tmp_path: Path) -> None:
    start_at = time.time() + 1.0
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_slow_build_in_process, args=(str(tmp_path), start_at)) for _ in range(3)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    assert len(StageCache(Storage(str(tmp_path))).records()) == 1


def test_waiter_times_out_with_one_line(tmp_path: Path) -> None:
    cache = StageCache(Storage(str(tmp_path)), wait_timeout_s=0.3, poll_s=0.05)
    ref = _ref()
    inner_error: list[BaseException] = []

    def build(folder: Path) -> None:
        # While this process holds the lease, a second getter of the same entry must give up.
        try:
            StageCache(Storage(str(tmp_path)), wait_timeout_s=0.3, poll_s=0.05).get(ref, build)
        except TimeoutError as err:
            inner_error.append(err)
        (folder / "out.txt").write_text("ok")

    cache.get(ref, build)
    (err,) = inner_error
    assert "\n" not in str(err) and "another process" in str(err)


def test_s3_storage_and_cache_on_a_moto_server(s3_server: str, tmp_path: Path) -> None:
    storage = Storage(f"{s3_server}/sweeps/a")
    storage.write_json("x/y.json", {"v": [1, 2]})
    assert storage.read_json("x/y.json") == {"v": [1, 2]}
    assert storage.list("x") == ["y.json"]

    cache = StageCache(storage, local_root=tmp_path / "mirror")
    ref = _ref()
    folder = cache.get(ref, lambda f: (f / "out.txt").write_text("on s3"))
    assert folder == tmp_path / "mirror" / ref.stage / ref.key
    # The files sit in the one build folder that the marker names.
    build_folder = storage.read_json(f"{ref.rel}/{COMPLETE}")["folder"]
    assert storage.list(ref.rel) == sorted([COMPLETE, build_folder])
    assert storage.list(f"{ref.rel}/{build_folder}") == ["out.txt"]
    assert sorted(p.name for p in folder.iterdir()) == [COMPLETE, "out.txt"]
    # Another machine (an empty mirror) downloads the entry instead of building it again.
    other = StageCache(Storage(f"{s3_server}/sweeps/a"), local_root=tmp_path / "other")
    again = other.get(ref, lambda f: pytest.fail("a complete entry must not be rebuilt"))
    assert (again / "out.txt").read_text() == "on s3"
    assert len(other.records()) == 1
