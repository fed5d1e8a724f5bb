from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.api.conftest import upload_chat


def create(client: TestClient, **overrides: Any) -> Any:
    body: dict[str, Any] = {"model": "tiny-llama", "training_file": upload_chat(client)}
    body.update(overrides)
    return client.post("/v1/fine_tuning/jobs", json=body)


def test_create_job_resolves_auto_and_echoes_the_config(client: TestClient) -> None:
    response = create(client, suffix="colours", seed=7, metadata={"team": "search"})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] == "queued" and job["fine_tuned_model"] is None  # its file was validated at upload
    assert job["finished_at"] is None and job["trained_tokens"] is None and job["error"] is None
    # 12 examples: auto epochs reach at least 100 examples seen; auto batch is 4 on small data.
    assert job["hyperparameters"] == {"n_epochs": 9, "batch_size": 4, "learning_rate_multiplier": 1.0}
    supervised = job["method"]["supervised"]
    assert supervised["hyperparameters"]["learning_rate"] == 2e-4
    assert supervised["adapter"]["type"] == "lora" and supervised["adapter"]["r"] == 16
    assert job["seed"] == 7 and job["suffix"] == "colours" and job["metadata"] == {"team": "search"}
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["id"] == job["id"]


def test_create_job_accepts_every_extension_knob(client: TestClient) -> None:
    hyper = {"n_epochs": 2, "batch_size": 2, "learning_rate": 1e-3, "lr_scheduler": "cosine", "warmup_ratio": 0.1,
             "max_seq_length": 256, "packing": True, "gradient_accumulation_steps": 2}
    adapter = {"type": "qlora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
               "quantization": {"quant_type": "fp4", "double_quant": False}}
    response = create(client, method={"type": "supervised", "supervised": {"hyperparameters": hyper,
                                                                           "adapter": adapter}})
    assert response.status_code == 200, response.text
    resolved = response.json()["method"]["supervised"]
    assert resolved["hyperparameters"]["lr_scheduler"] == "cosine" and resolved["hyperparameters"]["packing"]
    assert resolved["adapter"]["quantization"]["quant_type"] == "fp4"
    assert response.json()["hyperparameters"]["learning_rate_multiplier"] == 5.0


def test_bad_requests_get_the_error_envelope_naming_the_param(client: TestClient, other_client: TestClient
                                                              ) -> None:
    file_id = upload_chat(client)
    cases = [
        ({"training_file": file_id}, "model", "missing_required_parameter"),
        ({"model": "gpt-9", "training_file": file_id}, "model", "model_not_available"),
        ({"model": "tiny-llama", "training_file": "file-nope"}, "training_file", "invalid_file"),
        ({"model": "tiny-llama", "training_file": file_id, "colour": "red"}, "colour", "unknown_parameter"),
        ({"model": "tiny-llama", "training_file": file_id, "hyperparameters": {"n_epochs": 99}},
         "hyperparameters.n_epochs", "invalid_value"),
        ({"model": "tiny-llama", "training_file": file_id, "suffix": "../etc"}, "suffix", "invalid_value"),
        ({"model": "tiny-llama", "training_file": file_id,
          "method": {"type": "supervised", "supervised": {"adapter": {"type": "lora", "r": 0}}}},
         "method.supervised.adapter.r", "invalid_value"),
        ({"model": "tiny-llama", "training_file": file_id,
          "method": {"supervised": {"hyperparameters": {"early_stopping_patience": 2}}}},
         "method.supervised.hyperparameters.early_stopping_patience", "invalid_value"),
    ]
    for body, param, code in cases:
        response = client.post("/v1/fine_tuning/jobs", json=body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (param, code), (body, error)
        assert error["type"] == "invalid_request_error" and error["message"]
    foreign = other_client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id})
    assert foreign.status_code == 400 and foreign.json()["error"]["param"] == "training_file"
    malformed = client.post("/v1/fine_tuning/jobs", content=b"{not json",
                            headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"
    assert malformed.json()["error"]["param"] is None  # not "1", the offset of the error pydantic gives as its place
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing half-created


def test_file_with_too_few_examples_or_wrong_purpose_is_refused(client: TestClient, session: Any) -> None:
    from sqlalchemy import select

    from app.models import Project
    from app.services.files import build_result_file

    small = upload_chat(client, n=3)
    response = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": small})
    assert response.status_code == 400 and response.json()["error"]["code"] == "too_few_examples"
    project = session.scalar(select(Project).where(Project.name == "team-a"))
    result = build_result_file(project_pk=project.pk, filename="ftjob-x-metrics.csv", blob_key="k", size=1,
                               sha256="0" * 64)  # a job's output, purpose fine-tune-results
    session.add(result)
    session.commit()
    response = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": result.id})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_file_purpose" and error["param"] == "training_file"
    assert "purpose 'fine-tune-results'" in error["message"]


def test_examples_with_every_answer_weighted_zero_do_not_count_without_train_on_inputs(client: TestClient) -> None:
    """Found by an audit: the file was accepted and the job queued, then the worker, dropping the examples that had
    nothing in the loss, failed it for having no trainable examples."""
    from tests.api.conftest import upload
    from tests.support.data import chat_lines, jsonl

    rows = chat_lines(12)
    for row in rows[:5]:  # 7 trainable: fewer than the 10 a job needs
        for message in row["messages"]:  # type: ignore[union-attr]
            if message["role"] == "assistant":  # type: ignore[index]
                message["weight"] = 0  # type: ignore[index]
    file = upload(client, jsonl(rows)).json()
    report = client.get(f"/v1/files/{file['id']}/validation_report").json()["report"]
    assert (report["examples"], report["examples_without_trained_answer"]) == (12, 5)
    refused = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file["id"]})
    assert refused.status_code == 400 and refused.json()["error"] == {
        "message": f"File {file['id']} has 12 example(s), 5 of them with no assistant message of weight 1 (nothing "
                   "to learn without train_on_inputs); training needs at least 10.",
        "type": "invalid_request_error", "param": "training_file", "code": "too_few_examples"}
    inputs = client.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "training_file": file["id"],
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"train_on_inputs": True}}}})
    assert inputs.status_code == 200, inputs.text  # the prompts are in the loss: every example teaches


