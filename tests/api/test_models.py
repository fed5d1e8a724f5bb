from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.core.config import CatalogueModel, get_settings
from app.core.storage import get_storage
from app.models import FineTuningJob, JobCheckpoint, Project
from app.services.files import build_result_file
from app.services.jobs import fine_tuned_model_name
from tests.factories import create_job
from tests.services.test_base_models import TRUNCATED_CONFIG, model_copy, tiny_gpt2


def succeeded_job(session: Any, project_name: str = "team-a") -> FineTuningJob:
    """A succeeded job with stored adapter bytes and two checkpoints, as a worker leaves it."""
    from app.models import JobArtifact

    project = session.scalar(select(Project).where(Project.name == project_name))
    job = create_job(session, project=project, status="succeeded", suffix="s")
    job.fine_tuned_model = fine_tuned_model_name(job, organization=project.name)
    storage = get_storage()
    for name in ("adapter", "metrics"):
        stored = storage.write(f"artifacts/{job.id}/{name}", iter([name.encode() * 10]))
        file = build_result_file(project_pk=project.pk, filename=f"{name}.tar", blob_key=stored.key,
                                 size=stored.bytes, sha256=stored.sha256)
        session.add(file)
        session.flush()
        session.add(JobArtifact(job_pk=job.pk, file_pk=file.pk, name=name, kind=name))
    for step in (5, 10):
        stored = storage.write(f"checkpoints/{job.id}/step-{step}", iter([b"ckpt"]))
        session.add(JobCheckpoint(id=f"ftckpt_{job.id}{step}", job_pk=job.pk, step_number=step, attempt=1,
                                  metrics={"step": step}, blob_key=stored.key, sha256=stored.sha256,
                                  bytes=stored.bytes))
    session.commit()
    return job


def test_fine_tuned_models_and_their_checkpoints_are_listed_and_retrievable(client: TestClient, session: Any
                                                                          ) -> None:
    job = succeeded_job(session)
    listed = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["tiny-llama", job.fine_tuned_model]
    assert listed[1]["parent"] == "tiny-llama" and listed[0].get("parent") is None  # vLLM's field for an adapter
    model = client.get(f"/v1/models/{job.fine_tuned_model}").json()
    assert model["fine_tuning_job"] == job.id and model["root"] == "tiny-llama" and model["parent"] == "tiny-llama"
    assert client.get(f"/v1/models/{job.fine_tuned_model}:ckpt-step-10").status_code == 200
    assert client.get(f"/v1/models/{job.fine_tuned_model}:ckpt-step-7").status_code == 404
    artifacts = client.get(f"/v1/fine_tuning/jobs/{job.id}/artifacts").json()["data"]
    assert [a["name"] for a in artifacts] == ["adapter", "metrics", "checkpoint-step-5", "checkpoint-step-10"]
    assert client.get(f"/v1/fine_tuning/jobs/{job.id}/artifacts/checkpoint-step-5").content == b"ckpt"


def test_deleting_a_fine_tuned_model_removes_its_weights_and_files(client: TestClient, session: Any) -> None:
    job = succeeded_job(session)
    result_files = client.get(f"/v1/fine_tuning/jobs/{job.id}").json()["result_files"]
    response = client.delete(f"/v1/models/{job.fine_tuned_model}")
    assert response.json() == {"id": job.fine_tuned_model, "object": "model", "deleted": True}
    assert client.get(f"/v1/models/{job.fine_tuned_model}").status_code == 404
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-llama"]
    assert client.get(f"/v1/fine_tuning/jobs/{job.id}/artifacts").json()["data"] == []
    for file_id in result_files:
        assert client.get(f"/v1/files/{file_id}").status_code == 404
    assert get_storage().size(f"artifacts/{job.id}/adapter") is None
    assert client.delete(f"/v1/models/{job.fine_tuned_model}").status_code == 404
    assert client.get(f"/v1/fine_tuning/jobs/{job.id}").json()["status"] == "succeeded"


