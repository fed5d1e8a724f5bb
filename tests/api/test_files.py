from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import upload, upload_chat
from tests.support.data import chat_lines, jsonl
from tests.support.races import landing_before


def test_upload_valid_chat_file_is_processed_with_report(client: TestClient) -> None:
    response = upload(client, jsonl(chat_lines(12)))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "file" and body["purpose"] == "fine-tune" and body["status"] == "processed"
    assert body["id"].startswith("file-") and body["bytes"] == len(jsonl(chat_lines(12)))
    report = client.get(f"/v1/files/{body['id']}/validation_report").json()["report"]
    assert report["format"] == "chat" and report["examples"] == 12 and report["error_count"] == 0


def test_upload_that_is_not_jsonl_is_refused_and_not_listed(client: TestClient) -> None:
    response = upload(client, b"name,age\nalice,3\n", filename="data.csv")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_file_format" and error["param"] == "file"
    assert "not JSONL" in error["message"]
    assert client.get("/v1/files").json()["data"] == []


def test_upload_with_bad_lines_reports_each_with_its_line_number(client: TestClient) -> None:
    rows = [json.dumps(r) for r in chat_lines(3)]
    rows.insert(1, "{not json")
    rows.append(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    rows.append(json.dumps({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant"}]}))
    response = upload(client, ("\n".join(rows) + "\n").encode())
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "error" and "invalid example" in body["status_details"]
    report = client.get(f"/v1/files/{body['id']}/validation_report").json()["report"]
    codes = {(e["line"], e["code"]) for e in report["errors"]}
    assert (2, "invalid_json") in codes
    assert (5, "example_missing_assistant_message") in codes
    assert (6, "unrecognized_role") in codes and (6, "missing_content") in codes
    assert report["examples"] == 3


def test_upload_with_wrong_purpose_is_refused(client: TestClient) -> None:
    response = upload(client, jsonl(chat_lines(12)), purpose="assistants")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "purpose"


def test_file_content_round_trips_and_supports_ranges(client: TestClient) -> None:
    content = jsonl(chat_lines(12))
    file_id = upload(client, content).json()["id"]
    assert client.get(f"/v1/files/{file_id}/content").content == content
    partial = client.get(f"/v1/files/{file_id}/content", headers={"Range": "bytes=10-19"})
    assert partial.status_code == 206 and partial.content == content[10:20]
    assert partial.headers["content-range"] == f"bytes 10-19/{len(content)}"
    assert client.get(f"/v1/files/{file_id}/content", headers={"Range": "bytes=999999-"}).status_code == 416


def test_list_files_pages_with_after_and_has_more(client: TestClient) -> None:
    ids = [upload_chat(client, offset=i) for i in range(5)]
    first = client.get("/v1/files", params={"limit": 2}).json()
    assert [f["id"] for f in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    assert first["first_id"] == ids[4] and first["last_id"] == ids[3]
    rest = client.get("/v1/files", params={"limit": 10, "after": first["last_id"]}).json()
    assert [f["id"] for f in rest["data"]] == ids[::-1][2:] and rest["has_more"] is False
    assert client.get("/v1/files", params={"limit": 0}).status_code == 400


def test_delete_file_removes_it(client: TestClient) -> None:
    file_id = upload_chat(client)
    response = client.delete(f"/v1/files/{file_id}")
    assert response.json() == {"id": file_id, "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{file_id}").status_code == 404


def test_another_projects_file_is_not_found(client: TestClient, other_client: TestClient) -> None:
    file_id = upload_chat(client)
    for method, path in [("get", f"/v1/files/{file_id}"), ("get", f"/v1/files/{file_id}/content"),
                         ("delete", f"/v1/files/{file_id}")]:
        response = getattr(other_client, method)(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["message"] == f"No such File object: {file_id}"
    assert client.get(f"/v1/files/{file_id}").status_code == 200


def test_missing_or_wrong_api_key_is_401_in_the_envelope(client: TestClient) -> None:
    from app.main import app

    with TestClient(app) as anonymous:
        response = anonymous.get("/v1/files")
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        response = anonymous.get("/v1/files", headers={"Authorization": "Bearer tf-wrong"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_an_empty_model_query_parameter_is_a_400_not_a_500(client: TestClient) -> None:
    response = client.post("/v1/files?model=", files={"file": ("t.jsonl", b'{"prompt": "a", "completion": "b"}\n')},
                           data={"purpose": "fine-tune"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "model" and response.json()["error"]["code"] == "model_not_available"


def test_a_file_an_unfinished_evaluation_reads_cannot_be_deleted(client: TestClient, session: Any) -> None:
    """Found by an audit: the delete succeeded and the evaluation then failed, naming the storage path."""
    from app.models import AnswerEvaluation
    from tests.api.test_models import succeeded_job

    job = succeeded_job(session)
    file_id = upload_chat(client)
    evaluation = AnswerEvaluation(id="ftevaluation-reading", job_pk=job.pk, project_pk=job.project_pk,
                                  model=job.fine_tuned_model, file_id=file_id, max_examples=4, target={},
                                  status="queued", result_files=[])
    session.add(evaluation)
    session.commit()
    for status in ("queued", "running"):
        evaluation.status = status
        session.commit()
        refused = client.delete(f"/v1/files/{file_id}")
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["code"] == "file_in_use" and error["param"] == "file_id"
        assert error["message"] == (f"File {file_id} is used by evaluation ftevaluation-reading, which has not "
                                    "finished; wait for it before deleting the file.")
    refused = client.delete(f"/v1/models/{job.fine_tuned_model}")  # nor the weights it reads
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_in_use", refused.text
    evaluation.server = "vm:1/inference"  # its inference worker is gone (no heartbeat): it would never finish
    session.commit()
    assert client.delete(f"/v1/files/{file_id}").status_code == 200
    session.refresh(evaluation)
    assert evaluation.status == "failed" and evaluation.error["code"] == "inference_failed"


def test_a_file_deleted_while_a_job_on_it_is_created_is_not_trained_on(client: TestClient, session: Any,
                                                                       monkeypatch: Any) -> None:
    """Found by an audit: creating a job read the file, then planned it (for a DPO file, tokenising it) before the
    insert, while a delete of the file found no job using it: the job was created on a deleted file, and failed
    later. The delete lands here during the planning."""
    from app.services import jobs

    file_id = upload_chat(client)
    real_check = jobs.check_fits_some_worker
    deleted: list[int] = []

    def delete_meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not deleted:
            deleted.append(client.delete(f"/v1/files/{file_id}").status_code)
        return real_check(*args, **kwargs)

    monkeypatch.setattr(jobs, "check_fits_some_worker", delete_meanwhile)
    refused = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id})
    assert deleted == [200]
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_file", "training_file")
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


@pytest.mark.parametrize("landing", ["finished", "started"])
def test_an_evaluation_its_worker_finished_meanwhile_is_not_marked_orphaned(client: TestClient, session: Any,
                                                                            landing: str) -> None:
    """Found by an audit: an evaluation whose worker's heartbeat looked stale was read, then written failed over
    whatever its worker wrote between (finished, or started by another worker)."""
    from app.core.config import get_settings
    from app.models import AnswerEvaluation
    from app.services.evaluations import unfinished_evaluation
    from tests.api.test_models import succeeded_job

    job = succeeded_job(session)
    file_id = upload_chat(client)
    evaluation = AnswerEvaluation(id="ftevaluation-racing", job_pk=job.pk, project_pk=job.project_pk,
                                  model=job.fine_tuned_model, file_id=file_id, max_examples=4, target={},
                                  status="running", result_files=[], server="vm:1/inference")  # no heartbeat
    session.add(evaluation)
    session.commit()
    change = "status = 'succeeded'" if landing == "finished" else "server = 'vm:2/inference'"
    with landing_before(session, "UPDATE answer_evaluations",
                        f"UPDATE answer_evaluations SET {change} WHERE id = 'ftevaluation-racing'") as landed:
        unfinished_evaluation(session, settings=get_settings(), project_pk=job.project_pk, file_id=file_id)
    session.refresh(evaluation)
    assert landed and evaluation.error is None
    assert evaluation.status == ("succeeded" if landing == "finished" else "running")
