from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from app import cli_client
from app.cli import app as cli
from app.cli_client import job_request, sse_frames


def test_flags_override_the_spec_file_and_fill_the_method_block() -> None:
    spec = {"model": "tiny-llama", "training_file": "file-a", "suffix": "spec",
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4},
                                                            "adapter": {"type": "lora", "r": 4}}}}
    body = job_request(spec, model=None, training_file="file-b", validation_file=None, suffix="flag", seed=7,
                       n_epochs=2, batch_size=None, learning_rate=1e-3, adapter="dora")
    assert body["training_file"] == "file-b" and body["suffix"] == "flag" and body["seed"] == 7
    supervised = body["method"]["supervised"]
    assert supervised["hyperparameters"] == {"batch_size": 4, "n_epochs": 2, "learning_rate": 1e-3}
    assert supervised["adapter"] == {"type": "dora", "r": 4}
    assert spec["method"]["supervised"]["adapter"]["type"] == "lora"  # the loaded spec is not changed


def test_sse_frames_are_parsed_from_lines_and_comments_skipped() -> None:
    lines = ["id: ftevent-1", "event: event", 'data: {"a": 1}', "", ": keep-alive", "", "event: status",
             'data: {"status": "running"}', ""]
    frames = list(sse_frames(iter(lines)))
    assert frames == [{"id": "ftevent-1", "event": "event", "data": '{"a": 1}'},
                      {"event": "status", "data": '{"status": "running"}'}]
    assert json.loads(frames[1]["data"])["status"] == "running"


def test_create_without_model_or_file_says_what_to_give(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["jobs", "create", "--suffix", "x"], env={"TUNEFORGE_URL": "http://127.0.0.1:9"})
    assert result.exit_code == 2 and "--model and --training-file" in result.output


def test_unreachable_server_is_reported_without_a_traceback() -> None:
    result = CliRunner().invoke(cli, ["jobs", "list", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "cannot reach http://127.0.0.1:9" in result.output


def _serve(monkeypatch: pytest.MonkeyPatch, handler: Callable[[httpx.Request], httpx.Response]) -> None:
    """Point every client the CLI opens at `handler` instead of a server; no waiting between reconnects."""
    monkeypatch.setattr(cli_client, "_client", lambda url, api_key, **_: httpx.Client(
        base_url=url.rstrip("/") + "/v1", transport=httpx.MockTransport(handler)))
    monkeypatch.setattr(cli_client.time, "sleep", lambda _seconds: None)


class _CutStream(httpx.SyncByteStream):
    """An event stream that the network cuts after its first bytes."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __iter__(self) -> Iterator[bytes]:
        yield self.body
        raise httpx.ReadError("connection reset by peer")


def test_watch_gives_up_at_once_on_a_server_it_never_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    tries: list[float] = []

    def sleep(seconds: float) -> None:  # only a retry loop sleeps here: stop it rather than hang the test
        tries.append(seconds)
        if len(tries) > 3:
            raise AssertionError("jobs watch keeps retrying a server that refuses connections")

    monkeypatch.setattr(cli_client.time, "sleep", sleep)
    result = CliRunner().invoke(cli, ["jobs", "watch", "ftjob-1", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "cannot reach http://127.0.0.1:9" in result.output
    assert tries == []


def test_watch_resumes_a_cut_stream_after_the_last_event_it_saw(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("last-event-id"))
        if len(asked) == 1:
            frames = ('event: status\ndata: {"status": "running"}\n\nid: ftevent-7\nevent: event\n'
                      'data: {"type": "message", "message": "Step 1 done.", "created_at": 1}\n\n')
            return httpx.Response(200, stream=_CutStream(frames.encode()))
        return httpx.Response(200, text='event: status\ndata: {"status": "succeeded", "fine_tuned_model": "ft:m"}\n\n')

    _serve(monkeypatch, handler)
    result = CliRunner().invoke(cli, ["jobs", "watch", "ftjob-1"])
    assert result.exit_code == 0, result.output
    assert asked == [None, "ftevent-7"]
    assert "lost the event stream" in result.output and "ftjob-1 succeeded ft:m" in result.output


@pytest.mark.parametrize("connect_seconds", [0.0, cli_client.CONNECT_TIMEOUT_SECONDS])
def test_watch_gives_up_when_a_server_it_reached_stays_away(monkeypatch: pytest.MonkeyPatch,
                                                            connect_seconds: float) -> None:
    """About a minute after the stream was lost, whether the host refuses connections at once or lets each one time
    out (which took about 11 minutes when the tries were counted)."""
    asked: list[str] = []
    clock = [1000.0]

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if len(asked) == 1:
            return httpx.Response(200, stream=_CutStream(b'event: status\ndata: {"status": "running"}\n\n'))
        if len(asked) > 200:
            raise AssertionError("jobs watch keeps retrying a server that went away")
        clock[0] += connect_seconds
        raise httpx.ConnectError("connection refused")

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    _serve(monkeypatch, handler)
    monkeypatch.setattr(cli_client.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(cli_client.time, "sleep", sleep)
    result = CliRunner().invoke(cli, ["jobs", "watch", "ftjob-1", "--url", "http://tuneforge.test"])
    assert result.exit_code == 1
    waited = clock[0] - 1000.0  # from the cut to giving up
    assert cli_client.WATCH_RECONNECT_SECONDS <= waited < cli_client.WATCH_RECONNECT_SECONDS + 1.0 + connect_seconds
    assert len(asked) - 1 == math.ceil(cli_client.WATCH_RECONNECT_SECONDS / (1.0 + connect_seconds))
    assert "reconnecting (try" in result.output
    assert "cannot reach http://tuneforge.test: connection refused" in result.output


def _artifact_server(body: bytes, disposition: str | None) -> Callable[[httpx.Request], httpx.Response]:
    listing = {"object": "list", "has_more": False, "data": [
        {"object": "fine_tuning.job.artifact", "name": "metrics", "kind": "metrics", "bytes": len(body),
         "sha256": hashlib.sha256(body).hexdigest(), "created_at": 1, "file_id": "file-1"}]}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/fine_tuning/jobs/ftjob-1/artifacts":
            return httpx.Response(200, json=listing)
        assert request.url.path == "/v1/fine_tuning/jobs/ftjob-1/artifacts/metrics"
        return httpx.Response(200, content=body, headers={"content-disposition": disposition} if disposition else {})

    return handler


@pytest.mark.parametrize(("disposition", "saved"), [
    ('attachment; filename="ftjob-1-metrics.csv"', "ftjob-1-metrics.csv"),
    ('attachment; filename="../../etc/ftjob-1-metrics.csv"', "ftjob-1-metrics.csv"),  # a name, never a path
    (None, "ftjob-1-metrics.tar"),
])
def test_download_names_the_file_as_the_server_does(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    disposition: str | None, saved: str) -> None:
    body = b"step,train_loss\n1,2.5\n"
    _serve(monkeypatch, _artifact_server(body, disposition))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["jobs", "download", "ftjob-1", "--artifact", "metrics"])
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == [saved]
    assert (tmp_path / saved).read_bytes() == body