def test_another_projects_fine_tuned_model_is_not_found(client: TestClient, other_client: TestClient,
                                                        session: Any) -> None:
    job = succeeded_job(session)
    assert other_client.get(f"/v1/models/{job.fine_tuned_model}").status_code == 404
    assert other_client.delete(f"/v1/models/{job.fine_tuned_model}").status_code == 404
    assert client.get(f"/v1/models/{job.fine_tuned_model}").status_code == 200


def test_continued_training_starts_from_a_fine_tuned_model_on_its_base(client: TestClient, session: Any) -> None:
    from tests.api.conftest import upload_chat

    parent = succeeded_job(session)
    for model in (parent.fine_tuned_model, f"{parent.fine_tuned_model}:ckpt-step-5"):
        response = client.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": upload_chat(client)})
        assert response.status_code == 200, response.text
        child = session.scalar(select(FineTuningJob).where(FineTuningJob.id == response.json()["id"]))
        assert child.model == model and child.base_model == "tiny-llama"
    missing = client.post("/v1/fine_tuning/jobs", json={"model": "ft:tiny-llama:team-a::nope",
                                                         "training_file": upload_chat(client)})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"


def test_continued_training_trains_the_parents_adapter_and_refuses_other_settings(client: TestClient,
                                                                                   session: Any) -> None:
    """Found by an audit: the request's adapter settings were accepted, echoed and estimated, then the worker
    trained the parent's adapter with a warning; adapter.type "full" failed in the worker."""
    from app.schemas.training import AdapterConfig, TrainingConfig
    from tests.api.conftest import upload_chat

    parent = succeeded_job(session)
    parent.config = TrainingConfig(adapter=AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
                                   ).model_dump(mode="json")
    session.commit()
    training_file = upload_chat(client)

    def create(adapter: dict[str, Any] | None) -> Any:
        return client.post("/v1/fine_tuning/jobs", json={
            "model": parent.fine_tuned_model, "training_file": training_file,
            "method": {"type": "supervised", "supervised": {"adapter": adapter} if adapter else {}}})

    inherited = create(None)
    assert inherited.status_code == 200, inherited.text
    adapter = inherited.json()["method"]["supervised"]["adapter"]
    assert (adapter["type"], adapter["r"], adapter["alpha"], adapter["target_modules"]) == \
        ("lora", 4, 8, ["q_proj", "v_proj"])
    assert create({"dropout": 0.2}).json()["method"]["supervised"]["adapter"]["dropout"] == 0.2  # how it trains on
    quantized = create({"type": "qlora", "r": 4})  # the base's weights in 4 bits, the same adapter
    assert quantized.status_code == 200, quantized.text
    assert quantized.json()["method"]["supervised"]["adapter"]["type"] == "qlora"
    assert quantized.json()["method"]["supervised"]["adapter"]["r"] == 4
    fp4 = {"bits": 4, "quant_type": "fp4", "double_quant": False, "compute_dtype": "auto"}
    parent.config = TrainingConfig(adapter=AdapterConfig(type="qlora", r=4, alpha=8, quantization=fp4,
                                                         target_modules=["q_proj", "v_proj"])).model_dump(mode="json")
    session.commit()
    restated = create({"type": "qlora"})  # the type said again: the parent's quantization stays
    assert restated.json()["method"]["supervised"]["adapter"]["quantization"] == fp4, restated.text
    other = create({"type": "qlora", "quantization": {"quant_type": "nf4"}})  # given: the job's own
    assert other.json()["method"]["supervised"]["adapter"]["quantization"]["quant_type"] == "nf4", other.text
    for asked, param, words in (
            ({"r": 32}, "method.supervised.adapter.r", "adapter has r 4"),
            ({"target_modules": ["o_proj"]}, "method.supervised.adapter.target_modules", "adapter has target_modules"),
            ({"type": "full"}, "method.supervised.adapter.type", "adapter.type 'full' cannot"),
            ({"type": "dora"}, "method.supervised.adapter.type", "adapter.type 'dora' cannot")):
        refused = create(asked)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["param"], error["code"]) == (param, "invalid_value") and words in error["message"], error
    estimate = client.post("/v1/fine_tuning/jobs/estimate", json={"model": parent.fine_tuned_model,
                                                                  "training_file": training_file})
    same = client.post("/v1/fine_tuning/jobs/estimate", json={
        "model": "tiny-llama", "training_file": training_file, "method": {"type": "supervised", "supervised": {
            "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}}})
    assert estimate.status_code == 200 and same.status_code == 200, estimate.text
    assert estimate.json()["memory"]["trainable_parameters"] == same.json()["memory"]["trainable_parameters"]


def test_deleting_a_base_model_says_it_is_a_base_model(client: TestClient) -> None:
    response = client.delete("/v1/models/tiny-llama")
    assert response.status_code == 403
    assert response.json()["error"]["message"].startswith("'tiny-llama' is a base model: only fine-tuned models")
    assert client.get("/v1/models/tiny-llama").status_code == 200


def test_a_checkpoint_id_whose_step_is_no_number_is_not_found(client: TestClient, session: Any) -> None:
    """"²" passes str.isdigit and a step past 32 bits is no checkpoint's: both are ids of no model (404), not a
    crash in int() or in Postgres."""
    from tests.api.conftest import upload_chat

    job = succeeded_job(session)
    for tail in ("²", "99999999999999999999", "٣"):
        model = f"{job.fine_tuned_model}:ckpt-step-{tail}"
        assert client.get(f"/v1/models/{model}").status_code == 404
        created = client.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": upload_chat(client)})
        assert created.status_code == 400 and created.json()["error"]["code"] == "model_not_available", created.text


def test_a_model_is_not_deleted_while_a_job_trains_on_from_it_nor_one_checkpoint_alone(client: TestClient,
                                                                                        session: Any) -> None:
    from tests.api.conftest import upload_chat

    parent = succeeded_job(session)
    checkpoint = client.delete(f"/v1/models/{parent.fine_tuned_model}:ckpt-step-5")
    assert checkpoint.status_code == 400 and checkpoint.json()["error"]["param"] == "model", checkpoint.text
    child = client.post("/v1/fine_tuning/jobs", json={"model": f"{parent.fine_tuned_model}:ckpt-step-5",
                                                      "training_file": upload_chat(client)}).json()
    refused = client.delete(f"/v1/models/{parent.fine_tuned_model}")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "model_in_use" and child["id"] in refused.json()["error"]["message"]
    assert client.get(f"/v1/models/{parent.fine_tuned_model}:ckpt-step-5").status_code == 200
    assert client.post(f"/v1/fine_tuning/jobs/{child['id']}/cancel").status_code == 200
    assert client.delete(f"/v1/models/{parent.fine_tuned_model}").status_code == 200


def test_a_result_file_holding_a_models_weights_is_not_deleted_under_it(client: TestClient, session: Any) -> None:
    """Deleting the adapter's result file would take the model with it, without a word: 409 naming the model to
    delete instead. Other result files (metrics) go as any file does."""
    job = succeeded_job(session)
    adapter, metrics = client.get(f"/v1/fine_tuning/jobs/{job.id}").json()["result_files"]
    refused = client.delete(f"/v1/files/{adapter}")
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "file_in_use" and job.fine_tuned_model in error["message"]
    assert client.delete(f"/v1/files/{metrics}").status_code == 200
    assert client.get(f"/v1/models/{job.fine_tuned_model}").status_code == 200
    assert client.get(f"/v1/files/{adapter}").status_code == 200


def test_a_broken_catalogue_folder_leaves_every_other_model_usable(client: TestClient, tiny_model_dir: Path,
                                                                   tmp_path: Path, monkeypatch: Any) -> None:
    from tests.api.conftest import upload_chat

    broken = model_copy(tiny_model_dir, tmp_path / "broken", {"config.json": TRUNCATED_CONFIG})
    monkeypatch.setattr(get_settings(), "model_catalogue", {"broken": CatalogueModel(path=str(broken))})
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-llama"]
    assert client.get("/v1/models/tiny-llama").status_code == 200
    assert client.get("/v1/models/broken").status_code == 404
    file_id = upload_chat(client)
    created = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id})
    assert created.status_code == 200, created.text
    refused = client.post("/v1/fine_tuning/jobs", json={"model": "broken", "training_file": file_id})
    assert refused.status_code == 400
    assert refused.json()["error"] == {
        "message": f"Model 'broken' cannot be used: config.json in {broken} is not valid JSON (Expecting value at line "
                   "1 column 40): transformers could not load the model (save_pretrained writes the file afresh).",
        "type": "invalid_request_error", "param": "model", "code": "model_not_available"}


def test_a_gpt2_base_model_shows_its_shape_and_gets_a_memory_estimate(client: TestClient, tiny_model_dir: Path,
                                                                      tmp_path: Path, monkeypatch: Any) -> None:
    from tests.api.conftest import upload_chat

    folder = tiny_gpt2(tmp_path / "gpt2", tiny_model_dir)
    monkeypatch.setattr(get_settings(), "model_catalogue", {"tiny-gpt2": CatalogueModel(path=str(folder))})
    details = client.get("/v1/models/tiny-gpt2").json()["details"]
    assert (details["hidden_size"], details["layers"], details["context_length"]) == (16, 2, 128)
    body = {"model": "tiny-gpt2", "training_file": upload_chat(client),
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}}}
    estimate = client.post("/v1/fine_tuning/jobs/estimate", json=body)
    assert estimate.status_code == 200, estimate.text
    assert estimate.json()["memory"]["total_gib"] > 0


