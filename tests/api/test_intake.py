"""Dataset intake through the HTTP API: streaming multipart, size limit, formats, background validation,
content-addressed storage and token statistics; and through a real uvicorn server, a 300 MB upload with
flat server memory and an oversized one refused mid-stream."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.core.config import get_settings
from app.models import Blob, BlobChunk, File
from app.services.intake import validate_job_files
from tests.api.conftest import upload, upload_chat
from tests.support.data import chat_lines, jsonl, preference_lines
from tests.support.races import landing_before

BOUNDARY = "tuneforge-test-boundary"


def multipart(parts: list[tuple[str, bytes | Iterator[bytes]]], *, filename: str = "train.jsonl") -> Iterator[bytes]:
    """A multipart/form-data body, streamed (no Content-Length), with parts in the given order."""
    for name, value in parts:
        if name == "file":
            yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                   "Content-Type: application/jsonl\r\n\r\n").encode()
            yield from ([value] if isinstance(value, bytes) else value)
            yield b"\r\n"
        else:
            assert isinstance(value, bytes)
            yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def post_multipart(client: TestClient, parts: list[tuple[str, Any]], **params: str) -> Any:
    return client.post("/v1/files", content=multipart(parts), params=params,
                       headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


def leftovers() -> tuple[int, int]:
    """(blobs of uploaded files, staging chunks) in storage, counted outside the test's transaction."""
    from app.core.db import get_sessionmaker

    with get_sessionmaker()() as db:
        blobs = db.scalar(select(func.count()).select_from(Blob).where(Blob.key.like("files/%")))
        staging = db.scalar(select(func.count()).select_from(BlobChunk).where(BlobChunk.key.like("staging/%")))
    return int(blobs or 0), int(staging or 0)


def create_job(client: TestClient, file_id: str, **hyperparameters: Any) -> Any:
    body: dict[str, Any] = {"model": "tiny-llama", "training_file": file_id}
    if hyperparameters:
        body["method"] = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
    return client.post("/v1/fine_tuning/jobs", json=body)


def test_purpose_may_come_before_or_after_the_file(client: TestClient) -> None:
    content = jsonl(chat_lines(12))
    for parts in ([("purpose", b"fine-tune"), ("file", content)], [("file", content), ("purpose", b"fine-tune")]):
        response = post_multipart(client, parts)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "processed" and body["bytes"] == len(content) and body["filename"] == "train.jsonl"
        assert client.get(f"/v1/files/{body['id']}/content").content == content


def test_a_bad_or_missing_purpose_after_the_file_leaves_nothing_behind(client: TestClient) -> None:
    before = leftovers()
    content = jsonl(chat_lines(12))
    response = post_multipart(client, [("file", content), ("purpose", b"assistants")])
    assert response.status_code == 400 and response.json()["error"]["param"] == "purpose"
    response = post_multipart(client, [("file", content)])
    assert response.status_code == 400
    assert response.json()["error"] == {"message": "Missing required parameter: 'purpose'.",
                                        "type": "invalid_request_error", "param": "purpose",
                                        "code": "missing_required_parameter"}
    response = post_multipart(client, [("purpose", b"fine-tune")])
    assert response.status_code == 400 and response.json()["error"]["param"] == "file"
    assert client.get("/v1/files").json()["data"] == [] and leftovers() == before


