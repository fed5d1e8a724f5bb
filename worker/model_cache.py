"""This host's copies of the hub models its jobs train, in TUNEFORGE_MODEL_CACHE.

A model is fetched at the commit it was registered at (only the files the registry listed: safetensors
weights, config, tokenizer and generation files), one download per model per host at a time (a file lock: a
second job waits), and checked against the Hub's sizes and hashes before it is marked complete and again
before every load, so a cache entry that looks complete is complete. A download killed half way resumes
(huggingface_hub keeps the partial file); a file that fails its check is fetched again once.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import session_scope
from app.core.errors import APIError
from app.models import RegisteredModel
from app.models.registered_model import DOWNLOAD_HEARTBEAT_SECONDS
from app.services import base_models, hub
from app.services.hub import HubUnavailable

logger = logging.getLogger("tuneforge.worker")
COMPLETE = ".tuneforge-complete"


class ModelUnavailable(Exception):
    """The model cannot be had on this host; the message says why and what to do. `model_error`: the model
    itself is at fault or its download broke (the Hub refused it, a disk filled up, its files fail their hashes),
    so it goes to error; False for what only this host lacks now (offline, the Hub out of reach)."""

    def __init__(self, message: str, *, model_error: bool = True) -> None:
        super().__init__(message)
        self.model_error = model_error


class DownloadLog(Protocol):
    """Where a download's progress and outcome go (the registry; nothing in unit tests)."""

    def progress(self, done_bytes: int, total_bytes: int) -> None: ...

    def ready(self) -> None: ...

    def failed(self, message: str) -> None: ...


class _NoLog:
    def progress(self, done_bytes: int, total_bytes: int) -> None:
        pass

    def ready(self) -> None:
        pass

    def failed(self, message: str) -> None:
        pass


class RegistryLog:
    """The registry row of the model (status downloading -> ready, or error; see registered_model.py), as
    this worker host reports it. A database hiccup costs only a stale status, never the download."""

    def __init__(self, model: ModelRef, *, worker: str,
                 sessions: Callable[[], AbstractContextManager[Session]] = session_scope) -> None:
        self.model, self.worker, self.sessions = model, worker, sessions

    def _write(self, what: Callable[[Session], object]) -> None:
        try:
            with self.sessions() as session:
                what(session)
        except Exception:
            logger.warning("could not record the download of %s", self.model.name, exc_info=True)

    def progress(self, done_bytes: int, total_bytes: int) -> None:
        self._write(lambda s: base_models.record_download(s, name=self.model.name, commit_sha=self.model.commit_sha,
                                                          worker=self.worker, done_bytes=done_bytes,
                                                          total_bytes=total_bytes))

    def ready(self) -> None:
        self._write(lambda s: base_models.record_ready(s, name=self.model.name, commit_sha=self.model.commit_sha,
                                                       worker=self.worker))

    def failed(self, message: str) -> None:
        self._write(lambda s: base_models.record_failure(s, name=self.model.name,
                                                         commit_sha=self.model.commit_sha, message=message))


@dataclass(frozen=True)
class ModelRef:
    """What an attempt needs of a registry row (read once, used outside the database session)."""

    name: str
    source: str
    commit_sha: str | None
    files: list[dict[str, Any]]
    trust_remote_code: bool
    status: str
    error: str | None

    @classmethod
    def of(cls, row: RegisteredModel) -> ModelRef:
        return cls(name=row.name, source=row.source, commit_sha=row.commit_sha, files=list(row.files),
                   trust_remote_code=row.trust_remote_code, status=row.status, error=row.error)

    @property
    def repo(self) -> str | None:
        return self.source.removeprefix("hf:") if self.source.startswith("hf:") else None


def cache_folder(settings: Settings, model: ModelRef) -> Path:
    return settings.model_cache_root / (model.repo or "").replace("/", "--") / (model.commit_sha or "")


@contextmanager
def _locked(path: Path, *, waiting: Callable[[], None]) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _digest(path: Path, spec: dict[str, Any]) -> str | None:
    """Why path does not match its listing (size, then the Hub's sha256 or git blob sha1), or None."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if spec.get("size") is not None and size != int(spec["size"]):
        return f"{size} bytes, expected {spec['size']}"
    if spec.get("sha256"):
        digest = hashlib.sha256()
    elif spec.get("git_sha1"):
        digest = hashlib.sha1(usedforsecurity=False)
        digest.update(f"blob {size}\0".encode())
    else:
        return None
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    expected = spec.get("sha256") or spec.get("git_sha1")
    return None if digest.hexdigest() == expected else "its hash differs from the Hub's"


def check(folder: Path, model: ModelRef) -> dict[str, str]:
    """Every listed file that fails its check, with why."""
    return {spec["name"]: why for spec in model.files if (why := _digest(folder / spec["name"], spec)) is not None}


def is_held(settings: Settings, model: ModelRef) -> bool:
    """This host has a complete copy (a local folder always is; the hashes are checked again at load)."""
    return model.repo is None or (cache_folder(settings, model) / COMPLETE).is_file()


def missing_here(session: Session, *, settings: Settings) -> set[str]:
    """The registered hub models this host's cache lacks: jobs on them wait queued while one is fetched."""
    rows = session.scalars(select(RegisteredModel).where(RegisteredModel.source.startswith("hf:")))
    return {row.name for row in rows if not is_held(settings, ModelRef.of(row))}