def test_a_model_with_learned_positions_trains_rows_within_them(client: TestClient, tiny_model_dir: Path,
                                                                tmp_path: Path, monkeypatch: Any) -> None:
    """Found by an audit: a GPT-2 with 64 positions took the default max_seq_length of 1,024, and its job failed in
    the worker with an IndexError on the first longer row."""
    from tests.api.conftest import upload_chat

    folder = tiny_gpt2(tmp_path / "gpt2", tiny_model_dir)  # 128 learned positions
    monkeypatch.setattr(get_settings(), "model_catalogue", {"tiny-gpt2": CatalogueModel(path=str(folder))})
    training_file = upload_chat(client)

    def create(**hyperparameters: Any) -> Any:
        return client.post("/v1/fine_tuning/jobs", json={"model": "tiny-gpt2", "training_file": training_file,
                                                         "method": {"type": "supervised", "supervised": {
                                                             "hyperparameters": hyperparameters}}})

    default = create()
    assert default.status_code == 200, default.text
    assert default.json()["method"]["supervised"]["hyperparameters"]["max_seq_length"] == 128
    assert create(max_seq_length=100).json()["method"]["supervised"]["hyperparameters"]["max_seq_length"] == 100
    refused = create(max_seq_length=256)
    assert refused.status_code == 400 and refused.json()["error"] == {
        "message": "max_seq_length 256 is more than the 128 positions 'tiny-gpt2' has (its position embeddings are "
                   "learned, one per position): give at most 128.",
        "type": "invalid_request_error", "param": "method.supervised.hyperparameters.max_seq_length",
        "code": "invalid_value"}
    # A rotary model's context length is no limit: the tiny Llama runs past its own as before.
    llama = client.get("/v1/models/tiny-llama").json()["details"]["context_length"]
    longer = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": training_file,
                                                       "method": {"type": "supervised", "supervised": {
                                                           "hyperparameters": {"max_seq_length": llama * 2}}}})
    assert longer.status_code == 200, longer.text