def test_upload_over_the_size_limit_is_413_while_reading_and_leaves_nothing(
        client: TestClient, session: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "max_upload_bytes", 3 * 1024 * 1024)
    before = leftovers()
    block = jsonl(chat_lines(1000))

    # ~3.5 MB: past the file limit, within the body limit the middleware allows for multipart framing (the
    # test client sends the body in one piece; test_streaming_upload_* streams through a real server).
    content = (block * 40)[:3_600_000]
    response = post_multipart(client, [("purpose", b"fine-tune"), ("file", content)])
    assert response.status_code == 413
    assert response.json()["error"] == {
        "message": f"The file exceeds the maximum upload size of {3 * 1024 * 1024} bytes.",
        "type": "invalid_request_error", "param": "file", "code": "file_too_large"}
    assert session.scalar(select(func.count()).select_from(File)) == 0
    assert leftovers() == before
    # A declared Content-Length that is too large is refused before the body is read.
    declared = upload(client, block * 30)
    assert declared.status_code == 413
    assert client.get("/v1/files").json()["data"] == [] and leftovers() == before


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
FORMATS: dict[str, dict[str, Any]] = {
    "chat": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello", "weight": 1}]},
    "tool_calls": {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                                {"role": "assistant", "tool_calls": [CALL]},
                                {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "grey"}'},
                                {"role": "assistant", "content": "Grey skies."}],
                   "tools": [{"type": "function", "function": {"name": "get_weather"}}]},
    "prompt_completion": {"prompt": "2+2=", "completion": "4"},
    "text": {"text": "Once upon a time."},
    "preference": {"input": {"messages": [{"role": "user", "content": "Hi"}]},
                   "preferred_output": [{"role": "assistant", "content": "Hello!"}],
                   "non_preferred_output": [{"role": "assistant", "content": "What?"}]},
}


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_each_format_is_detected_and_accepted(client: TestClient, kind: str) -> None:
    rows = [json.loads(json.dumps(FORMATS[kind]).replace("Hi", f"Hi {i}")) for i in range(12)]
    body = upload(client, jsonl(rows)).json()
    assert body["status"] == "processed", body
    report = client.get(f"/v1/files/{body['id']}/validation_report").json()["report"]
    assert report["format"] == ("chat" if kind == "tool_calls" else kind) and report["examples"] == 12


def test_a_file_mixing_formats_is_an_error(client: TestClient) -> None:
    body = upload(client, jsonl([FORMATS["chat"], FORMATS["text"], FORMATS["prompt_completion"]])).json()
    assert body["status"] == "error" and "mixed_formats" in body["status_details"]
    report = client.get(f"/v1/files/{body['id']}/validation_report").json()["report"]
    assert [(e["line"], e["code"]) for e in report["errors"]] == [(2, "mixed_formats"), (3, "mixed_formats")]
    response = create_job(client, body["id"])
    assert response.status_code == 400 and response.json()["error"]["param"] == "training_file"


def test_identical_uploads_share_one_blob_until_the_last_is_deleted(client: TestClient, session: Any) -> None:
    content = jsonl(chat_lines(12))
    first, second = (upload(client, content).json() for _ in range(2))
    assert first["id"] != second["id"] and first["sha256"] == second["sha256"]
    keys = {session.scalar(select(File.blob_key).where(File.id == f["id"])) for f in (first, second)}
    assert len(keys) == 1
    key = keys.pop()
    assert client.delete(f"/v1/files/{first['id']}").status_code == 200
    assert client.get(f"/v1/files/{second['id']}/content").content == content
    assert client.delete(f"/v1/files/{second['id']}").status_code == 200
    from app.core.storage import get_storage

    assert get_storage().size(key) is None


def test_the_same_bytes_validated_by_an_older_validator_are_validated_again(client: TestClient, session: Any) -> None:
    """Found by a review: a new upload of bytes uploaded before a release reused the earlier report, so the checks the
    release added (here invalid_tools) never ran on them."""
    rows = chat_lines(12)
    rows[3]["tools"] = ["get_weather"]
    content = jsonl(rows)
    first = upload(client, content).json()
    assert first["status"] == "error"
    earlier = session.scalar(select(File).where(File.id == first["id"]))
    report = {k: v for k, v in earlier.report.items() if k != "validator"}  # as the release before wrote it
    earlier.status, earlier.status_details = "processed", None
    earlier.report = {**report, "error_count": 0, "errors": [], "errors_by_code": {}, "examples": 12}
    session.commit()
    again = upload(client, content).json()
    assert again["status"] == "error" and "invalid_tools" in str(
        client.get(f"/v1/files/{again['id']}/validation_report").json()["report"]["errors_by_code"])


