"""The `tuneforge files|jobs|models` client commands: talk to any tuneforge URL over its /v1 API."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import IO, Annotated, Any
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

files_app = typer.Typer(help="Upload and list datasets.", no_args_is_help=True)
jobs_app = typer.Typer(help="Create, follow and control fine-tuning jobs.", no_args_is_help=True)
models_app = typer.Typer(help="Base and fine-tuned models.", no_args_is_help=True)
admin_app = typer.Typer(help="Operator views of the whole service (needs an admin API key).", no_args_is_help=True)

console = Console()
TERMINAL = ("succeeded", "failed", "cancelled")
# A job's trained weights: an adapter job's `adapter`, a full fine-tune's `model`.
MAIN_ARTIFACTS = ("adapter", "model")
CHUNK = 1024 * 1024

Url = Annotated[str, typer.Option("--url", envvar="TUNEFORGE_URL", help="The tuneforge server.")]
ApiKey = Annotated[str, typer.Option("--api-key", envvar="TUNEFORGE_API_KEY", show_default=False,
                                     help="API key (keyless local servers accept any).")]
DEFAULT_URL = "http://127.0.0.1:8000"
# `jobs watch` after its stream was cut: one try a second, for this long without an answer, so a restarting API has
# about a minute to come back before the command gives up (a proxy's idle cut comes back at the first try). Timed,
# not counted: against a host that accepts no connections each try waits CONNECT_TIMEOUT_SECONDS.
WATCH_RECONNECT_SECONDS = 60.0
# A stream waits for events without limit, but a host that never answers the connection must not hang the CLI.
CONNECT_TIMEOUT_SECONDS = 10.0


class ClientError(Exception):
    """A request the server refused; the message is the server's."""


def _client(url: str, api_key: str, *, timeout: float | httpx.Timeout | None = 60.0) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key or 'local'}"}
    return httpx.Client(base_url=url.rstrip("/") + "/v1", headers=headers, timeout=timeout)


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500] or response.reason_phrase
    raise ClientError(f"{response.status_code}: {message}")


def _call(url: str, api_key: str, method: str, path: str, **kwargs: Any) -> Any:
    try:
        with _client(url, api_key) as client:
            return _check(client.request(method, path, **kwargs)).json()
    except ClientError as exc:
        console.print(f"[red]error[/red] {exc}")
        raise typer.Exit(1) from None
    except httpx.HTTPError as exc:
        console.print(f"[red]error[/red] cannot reach {url}: {exc}")
        raise typer.Exit(1) from None


def _table(*columns: str) -> Table:
    """A table whose first column (the id people copy) never wraps."""
    table = Table()
    for i, name in enumerate(columns):
        table.add_column(name, no_wrap=i == 0, min_width=30 if i == 0 else None)
    return table


def _when(seconds: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds)) if seconds else "-"


class _ProgressReader:
    """A file whose reads advance a progress bar (httpx streams multipart parts by read())."""

    def __init__(self, file: IO[bytes], progress: Progress, task: Any) -> None:
        self.file, self.progress, self.task = file, progress, task

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.progress.advance(self.task, len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()


def _transfer_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=console)


# --- files -------------------------------------------------------------------------------------------