def test_a_fine_tuned_model_is_refused_on_other_weights_registered_under_its_bases_name(client: TestClient,
                                                                                      session: Any) -> None:
    """Found by an audit: after its base's name was registered again for another model, chat answered 502 with a
    PEFT size mismatch (or, same shape, the adapter on the wrong weights) and continued training failed in the
    worker."""
    from app.services import base_models
    from tests.api.conftest import upload_chat

    training_file = upload_chat(client)
    created = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": training_file})
    tiny = base_models.find(session, settings=get_settings(), name="tiny-llama")
    assert tiny is not None and tiny.source.startswith("path:")
    job = session.scalar(select(FineTuningJob).where(FineTuningJob.id == created.json()["id"]))
    assert job.base_revision == base_models.revision_of(tiny) == f"{tiny.source}@"  # kept at creation
    parent = succeeded_job(session)
    parent.base_revision = "hf:test-org/older-chat@" + "a" * 40  # trained on the weights the name had before
    session.commit()
    message = (f"{parent.fine_tuned_model} was trained on 'tiny-llama' as hf:test-org/older-chat@{'a' * 40}; that "
               f"name now registers {tiny.source}@, which its weights do not fit: register hf:test-org/older-chat "
               "as 'tiny-llama' again to use it.")
    chat = client.post("/v1/chat/completions", json={"model": parent.fine_tuned_model,
                                                     "messages": [{"role": "user", "content": "hi"}]})
    continued = client.post("/v1/fine_tuning/jobs", json={"model": parent.fine_tuned_model,
                                                           "training_file": training_file})
    for refused in (chat, continued):
        assert refused.status_code == 400 and refused.json()["error"] == {
            "message": message, "type": "invalid_request_error", "param": "model", "code": "model_not_available"}
    parent.base_revision = base_models.revision_of(tiny)  # the weights it was trained on: used as before
    session.commit()
    assert client.post("/v1/fine_tuning/jobs", json={"model": parent.fine_tuned_model,
                                                     "training_file": training_file}).status_code == 200