def big_chat_file(n: int, *, bad_line: int | None = None) -> bytes:
    rows: list[Any] = [{"messages": [{"role": "user", "content": f"question {i} " + "word " * 40},
                                     {"role": "assistant", "content": f"answer {i}"}]} for i in range(n)]
    if bad_line is not None:
        rows[bad_line] = {"messages": [{"role": "user", "content": "no answer"}]}
    return jsonl(rows)


def test_large_upload_is_validated_by_the_worker_before_the_job_is_queued(
        client: TestClient, session: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = get_settings()
    monkeypatch.setattr(settings, "intake_sync_validation_bytes", 1)
    content = big_chat_file(12_000)  # ~3 MB: the first MiB is checked during the upload
    body = upload(client, content).json()
    assert body["status"] == "uploaded" and "whole file is validated" in body["status_details"]
    job = create_job(client, body["id"]).json()
    assert job["status"] == "validating_files"
    assert validate_job_files(session, job_id=job["id"], settings=settings) is True
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "queued"
    file = client.get(f"/v1/files/{body['id']}").json()
    assert file["status"] == "processed" and "status_details" not in file  # absent, not null (OpenAI schema)
    report = client.get(f"/v1/files/{body['id']}/validation_report").json()["report"]
    assert report["examples"] == 12_000 and report["partial"] is False


def test_auto_settings_decided_from_the_part_validated_at_upload_are_decided_again_from_the_whole_file(
        client: TestClient, session: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = get_settings()
    monkeypatch.setattr(settings, "intake_sync_validation_bytes", 1)
    training = upload(client, big_chat_file(12_000)).json()  # the first MiB holds about 4,000 of its examples
    validation = upload_chat(client, 12)
    seen = client.get(f"/v1/files/{training['id']}/validation_report").json()["report"]["examples"]
    assert seen < 8_333  # few enough for 3 epochs: 3 x seen is within OpenAI's 25,000 examples
    auto = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": training["id"],
                                                     "validation_file": validation}).json()
    given = create_job(client, training["id"], n_epochs=3, batch_size=4).json()
    assert auto["hyperparameters"]["n_epochs"] == 3 and given["hyperparameters"]["n_epochs"] == 3
    created = auto["method"]["supervised"]["hyperparameters"]
    assert validate_job_files(session, job_id=auto["id"], settings=settings) is True
    assert validate_job_files(session, job_id=given["id"], settings=settings) is True
    queued = client.get(f"/v1/fine_tuning/jobs/{auto['id']}").json()
    # 25,000 // 12,000: the whole file's count, as a job created after its validation would get
    assert queued["status"] == "queued" and queued["hyperparameters"]["n_epochs"] == 2
    after = queued["method"]["supervised"]["hyperparameters"]
    assert after["batch_size"] == created["batch_size"]  # creation's memory check was made for it
    assert after["n_evals"] is not None
    events = client.get(f"/v1/fine_tuning/jobs/{auto['id']}/events").json()["data"]
    assert any("12000 examples in all: n_epochs 3 -> 2" in e["message"] for e in events)
    later = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": training["id"],
                                                      "validation_file": validation}).json()
    assert {k: v for k, v in later["method"]["supervised"]["hyperparameters"].items() if k != "batch_size"} == \
        {k: v for k, v in after.items() if k != "batch_size"}
    assert client.get(f"/v1/fine_tuning/jobs/{given['id']}").json()["hyperparameters"]["n_epochs"] == 3


