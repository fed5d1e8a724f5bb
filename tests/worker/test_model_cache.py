"""A worker host's model cache against a fake Hub: one verified download per host, corruption caught by hash
before a load, dropped connections, concurrent jobs, offline hosts and a full disk."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import InvalidRequest
from app.models.registered_model import DOWNLOAD_STALE_SECONDS
from app.services import base_models
from tests.factories import create_job
from tests.support.fake_hub import FakeHub, repo_from_dir
from worker import model_cache
from worker.model_cache import COMPLETE, ModelRef, ModelUnavailable, local_model

REPO = "test-org/tiny-chat"
WEIGHTS = "model.safetensors"


@pytest.fixture
def hub(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    # The first GET of the weights breaks off after 4 KiB: huggingface_hub retries within the call.
    repo = repo_from_dir(REPO, tiny_model_dir, drop_after={WEIGHTS: 4096})
    with FakeHub([repo]) as fake:
        fake.patch_env(monkeypatch)
        yield fake


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "host", model_catalogue={}, catalogue_file=tmp_path / "none.json")


@pytest.fixture
def model(session: Session, hub: FakeHub, settings: Settings) -> ModelRef:
    row = base_models.register(session, settings=settings, name="tiny-chat", source=f"hf:{REPO}")
    return ModelRef.of(row)


def fetch(model: ModelRef, settings: Settings) -> tuple[Path, list[str]]:
    said: list[str] = []
    return local_model(model, settings=settings, progress=said.append), said


def test_one_download_per_host_then_loads_from_the_cache(model: ModelRef, settings: Settings, hub: FakeHub,
                                                         tiny_model_dir: Path) -> None:
    folder, said = fetch(model, settings)
    assert folder == settings.model_cache_root / "test-org--tiny-chat" / model.commit_sha
    assert (folder / WEIGHTS).read_bytes() == (tiny_model_dir / WEIGHTS).read_bytes()
    assert (folder / COMPLETE).is_file()
    assert said[0].startswith(f"Downloading {REPO}@{model.commit_sha[:10]}: 0.0 of ")  # type: ignore[index]
    assert hub.downloads(REPO, WEIGHTS) == 2  # the dropped first GET, and its retry
    again, said_again = fetch(model, settings)
    assert again == folder and said_again == [] and hub.downloads(REPO, WEIGHTS) == 2


def test_a_corrupted_cache_file_is_caught_by_hash_and_fetched_again(model: ModelRef, settings: Settings,
                                                                    hub: FakeHub, tiny_model_dir: Path) -> None:
    folder, _ = fetch(model, settings)
    weights = bytearray((folder / WEIGHTS).read_bytes())
    weights[-1] ^= 0xFF  # same size: only the hash can tell
    (folder / WEIGHTS).write_bytes(bytes(weights))
    _, said = fetch(model, settings)
    assert "failed its check (model.safetensors: its hash differs from the Hub's)" in said[0]
    assert (folder / WEIGHTS).read_bytes() == (tiny_model_dir / WEIGHTS).read_bytes()
    assert hub.downloads(REPO, WEIGHTS) == 3


def test_an_incomplete_entry_never_looks_complete(model: ModelRef, settings: Settings, hub: FakeHub) -> None:
    folder, _ = fetch(model, settings)
    (folder / COMPLETE).unlink()  # a download killed before it was verified
    (folder / WEIGHTS).write_bytes(b"partial")
    fetch(model, settings)
    assert model_cache.check(folder, model) == {} and (folder / COMPLETE).is_file()


def test_two_jobs_on_one_host_download_once(model: ModelRef, settings: Settings, hub: FakeHub) -> None:
    results: list[tuple[Path, list[str]]] = []
    threads = [threading.Thread(target=lambda: results.append(fetch(model, settings))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0][0] == results[1][0]
    assert hub.downloads(REPO, WEIGHTS) == 2  # one download (its dropped first GET and the retry), not two
    assert any(m.startswith("Waiting for another job on this host") for _, said in results for m in said)


def test_an_offline_host_uses_its_cache_and_says_when_it_has_none(model: ModelRef, settings: Settings,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    fetch(model, settings)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert fetch(model, settings)[0].is_dir()
    elsewhere = Settings(data_dir=tmp_path / "other-host", model_catalogue={}, catalogue_file=tmp_path / "n.json")
    with pytest.raises(ModelUnavailable, match="offline .* not in its cache"):
        fetch(model, elsewhere)


def test_a_full_disk_fails_before_writing(model: ModelRef, settings: Settings, hub: FakeHub,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_cache.shutil, "disk_usage", lambda _p: type("Usage", (), {"free": 1000})())
    with pytest.raises(ModelUnavailable, match="Not enough disk .* 1000|0.0 GB free"):
        fetch(model, settings)
    folder = model_cache.cache_folder(settings, model)
    assert not (folder / COMPLETE).exists() and not (folder / WEIGHTS).exists()
    assert hub.downloads(REPO, WEIGHTS) == 0


def test_a_model_in_error_fails_with_its_reason(model: ModelRef, settings: Settings) -> None:
    broken = ModelRef(**{**model.__dict__, "status": "error", "error": "the folder is gone"})
    with pytest.raises(ModelUnavailable, match="the folder is gone"):
        fetch(broken, settings)


@pytest.fixture
def registry(session: Session, model: ModelRef) -> model_cache.RegistryLog:
    """The registry row of the model as worker w1 reports to it, in the test's own transaction."""

    @contextmanager
    def sessions() -> Iterator[Session]:
        yield session

    return model_cache.RegistryLog(model, worker="w1", sessions=sessions)