def test_a_finished_jobs_outputs_can_be_deleted_a_cancelled_ones_checkpoints_too(client: TestClient,
                                                                               session: Any) -> None:
    """Found by an audit: a cancelled or failed job's checkpoints are listed and downloadable but name no model,
    so no route could free them."""
    from tests.api.conftest import upload_chat

    project = session.scalar(select(Project).where(Project.name == "team-a"))
    cancelled = create_job(session, project=project, status="cancelled")
    storage = get_storage()
    for step in (20, 40):
        stored = storage.write(f"checkpoints/{cancelled.id}/step-{step}", iter([b"ckpt"]))
        session.add(JobCheckpoint(id=f"ftckpt_{cancelled.id}{step}", job_pk=cancelled.pk, step_number=step, attempt=1,
                                  metrics={"step": step}, blob_key=stored.key, sha256=stored.sha256,
                                  bytes=stored.bytes))
    running = create_job(session, project=project, status="running")
    session.commit()
    path = f"/v1/fine_tuning/jobs/{cancelled.id}/artifacts"
    assert [a["name"] for a in client.get(path).json()["data"]] == ["checkpoint-step-20", "checkpoint-step-40"]
    deleted = client.delete(path)
    assert deleted.status_code == 200 and deleted.json() == {"id": cancelled.id, "object": "fine_tuning.job.artifacts",
                                                             "deleted": True}
    assert client.get(path).json()["data"] == [] and client.get(f"{path[:-9]}checkpoints").json()["data"] == []
    assert storage.size(f"checkpoints/{cancelled.id}/step-20") is None
    refused = client.delete(f"/v1/fine_tuning/jobs/{running.id}/artifacts")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "job_not_finished"
    parent = succeeded_job(session)
    child = client.post("/v1/fine_tuning/jobs", json={"model": parent.fine_tuned_model,
                                                      "training_file": upload_chat(client)}).json()
    in_use = client.delete(f"/v1/fine_tuning/jobs/{parent.id}/artifacts")
    assert in_use.status_code == 409 and in_use.json()["error"]["code"] == "model_in_use"
    assert client.post(f"/v1/fine_tuning/jobs/{child['id']}/cancel").status_code == 200
    assert client.delete(f"/v1/fine_tuning/jobs/{parent.id}/artifacts").status_code == 200
    assert client.get(f"/v1/models/{parent.fine_tuned_model}").status_code == 404  # its weights went
    assert client.get(f"/v1/fine_tuning/jobs/{parent.id}").json()["status"] == "succeeded"  # the record stays