def test_unknown_job_is_404(client: TestClient) -> None:
    for path in ["/v1/fine_tuning/jobs/ftjob-nope", "/v1/fine_tuning/jobs/ftjob-nope/events",
                 "/v1/fine_tuning/jobs/ftjob-nope/checkpoints", "/v1/fine_tuning/jobs/ftjob-nope/artifacts"]:
        response = client.get(path)
        assert response.status_code == 404 and response.json()["error"]["message"].startswith("No such"), path


def test_cancel_queued_job_then_cancel_again_is_refused(client: TestClient) -> None:
    job_id = create(client).json()["id"]
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    again = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert again.status_code == 400 and again.json()["error"]["code"] == "job_not_cancellable"
    messages = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]]
    assert messages[0] == "Job cancelled by request." and messages[-1].startswith("Created fine-tuning job")


def test_deleting_a_file_a_pending_job_needs_is_refused(client: TestClient) -> None:
    job = create(client).json()
    response = client.delete(f"/v1/files/{job['training_file']}")
    assert response.status_code == 409 and response.headers["x-should-retry"] == "false"
    assert job["id"] in response.json()["error"]["message"]


def test_idempotency_key_returns_the_same_job_and_refuses_a_different_body(client: TestClient) -> None:
    file_id = upload_chat(client)
    body = {"model": "tiny-llama", "training_file": file_id}
    first = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "k1"}).json()
    second = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "k1"}).json()
    assert first["id"] == second["id"]
    other = client.post("/v1/fine_tuning/jobs", json={**body, "suffix": "x"}, headers={"Idempotency-Key": "k1"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert len(client.get("/v1/fine_tuning/jobs").json()["data"]) == 1


def test_list_jobs_pages_and_filters_by_metadata(client: TestClient) -> None:
    ids = [create(client, metadata={"n": str(i)}).json()["id"] for i in range(3)]
    page = client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == [ids[2], ids[1]] and page["has_more"]
    rest = client.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": ids[1]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]
    filtered = client.get("/v1/fine_tuning/jobs", params={"metadata[n]": "1"}).json()
    assert [j["id"] for j in filtered["data"]] == [ids[1]]


def test_models_list_the_catalogue(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-llama"]
    assert client.get("/v1/models/tiny-llama").json()["object"] == "model"
    assert client.get("/v1/models/nope").status_code == 404


def test_an_unreachable_database_answers_503_with_retry_after(client: TestClient) -> None:
    from sqlalchemy.orm import Session

    from app.api.deps import get_session
    from app.core.db import build_engine
    from app.main import app

    down = build_engine("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")  # nothing listens on port 1
    app.dependency_overrides[get_session] = lambda: Session(bind=down)
    try:
        response = client.get("/v1/fine_tuning/jobs")
    finally:
        down.dispose()
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "database_unavailable"
    assert "retry" in response.json()["error"]["message"]


def test_pausing_a_running_job_answers_that_the_pause_is_pending(client: TestClient, session: Any) -> None:
    from sqlalchemy import select

    from app.models import FineTuningJob

    job = create(client).json()
    row = session.scalar(select(FineTuningJob).where(FineTuningJob.id == job["id"]))
    row.status, row.attempt = "running", 1  # as a worker's claim leaves it
    session.commit()
    assert job["pause_requested"] is False
    paused = client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause").json()
    assert paused["status"] == "running" and paused["pause_requested"] is True
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert events[0]["message"] == "Pause requested: the job will checkpoint and stop."


def test_events_without_data_leave_the_field_out(client: TestClient) -> None:
    job = create(client).json()
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    created = next(e for e in events if e["message"].startswith("Created fine-tuning job"))
    assert "data" not in created  # OpenAI's schema allows it absent, not null


def test_chat_and_preference_files_are_refused_for_a_model_without_a_chat_template(client: TestClient,
                                                                                     session: Any) -> None:
    """The worker renders chat examples and pairs with the model's chat template: without one the job is refused
    at creation, naming the file, and prompt/completion examples still train."""
    from sqlalchemy import select

    from app.models import RegisteredModel
    from tests.api.conftest import upload, upload_pairs
    from tests.support.data import jsonl

    assert client.get("/v1/models/tiny-llama").status_code == 200  # the catalogue imported
    model = session.scalar(select(RegisteredModel).where(RegisteredModel.name == "tiny-llama"))
    model.info = {**model.info, "has_chat_template": False}
    session.commit()
    chat = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": upload_chat(client)})
    assert chat.status_code == 400, chat.text
    error = chat.json()["error"]
    assert (error["param"], error["code"]) == ("training_file", "invalid_file") and "chat template" in error["message"]
    pairs = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": upload_pairs(client),
                                                      "method": {"type": "dpo"}})
    assert pairs.status_code == 400 and pairs.json()["error"]["param"] == "training_file", pairs.text
    completions = upload(client, jsonl([{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(12)])).json()
    plain = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": completions["id"]})
    assert plain.status_code == 200, plain.text


def test_target_modules_the_model_does_not_have_are_refused_naming_its_modules(client: TestClient) -> None:
    """A typo in target_modules is a 400 at creation (PEFT would report it only in the worker, after the weights were
    fetched): the registry read the model's module names from its safetensors headers."""
    from tests.api.conftest import upload_pairs

    def adapter(targets: list[str], method: str = "supervised", training_file: str | None = None) -> Any:
        return create(client, method={"type": method, method: {"adapter": {"type": "lora", "target_modules": targets}}},
                      **({"training_file": training_file} if training_file else {}))

    typo = adapter(["q_proj", "v_porj"])
    assert typo.status_code == 400, typo.text
    error = typo.json()["error"]
    assert (error["param"], error["code"]) == ("method.supervised.adapter.target_modules", "invalid_value")
    assert "'v_porj'" in error["message"] and "'q_proj'" not in error["message"]
    assert "q_proj, up_proj, v_proj" in error["message"]  # what the model has, to choose from
    norm = adapter(["input_layernorm"], "dpo", upload_pairs(client))  # a norm holds no matrix to adapt
    assert norm.status_code == 400 and norm.json()["error"]["param"] == "method.dpo.adapter.target_modules"
    # PEFT matches a name's end: a longer suffix and the (tied or not) output layer are fine.
    assert adapter(["self_attn.q_proj", "mlp.down_proj", "lm_head"]).status_code == 200
    assert client.get("/v1/fine_tuning/jobs").json()["data"][0]["method"]["supervised"]["adapter"][
        "target_modules"] == ["self_attn.q_proj", "mlp.down_proj", "lm_head"]


def test_a_model_registered_without_module_names_is_not_checked(client: TestClient, session: Any) -> None:
    from sqlalchemy import select

    from app.models import RegisteredModel

    assert client.get("/v1/models/tiny-llama").status_code == 200  # the catalogue imported
    model = session.scalar(select(RegisteredModel).where(RegisteredModel.name == "tiny-llama"))
    assert "q_proj" in model.info["modules"] and "input_layernorm" not in model.info["modules"]
    model.info = {**model.info, "modules": None}  # registered before the registry read them, or pickle weights
    session.commit()
    response = create(client, method={"type": "supervised", "supervised": {"adapter": {"target_modules": ["qkv"]}}})
    assert response.status_code == 200, response.text


def test_a_fine_tuned_model_id_over_its_limit_is_refused_at_creation(client: TestClient, session: Any,
                                                                     tiny_model_dir: Any) -> None:
    """Found by an audit: the job trained, then failed writing its model's id (a column of 255 characters)."""
    from app.core.config import get_settings
    from app.services import base_models

    long_name = "org/" + "a" * 200  # a legal name; with the organization, a suffix and the id's tail, too long
    base_models.register(session, settings=get_settings(), name=long_name, source=f"path:{tiny_model_dir}",
                         check_allowed=False)
    session.commit()
    file_id = upload_chat(client)
    refused = client.post("/v1/fine_tuning/jobs", json={"model": long_name, "training_file": file_id,
                                                         "suffix": "s" * 64})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "suffix" and error["code"] == "invalid_value"
    # 255, a model column's length, less ":ckpt-step-2147483647": its checkpoints' ids fit one too
    assert "would be 288 characters, over the limit of 234" in error["message"]
    longest = client.post("/v1/fine_tuning/jobs", json={"model": long_name, "training_file": file_id,
                                                         "suffix": "s" * 11})
    assert longest.status_code == 400 and "would be 235 characters" in longest.json()["error"]["message"]
    accepted = client.post("/v1/fine_tuning/jobs", json={"model": long_name, "training_file": file_id,
                                                          "suffix": "s" * 10})
    assert accepted.status_code == 200, accepted.text  # 234 characters: within the limit