def test_a_download_takes_the_model_from_registered_through_downloading_to_ready(
        model: ModelRef, settings: Settings, session: Session, registry: model_cache.RegistryLog) -> None:
    row = base_models.get(session, settings=settings, name="tiny-chat")
    assert (row.status, row.hosts) == ("registered", [])
    seen: list[tuple[str, dict | None]] = []

    def progress(message: str) -> None:
        session.refresh(row)
        seen.append((row.status, row.download))

    local_model(model, settings=settings, progress=progress, log=registry)
    assert seen and all(status == "downloading" for status, _ in seen), seen
    assert {d["worker"] for _, d in seen if d} == {"w1"}
    assert seen[-1][1] is not None and seen[-1][1]["done_bytes"] == seen[-1][1]["total_bytes"] > 0
    session.refresh(row)
    assert (row.status, row.error, row.download, row.hosts) == ("ready", None, None, ["w1"])
    assert not base_models.downloading_elsewhere(row, worker="w2")


def test_a_disk_that_fills_up_mid_download_puts_the_model_in_error_and_fails_its_queued_jobs(
        model: ModelRef, settings: Settings, session: Session, registry: model_cache.RegistryLog,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import huggingface_hub

    queued = create_job(session, model="tiny-chat", base_model="tiny-chat", status="queued")
    running = create_job(session, model="tiny-chat", base_model="tiny-chat", status="running", attempt=1)

    def fill_the_disk(repo_id: str, filename: str, *, local_dir: Path, **_kw: object) -> str:
        partial = Path(local_dir) / ".cache" / "huggingface" / "download" / f"{filename}.x.incomplete"
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fill_the_disk)
    with pytest.raises(ModelUnavailable, match="disk filled up"):
        local_model(model, settings=settings, progress=lambda _m: None, log=registry)
    folder = model_cache.cache_folder(settings, model)
    assert not (folder / COMPLETE).exists() and not (folder / ".cache").exists()  # nothing half-written stays
    row = base_models.get(session, settings=settings, name="tiny-chat")
    assert row.status == "error" and "disk filled up" in (row.error or "")
    session.refresh(queued)
    session.refresh(running)
    assert queued.status == "failed" and queued.error["code"] == "model_not_available"
    assert "disk filled up" in queued.error["message"]
    assert running.status == "running"  # an attempt in progress holds its model already
    # Jobs on it now fail at once; a pull the operator asks for takes it back to registered.
    with pytest.raises(InvalidRequest, match="disk filled up"):
        base_models.ready_for_jobs(session, settings=settings, name="tiny-chat")
    assert base_models.request_pull(session, settings=settings, name="tiny-chat") == []  # no live worker here
    assert (row.status, row.error) == ("registered", None)


def test_a_host_that_only_lacks_the_hub_leaves_the_model_as_it_was(
        model: ModelRef, settings: Settings, session: Session, registry: model_cache.RegistryLog,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailable, match="offline") as caught:
        local_model(model, settings=settings, progress=lambda _m: None, log=registry)
    assert not caught.value.model_error
    assert base_models.get(session, settings=settings, name="tiny-chat").status != "error"


def test_a_download_whose_heartbeat_stopped_may_be_taken_over(session: Session, model: ModelRef,
                                                               settings: Settings) -> None:
    row = base_models.get(session, settings=settings, name="tiny-chat")
    base_models.record_download(session, name="tiny-chat", commit_sha=model.commit_sha, worker="w1",
                                done_bytes=10, total_bytes=100)
    assert row.status == "downloading"
    assert base_models.downloading_elsewhere(row, worker="w2") and not base_models.downloading_elsewhere(row,
                                                                                                        worker="w1")
    later = time.time() + DOWNLOAD_STALE_SECONDS + 1
    assert not base_models.downloading_elsewhere(row, worker="w2", now=later)


def test_a_download_killed_half_way_resumes_file_by_file_and_leaves_no_litter(
        model: ModelRef, settings: Settings, hub: FakeHub, tiny_model_dir: Path) -> None:
    """What a killed process leaves: the files it finished, a partial file of the one it was fetching (in
    huggingface_hub's download folder), no marker. The finished files are not fetched again; the partial one is
    fetched anew (huggingface_hub 2.x never continues another process's temporary file) and removed."""
    folder = model_cache.cache_folder(settings, model)
    folder.mkdir(parents=True)
    (folder / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
    partial = folder / ".cache" / "huggingface" / "download" / "abc.0123456789.d00dfeed.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes((tiny_model_dir / WEIGHTS).read_bytes()[:1000])
    read_at_registration = hub.downloads(REPO, "config.json")
    path, _said = fetch(model, settings)
    assert hub.downloads(REPO, "config.json") == read_at_registration and hub.downloads(REPO, WEIGHTS) >= 1
    assert not partial.exists()
    assert (path / WEIGHTS).read_bytes() == (tiny_model_dir / WEIGHTS).read_bytes() and (path / COMPLETE).is_file()