def _during_planning(monkeypatch: Any, action: Any) -> list[Any]:
    """Run `action` once while a job request is planned, before its insert: another request landing meanwhile."""
    from app.services import jobs

    real_check = jobs.check_fits_some_worker
    done: list[Any] = []

    def meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(action())
        return real_check(*args, **kwargs)

    monkeypatch.setattr(jobs, "check_fits_some_worker", meanwhile)
    return done


def test_a_model_deleted_while_a_job_continuing_from_it_is_created_is_not_trained_on(
        client: TestClient, session: Any, monkeypatch: Any) -> None:
    """Found by an audit: the deletion found no job training on from the model, the job was then inserted on it,
    and failed when claimed (no adapter to continue from)."""
    from tests.api.conftest import upload_chat

    parent = succeeded_job(session)
    training_file = upload_chat(client)
    done = _during_planning(monkeypatch, lambda: client.delete(f"/v1/models/{parent.fine_tuned_model}").status_code)
    refused = client.post("/v1/fine_tuning/jobs", json={"model": parent.fine_tuned_model,
                                                        "training_file": training_file})
    assert done == [200]
    assert refused.status_code == 400, refused.text
    assert (refused.json()["error"]["code"], refused.json()["error"]["param"]) == ("model_not_available", "model")
    assert all(j["model"] != parent.fine_tuned_model for j in client.get("/v1/fine_tuning/jobs").json()["data"])


def test_a_base_model_unregistered_while_a_job_on_it_is_created_is_not_trained_on(
        client: TestClient, session: Any, monkeypatch: Any, tiny_model_dir: Path) -> None:
    from app.services import base_models
    from tests.api.conftest import upload_chat

    base_models.register(session, settings=get_settings(), name="racing-base", source=f"path:{tiny_model_dir}",
                         check_allowed=False)
    session.commit()
    training_file = upload_chat(client)

    def unregister() -> str:
        removed = base_models.remove(session, settings=get_settings(), name="racing-base").name
        session.commit()
        return removed

    done = _during_planning(monkeypatch, unregister)
    refused = client.post("/v1/fine_tuning/jobs", json={"model": "racing-base", "training_file": training_file})
    assert done == ["racing-base"]
    assert refused.status_code == 400, refused.text
    assert (refused.json()["error"]["code"], refused.json()["error"]["param"]) == ("model_not_available", "model")


def test_a_base_model_registered_again_while_a_job_on_it_is_created_is_not_trained_on(
        client: TestClient, session: Any, monkeypatch: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Found by a review: the hold matched the name only, so a base registered again for other weights between the
    job's planning and its insert passed, and the job kept the revision it was planned on."""
    import shutil

    from app.services import base_models
    from tests.api.conftest import upload_chat

    other = tmp_path / "other-weights"
    shutil.copytree(tiny_model_dir, other)
    base_models.register(session, settings=get_settings(), name="racing-base", source=f"path:{tiny_model_dir}",
                         check_allowed=False)
    session.commit()
    training_file = upload_chat(client)

    def register_again() -> str:
        base_models.remove(session, settings=get_settings(), name="racing-base")
        base_models.register(session, settings=get_settings(), name="racing-base", source=f"path:{other}",
                             check_allowed=False)
        session.commit()
        return "again"

    done = _during_planning(monkeypatch, register_again)
    refused = client.post("/v1/fine_tuning/jobs", json={"model": "racing-base", "training_file": training_file})
    assert done == ["again"]
    assert refused.status_code == 400, refused.text
    assert (refused.json()["error"]["code"], refused.json()["error"]["param"]) == ("model_not_available", "model")
