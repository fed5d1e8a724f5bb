"""A job's echoed configuration is a valid request for the same job, and no accepted setting is silently
ignored: each combination that would do nothing is refused, naming the parameter to change."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import FineTuningJob
from app.schemas.jobs import JobCreate
from app.schemas.training import HYPERPARAMETER_FIELDS, NEEDS_VALIDATION_FILE
from tests.api.conftest import upload_chat

# Every extension set, each away from its default.
EVERYTHING: dict[str, Any] = {
    "suffix": "all-knobs", "seed": 11, "metadata": {"team": "search"}, "merge": True, "priority": 5,
    "resources": {"processes": 2, "distributed": "fsdp", "labels": ["cpu"]},
    "method": {"type": "supervised", "supervised": {
        "adapter": {"type": "dora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
                    "use_rslora": True},
        "evaluation": {"generate": True, "max_examples": 5, "max_new_tokens": 20},
        "hyperparameters": {
            "n_epochs": 2, "batch_size": 2, "learning_rate": 1e-3, "lr_scheduler": "cosine", "warmup_ratio": 0.1,
            "weight_decay": 0.01, "max_grad_norm": 0.5, "gradient_accumulation_steps": 2, "max_seq_length": 256,
            "packing": True, "train_on_inputs": True, "gradient_checkpointing": True, "precision": "fp32",
            "eval_steps": 3, "early_stopping_patience": 2, "early_stopping_threshold": 0.01, "save_steps": 4,
            "load_best_at_end": True}}},
}


def test_every_echoed_field_of_a_job_is_accepted_back_and_makes_the_same_job(client: TestClient) -> None:
    hyperparameters = EVERYTHING["method"]["supervised"]["hyperparameters"]
    assert set(hyperparameters) | {"learning_rate_multiplier", "n_evals", "n_checkpoints"} == set(HYPERPARAMETER_FIELDS)
    first = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": upload_chat(client),
                                                      "validation_file": upload_chat(client, offset=50), **EVERYTHING})
    assert first.status_code == 200, first.text
    echoed = first.json()
    # Everything the job echoes that a request can carry, sent back as it came.
    body = {name: echoed[name] for name in JobCreate.model_fields if echoed.get(name) is not None}
    assert {"method", "hyperparameters", "seed", "merge", "resources", "priority", "suffix"} <= set(body)
    second = client.post("/v1/fine_tuning/jobs", json=body)
    assert second.status_code == 200, second.text
    again = second.json()
    for name in [*body, "method"]:
        assert again[name] == echoed[name], name


def test_a_rate_over_100x_the_base_goes_back_as_echoed_and_a_multiplier_alone_stays_within_100(
        client: TestClient) -> None:
    """A learning_rate 250x DPO's adapter base rate (5e-6) echoes multiplier 250, over OpenAI's wire limit of 100:
    beside the rate it means, the echo posts back as the same job; the multiplier alone is held to 100."""
    from tests.api.conftest import upload_pairs

    pairs = upload_pairs(client)
    first = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": pairs, "method": {
        "type": "dpo", "dpo": {"hyperparameters": {"learning_rate": 1.25e-3}}}})
    assert first.status_code == 200, first.text
    echoed = first.json()
    assert echoed["hyperparameters"]["learning_rate_multiplier"] == 250.0
    body = {name: echoed[name] for name in JobCreate.model_fields if echoed.get(name) is not None}
    again = client.post("/v1/fine_tuning/jobs", json=body)
    assert again.status_code == 200, again.text
    assert again.json()["method"] == echoed["method"]
    for param, body in [
            ("hyperparameters", {"training_file": upload_chat(client),
                                 "hyperparameters": {"learning_rate_multiplier": 250}}),
            ("method.dpo.hyperparameters", {"training_file": pairs, "method": {
                "type": "dpo", "dpo": {"hyperparameters": {"learning_rate_multiplier": 250}}}})]:
        alone = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", **body})
        assert alone.status_code == 400, alone.text
        error = alone.json()["error"]
        assert error["param"] == f"{param}.learning_rate_multiplier" and "over 100" in error["message"], error


@pytest.mark.parametrize("setting", [{"eval_steps": 5}, {"n_evals": 3}, {"load_best_at_end": True, "n_evals": 2},
                                     {"early_stopping_patience": 2, "eval_steps": 2}])
def test_settings_that_evaluate_are_refused_without_a_validation_file(client: TestClient,
                                                                      setting: dict[str, Any]) -> None:
    response = client.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "training_file": upload_chat(client),
        "method": {"supervised": {"hyperparameters": setting}}})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "validation_file" and error["code"] == "invalid_value"
    named = [name for name in NEEDS_VALIDATION_FILE if name in setting]
    assert f"{', '.join(named)} evaluate" in error["message"] and "set validation_file" in error["message"]


def test_turning_the_answer_report_off_needs_no_validation_file(client: TestClient) -> None:
    response = client.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "training_file": upload_chat(client),
        "method": {"supervised": {"evaluation": {"generate": False}}}})
    assert response.status_code == 200, response.text
    assert response.json()["method"]["supervised"]["evaluation"]["generate"] is False


@pytest.mark.parametrize("evaluation", [{"max_examples": 5}, {"generate": True, "max_new_tokens": 8}])
def test_an_answer_report_setting_without_a_validation_file_is_refused(client: TestClient,
                                                                       evaluation: dict[str, Any]) -> None:
    response = client.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "training_file": upload_chat(client),
        "method": {"supervised": {"evaluation": evaluation}}})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "validation_file"
    assert "evaluation evaluates on the validation set" in response.json()["error"]["message"]
    bad = client.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "training_file": upload_chat(client), "validation_file": upload_chat(client, 50),
        "method": {"supervised": {"evaluation": {"max_examples": 0}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "method.supervised.evaluation.max_examples"


@pytest.mark.parametrize(("method", "resources", "param", "words"), [
    ({"hyperparameters": {"early_stopping_threshold": 0.1}}, None,
     "method.supervised.hyperparameters.early_stopping_threshold", "set early_stopping_patience"),
    # (with a validation file, evaluation is on by default: only n_evals 0 leaves load_best_at_end nothing to pick)
    ({"hyperparameters": {"load_best_at_end": True, "n_evals": 0}}, None,
     "method.supervised.hyperparameters.load_best_at_end", "set eval_steps or n_evals"),
    ({"adapter": {"type": "full", "r": 8}}, None, "method.supervised.adapter", "r configure an adapter"),
    ({}, {"distributed": "fsdp"}, "resources.distributed", "with one process it does nothing"),
])
def test_settings_that_would_do_nothing_are_refused_naming_what_to_change(
        client: TestClient, method: dict[str, Any], resources: dict[str, Any] | None, param: str, words: str) -> None:
    response = client.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "training_file": upload_chat(client), "validation_file": upload_chat(client, offset=50),
        "method": {"supervised": method}, **({"resources": resources} if resources else {})})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert words in response.json()["error"]["message"]


def test_the_deprecated_top_level_hyperparameters_are_named_as_sent(client: TestClient) -> None:
    response = client.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "training_file": upload_chat(client), "hyperparameters": {"n_evals": 2}})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "validation_file"
    response = client.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "training_file": upload_chat(client), "validation_file": upload_chat(client, 50),
        "hyperparameters": {"early_stopping_threshold": 0.5}})
    assert response.json()["error"]["param"] == "hyperparameters.early_stopping_threshold"


def test_a_wandb_integration_without_a_configured_key_is_refused_at_creation(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import SecretStr

    from app.core.config import get_settings

    body = {"model": "tiny-llama", "training_file": upload_chat(client),
            "integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}
    response = client.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "integrations" and error["code"] == "integration_not_configured"
    assert "TUNEFORGE_WANDB_API_KEY" in error["message"] and "TUNEFORGE_WANDB_MODE=offline" in error["message"]
    monkeypatch.setattr(get_settings(), "wandb_mode", "offline")  # runs kept on the workers: no key needed
    assert client.post("/v1/fine_tuning/jobs", json=body).status_code == 200
    monkeypatch.setattr(get_settings(), "wandb_mode", "online")
    monkeypatch.setattr(get_settings(), "wandb_api_key", SecretStr("k" * 40))
    assert client.post("/v1/fine_tuning/jobs", json=body).status_code == 200


def test_a_validation_file_gives_a_validation_curve_by_default(client: TestClient) -> None:
    train, valid = upload_chat(client), upload_chat(client, 20, offset=100)
    # 12 examples x 9 epochs: a tenth of that cannot give 16-example evaluations; the floor is two.
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": train,
                                                    "validation_file": valid}).json()
    assert job["method"]["supervised"]["hyperparameters"]["n_evals"] == 2
    # 200 x 10 = 2,000 examples trained: ten evaluations of 16 are 8% of it.
    bigger = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": upload_chat(client, 200),
                                                       "validation_file": valid, "hyperparameters": {"n_epochs": 10}})
    assert bigger.json()["method"]["supervised"]["hyperparameters"]["n_evals"] == 10
    fewer = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": upload_chat(client, 160),
                                                      "validation_file": valid, "hyperparameters": {"n_epochs": 5}})
    assert fewer.json()["method"]["supervised"]["hyperparameters"]["n_evals"] == 4  # floor(0.08 x 800 / 16)
    off = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": train,
                                                    "validation_file": valid, "hyperparameters": {"n_evals": 0}}).json()
    assert off["method"]["supervised"]["hyperparameters"]["n_evals"] == 0
    chosen = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": train,
                                                       "validation_file": valid,
                                                       "hyperparameters": {"eval_steps": 2}}).json()
    assert chosen["method"]["supervised"]["hyperparameters"].get("n_evals") is None
    without = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": train}).json()
    assert without["method"]["supervised"]["hyperparameters"].get("n_evals") is None


@pytest.mark.parametrize(("place", "value"), [
    ("method.supervised.hyperparameters.max_grad_norm", "Infinity"),
    ("method.supervised.adapter.alpha", "Infinity"),
    ("method.supervised.hyperparameters.learning_rate", "NaN"),
])
def test_a_number_that_is_not_finite_is_refused_naming_its_field(client: TestClient, session: Session, place: str,
                                                                 value: str) -> None:
    """Python's json (and the SDKs over it) writes Infinity and NaN: refused with a 400 that names the field,
    before anything is stored (Postgres's JSON cannot hold them)."""
    body: dict[str, Any] = {"model": "tiny-llama", "training_file": upload_chat(client)}
    *path, name = place.split(".")
    node = body
    for key in path:
        node = node.setdefault(key, {})
    node[name] = 1.0
    raw = json.dumps(body).replace(f'"{name}": 1.0', f'"{name}": {value}')
    before = session.scalar(select(func.count()).select_from(FineTuningJob))
    for endpoint in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/estimate"):
        response = client.post(endpoint, content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == place and error["type"] == "invalid_request_error", error
    assert session.scalar(select(func.count()).select_from(FineTuningJob)) == before


@pytest.mark.parametrize(("extra", "param"), [
    ({"method": {"supervised": {"hyperparameters": {"learning_rate": 1e-3, "learning_rate_multiplier": 2}}}},
     "method.supervised.hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"n_epochs": 2}, "method": {"supervised": {"hyperparameters": {"n_epochs": 3}}}},
     "hyperparameters.n_epochs"),
    ({"method": {"supervised": {"hyperparameters": {"save_steps": 3, "n_checkpoints": 5}}}},
     "method.supervised.hyperparameters.n_checkpoints"),
])
def test_a_setting_another_one_overrides_is_refused(client: TestClient, extra: dict[str, Any], param: str) -> None:
    """Each of these would be ignored beside the other: a rate and a multiplier that disagree, a top-level
    hyperparameter that differs from the method's, a checkpoint count beside save_steps."""
    response = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": upload_chat(client),
                                                          **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()


def test_a_rule_added_for_requests_leaves_stored_jobs_readable() -> None:
    """A stored config is held to the rules it was created under: one saved with save_steps and n_checkpoints
    before they were refused together still loads (the job, its list and its worker read it)."""
    from pydantic import ValidationError

    from app.schemas.training import TrainingConfig

    stored = {"save_steps": 3, "n_checkpoints": 5}
    assert TrainingConfig.model_validate(stored).n_checkpoints == 5
    with pytest.raises(ValidationError, match="give save_steps or n_checkpoints"):
        TrainingConfig.model_validate(stored, context={"validation_file": False})


@pytest.mark.parametrize("name", ["n_epochs", "batch_size", "learning_rate_multiplier"])
def test_true_is_not_a_number_of_epochs(client: TestClient, name: str) -> None:
    """JSON's true is no integer: Python would read it as 1, the request is refused naming the field."""
    response = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": upload_chat(client),
                                                          "hyperparameters": {name: True}})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == f"hyperparameters.{name}"


@pytest.mark.parametrize(("extra", "param"), [
    ({"seed": True}, "seed"),
    ({"method": {"supervised": {"hyperparameters": {"max_seq_length": True}}}},
     "method.supervised.hyperparameters.max_seq_length"),
    ({"method": {"supervised": {"adapter": {"r": True}}}}, "method.supervised.adapter.r"),
    ({"resources": {"processes": True}}, "resources.processes"),
    ({"method": {"supervised": {"hyperparameters": {"n_checkpoints": 2.0}}}},
     "method.supervised.hyperparameters.n_checkpoints"),
    ({"method": {"supervised": {"hyperparameters": {"learning_rate": True}}}},
     "method.supervised.hyperparameters.learning_rate"),
    ({"method": {"supervised": {"adapter": {"alpha": True}}}}, "method.supervised.adapter.alpha"),
])
def test_every_number_setting_refuses_true(client: TestClient, extra: dict[str, Any], param: str) -> None:
    """tuneforge's number settings, like OpenAI's, refuse true (which Python reads as 1), and its integer ones 2.0."""
    response = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": upload_chat(client),
                                                          **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()
