"""No request string becomes a filesystem path; only catalogue models, safetensors, no remote code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import upload, upload_chat
from tests.security.conftest import ProjectAObjects
from tests.support.data import chat_lines, jsonl

TRAVERSALS = ["../../etc/passwd", "..\\..\\windows\\win.ini", "/etc/passwd", "a/../../b", "..", "."]


@pytest.mark.parametrize(("given", "stored"), [
    ("../../etc/passwd", "passwd"), ("..\\..\\win.ini", "win.ini"), ("/abs/train.jsonl", "train.jsonl"),
    ("..", "upload.jsonl"), ("", "upload.jsonl"), ("a\x00b\r\n.jsonl", "ab.jsonl"), ("train.jsonl", "train.jsonl"),
])
def test_upload_filenames_are_kept_as_plain_names(given: str, stored: str) -> None:
    from app.core.security import plain_filename

    assert plain_filename(given) == stored


def test_traversal_in_an_upload_filename_is_stored_as_a_plain_name(client: TestClient) -> None:
    response = upload(client, jsonl(chat_lines(12)), filename="../../etc/passwd")
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == "passwd"
    content = client.get(f"/v1/files/{response.json()['id']}/content")
    assert content.status_code == 200 and f'filename="{response.json()["id"]}"' in content.headers[
        "content-disposition"]


def test_local_storage_keys_never_come_from_the_filename(tmp_path: Path, client: TestClient,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With files on disk, a traversal filename still lands at <root>/files/<id> and nowhere else."""
    from app.api.routes import files as file_routes
    from app.core.storage import LocalStorage

    root = tmp_path / "deep" / "storage"
    storage = LocalStorage(root)
    monkeypatch.setattr(file_routes, "get_storage", lambda: storage)
    response = upload(client, jsonl(chat_lines(12)), filename="../../escape.jsonl")
    assert response.status_code == 200, response.text
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [root / "files" / response.json()["id"]]
    for key in ("../x", "/etc/passwd", "files/../../x", "", "files//x", "./x"):
        with pytest.raises(ValueError):
            storage.write(key, [b"x"])


@pytest.mark.parametrize("model", ["../x", "/etc/passwd", "tiny-llama/../../etc", "~/.ssh/id_rsa",
                                   "./tiny-llama", "file:///etc/passwd", "tiny-llama\x00",
                                   "tiny-llama\n"])
def test_model_names_outside_the_catalogue_are_refused(client: TestClient, model: str) -> None:
    file_id = upload_chat(client)
    response = client.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": file_id})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "model_not_available"


@pytest.mark.parametrize("path", ["..%2Fx", "%2Fetc%2Fpasswd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e"])
def test_model_lookups_by_traversal_are_404(client: TestClient, path: str) -> None:
    response = client.get(f"/v1/models/{path}")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("suffix", ["../x", "a/b", "/etc", "x\\y", "a b"])
def test_suffixes_with_path_characters_are_refused(client: TestClient, suffix: str) -> None:
    response = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": "file-x",
                                                         "suffix": suffix})
    assert response.status_code == 400 and response.json()["error"]["param"] == "suffix"


@pytest.mark.parametrize("name", ["..%2F..%2Fetc%2Fpasswd", "..%2Fadapter", "%2Fetc%2Fpasswd", "%2e%2e", "adapter%00"])
def test_artifact_names_with_traversal_are_404(client: TestClient, project_a: ProjectAObjects, name: str) -> None:
    job_id = project_a.path_ids["fine_tuning_job_id"]
    response = client.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts/{name}")
    assert response.status_code == 404, response.text
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts/{project_a.path_ids['name']}").status_code == 200


@pytest.mark.parametrize("file_id", ["..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "files%2Ffile-x", "%2e%2e"])
def test_file_ids_with_traversal_are_404(client: TestClient, file_id: str) -> None:
    for suffix in ("", "/content", "/validation_report"):
        response = client.get(f"/v1/files/{file_id}{suffix}")
        assert response.status_code == 404, (file_id, suffix, response.text)


def test_catalogue_models_default_to_no_remote_code() -> None:
    from app.core.config import CatalogueModel

    assert CatalogueModel(path="/models/x").trust_remote_code is False


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_worker_loads_safetensors_and_runs_remote_code_only_when_the_catalogue_allows(
        monkeypatch: pytest.MonkeyPatch, trust_remote_code: bool) -> None:
    transformers = pytest.importorskip("transformers")
    import torch

    from app.schemas.training import TrainingConfig
    from worker.training.model import load_model

    seen: dict[str, Any] = {}

    def capture(path: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", capture)
    with pytest.raises(RuntimeError, match="stop before loading"):
        load_model(TrainingConfig(), Path("/nonexistent"), device=torch.device("cpu"), dtype=torch.float32,
                   trust_remote_code=trust_remote_code)
    assert seen["use_safetensors"] is True and seen["local_files_only"] is True
    assert seen["trust_remote_code"] is trust_remote_code


def test_a_folder_with_safetensors_is_read_by_the_workers_reader_without_remote_code(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The reader (worker/training/weights.py) reads *.safetensors only, and transformers builds the model from them
    with remote code off; a model whose catalogue entry allows remote code goes through the test above instead."""
    pytest.importorskip("transformers")
    import torch
    from transformers import LlamaForCausalLM

    from app.schemas.training import TrainingConfig
    from worker.training.model import load_model
    from worker.training.tiny_model import make_tiny_model
    from worker.training.weights import FileTensor

    folder = make_tiny_model(tmp_path / "model")
    seen: dict[str, Any] = {}

    def capture(path: Any, **kwargs: Any) -> Any:
        seen.update(kwargs, path=path)
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(LlamaForCausalLM, "from_pretrained", capture)
    with pytest.raises(RuntimeError, match="stop before loading"):
        load_model(TrainingConfig(), folder, device=torch.device("cpu"), dtype=torch.float32)
    assert seen["path"] is None and seen["trust_remote_code"] is False
    assert seen["state_dict"] and all(isinstance(t, FileTensor) for t in seen["state_dict"].values())