def local_model(model: ModelRef, *, settings: Settings, progress: Callable[[str], None],
                log: DownloadLog | None = None) -> Path:
    """The folder to load the model from on this host, fetching and checking it first when needed; `log` hears
    the download's progress and outcome."""
    if model.status == "error":
        raise ModelUnavailable(f"Model {model.name!r} cannot be used: {model.error}")
    if model.repo is None:
        return Path(model.source.removeprefix("path:"))
    log = log or _NoLog()
    try:
        folder = _local_hub_model(model, settings=settings, progress=progress, log=log)
    except ModelUnavailable as exc:
        if exc.model_error:
            log.failed(str(exc))
        raise
    log.ready()
    return folder


def _local_hub_model(model: ModelRef, *, settings: Settings, progress: Callable[[str], None],
                     log: DownloadLog) -> Path:
    assert model.commit_sha is not None
    folder = cache_folder(settings, model)
    label = f"{model.repo}@{model.commit_sha[:10]}"

    def waiting() -> None:
        progress(f"Waiting for another job on this host to finish downloading {label}.")

    with _locked(folder.with_name(f"{model.commit_sha}.lock"), waiting=waiting):
        if (folder / COMPLETE).is_file():
            failed = check(folder, model)
            if not failed:
                return folder
            progress(f"The cached copy of {label} failed its check ({_listing(failed)}); fetching those files "
                     "again.")
            (folder / COMPLETE).unlink()
            for name in failed:
                (folder / name).unlink(missing_ok=True)
        _fetch(model, folder, settings=settings, progress=progress, log=log, label=label)
        failed = check(folder, model)
        if failed:  # one more try for what failed (a file replaced under us, a broken transfer)
            for name in failed:
                (folder / name).unlink(missing_ok=True)
            _fetch(model, folder, settings=settings, progress=progress, log=log, label=label)
            failed = check(folder, model)
        if failed:
            raise ModelUnavailable(f"{label} failed its check after downloading it twice: {_listing(failed)}.")
        (folder / COMPLETE).write_text(json.dumps({"verified_at": time.time(), "files": len(model.files)}))
    return folder


def _listing(failed: dict[str, str]) -> str:
    return "; ".join(f"{name}: {why}" for name, why in sorted(failed.items()))


def _fetch(model: ModelRef, folder: Path, *, settings: Settings, progress: Callable[[str], None], log: DownloadLog,
           label: str) -> None:
    from huggingface_hub import hf_hub_download

    total = sum(int(f.get("size") or 0) for f in model.files)
    # A download killed half way resumes file by file: what it finished is kept (checked by size here, by hash
    # after), what it left half done is fetched again. huggingface_hub (2.x) writes each download to a temporary
    # file of its own process and never continues another's, so a dead process's partial files are only litter;
    # under this host's lock no live process writes them.
    partial = folder / ".cache" / "huggingface" / "download"
    for orphan in partial.rglob("*.incomplete") if partial.is_dir() else []:
        orphan.unlink(missing_ok=True)
    missing = [f for f in model.files if _digest(folder / f["name"], {"size": f.get("size")}) is not None]
    needed = sum(int(f.get("size") or 0) for f in missing)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ModelUnavailable(f"Not enough disk for {label} on this host: {_gb(needed)} GB to download, "
                               f"{_gb(free)} GB free in the model cache (TUNEFORGE_MODEL_CACHE).")

    def tell() -> None:  # what is on disk now, partial files included
        done = min(total, _bytes_on_disk(folder, model))
        log.progress(done, total)
        progress(f"Downloading {label}: {_gb(done)} of {_gb(total)} GB.")

    tell()
    stop = threading.Event()

    def heartbeat() -> None:  # a large file takes minutes: say how far it is while hf_hub_download runs
        while not stop.wait(DOWNLOAD_HEARTBEAT_SECONDS):
            try:
                tell()
            except Exception:  # a progress note lost, not the download
                logger.warning("could not report the download of %s", label, exc_info=True)

    beating = threading.Thread(target=heartbeat, name="tuneforge-download-progress", daemon=True)
    beating.start()
    try:
        for spec in missing:
            with hub.hub_errors(model.repo or "", model.commit_sha):
                hf_hub_download(model.repo or "", spec["name"], revision=model.commit_sha, local_dir=folder,
                                token=hub.token(settings) or False)
    except HubUnavailable as exc:
        raise ModelUnavailable(exc.message, model_error=False) from None
    except APIError as exc:
        raise ModelUnavailable(exc.message) from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            shutil.rmtree(folder / ".cache", ignore_errors=True)  # the partial files: nothing half-written stays
            raise ModelUnavailable(f"The disk filled up while downloading {label}; free space in the model "
                                   "cache (TUNEFORGE_MODEL_CACHE), then pull the model again "
                                   "(tuneforge models pull).") from None
        raise
    finally:
        stop.set()
        beating.join()
    tell()


def _bytes_on_disk(folder: Path, model: ModelRef) -> int:
    """The listed files present plus huggingface_hub's partial downloads (.incomplete under .cache)."""
    done = sum((folder / f["name"]).stat().st_size for f in model.files if (folder / f["name"]).is_file())
    partial = folder / ".cache" / "huggingface" / "download"
    if partial.is_dir():
        done += sum(p.stat().st_size for p in partial.rglob("*.incomplete") if p.is_file())
    return done


def _gb(size: int) -> str:
    return f"{size / 1e9:.1f}"
