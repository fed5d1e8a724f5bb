"""The OpenAPI document says what the API answers (the black-box fuzz in tests/security checks it from outside)."""

from __future__ import annotations

from fastapi.testclient import TestClient


def test_every_error_answer_is_documented_with_the_envelope(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)  # validation errors are 400s in the envelope
            for code, answer in responses.items():
                if int(code) >= 400 and path != "/readyz":
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, code)
            if path.startswith("/v1/"):
                assert {"401", "429", "503"} <= set(responses), (method, path)
            if "{" in path:
                assert "404" in responses, (method, path)
            if path.startswith("/v1/admin/"):
                assert "403" in responses, (method, path)
    files = document["paths"]["/v1/files/{file_id}/content"]["get"]["responses"]
    assert set(files["200"]["content"]) == {"application/octet-stream"} and "416" in files
    stream = document["paths"]["/v1/fine_tuning/jobs/{fine_tuning_job_id}/events/stream"]["get"]["responses"]
    assert set(stream["200"]["content"]) == {"text/event-stream"}
    limit = next(p for p in document["paths"]["/v1/files"]["get"]["parameters"] if p["name"] == "limit")
    assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, 100)


def test_405_names_every_method_of_the_path(client: TestClient) -> None:
    for path, methods in (("/v1/files", "GET, POST"), ("/v1/webhooks/wh_1", "DELETE, GET")):
        answer = client.request("PUT", path)
        assert answer.status_code == 405
        assert answer.headers["allow"] == methods
        assert answer.json()["error"]["message"] == "Method not allowed."


def test_a_missing_body_is_named_as_such(client: TestClient) -> None:
    answer = client.post("/v1/webhooks")
    assert answer.status_code == 400
    assert answer.json()["error"] == {"message": "The request needs a JSON object body.",
                                      "type": "invalid_request_error", "param": None,
                                      "code": "missing_required_parameter"}


def test_booleans_are_not_numbers(client: TestClient) -> None:
    answer = client.post("/v1/webhooks", json={"url": "https://hooks.example.com/x", "event_types": None})
    assert answer.status_code == 200
    for body in ({"model": "tiny-llama", "training_file": "file-x", "merge": 0},
                 {"model": "tiny-llama", "training_file": "file-x", "hyperparameters": {"packing": 1}}):
        refused = client.post("/v1/fine_tuning/jobs", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_value", refused.text


def test_the_service_address_leads_to_the_dashboard(client: TestClient) -> None:
    answer = client.get("/", follow_redirects=False)
    assert answer.status_code == 307 and answer.headers["location"] == "/dashboard/"
    assert client.get("/").headers["content-type"].startswith("text/html")


def test_the_dpo_method_its_extensions_and_the_job_errors_are_documented(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert schemas["Method"]["properties"]["type"]["enum"] == ["supervised", "dpo"]
    assert {"hyperparameters", "adapter", "evaluation"} == set(schemas["DpoMethod"]["properties"])
    dpo = schemas["DpoHyperparameters"]["properties"]
    assert list(dpo)[:4] == ["n_epochs", "batch_size", "learning_rate_multiplier", "beta"]
    assert {"loss_type", "label_smoothing", "rpo_alpha", "simpo_gamma", "max_seq_length"} <= set(dpo)
    assert not {"packing", "train_on_inputs"} & set(dpo)
    assert {"const": "auto", "type": "string"} in dpo["beta"]["anyOf"]
    assert {"exclusiveMinimum": 0, "maximum": 20, "type": "number"} in dpo["beta"]["anyOf"]
    assert dpo["loss_type"]["anyOf"][0]["enum"] == ["sigmoid", "ipo", "simpo"]
    assert "sigmoid only" in dpo["label_smoothing"]["description"]
    for path in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/estimate"):
        refusal = document["paths"][path]["post"]["responses"]["400"]
        assert refusal["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
        for code in ("invalid_file", "prompt_too_long"):
            assert code in refusal["description"], (path, code)
    for path in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume"):  # both take a slot
        assert "quota_exceeded" in document["paths"][path]["post"]["responses"]["429"]["description"], path
