"""Chat completions and completions through the API, against a real inference server (the role's app and engine
on the tiny model, in a thread on a loopback port) found through the inference_servers table."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from app.core.config import get_settings
from app.core.storage import get_storage
from app.models import InferenceServer
from app.services import inference
from tests.api.conftest import upload, upload_pairs
from tests.api.test_models import succeeded_job
from tests.support.adapters import store_adapter

CHAT = [{"role": "user", "content": "code 7"}]


class ThreadServer:
    def __init__(self, generations: Any, server: Any, thread: threading.Thread, url: str) -> None:
        self.generations, self.server, self.thread, self.url = generations, server, thread, url


@pytest.fixture
def inference_server(session: Any, tiny_model_dir: Path) -> Iterator[ThreadServer]:
    """The inference role's own app and engine (real model calls), registered as a live inference server."""
    import torch
    import uvicorn

    from worker.inference.engine import Engine
    from worker.inference.server import Generations, build_app

    engine = Engine(get_settings(), storage=get_storage(), device=torch.device("cpu"),
                    base_folder=lambda name: (tiny_model_dir, False, None))
    generations = Generations(engine, max_queue=0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(build_app(generations, token="t0ken"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    inference.register_server(session, name="test/inference", hostname="test", pid=1, url=url, device="cpu",
                              token="t0ken")
    session.commit()
    yield ThreadServer(generations, server, thread, url)
    server.should_exit = True
    thread.join(timeout=10)


def sdk(client: TestClient) -> openai.OpenAI:
    """The unmodified openai SDK, talking to the in-process API."""
    key = client.headers["authorization"].removeprefix("Bearer ")
    return openai.OpenAI(api_key=key, base_url=f"{client.base_url}/v1", http_client=client, max_retries=0)


def test_without_an_inference_worker_the_answer_says_how_to_start_one(client: TestClient, session: Any) -> None:
    response = client.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": CHAT})
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "inference_unavailable"
    assert "tuneforge worker --inference" in response.json()["error"]["message"]
    assert int(response.headers["retry-after"]) >= 1
    # A server whose heartbeat is stale counts as gone.
    inference.register_server(session, name="old/inference", hostname="h", pid=1, url="http://127.0.0.1:9",
                              device="cpu", token="x")
    session.flush()
    for row in session.query(InferenceServer):
        row.heartbeat_at = time.time() - 3600
    session.commit()
    assert client.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": CHAT}).status_code == 503


def test_a_registered_server_that_is_not_listening_is_unavailable(client: TestClient, session: Any) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    inference.register_server(session, name="dead/inference", hostname="h", pid=1, url=f"http://127.0.0.1:{port}",
                              device="cpu", token="x")
    session.commit()
    response = client.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": CHAT})
    assert response.status_code == 503 and "could be reached" in response.json()["error"]["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 0}, "n"), ({"n": 9}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"),
    ({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"logprobs": True}, "logprobs"),
    ({"stream": "yes"}, "stream"), ({"messages": []}, "messages"),
    ({"n": True}, "n"), ({"max_tokens": True}, "max_tokens"), ({"temperature": True}, "temperature"),  # not 1
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
])
def test_bad_parameters_are_refused_by_name(client: TestClient, body: dict[str, Any], param: str) -> None:
    response = client.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": CHAT, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_conflicting_limits_and_a_trailing_assistant_turn_are_refused(client: TestClient) -> None:
    both = client.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": CHAT, "max_tokens": 3,
                                                     "max_completion_tokens": 3})
    assert both.status_code == 400 and "not both" in both.json()["error"]["message"]
    trailing = client.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": [
        *CHAT, {"role": "assistant", "content": "red"}]})
    assert trailing.status_code == 400 and "last message" in trailing.json()["error"]["message"]


def test_unknown_models_and_another_projects_fine_tuned_model_are_not_found(
        client: TestClient, other_client: TestClient, session: Any, inference_server: ThreadServer) -> None:
    theirs = succeeded_job(session, project_name="team-b")
    for model in ("no-such-model", theirs.fine_tuned_model, f"{theirs.fine_tuned_model}:ckpt-step-5"):
        response = client.post("/v1/chat/completions", json={"model": model, "messages": CHAT})
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "not_found"


