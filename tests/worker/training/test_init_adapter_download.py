"""worker.attempt.download_init_adapter: the parent job's adapter (or checkpoint) lands as a PEFT directory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.core.storage import get_storage
from app.models import JobArtifact, JobCheckpoint
from app.services.files import build_result_file
from tests.factories import create_job
from worker import attempt as attempt_module
from worker.archive import file_chunks, tar_directory


def adapter_tar(tmp_path: Path, name: str, r: int) -> Path:
    source = tmp_path / name
    source.mkdir()
    (source / "adapter_config.json").write_text(f'{{"r": {r}}}')
    (source / "adapter_model.safetensors").write_bytes(b"weights")
    return tar_directory(source, tmp_path / f"{name}.tar")


@pytest.fixture
def parent_job(session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A succeeded job with an adapter artifact and a checkpoint at step 5; the worker's sessions use the test's."""

    @contextlib.contextmanager
    def test_session() -> Iterator[Any]:
        yield session

    monkeypatch.setattr(attempt_module, "session_scope", test_session)
    job = create_job(session, status="succeeded")
    storage = get_storage()
    stored = storage.write(f"artifacts/{job.id}/adapter", file_chunks(adapter_tar(tmp_path, "final", r=8)))
    file = build_result_file(project_pk=job.project_pk, filename="adapter.tar", blob_key=stored.key,
                             size=stored.bytes, sha256=stored.sha256)  # fmt: skip
    session.add(file)
    session.flush()
    session.add(JobArtifact(job_pk=job.pk, file_pk=file.pk, name="adapter", kind="adapter"))
    stored = storage.write(f"checkpoints/{job.id}/step-5", file_chunks(adapter_tar(tmp_path, "step5", r=4)))
    session.add(JobCheckpoint(id=f"ftckpt_{job.id}5", job_pk=job.pk, step_number=5, attempt=1, metrics={"step": 5},
                              blob_key=stored.key, sha256=stored.sha256, bytes=stored.bytes))  # fmt: skip
    session.commit()
    return job


def test_the_final_adapter_or_a_checkpoint_is_downloaded(parent_job: Any, tmp_path: Path) -> None:
    storage = get_storage()
    final = attempt_module.download_init_adapter(storage, parent_job_id=parent_job.id, step=None,
                                                 project_pk=parent_job.project_pk, target=tmp_path / "a")  # fmt: skip
    assert (final / "adapter_config.json").read_text() == '{"r": 8}'
    checkpoint = attempt_module.download_init_adapter(
        storage, parent_job_id=parent_job.id, step=5, project_pk=parent_job.project_pk, target=tmp_path / "b"
    )
    assert (checkpoint / "adapter_config.json").read_text() == '{"r": 4}'


def test_a_missing_checkpoint_or_another_projects_job_is_not_found(parent_job: Any, tmp_path: Path) -> None:
    storage = get_storage()
    with pytest.raises(FileNotFoundError, match="has no checkpoint-step-7"):
        attempt_module.download_init_adapter(storage, parent_job_id=parent_job.id, step=7,
                                             project_pk=parent_job.project_pk, target=tmp_path / "a")  # fmt: skip
    with pytest.raises(FileNotFoundError, match="was deleted"):
        attempt_module.download_init_adapter(
            storage, parent_job_id=parent_job.id, step=None, project_pk=parent_job.project_pk + 1000,
            target=tmp_path / "b",
        )