def test_large_upload_with_a_bad_line_late_fails_the_waiting_job_naming_training_file(
        client: TestClient, session: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = get_settings()
    monkeypatch.setattr(settings, "intake_sync_validation_bytes", 1)
    body = upload(client, big_chat_file(12_000, bad_line=11_000)).json()
    assert body["status"] == "uploaded"
    job = create_job(client, body["id"]).json()
    assert validate_job_files(session, job_id=job["id"], settings=settings) is False
    failed = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["param"] == "training_file"
    assert failed["error"]["code"] == "invalid_file" and "line 11001" in failed["error"]["message"]
    assert client.get(f"/v1/files/{body['id']}").json()["status"] == "error"


def test_a_job_on_files_validated_at_upload_is_queued_at_once(client: TestClient) -> None:
    job = create_job(client, upload_chat(client, 12)).json()
    assert job["status"] == "queued"
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert events[0]["message"] == "Files validated at upload; job queued."


def test_the_token_report_measures_with_the_jobs_model_and_warns_about_truncation(
        client: TestClient, session: Any, tiny_model_dir: Path) -> None:
    from app.models import FineTuningJob
    from app.services.intake import token_report

    file_id = upload_chat(client, 12)
    job = create_job(client, file_id, max_seq_length=16).json()
    row = session.scalar(select(FineTuningJob).where(FineTuningJob.id == job["id"]))
    events = token_report(session, row, settings=get_settings())
    level, message, data = next(e for e in events if e[1].startswith(f"training_file {file_id}:"))
    assert level == "info" and data["examples"] == 12 and data["method"] == "chat_template"
    summary = data["tokens_per_example"]
    assert 16 < summary["min"] <= summary["p50"] <= summary["p95"] <= summary["max"] < 100
    level, message, data = next(e for e in events if e[0] == "warn")
    assert data["over_max_seq_length"] == 12 and "12 example(s)" in message and "truncated" in message
    report = client.get(f"/v1/files/{file_id}/validation_report").json()["report"]
    assert report["tokens"]["tiny-llama"]["over_max_seq_length"] == {"16": 12}


def test_token_counts_match_the_trainers_tokenization(client: TestClient, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from worker.training.data import tokenize_record

    rows = chat_lines(12)
    file_id = upload(client, jsonl(rows), ).json()["id"]
    response = client.post("/v1/files", params={"model": "tiny-llama"},
                           files={"file": ("t.jsonl", jsonl(rows), "application/jsonl")}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    stats = client.get(f"/v1/files/{response.json()['id']}/validation_report").json()["report"]["tokens"]["tiny-llama"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = sorted(len(tokenize_record(r, tokenizer, train_on_inputs=False).input_ids) for r in rows)
    assert stats["tokens_per_example"]["min"] == lengths[0] and stats["tokens_per_example"]["max"] == lengths[-1]
    assert stats["total_tokens"] == sum(lengths) and stats["over_max_seq_length"] == {"1024": 0}
    assert client.get(f"/v1/files/{file_id}/validation_report").json()["report"].get("tokens") is None


def test_preference_pairs_with_identical_answers_are_reported_by_line_and_refused(client: TestClient) -> None:
    rows: list[Any] = preference_lines(12)
    for line in (4, 11):
        rows[line - 1]["non_preferred_output"] = rows[line - 1]["preferred_output"]
    body = upload(client, jsonl(rows)).json()
    assert body["status"] == "error" and "identical_outputs" in body["status_details"]
    report = client.get(f"/v1/files/{body['id']}/validation_report").json()["report"]
    assert [(e["line"], e["code"]) for e in report["errors"]] == [(4, "identical_outputs"), (11, "identical_outputs")]
    assert report["format"] == "preference" and report["examples"] == 10
    response = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": body["id"],
                                                          "method": {"type": "dpo"}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "training_file"
    assert "line 4: 'preferred_output' and 'non_preferred_output' are the same answer" in \
        response.json()["error"]["message"]


def test_preference_token_counts_match_the_trainers_tokenization(client: TestClient, session: Any,
                                                                 tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from app.core.storage import get_storage
    from app.services.tokens import record_token_stats
    from worker.training.preference import tokenize_preference

    rows: list[Any] = preference_lines(12)
    rows[3]["non_preferred_output"] = [{"role": "assistant", "content": "a much longer answer " * 5}]
    rows[7]["input"]["messages"].insert(1, {"role": "user", "content": "an earlier turn"})
    response = client.post("/v1/files", params={"model": "tiny-llama"},
                           files={"file": ("p.jsonl", jsonl(rows), "application/jsonl")}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    stats = client.get(f"/v1/files/{response.json()['id']}/validation_report").json()["report"]["tokens"]["tiny-llama"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = [tokenize_preference(r, tokenizer, max_seq_length=1024) for r in rows]
    prompts = sorted(len(p.prompt_ids) for p in pairs)
    longest = sorted(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    assert (stats["prompt_tokens"]["min"], stats["prompt_tokens"]["max"]) == (prompts[0], prompts[-1])
    assert (stats["tokens_per_example"]["min"], stats["tokens_per_example"]["max"]) == (longest[0], longest[-1])
    assert stats["total_tokens"] == sum(longest) and stats["prompt_fills_max_seq_length"] == {"1024": 0}
    # The trainer finds no room for an answer exactly where the prompt-room rule does.
    with pytest.raises(ValueError, match="no room for an answer"):
        tokenize_preference(rows[7], tokenizer, max_seq_length=prompts[-1])
    assert tokenize_preference(rows[7], tokenizer, max_seq_length=prompts[-1] + 1).chosen_ids
    row = session.scalar(select(File).where(File.id == response.json()["id"]))
    for length, lines in ((prompts[-1], [8]), (prompts[-1] + 1, [])):
        measured = record_token_stats(session, storage=get_storage(), file=row, model="tiny-llama",
                                      settings=get_settings(), max_seq_length=length)
        assert measured is not None and measured["prompt_fills_max_seq_length_lines"][str(length)] == lines
    assert set(row.report["tokens"]["tiny-llama"]["over_max_seq_length"]) == {"1024", str(prompts[-1]),
                                                                             str(prompts[-1] + 1)}


def test_upload_with_an_unknown_model_is_refused(client: TestClient) -> None:
    response = post_multipart(client, [("purpose", b"fine-tune"), ("model", b"gpt-9"), ("file", jsonl(chat_lines(12)))])
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"
    response = post_multipart(client, [("file", jsonl(chat_lines(12))), ("purpose", b"fine-tune"), ("model", b"x")])
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"
    assert client.get("/v1/files").json()["data"] == []


# -- through a real server: streamed bodies, server RSS ------------------------------------------------

STREAM_BOUNDARY = "tuneforge-stream-boundary"
UPLOAD_MB = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _body(size_mb: int) -> Iterator[bytes]:
    """A multipart body whose file is size_mb MiB of chat JSONL, generated as it is sent."""
    yield (f'--{STREAM_BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
           f'--{STREAM_BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
           "Content-Type: application/jsonl\r\n\r\n").encode()
    block = jsonl(chat_lines(8000))
    block = block[: block.rindex(b"\n", 0, 1024 * 1024) + 1]
    for i in range(size_mb * 1024 * 1024 // len(block)):
        yield block.replace(b"code ", f"c{i} ".encode(), 1)
    yield f"\r\n--{STREAM_BOUNDARY}--\r\n".encode()


@pytest.fixture
def start_server(database_url: str) -> Iterator[Any]:
    """Starts uvicorn in a subprocess on the test database with a given upload limit; returns (url, API key,
    server process). The key's project (and its files) are removed afterwards."""
    from sqlalchemy import delete

    from app.core.db import get_sessionmaker
    from app.models import Project
    from app.services.projects import create_api_key

    processes: list[subprocess.Popen[bytes]] = []
    projects: list[int] = []

    def start(limit_mb: int, log: Path | None = None) -> tuple[str, str, psutil.Process]:
        with get_sessionmaker()() as db:
            row, key = create_api_key(db, project_name=f"stream-{os.getpid()}-{time.time_ns()}")
            projects.append(row.project_pk)
            db.commit()
        port = _free_port()
        env = {**os.environ, "TUNEFORGE_MAX_UPLOAD_BYTES": str(limit_mb * 1024 * 1024)}
        output = log.open("wb") if log is not None else None
        processes.append(subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
                                           "--port", str(port), "--log-level", "warning"], env=env,
                                          stdout=output, stderr=output))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        return url, key, psutil.Process(processes[-1].pid)

    try:
        yield start
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)
        with get_sessionmaker()() as db:
            db.execute(delete(Project).where(Project.pk.in_(projects)))
            db.commit()


def _peak_rss_during(process: psutil.Process, work: Any) -> tuple[Any, int]:
    peak, done = process.memory_info().rss, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.05):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return result, peak


def _stream_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": f"multipart/form-data; boundary={STREAM_BOUNDARY}"}


@pytest.mark.slow
def test_streaming_upload_of_300_mb_keeps_server_memory_flat(start_server: Any) -> None:
    url, key, process = start_server(1024)
    with httpx.Client(base_url=url, headers=_stream_headers(key), timeout=120) as client:
        warm = client.post("/v1/files", content=_body(2))
        assert warm.status_code == 200, warm.text
        assert client.delete(f"/v1/files/{warm.json()['id']}").status_code == 200
        baseline = process.memory_info().rss

        response, peak = _peak_rss_during(process, lambda: client.post("/v1/files", content=_body(UPLOAD_MB)))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["bytes"] >= (UPLOAD_MB - 1) * 1024 * 1024 and body["status"] == "uploaded"
        growth_mb = (peak - baseline) / 1e6
        print(f"server RSS growth during a {UPLOAD_MB} MB upload: {growth_mb:.1f} MB")
        assert growth_mb < 100, growth_mb
        head = client.get(f"/v1/files/{body['id']}/content", headers={"Range": "bytes=0-99"})
        assert head.status_code == 206 and head.content.startswith(b'{"messages"')
        assert client.delete(f"/v1/files/{body['id']}").status_code == 200


def test_a_client_that_disconnects_mid_upload_leaves_nothing_and_no_traceback(start_server: Any,
                                                                             tmp_path: Path) -> None:
    """Found by an audit: a cancelled upload logged "unhandled error" and uvicorn's "Exception in ASGI application",
    two tracebacks for no fault of the server's."""
    import itertools

    log = tmp_path / "server.log"
    url, key, _process = start_server(64, log=log)
    before = leftovers()
    host, port = url.removeprefix("http://").split(":")
    part = b"".join(itertools.islice(_body(8), 3))  # the fields and two MiB of the file, of eight
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall((f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                      f"Content-Type: multipart/form-data; boundary={STREAM_BOUNDARY}\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n").encode() + f"{len(part):x}\r\n".encode() + part + b"\r\n")
        time.sleep(1.0)  # the server is reading the file: then the client goes
    deadline = time.monotonic() + 20
    while leftovers() != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers() == before  # the staged chunks went with the request
    time.sleep(1.0)
    text = log.read_text()
    assert "Traceback" not in text and "unhandled error" not in text, text
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
        assert client.get("/v1/files").json()["data"] == []


def test_streaming_upload_over_the_limit_is_refused_mid_stream_and_leaves_nothing(start_server: Any) -> None:
    url, key, _process = start_server(8)
    before = leftovers()
    with httpx.Client(base_url=url, headers=_stream_headers(key), timeout=60) as client:
        refused = client.post("/v1/files", content=_body(40))  # streamed: no Content-Length to refuse early
        assert refused.status_code == 413, refused.text
        assert refused.json()["error"] == {"message": f"The file exceeds the maximum upload size of {8 * 1024 * 1024} "
                                           "bytes.", "type": "invalid_request_error", "param": "file",
                                           "code": "file_too_large"}
        assert client.get("/v1/files").json()["data"] == []
    assert leftovers() == before


def test_token_estimate_without_a_chat_template_is_close_to_the_rendered_count(tiny_model_dir: Path) -> None:
    from app.services.tokens import load_token_counter

    files = {p.name: p.read_text() for p in tiny_model_dir.iterdir() if p.suffix in (".json", ".jinja")}
    counter = load_token_counter(files)
    assert counter is not None and counter.method == "chat_template"
    rows: list[dict[str, Any]] = [*chat_lines(5), FORMATS["tool_calls"], FORMATS["preference"]]
    exact = counter.lengths(rows)
    counter.template = None
    assert counter.method == "estimate"
    estimate = counter.lengths(rows)
    assert all(abs(e - x) <= 0.2 * x for e, x in zip(estimate, exact, strict=True)), (estimate, exact)
    assert counter.lengths([FORMATS["text"], FORMATS["prompt_completion"]])[0] > 2


def test_a_job_paused_before_its_files_were_read_whole_resumes_into_validating_files(
        client: TestClient, session: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resuming must not skip the check a pause interrupted: a job that never ran goes back to validating_files,
    and the bad line late in its file still fails it."""
    settings = get_settings()
    monkeypatch.setattr(settings, "intake_sync_validation_bytes", 1)
    body = upload(client, big_chat_file(12_000, bad_line=11_000)).json()
    job = create_job(client, body["id"]).json()
    assert job["status"] == "validating_files"
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause").json()["status"] == "paused"
    assert validate_job_files(session, job_id=job["id"], settings=settings) is False  # paused: nothing checked
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume").json()["status"] == "validating_files"
    assert validate_job_files(session, job_id=job["id"], settings=settings) is False
    failed = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["param"] == "training_file"


@pytest.mark.parametrize("bad_line", [None, 5_500])
def test_a_cancel_landing_while_the_files_are_read_stands(client: TestClient, session: Any,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          bad_line: int | None) -> None:
    """Found by an audit: the intake read the job, then wrote queued (or failed) over it through the ORM. On SQLite,
    where a read takes no lock, a cancel landing between them was overwritten: the user's cancel answered 200, then
    the job was queued and trained. The cancel lands here, in the intake's transaction, just before its own UPDATE."""
    settings = get_settings()
    monkeypatch.setattr(settings, "intake_sync_validation_bytes", 1)
    job = create_job(client, upload(client, big_chat_file(6_000, bad_line=bad_line)).json()["id"]).json()  # > 1 MiB
    assert job["status"] == "validating_files"
    with landing_before(session, "UPDATE fine_tuning_jobs",
                        f"UPDATE fine_tuning_jobs SET status = 'cancelled' WHERE id = '{job['id']}'") as landed:
        assert validate_job_files(session, job_id=job["id"], settings=settings) is False
    assert landed
    after = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert after["status"] == "cancelled" and after["error"] is None


def test_an_upload_whose_twin_is_deleted_meanwhile_keeps_its_own_bytes(client: TestClient, session: Any) -> None:
    """Found by an audit: an upload found an earlier file with the same bytes, and on SQLite (where that read locks
    nothing) a delete of that file committed, and removed the shared bytes, before the upload's row, pointing at
    them, was written: the new file had no content. The delete lands here just before the upload's insert."""
    from app.core.storage import get_storage

    content = jsonl(chat_lines(12))
    first = upload(client, content).json()
    twin_key = session.scalar(select(File.blob_key).where(File.id == first["id"]))
    def delete_the_twin(cursor: Any) -> None:
        cursor.execute(f"DELETE FROM files WHERE id = '{first['id']}'")
        get_storage().delete(twin_key)

    with landing_before(session, "INSERT INTO files", delete_the_twin) as landed:
        second = upload(client, content).json()
    assert landed and second["status"] == "processed"
    assert client.get(f"/v1/files/{second['id']}/content").content == content