def test_chat_completions_through_the_openai_sdk(client: TestClient, inference_server: ThreadServer) -> None:
    api = sdk(client)
    answer = api.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    assert answer.object == "chat.completion" and answer.model == "tiny-llama"
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.role == "assistant"
    assert answer.usage is not None and answer.usage.completion_tokens == 6
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 6 and answer.usage.prompt_tokens > 3
    chunks = list(api.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage


def test_choices_seeds_and_stop_sequences(client: TestClient, inference_server: ThreadServer) -> None:
    api = sdk(client)
    sampled = api.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=8, n=3, seed=11,  # type: ignore[arg-type]
                                          temperature=1.0)
    again = api.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=8, n=3, seed=11,  # type: ignore[arg-type]
                                        temperature=1.0)
    texts = [c.message.content for c in sampled.choices]
    assert [c.index for c in sampled.choices] == [0, 1, 2] and texts == [c.message.content for c in again.choices]
    assert sampled.usage is not None and sampled.usage.completion_tokens == 24
    greedy = api.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=16, temperature=0)  # type: ignore[arg-type]
    text = greedy.choices[0].message.content or ""
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = api.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=16, temperature=0, stop=stop)  # type: ignore[arg-type]
    assert cut.choices[0].message.content == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_a_fine_tuned_model_and_its_checkpoint_answer_with_their_adapters(
        client: TestClient, session: Any, inference_server: ThreadServer, tmp_path: Path, tiny_model_dir: Path) -> None:
    from app.models import File, JobArtifact, JobCheckpoint

    job = succeeded_job(session)
    storage = get_storage()
    adapter = session.query(JobArtifact).filter_by(job_pk=job.pk, name="adapter").one()
    session.get(File, adapter.file_pk).blob_key = store_adapter(tiny_model_dir, storage, tmp_path, seed=1,
                                                                key=f"artifacts/{job.id}/a1")
    checkpoint = session.query(JobCheckpoint).filter_by(job_pk=job.pk, step_number=5).one()
    checkpoint.blob_key = store_adapter(tiny_model_dir, storage, tmp_path, seed=2, key=f"checkpoints/{job.id}/c5")
    session.commit()
    api = sdk(client)
    answers = {model: api.chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0)  # type: ignore[arg-type]
               .choices[0].message.content
               for model in ("tiny-llama", job.fine_tuned_model, f"{job.fine_tuned_model}:ckpt-step-5")}
    assert len(set(answers.values())) == 3  # each set of weights answers differently
    loaded = inference_server.generations.engine.models["tiny-llama"]
    assert len(loaded.adapters) == 2  # both adapters on one copy of the base


def test_completions_with_echo_and_streaming(client: TestClient, inference_server: ThreadServer) -> None:
    api = sdk(client)
    plain = api.completions.create(model="tiny-llama", prompt="the colour of", max_tokens=5, temperature=0)
    assert plain.object == "text_completion" and plain.choices[0].finish_reason == "length"
    echoed = api.completions.create(model="tiny-llama", prompt="the colour of", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "the colour of" + plain.choices[0].text
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model="tiny-llama", prompt="the colour of", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == plain.choices[0].text


def test_a_full_queue_answers_429_and_a_too_long_prompt_400(client: TestClient,
                                                            inference_server: ThreadServer) -> None:
    generations = inference_server.generations
    with generations.turn:  # the only slot (max_queue=0) is held by a request waiting for its turn
        held = generations.submit({"base": "tiny-llama", "weights_key": None})
        assert held is not None
        busy = client.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": CHAT})
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "inference_busy"
        held[1].set()
    deadline = time.monotonic() + 10
    while generations.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    long = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "word " * 5000})
    assert long.status_code == 400, long.text
    assert long.json()["error"]["code"] == "context_length_exceeded" and long.json()["error"]["param"] == "prompt"


def test_an_evaluation_whose_inference_worker_is_gone_fails_saying_so(client: TestClient, session: Any) -> None:
    from app.models import AnswerEvaluation

    job = succeeded_job(session)
    file_id = client.post("/v1/files", files={"file": ("v.jsonl", b'{"prompt": "a", "completion": "b"}\n' * 12)},
                          data={"purpose": "fine-tune"}).json()["id"]
    path = f"/v1/fine_tuning/jobs/{job.id}/evaluations"
    unavailable = client.post(path, json={"file_id": file_id})  # no inference worker runs
    assert unavailable.status_code == 503 and unavailable.json()["error"]["code"] == "inference_unavailable"
    session.add(AnswerEvaluation(id="ftevaluation-orphan", job_pk=job.pk, project_pk=job.project_pk,
                                 model=job.fine_tuned_model, file_id=file_id, max_examples=4, target={},
                                 status="running", server="gone/inference", result_files=[]))
    session.commit()
    found = client.get(f"{path}/ftevaluation-orphan").json()
    assert found["status"] == "failed" and "stopped before it finished" in found["error"]["message"]
    assert client.get(f"{path}/ftevaluation-nope").status_code == 404


