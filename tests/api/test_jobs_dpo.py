"""DPO jobs through the API: OpenAI's wire format and our extensions, resolved and echoed; every incoherent
combination refused naming its parameter; files of the other method refused; the prompt-room rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.core.config import get_settings
from app.models import FineTuningJob
from app.schemas.jobs import JobCreate
from app.schemas.training import AUTO_BETA, AUTO_SIMPO_GAMMA, PreferenceConfig, TrainingConfig
from app.services import jobs as job_service
from tests.api.conftest import upload, upload_chat, upload_pairs
from tests.factories import create_job
from tests.support.data import jsonl, preference_lines

JOBS = "/v1/fine_tuning/jobs"


def dpo(client: TestClient, dpo_block: dict[str, Any] | None = None, **body: Any) -> Any:
    request = {"model": "tiny-llama", "training_file": body.pop("training_file", None) or upload_pairs(client),
               "method": {"type": "dpo", "dpo": dpo_block or {}}, **body}
    return client.post(JOBS, json=request)


def test_a_valid_dpo_request_creates_a_dpo_job(client: TestClient) -> None:
    training = upload_pairs(client)
    body = {"model": "tiny-llama", "training_file": training,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}}
    created = client.post(JOBS, json=body)
    assert created.status_code == 200, created.text
    assert created.json()["method"]["type"] == "dpo"
    stored = client.get(f"{JOBS}/{created.json()['id']}").json()
    assert stored["method"]["dpo"]["hyperparameters"]["beta"] == 0.2


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_auto_values_resolve_per_loss_type_and_echo_as_openai_does(
        client: TestClient, loss_type: str) -> None:
    response = dpo(client, {"hyperparameters": {"beta": "auto", "loss_type": loss_type}})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["method"]["type"] == "dpo" and set(job["method"]) == {"type", "dpo"}
    hyper = job["method"]["dpo"]["hyperparameters"]
    # 12 pairs: the same "auto" rules as supervised jobs for OpenAI's three, DPO's own base learning rate.
    assert (hyper["n_epochs"], hyper["batch_size"], hyper["learning_rate_multiplier"]) == (9, 4, 1.0)
    assert job["hyperparameters"] == {"n_epochs": 9, "batch_size": 4, "learning_rate_multiplier": 1.0}
    assert hyper["learning_rate"] == job_service.BASE_LEARNING_RATE["dpo"]["lora"] == 5e-6
    assert hyper["beta"] == AUTO_BETA[loss_type] == {"sigmoid": 0.1, "ipo": 0.1, "simpo": 2.0}[loss_type]
    assert hyper["loss_type"] == loss_type and hyper["label_smoothing"] == 0.0 and hyper["rpo_alpha"] is None
    assert hyper["simpo_gamma"] == (AUTO_SIMPO_GAMMA if loss_type == "simpo" else None)
    assert "packing" not in hyper and "train_on_inputs" not in hyper  # supervised-only knobs are not offered
    assert job["method"]["dpo"]["adapter"]["type"] == "lora"


def test_openai_values_and_every_applicable_extension_are_accepted(client: TestClient
                                                                   ) -> None:
    block = {
        "hyperparameters": {
            "beta": 0.25, "n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 2, "loss_type": "sigmoid",
            "label_smoothing": 0.1, "rpo_alpha": 0.5, "lr_scheduler": "cosine", "warmup_ratio": 0.1,
            "gradient_accumulation_steps": 4, "gradient_checkpointing": True, "precision": "fp32",
            "max_seq_length": 256, "eval_steps": 2, "early_stopping_patience": 2, "early_stopping_threshold": 0.01,
            "save_steps": 3, "load_best_at_end": True},
        "adapter": {"type": "qlora", "r": 8, "quantization": {"quant_type": "fp4"}},
        "evaluation": {"max_examples": 4},
    }
    response = dpo(client, block, validation_file=upload_pairs(client, offset=50), seed=3, suffix="prefs")
    assert response.status_code == 200, response.text
    echoed = response.json()["method"]["dpo"]
    assert {k: v for k, v in echoed["hyperparameters"].items() if k in block["hyperparameters"]} == {
        **block["hyperparameters"], "learning_rate_multiplier": 2.0}
    assert echoed["hyperparameters"]["learning_rate"] == pytest.approx(1e-5)  # 2 x DPO's adapter base rate
    assert echoed["adapter"]["type"] == "qlora" and echoed["adapter"]["quantization"]["quant_type"] == "fp4"
    assert echoed["evaluation"]["max_examples"] == 4


def test_the_echo_is_a_request_for_the_same_job_and_the_stored_config_round_trips(
        client: TestClient, session: Any) -> None:
    first = dpo(client, {"hyperparameters": {"loss_type": "simpo", "simpo_gamma": 0.8, "rpo_alpha": 1.0},
                         "adapter": {"type": "dora", "r": 4}}, validation_file=upload_pairs(client, offset=50))
    assert first.status_code == 200, first.text
    echoed = first.json()
    body = {name: echoed[name] for name in JobCreate.model_fields if echoed.get(name) is not None}
    assert {"method", "hyperparameters", "seed", "resources"} <= set(body)  # the deprecated three ride along
    again = client.post(JOBS, json=body)
    assert again.status_code == 200, again.text
    assert again.json()["method"] == echoed["method"]
    row = session.scalar(select(FineTuningJob).where(FineTuningJob.id == echoed["id"]))
    stored = TrainingConfig.model_validate(row.config)
    assert stored.method == "dpo" and stored.model_dump(mode="json") == row.config
    assert stored.preference == PreferenceConfig(beta=2.0, loss_type="simpo", simpo_gamma=0.8, rpo_alpha=1.0)
    assert TrainingConfig.model_validate_json(json.dumps(row.config)) == stored


def test_supervised_configs_stored_before_dpo_still_load_and_echo(client: TestClient, session: Any) -> None:
    legacy = TrainingConfig().model_dump(mode="json")
    del legacy["method"], legacy["preference"]
    config = TrainingConfig.model_validate(legacy)
    assert config.method == "supervised" and config.preference is None
    job = create_job(session, config=legacy)
    echoed = client.get(f"{JOBS}/{job.id}").json()
    assert echoed["method"]["type"] == "supervised" and set(echoed["method"]) == {"type", "supervised"}
    assert "beta" not in echoed["method"]["supervised"]["hyperparameters"]


# Each incoherent combination, and the parameter its 400 names: every one answers before the final gate.
INCOHERENT: list[tuple[dict[str, Any], str, str]] = [
    ({"hyperparameters": {"loss_type": "ipo", "label_smoothing": 0.1}},
     "method.dpo.hyperparameters.label_smoothing", "with loss_type \"sigmoid\" only"),
    ({"hyperparameters": {"loss_type": "simpo", "label_smoothing": 0.2}},
     "method.dpo.hyperparameters.label_smoothing", "with loss_type \"sigmoid\" only"),
    ({"hyperparameters": {"simpo_gamma": 0.5}}, "method.dpo.hyperparameters.simpo_gamma", "use loss_type \"simpo\""),
    ({"hyperparameters": {"loss_type": "ipo", "simpo_gamma": 1.0}}, "method.dpo.hyperparameters.simpo_gamma",
     "loss_type is 'ipo'"),
    ({"hyperparameters": {"label_smoothing": 0.5}}, "method.dpo.hyperparameters.label_smoothing", "less than 0.5"),
    ({"hyperparameters": {"beta": 0}}, "method.dpo.hyperparameters.beta",
     "beta must be \"auto\" or a number in (0, 20]"),
    ({"hyperparameters": {"beta": 25}}, "method.dpo.hyperparameters.beta", "(0, 20]"),
    ({"hyperparameters": {"beta": "high"}}, "method.dpo.hyperparameters.beta", "(0, 20]"),
    ({"hyperparameters": {"rpo_alpha": -1}}, "method.dpo.hyperparameters.rpo_alpha", "greater than or equal to 0"),
    ({"hyperparameters": {"loss_type": "kto"}}, "method.dpo.hyperparameters.loss_type", "'sigmoid', 'ipo' or 'simpo'"),
    ({"hyperparameters": {"n_epochs": 51}}, "method.dpo.hyperparameters.n_epochs", "[1, 50]"),
    ({"hyperparameters": {"early_stopping_patience": 2}}, "method.dpo.hyperparameters.early_stopping_patience",
     "needs evaluation"),
    ({"hyperparameters": {"eval_steps": 5}}, "validation_file", "set validation_file"),
    ({"adapter": {"type": "full", "r": 8}}, "method.dpo.adapter", "r configure an adapter"),
    ({"adapter": {"type": "lora", "r": 0}}, "method.dpo.adapter.r", "greater than or equal to 1"),
    ({"evaluation": {"max_examples": 3}}, "validation_file", "evaluation evaluates on the validation set"),
]


@pytest.mark.parametrize(("block", "param", "words"), INCOHERENT)
def test_each_incoherent_dpo_setting_is_refused_naming_its_parameter(
        client: TestClient, block: dict[str, Any], param: str, words: str) -> None:
    response = dpo(client, block)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, "invalid_value"), error
    assert words in error["message"], error["message"]


@pytest.mark.parametrize(("knob", "value"), [("packing", True), ("train_on_inputs", True)])
def test_supervised_only_knobs_are_unknown_to_dpo(client: TestClient, knob: str, value: Any) -> None:
    response = dpo(client, {"hyperparameters": {knob: value}})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (f"method.dpo.hyperparameters.{knob}", "unknown_parameter")
    with pytest.raises(ValueError, match=f"{knob} applies to supervised jobs"):
        TrainingConfig(method="dpo", **{knob: value})


def test_method_blocks_that_contradict_method_type_are_refused(client: TestClient) -> None:
    pairs, chat = upload_pairs(client), upload_chat(client)
    cases = [
        ({"training_file": pairs, "method": {"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 2}}}},
         "method.supervised", "set method.type to 'supervised'"),
        ({"training_file": chat, "method": {"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.2}}}},
         "method.dpo", "set method.type to 'dpo'"),
        ({"training_file": chat, "method": {"dpo": {}}}, "method.dpo", "method.type is 'supervised'"),
        ({"training_file": pairs, "method": {"type": "dpo"}, "hyperparameters": {"n_epochs": 2}}, "hyperparameters",
         "under method.dpo.hyperparameters"),
        ({"training_file": pairs, "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 3}}},
          "hyperparameters": {"n_epochs": 2}}, "hyperparameters.n_epochs", "differs from method.dpo.hyperparameters"),
        ({"training_file": pairs, "method": {"type": "dpo", "dpo": {"hyperparameters": {}}},
          "hyperparameters": {"packing": False}}, "hyperparameters.packing", "differs"),
    ]
    for body, param, words in cases:
        response = client.post(JOBS, json={"model": "tiny-llama", **body})
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (param, "invalid_value"), (body, error)
        assert words in error["message"], (body, error["message"])


def test_a_dpo_job_refuses_supervised_files_and_a_supervised_job_refuses_pairs(client: TestClient) -> None:
    chat, pairs = upload_chat(client), upload_pairs(client)
    text = upload(client, jsonl([{"text": f"Once upon a time, {i}."} for i in range(12)])).json()["id"]
    cases = [
        ({"training_file": chat, "method": {"type": "dpo"}}, "training_file", "chat examples (detected format 'chat')"),
        ({"training_file": text, "method": {"type": "dpo"}}, "training_file", "text examples (detected format 'text')"),
        ({"training_file": pairs, "validation_file": chat, "method": {"type": "dpo"}}, "validation_file",
         "detected format 'chat'"),
        ({"training_file": pairs}, "training_file", "preference (DPO) examples (detected format 'preference')"),
        ({"training_file": chat, "validation_file": pairs, "method": {"type": "supervised"}}, "validation_file",
         "detected format 'preference'"),
    ]
    for body, param, words in cases:
        response = client.post(JOBS, json={"model": "tiny-llama", **body})
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (param, "invalid_file"), (body, error)
        assert words in error["message"], (body, error["message"])
    dpo_says = client.post(JOBS, json={"model": "tiny-llama", "training_file": chat, "method": {"type": "dpo"}})
    assert "preference pairs" in dpo_says.json()["error"]["message"]


# With max_seq_length 64 on the tiny model: a pair of preference_lines is about 38 tokens (prompt 33); a long
# answer (30 words) makes one about 68, a long prompt (60 words) about 97 with a prompt of 93.
MAX_SEQ_LENGTH = 64


def pairs_file(*, long_answers: tuple[int, ...] = (), long_prompts: tuple[int, ...] = (), offset: int = 0) -> bytes:
    """12 pairs; the given 1-based lines get a long non-preferred answer, or a long prompt."""
    rows: list[Any] = preference_lines(12, offset=offset)
    for line in long_answers:
        rows[line - 1]["non_preferred_output"] = [{"role": "assistant", "content": "word " * 30}]
    for line in long_prompts:
        rows[line - 1]["input"]["messages"][-1]["content"] = "word " * 60
    return jsonl(rows)


def test_pairs_whose_prompt_leaves_no_room_for_the_answers_are_refused_with_their_lines(client: TestClient) -> None:
    bad = upload(client, pairs_file(long_prompts=(3, 9))).json()["id"]
    response = dpo(client, {"hyperparameters": {"max_seq_length": MAX_SEQ_LENGTH}}, training_file=bad)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("training_file", "prompt_too_long")
    assert f"2 pair(s) in training_file {bad} (lines 3, 9)" in error["message"]
    assert f"max_seq_length={MAX_SEQ_LENGTH}" in error["message"]
    assert "the longest prompt is 93 tokens" in error["message"]
    # The same pairs fit a longer max_seq_length; and the rule reads the validation file too.
    roomy = dpo(client, {"hyperparameters": {"max_seq_length": 128}}, training_file=bad)
    assert roomy.status_code == 200, roomy.text
    valid_bad = upload(client, pairs_file(long_prompts=(5,), offset=50)).json()["id"]
    response = dpo(client, {"hyperparameters": {"max_seq_length": MAX_SEQ_LENGTH}}, validation_file=valid_bad)
    assert response.json()["error"]["param"] == "validation_file"
    assert f"1 pair(s) in validation_file {valid_bad} (line 5)" in response.json()["error"]["message"]


def test_pairs_cut_by_max_seq_length_are_a_warning_in_the_token_report(
        client: TestClient, session: Any) -> None:
    from app.services.intake import token_report

    file_id = upload(client, pairs_file(long_answers=(2, 5))).json()["id"]
    job = dpo(client, {"hyperparameters": {"max_seq_length": MAX_SEQ_LENGTH}}, training_file=file_id).json()
    assert job["status"] == "queued", job  # measured at creation: no validating_files phase needed
    row = session.scalar(select(FineTuningJob).where(FineTuningJob.id == job["id"]))
    warnings = [(message, data) for level, message, data in token_report(session, row, settings=get_settings())
                if level == "warn"]
    assert len(warnings) == 1
    message, data = warnings[0]
    assert f"2 pair(s) in training_file {file_id} (lines 2, 5)" in message
    assert "answers will be cut at max_seq_length" in message
    assert data["lines"] == [2, 5] and data["over_max_seq_length"] == 2


def test_files_too_large_to_measure_at_creation_are_measured_in_validating_files(
        client: TestClient, session: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.services.intake import validate_job_files

    settings = get_settings()
    good = upload(client, pairs_file(long_answers=(4,))).json()["id"]
    bad = upload(client, pairs_file(long_prompts=(7,), offset=20)).json()["id"]
    monkeypatch.setattr(settings, "intake_sync_validation_bytes", 0)  # processed files, but "too large" now
    hyper = {"hyperparameters": {"max_seq_length": MAX_SEQ_LENGTH}}
    fine, failing = (dpo(client, hyper, training_file=f).json() for f in (good, bad))
    assert fine["status"] == failing["status"] == "validating_files"
    assert validate_job_files(session, job_id=fine["id"], settings=settings) is True
    assert validate_job_files(session, job_id=failing["id"], settings=settings) is False
    failed = client.get(f"{JOBS}/{failing['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "prompt_too_long"
    assert failed["error"]["param"] == "training_file" and "(line 7)" in failed["error"]["message"]


def test_fsdp_is_refused_for_dpo_naming_the_resource(client: TestClient) -> None:
    response = dpo(client, {}, resources={"processes": 2, "distributed": "fsdp"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "not available for DPO" in error["message"] and error["param"] == "resources.distributed", error


def test_a_chat_template_that_refuses_the_pairs_is_a_400_naming_the_line(client: TestClient, tiny_model_dir: Path,
                                                                          tmp_path: Path, monkeypatch: Any) -> None:
    """Found by an audit: a template's raise_exception (Gemma's, Mistral's "no system role") was undefined where the
    API counts tokens, and DPO job creation, its estimate and uploads with ?model= answered 500."""
    import shutil

    from app.core.config import CatalogueModel
    from worker.training.tiny_model import CHAT_TEMPLATE

    strict = tmp_path / "strict"
    shutil.copytree(tiny_model_dir, strict)
    (strict / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + CHAT_TEMPLATE)
    monkeypatch.setattr(get_settings(), "model_catalogue", {"tiny-strict": CatalogueModel(path=str(strict))})
    pairs = upload_pairs(client)  # their prompts start with a system message
    body = {"model": "tiny-strict", "training_file": pairs, "method": {"type": "dpo"}}
    message = (f"training_file {pairs} line 1: the chat template of 'tiny-strict' refuses the example (System role "
               "not supported); change the example or use another model.")
    for path in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/estimate"):
        refused = client.post(path, json=body)
        assert refused.status_code == 400 and refused.json()["error"] == {
            "message": message, "type": "invalid_request_error", "param": "training_file", "code": "invalid_file"}
    counted = client.post("/v1/files", params={"model": "tiny-strict"},
                          files={"file": ("p.jsonl", jsonl(preference_lines(4)))}, data={"purpose": "fine-tune"})
    assert counted.status_code == 200 and counted.json()["status"] == "processed", counted.text


def test_a_dpo_jobs_adapter_dropout_is_zero_unless_it_gives_one(client: TestClient) -> None:
    """The policy's log-probabilities are compared with the reference's, scored without dropout (TRL's default too);
    a supervised job keeps its 0.05."""
    pairs, chat = upload_pairs(client), upload_chat(client)

    def dropout(method: str, training_file: str, adapter: dict[str, Any] | None = None) -> Any:
        block = {"adapter": adapter} if adapter else {}
        job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": training_file,
                                                        "method": {"type": method, method: block}})
        assert job.status_code == 200, job.text
        return job.json()["method"][method]["adapter"]["dropout"]

    assert dropout("dpo", pairs) == 0.0
    assert dropout("dpo", pairs, {"type": "lora", "dropout": 0.1}) == 0.1
    assert dropout("dpo", pairs, {"r": 8}) == 0.0
    assert dropout("supervised", chat) == 0.05


def test_templates_using_transformers_helpers_are_counted_not_refused(client: TestClient, tiny_model_dir: Path,
                                                                      tmp_path: Path, monkeypatch: Any) -> None:
    """Found by a review: strftime_now (Mistral-Small's, SmolLM3's), the {% generation %} tag and loop controls were
    missing where the API renders a template, and their errors were taken for the example's."""
    import shutil

    from app.core.config import CatalogueModel
    from worker.training.tiny_model import CHAT_TEMPLATE

    dated = tmp_path / "dated"
    shutil.copytree(tiny_model_dir, dated)
    (dated / "chat_template.jinja").write_text(
        "{% set today = strftime_now('%Y-%m-%d') %}{% for m in messages %}{% if m['role'] == 'tool' %}{% continue %}"
        "{% endif %}{% endfor %}{% generation %}{% endgeneration %}" + CHAT_TEMPLATE)
    monkeypatch.setattr(get_settings(), "model_catalogue", {"tiny-dated": CatalogueModel(path=str(dated))})
    created = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-dated", "training_file": upload_pairs(client),
                                                        "method": {"type": "dpo"}})
    assert created.status_code == 200, created.text


def test_a_preference_file_deleted_while_a_dpo_job_measures_it_is_refused_not_a_500(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by an audit: creating a DPO job tokenises its file in the request; a delete landing meanwhile made the
    read of its bytes, or the write of its token statistics, a 500."""
    from app.services import tokens

    training = upload_pairs(client)
    real_statistics = tokens.token_statistics
    deleted: list[int] = []

    def delete_meanwhile(**kwargs: Any) -> Any:
        if not deleted:
            deleted.append(client.delete(f"/v1/files/{training}").status_code)
        return real_statistics(**kwargs)

    monkeypatch.setattr(tokens, "token_statistics", delete_meanwhile)
    refused = dpo(client, training_file=training)
    assert deleted == [200]
    assert refused.status_code == 400, refused.text
    assert (refused.json()["error"]["code"], refused.json()["error"]["param"]) == ("invalid_file", "training_file")