@files_app.command("upload")
def upload_file(path: Path, purpose: str = "fine-tune", url: Url = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Upload a JSONL dataset (progress bar); prints the file id and its validation status."""
    if not path.is_file():
        raise typer.BadParameter(f"{path} is not a file", param_hint="PATH")
    with _transfer_progress() as progress, path.open("rb") as raw:
        size = path.stat().st_size
        task = progress.add_task(f"upload {path.name}", total=size)
        reader = _ProgressReader(raw, progress, task)
        started = time.monotonic()
        row = _call(url, api_key, "POST", "/files", files={"file": (path.name, reader, "application/jsonl")},
                    data={"purpose": purpose})
        # Rich measures speed between reads; a file sent in one read has none ("0 bytes/s"). The rate shown is
        # the whole request's: bytes over the time until the server had stored and validated them.
        progress.tasks[task].finished_speed = size / max(time.monotonic() - started, 1e-6)
    console.print(f"{row['id']}\t{row['status']}" + (f"\t{row['status_details']}" if row.get("status_details")
                                                      else ""))
    if row["status"] == "error":  # stored, but no job can use it: a script must not carry on
        console.print(f"[red]error[/red] {path} failed validation; GET /v1/files/{row['id']}/validation_report "
                      "lists every problem with its line number")
        raise typer.Exit(1)


@files_app.command("list")
def list_files(url: Url = DEFAULT_URL, api_key: ApiKey = "", limit: int = 100) -> None:
    """List uploaded files, newest first."""
    page = _call(url, api_key, "GET", "/files", params={"limit": limit})
    table = _table("id", "filename", "purpose", "bytes", "status", "created")
    for row in page["data"]:
        table.add_row(row["id"], row["filename"], row["purpose"], str(row["bytes"]), row["status"],
                      _when(row["created_at"]))
    console.print(table)


# --- jobs --------------------------------------------------------------------------------------------


def job_request(spec: dict[str, Any], *, model: str | None, training_file: str | None, validation_file: str | None,
                suffix: str | None, seed: int | None, n_epochs: int | None, batch_size: int | None,
                learning_rate: float | None, adapter: str | None, priority: int | None = None,
                gpus: int | None = None, labels: list[str] | None = None) -> dict[str, Any]:
    """The create body: the spec file's, with every given flag on top."""
    body = copy.deepcopy(spec)
    for key, value in (("model", model), ("training_file", training_file), ("validation_file", validation_file),
                       ("suffix", suffix), ("seed", seed), ("priority", priority)):
        if value is not None:
            body[key] = value
    if gpus is not None:
        body.setdefault("resources", {})["gpus"] = gpus
    if labels:
        body.setdefault("resources", {})["labels"] = labels
    hyper = {k: v for k, v in (("n_epochs", n_epochs), ("batch_size", batch_size),
                               ("learning_rate", learning_rate)) if v is not None}
    if hyper or adapter:
        method = body.setdefault("method", {"type": "supervised"})
        supervised = method.setdefault("supervised", {})
        supervised.setdefault("hyperparameters", {}).update(hyper)
        if adapter:
            supervised.setdefault("adapter", {})["type"] = adapter
    return body


def _load_spec(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        loaded = yaml.safe_load(text)
    else:
        loaded = json.loads(text)
    if not isinstance(loaded, dict):
        raise typer.BadParameter(f"{path} must hold one object (the job request)", param_hint="--spec")
    return loaded


@jobs_app.command("create")
def create_job(spec: Annotated[Path | None, typer.Option(help="YAML or JSON job request; flags override it.")] = None,
               model: str | None = None, training_file: str | None = None, validation_file: str | None = None,
               suffix: str | None = None, seed: int | None = None, n_epochs: int | None = None,
               batch_size: int | None = None, learning_rate: float | None = None,
               adapter: Annotated[str | None, typer.Option(help="lora | qlora | dora | full")] = None,
               priority: Annotated[int | None, typer.Option(help="-100..100; higher runs first.")] = None,
               gpus: Annotated[int | None, typer.Option(help="GPUs on one worker (one process each).")] = None,
               label: Annotated[list[str] | None, typer.Option(help="A worker label the job needs (repeat).")] = None,
               estimate: Annotated[bool, typer.Option(
                   "--estimate", help="Print tokens, steps, peak memory and fitting workers; create nothing.")] = False,
               idempotency_key: str | None = None, url: Url = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Create a fine-tuning job from flags or a spec file; prints its id and status (or, with --estimate,
    what it would cost)."""
    body = job_request(_load_spec(spec) if spec else {}, model=model, training_file=training_file,
                       validation_file=validation_file, suffix=suffix, seed=seed, n_epochs=n_epochs,
                       batch_size=batch_size, learning_rate=learning_rate, adapter=adapter, priority=priority,
                       gpus=gpus, labels=label)
    if "model" not in body or "training_file" not in body:
        raise typer.BadParameter("give --model and --training-file (or put them in --spec)")
    if estimate:
        print_estimate(_call(url, api_key, "POST", "/fine_tuning/jobs/estimate", json=body))
        return
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    job = _call(url, api_key, "POST", "/fine_tuning/jobs", json=body, headers=headers)
    console.print(f"{job['id']}\t{job['status']}")


def print_estimate(found: dict[str, Any]) -> None:
    tokens = f"{found['tokens']} tokens" if found["tokens"] is not None else "tokens unknown (upload with ?model=)"
    typer.echo(f"{found['model']} ({found['method']}): {found['examples']} examples, {tokens}; "
               f"{found['n_epochs']} epochs x {found['batches_per_epoch'] or '?'} batches of {found['batch_size']} "
               f"-> {found['steps'] or '?'} steps")
    memory = found["memory"]
    if memory is None:
        typer.echo("peak memory: unknown (the model's shape was not read)")
    else:
        parts = ", ".join(f"{k.removesuffix('_gib')} {v:.2f}" for k, v in memory.items()
                          if k.endswith("_gib") and k != "total_gib" and v)
        typer.echo(f"peak accelerator memory per process: {memory['total_gib']:.2f} GiB at {memory['precision']} "
                   f"({parts}); {memory['trainable_parameters']:,} trainable parameters")
    for worker in found["workers"]:
        verdict = {True: "fits", False: "does not fit", None: "no GPU memory stated"}[worker["fits"]]
        gpu = f"{worker['gpus']} GPU x {worker['gpu_memory_gb']:g} GiB" if worker["gpu_memory_gb"] else "no GPU"
        typer.echo(f"  {worker['name']}: {gpu}: {verdict}")


@jobs_app.command("list")
def list_jobs(url: Url = DEFAULT_URL, api_key: ApiKey = "", limit: int = 20) -> None:
    """List jobs, newest first, with their progress."""
    page = _call(url, api_key, "GET", "/fine_tuning/jobs", params={"limit": limit})
    table = _table("id", "status", "model", "step", "fine_tuned_model", "created")
    for job in page["data"]:
        progress = job.get("progress") or {}
        step = f"{progress.get('step', 0)}/{progress.get('total_steps') or '?'}"
        table.add_row(job["id"], job["status"], job["model"], step, job.get("fine_tuned_model") or "-",
                      _when(job["created_at"]))
    console.print(table)


@jobs_app.command("get")
def get_job(job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Print a job as JSON."""
    console.print_json(data=_call(url, api_key, "GET", f"/fine_tuning/jobs/{job_id}"))


def _action(job_id: str, action: str, url: str, api_key: str) -> None:
    job = _call(url, api_key, "POST", f"/fine_tuning/jobs/{job_id}/{action}")
    console.print(f"{job['id']}\t{job['status']}")


@jobs_app.command("cancel")
def cancel_job(job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Cancel a job."""
    _action(job_id, "cancel", url, api_key)


@jobs_app.command("pause")
def pause_job(job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Pause a job (it checkpoints first)."""
    _action(job_id, "pause", url, api_key)


@jobs_app.command("resume")
def resume_job(job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Resume a paused job from its last checkpoint."""
    _action(job_id, "resume", url, api_key)


def sse_frames(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Server-Sent Events frames ({"event", "id", "data"}) from a stream of lines."""
    frame: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in frame:
                yield frame
            frame = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            frame[name] = frame[name] + "\n" + value if name == "data" and "data" in frame else value
    if "data" in frame:
        yield frame


@jobs_app.command("watch")
def watch_job(job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Follow a job live (status, step/total, loss, ETA) until it finishes; exit 0 only if it succeeded."""
    last_id: str | None = None
    state: dict[str, Any] = {"status": "?"}
    loss: float | None = None
    quality = ""  # a DPO job's preference accuracy and reward margin
    progress = Progress(TextColumn("{task.fields[status]:<10}"), BarColumn(), TaskProgressColumn(),
                        TextColumn("step {task.completed:.0f}/{task.fields[total_label]}"),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[quality]}"),
                        TextColumn("ETA {task.fields[eta]}"), console=console)
    connected = False
    lost_at: float | None = None  # when the stream was lost (time.monotonic), since the last answer from the server
    failed_tries = 0
    timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT_SECONDS)
    with progress, _client(url, api_key, timeout=timeout) as client:
        task = progress.add_task(job_id, total=None, status="?", total_label="?", loss="-", eta="-", quality="")
        while state["status"] not in TERMINAL:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with client.stream("GET", f"/fine_tuning/jobs/{job_id}/events/stream", headers=headers) as response:
                    connected, lost_at, failed_tries = True, None, 0
                    if not response.is_success:
                        response.read()
                        _check(response)
                    for frame in sse_frames(response.iter_lines()):
                        data = json.loads(frame["data"])
                        if frame.get("event") == "status":
                            state = data
                        else:
                            last_id = frame.get("id") or last_id
                            if data["type"] == "metrics" and isinstance((data.get("data") or {}).get("train_loss"),
                                                                        int | float):
                                loss = float(data["data"]["train_loss"])
                                quality = _preference_figures(data["data"]) or quality
                            elif data["type"] != "metrics":
                                progress.console.print(f"[dim]{_when(data['created_at'])}[/dim] {data['message']}")
                        step = (state.get("progress") or {}).get("step") or 0
                        total = (state.get("progress") or {}).get("total_steps")
                        eta = state.get("estimated_finish")
                        progress.update(task, completed=step, total=total, status=state["status"],
                                        total_label=total or "?", loss=f"{loss:.4f}" if loss is not None else "-",
                                        quality=quality,
                                        eta=f"{max(0, int(eta - time.time()))}s" if eta else "-")
            except ClientError as exc:
                console.print(f"[red]error[/red] {exc}")
                raise typer.Exit(1) from None
            except httpx.TransportError as exc:
                # Never reached: a wrong URL or a server that is down, as `jobs get` says. Reached before: the
                # server restarted or a proxy cut the stream, so try again (resuming after last_id), for a while.
                now = time.monotonic()
                lost_at = now if lost_at is None else lost_at
                failed_tries += 1
                if not connected or now - lost_at >= WATCH_RECONNECT_SECONDS:
                    console.print(f"[red]error[/red] cannot reach {url}: {exc}")
                    raise typer.Exit(1) from None
                console.print(f"[yellow]lost the event stream[/yellow] ({exc or type(exc).__name__}); reconnecting "
                              f"(try {failed_tries}, {now - lost_at:.0f} s of {WATCH_RECONNECT_SECONDS:.0f})")
            if state["status"] not in TERMINAL:
                time.sleep(1.0)
    final = state["status"]
    colour = "green" if final == "succeeded" else "red"
    extra = state.get("fine_tuned_model") or (state.get("error") or {}).get("message") or ""
    console.print(f"[{colour}]{job_id} {final}[/{colour}] {extra}")
    if final != "succeeded":
        raise typer.Exit(1)


def _preference_figures(metrics: dict[str, Any]) -> str:
    """A DPO step's preference accuracy and reward margin (validation's when the step evaluated); "" otherwise."""
    for prefix, label in (("valid_", "valid "), ("train_", "")):
        accuracy, margin = metrics.get(f"{prefix}preference_accuracy"), metrics.get(f"{prefix}rewards_margin")
        if isinstance(accuracy, int | float) and isinstance(margin, int | float):
            return f"{label}pref acc {accuracy:.2f} margin {margin:.3f}"
    return ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@jobs_app.command("download")
def download_artifact(job_id: str, artifact: Annotated[str | None, typer.Option(
                          help="Artifact name (default: the trained weights, `adapter` or, for a full fine-tune, "
                               "`model`).")] = None,
                      output: Annotated[Path | None, typer.Option("-o", "--output")] = None,
                      url: Url = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Download an artifact (progress bar); resumes a partial file with a Range request; checks its sha256."""
    listing = _call(url, api_key, "GET", f"/fine_tuning/jobs/{job_id}/artifacts")
    if artifact is None:
        present = {a["name"] for a in listing["data"]}
        artifact = next((name for name in MAIN_ARTIFACTS if name in present), MAIN_ARTIFACTS[0])
    target = output or Path(_served_filename(job_id, artifact, url=url, api_key=api_key)
                            or f"{job_id}-{artifact}.tar")
    target = fetch_artifact(job_id, artifact, target, listing=listing["data"], url=url, api_key=api_key)
    console.print(f"{target}\t{target.stat().st_size} bytes\tsha256 {_sha256(target)} verified")


def _served_filename(job_id: str, artifact: str, *, url: str, api_key: str) -> str | None:
    """The file name the server gives an artifact (metrics are CSV, the config JSON), without any folder part;
    None when it gives none. Asked before the download, whose resuming needs the name of the partial file."""
    try:
        with _client(url, api_key) as client, client.stream(
                "GET", f"/fine_tuning/jobs/{job_id}/artifacts/{artifact}") as response:  # closed before the body
            disposition = response.headers.get("content-disposition")
    except httpx.HTTPError as exc:
        console.print(f"[red]error[/red] cannot reach {url}: {exc}")
        raise typer.Exit(1) from None
    if not disposition:
        return None
    # Here, not at the top: it loads FastAPI, most of a second that every other command would wait for.
    from app.core.security import plain_filename

    header = Message()
    header["content-disposition"] = disposition
    # The server's name is a label: the last path part, no control characters, never "." or "..".
    return plain_filename(header.get_filename(), default="") or None


def fetch_artifact(job_id: str, artifact: str, target: Path, *, listing: list[dict[str, Any]], url: str,
                   api_key: str) -> Path:
    """Download one artifact of a job to `target` (resuming a partial file), checked against its sha256; exits
    with the reason on failure."""
    entry = next((a for a in listing if a["name"] == artifact), None)
    if entry is None:
        names = ", ".join(a["name"] for a in listing) or "none yet"
        console.print(f"[red]error[/red] job {job_id} has no artifact {artifact!r} (has: {names})")
        raise typer.Exit(1)
    size, expected = int(entry["bytes"]), entry["sha256"]
    have = target.stat().st_size if target.exists() else 0
    if have > size:
        have = 0  # not a prefix of this artifact: start again
    try:
        with _client(url, api_key, timeout=None) as client, _transfer_progress() as progress:
            task = progress.add_task(f"download {target.name}", total=size, completed=have)
            if have < size:
                headers = {"Range": f"bytes={have}-"} if have else {}
                path = f"/fine_tuning/jobs/{job_id}/artifacts/{artifact}"
                with client.stream("GET", path, headers=headers) as response:
                    if not response.is_success:
                        response.read()
                        _check(response)
                    expected = response.headers.get("x-content-sha256", expected)
                    resumed = response.status_code == 206
                    if not resumed:
                        progress.update(task, completed=0)
                    with target.open("ab" if resumed else "wb") as out:
                        for chunk in response.iter_bytes(CHUNK):
                            out.write(chunk)
                            progress.advance(task, len(chunk))
    except ClientError as exc:
        console.print(f"[red]error[/red] {exc}")
        raise typer.Exit(1) from None
    except httpx.TransportError as exc:
        console.print(f"[red]error[/red] download interrupted ({exc}); run the same command again to resume")
        raise typer.Exit(1) from None
    actual = _sha256(target)
    if actual != expected:
        console.print(f"[red]error[/red] sha256 mismatch for {target}: got {actual}, expected {expected}; "
                      "delete the file and download again")
        raise typer.Exit(1)
    return target


# --- models ------------------------------------------------------------------------------------------


@models_app.command("list")
def list_models(registered: Annotated[bool, typer.Option(
                    "--registered", help="Every registered base model with its status and pin (admin key).")] = False,
                url: Url = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """List ready base models and fine-tuned models (or, with --registered, the registry)."""
    if registered:
        table = _table("name", "status", "source", "commit", "parameters", "size", "on workers")
        for row in _call(url, api_key, "GET", "/admin/models")["data"]:
            details, download = row["details"], row.get("download")
            status = row["status"] + (f": {row['error']}" if row["error"] else "")
            if download:
                status += (f" ({_size(download['done_bytes'])} of {_size(download['total_bytes'])} on "
                           f"{download['worker']})")
            table.add_row(row["id"], status, row["source"], (row["commit_sha"] or "-")[:12],
                          _count(details.get("parameters")), _size(details.get("bytes")),
                          ", ".join(row.get("hosts") or []) or "-")
        console.print(table)
        return
    page = _call(url, api_key, "GET", "/models")
    table = _table("id", "owned_by", "root", "job")
    for row in page["data"]:
        table.add_row(row["id"], row.get("owned_by") or "-", row.get("root") or "-",
                      row.get("fine_tuning_job") or "-")
    console.print(table)


@models_app.command("add")
def add_model(name: Annotated[str, typer.Argument(help="What jobs will say in `model`.")],
              source: Annotated[str, typer.Argument(help="A hub id (ORG/NAME or hf:ORG/NAME) or path:/folder.")],
              revision: Annotated[str | None, typer.Option(help="Tag, branch or commit (hub sources).")] = None,
              trust_remote_code: Annotated[bool, typer.Option(help="Run Python shipped with the model.")] = False,
              allow_pickle: Annotated[bool, typer.Option(help="Accept .bin/.pt weights (they run code).")] = False,
              url: Url = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Register a base model (admin key): a hub model is pinned to the commit its revision resolves to."""
    body = {"name": name, "source": source, "revision": revision, "trust_remote_code": trust_remote_code,
            "allow_pickle": allow_pickle}
    row = _call(url, api_key, "POST", "/admin/models", json=body)
    pin = f" at {row['commit_sha']}" if row["commit_sha"] else ""
    typer.echo(f"registered {row['id']} ({row['source']}{pin}): {row['status']}")


@models_app.command("pull")
def pull_model(name: str, worker: Annotated[str | None, typer.Option(help="Only this worker.")] = None,
               url: Url = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Download a hub model into the cache of every live worker (or one) ahead of its jobs (admin key)."""
    answer = _call(url, api_key, "POST", f"/admin/models/{quote(name, safe='/')}/pull",
                   json={"worker": worker} if worker else {})
    typer.echo(f"pull of {answer['model']} sent to: {', '.join(answer['workers']) or 'no live worker'}")


@models_app.command("rm")
def remove_model(name: str, url: Url = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Unregister a base model (admin key); refused while a job that has not finished uses it."""
    row = _call(url, api_key, "DELETE", f"/admin/models/{quote(name, safe='/')}")
    typer.echo(f"removed {row['id']}")


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}B" if value >= 1e8 else f"{value / 1e6:.1f}M"


def _size(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f} GB" if value >= 1e8 else f"{value / 1e6:.1f} MB"


# --- admin -------------------------------------------------------------------------------------------


def worker_row(worker: dict[str, Any]) -> tuple[str, ...]:
    """One table row: name, status, GPUs, labels, heartbeat age, current job, host."""
    status = worker["status"] if worker["live"] else "gone"
    gpus = str(worker["gpus"])
    if worker["gpus"] and worker.get("gpu_memory_gb"):
        gpus += f" x {worker['gpu_memory_gb']:g} GiB"
    job = worker.get("current_job")
    running = "-" if not job else f"{job['id']} {job['step']}/{job['total_steps'] or '?'} ({job['project']})"
    return (worker["name"], status, gpus, ",".join(worker["labels"]) or "-",
            f"{worker['seconds_since_heartbeat']:.0f}s ago", running, f"{worker['hostname']}:{worker['pid']}")


@admin_app.command("workers")
def list_workers(name: Annotated[str | None, typer.Argument(help="Show one worker.")] = None,
                 as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
                 url: Url = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """List workers: status (idle, busy, draining, or gone when its heartbeat stopped), GPUs, labels, job."""
    if name is not None:
        workers = [_call(url, api_key, "GET", f"/admin/workers/{quote(name, safe=':@')}")]
    else:
        workers = _call(url, api_key, "GET", "/admin/workers")["data"]
    if as_json:
        typer.echo(json.dumps(workers if name is None else workers[0], indent=2))
        return
    table = _table("name", "status", "gpus", "labels", "heartbeat", "job", "host")
    for worker in workers:
        table.add_row(*worker_row(worker))
    console.print(table)