def test_the_inference_port_answers_only_with_its_token(inference_server: ThreadServer) -> None:
    import httpx

    body = {"model": "tiny-llama", "base": "tiny-llama", "weights_key": None, "full": False, "prompt": {"text": "a"},
            "max_tokens": 1, "temperature": 0, "top_p": 1, "n": 1, "stop": [], "seed": 1}
    for headers in ({}, {inference.TOKEN_HEADER: "wrong"}):
        refused = httpx.post(inference_server.url + inference.GENERATE_PATH, json=body, headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert httpx.post(inference_server.url + inference.EVALUATIONS_PATH, json={"id": "x"}).status_code == 401
    served = httpx.post(inference_server.url + inference.GENERATE_PATH, json=body,
                        headers={inference.TOKEN_HEADER: "t0ken"})
    assert served.status_code == 200 and '"type": "done"' in served.text


def test_a_request_whose_caller_gave_up_while_waiting_never_generates(inference_server: ThreadServer) -> None:
    import httpx

    generations = inference_server.generations
    body = {"model": "tiny-llama", "base": "tiny-llama", "weights_key": None, "full": False, "prompt": {"text": "a"},
            "max_tokens": 2000, "temperature": 0, "top_p": 1, "n": 1, "stop": [], "seed": 1}
    started = threading.Event()
    original = generations.engine.prepare

    def prepare(request: dict[str, Any]) -> Any:
        started.set()
        return original(request)

    generations.engine.prepare = prepare  # type: ignore[method-assign]
    with generations.turn:  # another answer is generating: this request waits for its turn
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(inference_server.url + inference.GENERATE_PATH, json=body, timeout=1.0,
                       headers={inference.TOKEN_HEADER: "t0ken"})
        time.sleep(2.0)  # the server notices the caller left while the request still waits
    deadline = time.monotonic() + 5
    while generations.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert generations.in_flight == 0 and not started.is_set()  # its place was given back; nothing was generated


def test_stream_options_without_streaming_are_refused(client: TestClient) -> None:
    """Found by an audit: accepted and ignored, where OpenAI answers 400."""
    response = client.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": CHAT,
                                                         "stream_options": {"include_usage": True}})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "stream_options" and error["code"] == "invalid_value"
    assert error["message"] == "Invalid value for 'stream_options': is only allowed when stream is true"
    completion = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "a", "stream": False,
                                                      "stream_options": {"include_usage": False}})
    assert completion.status_code == 400 and completion.json()["error"]["param"] == "stream_options"


def test_an_evaluation_takes_a_preference_file_with_the_preferred_answers_as_references(
        client: TestClient, session: Any, inference_server: ThreadServer) -> None:
    """Found by an audit: a preference file, even a DPO job's own validation file, was refused as not supervised."""
    job = succeeded_job(session)
    response = client.post(f"/v1/fine_tuning/jobs/{job.id}/evaluations", json={"file_id": upload_pairs(client)})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "queued"


def test_an_evaluation_on_text_examples_is_refused_when_asked_for(client: TestClient, session: Any) -> None:
    """Found by an audit: accepted, then failed in the inference worker, which had nothing to compare with."""
    job = succeeded_job(session)
    text = upload(client, b'{"text": "the colour of the sky"}\n' * 12).json()
    response = client.post(f"/v1/fine_tuning/jobs/{job.id}/evaluations", json={"file_id": text["id"]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "file_id" and error["code"] == "invalid_file"
    assert error["message"] == (f"File {text['id']} holds text examples, which have no answer to compare with: an "
                                "evaluation needs chat examples whose last message is the assistant's, "
                                "prompt/completion examples or preference pairs.")


def test_an_evaluation_while_every_inference_worker_is_busy_answers_429_and_leaves_nothing(
        client: TestClient, session: Any, inference_server: ThreadServer) -> None:
    """Found by an audit: it answered 503 and left a failed evaluation the client never received."""
    from app.models import AnswerEvaluation

    job = succeeded_job(session)
    file_id = upload(client, b'{"prompt": "a", "completion": "b"}\n' * 12).json()["id"]
    generations = inference_server.generations
    with generations.turn:  # the only slot (max_queue=0) is held by a request waiting for its turn
        held = generations.submit({"base": "tiny-llama", "weights_key": None})
        assert held is not None
        busy = client.post(f"/v1/fine_tuning/jobs/{job.id}/evaluations", json={"file_id": file_id})
        held[1].set()
    assert busy.status_code == 429, busy.text
    assert busy.json()["error"]["code"] == "inference_busy" and int(busy.headers["retry-after"]) >= 1
    assert busy.json()["error"]["message"] == "The inference worker's queue is full; retry shortly."
    assert session.query(AnswerEvaluation).count() == 0
    assert client.get(f"/v1/fine_tuning/jobs/{job.id}/evaluations").json()["data"] == []
