"""The `tuneforge` command: the service's pieces (serve, api, worker, migrate) and admin tasks."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from app.cli_client import DEFAULT_URL, ApiKey, Url, admin_app, files_app, jobs_app, models_app

app = typer.Typer(help="tuneforge: self-hosted LLM fine-tuning with an OpenAI-compatible API.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
keys_app = typer.Typer(help="Manage API keys (admin).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(files_app, name="files")
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")
app.add_typer(admin_app, name="admin")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_migrations(database_url: str | None = None) -> None:
    """Bring the database schema to the latest revision (idempotent)."""
    from alembic import command
    from alembic.config import Config

    from app.core.config import get_settings

    settings = get_settings()
    url = database_url or settings.resolved_database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


@app.command()
def migrate() -> None:
    """Apply database migrations (run once per upgrade, before starting APIs and workers)."""
    run_migrations()
    typer.echo("database is at the latest schema revision")


@app.command()
def api(host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Run the HTTP API (production: behind a proxy, against Postgres and Redis)."""
    import uvicorn

    from app.core.config import get_settings

    settings = get_settings()
    if not settings.require_api_keys and not _is_loopback(host):
        raise typer.BadParameter("TUNEFORGE_REQUIRE_API_KEYS=false is only allowed on a loopback host",
                                 param_hint="--host")
    # SIGTERM / SIGINT: stop accepting, let in-flight requests finish (at most stop_grace_seconds), exit 0.
    # uvicorn re-raises the signal after its drain with the previous handler restored, which would end the
    # process by the signal (and skip `tuneforge serve`'s stopping of its worker): make it a clean exit instead.
    for signum in (signal.SIGTERM, signal.SIGINT):  # Ctrl-C too: a clean exit, not a traceback
        signal.signal(signum, _exit_after_drain)
    uvicorn.run("app.main:app", host=host, port=port, workers=workers, log_level="info",
                timeout_graceful_shutdown=int(settings.stop_grace_seconds))


@app.command()
def worker(loglevel: str = "INFO", inference: Annotated[bool, typer.Option(
        "--inference", help="Serve chat completions and completions (base and fine-tuned models) instead of "
                            "training: the API finds this process through the database.")] = False) -> None:
    """Run a training worker (one per GPU host, or one per GPU): takes jobs from the queues."""
    from app.core.config import get_settings

    settings = get_settings()
    if inference:
        import logging

        from worker.inference.server import serve as serve_inference

        logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        serve_inference(settings)
        return

    from app.services.workers import direct_queue
    from worker.celery_app import celery_app
    from worker.registration import worker_name

    if os.geteuid() == 0:
        # Celery's screenful about superuser privileges is about pickle messages executing code as root; this
        # service accepts JSON only. One line instead, since containers often run as root.
        import warnings

        from celery.exceptions import SecurityWarning

        warnings.filterwarnings("ignore", category=SecurityWarning)
        typer.echo("note: the worker runs as root; tuneforge accepts only JSON messages (no pickle), but run "
                   "workers as an unprivileged user in production (docs/operators.md)", err=True)
    # The shared queue takes jobs any worker can run; the direct one, jobs routed to this worker for
    # its GPUs or labels (app/services/dispatch.py).
    queues = f"{settings.training_queue},{direct_queue(settings, worker_name(settings))}"
    celery_app.worker_main(["worker", "-Q", queues, "--pool=solo",
                            f"--loglevel={loglevel}", "--without-gossip", "--without-mingle",
                            "-n", f"tuneforge-{os.getpid()}@%h"])


@app.command("make-tiny-model")
def make_tiny_model(path: Path, register: Annotated[str | None, typer.Option(
        help="Also add the model to the catalogue under this name.")] = None) -> None:
    """Build a tiny Llama-architecture model with its own tokenizer (tests and demos; no hub needed)."""
    from worker.training.tiny_model import make_tiny_model as build

    build(path)
    typer.echo(f"tiny model written to {path}")
    if register:
        register_model(register, path)


def register_model(name: str, path: Path) -> None:
    """Add name -> path to the catalogue file."""
    from app.core.config import get_settings

    catalogue_path = get_settings().catalogue_path
    catalogue = json.loads(catalogue_path.read_text()) if catalogue_path.exists() else {}
    catalogue[name] = {"path": str(path.resolve())}
    catalogue_path.parent.mkdir(parents=True, exist_ok=True)
    catalogue_path.write_text(json.dumps(catalogue, indent=2))
    typer.echo(f"registered {name!r} in {catalogue_path}")


@app.command()
def serve(host: str = "127.0.0.1", port: int = 8000,
          data_dir: Annotated[Path | None, typer.Option(
              help="Where everything is kept (default: TUNEFORGE_DATA_DIR, else .tuneforge).")] = None,
          demo: Annotated[bool, typer.Option(help="Build and register the tiny demo model.")] = True) -> None:
    """Embedded mode: API and one worker together, SQLite and a folder broker under data_dir."""
    from app.core.config import get_settings

    # Flag, then environment, then default, as for every setting: the data dir is the settings' own unless given.
    data_dir = data_dir or get_settings().data_dir
    os.environ["TUNEFORGE_DATA_DIR"] = str(data_dir.resolve())
    os.environ.setdefault("TUNEFORGE_REQUIRE_API_KEYS", "false" if _is_loopback(host) else "true")
    get_settings.cache_clear()
    settings = get_settings()
    data_dir.mkdir(parents=True, exist_ok=True)
    run_migrations()
    if demo and "tiny-llama" not in settings.catalogue():
        tiny = data_dir.resolve() / "models" / "tiny-llama"
        make_tiny_model(tiny, register="tiny-llama")
    if not settings.require_api_keys:
        typer.echo(f"WARNING: API keys are not required: serving on loopback {host} only.", err=True)
    worker_process = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=os.environ.copy())
    # The inference role, for chat completions on the models trained here (it loads a model on first use).
    inference_process = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--inference"],
                                         env=os.environ.copy())
    typer.echo(f"tuneforge serving on http://{host}:{port}/v1 (worker pid {worker_process.pid}, inference worker "
               f"pid {inference_process.pid}, data in {data_dir.resolve()})")
    try:
        api(host=host, port=port, workers=1)
    finally:
        from app.core.processes import stop_process

        typer.echo("stopping the workers (a running job checkpoints and is handed back)", err=True)
        stop_process(inference_process, grace=settings.stop_grace_seconds)
        stop_process(worker_process, grace=settings.stop_grace_seconds)


@models_app.command("export")
def export_model(model: Annotated[str, typer.Argument(help="A fine-tuned model (ft:...) or checkpoint id.")],
                 fmt: Annotated[str, typer.Option("--format", help="peft: the adapter, for peft and vLLM "
                                                  "--lora-modules; merged: a plain transformers model folder.")
                                ] = "peft",
                 output: Annotated[Path | None, typer.Option("-o", "--output", help="Folder to write (default: "
                                                             "./<model>-<format>).")] = None,
                 url: Url = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Write a fine-tuned model as a folder transformers, peft and vLLM load as it is (docs/operators.md)."""
    import tarfile
    import tempfile
    from urllib.parse import quote

    from app.cli_client import _call, console, fetch_artifact

    if fmt not in ("peft", "merged"):
        raise typer.BadParameter("use peft or merged", param_hint="--format")
    found = _call(url, api_key, "GET", f"/models/{quote(model, safe='')}")
    job_id = found.get("fine_tuning_job")
    if not job_id:
        raise typer.BadParameter(f"{model} is a base model: export fine-tuned models", param_hint="MODEL")
    base = _call(url, api_key, "GET", f"/models/{quote(found['root'], safe='')}")
    listing = _call(url, api_key, "GET", f"/fine_tuning/jobs/{job_id}/artifacts")["data"]
    names = {a["name"] for a in listing}
    method = _call(url, api_key, "GET", f"/fine_tuning/jobs/{job_id}")["method"]
    adapter_type = method[method["type"]]["adapter"]["type"]
    from app.services.artifacts import split_checkpoint_id, weights_artifact

    _model, step = split_checkpoint_id(model)
    if step is not None:
        artifact = f"checkpoint-step-{step}"
    elif fmt == "merged" and "merged" in names:  # merged by the worker at the end of training (merge: true)
        artifact = "merged"
    else:
        artifact = weights_artifact(adapter_type)
    target = output or Path(f"{model.replace(':', '-').replace('/', '-')}-{fmt}")
    if target.exists() and any(target.iterdir()):
        raise typer.BadParameter(f"{target} exists and is not empty", param_hint="--output")
    from worker import export

    with tempfile.TemporaryDirectory(prefix="tuneforge-export-") as tmp:
        archive = fetch_artifact(job_id, artifact, Path(tmp) / "weights.tar", listing=listing, url=url,
                                 api_key=api_key)
        raw = Path(tmp) / "raw"
        with tarfile.open(archive) as tar:
            tar.extractall(raw, filter="data")
        training_config = (json.loads((raw / "training_config.json").read_text())
                            if (raw / "training_config.json").is_file() else None)
        try:
            if artifact == "merged":
                shutil.copytree(raw, target, dirs_exist_ok=True)
                adapter_config = None
            elif fmt == "peft":
                adapter_config = export.export_peft(raw, target, base=base)
            else:
                export.export_merged(raw, target, base=base, training_config=training_config)
                adapter_config = None
        except (ValueError, FileNotFoundError, ImportError) as exc:
            console.print(f"[red]error[/red] {exc}")
            raise typer.Exit(1) from None
    manifest = export.write_manifest(target, model=model, job_id=job_id, fmt=fmt, base=base,
                                     adapter_config=adapter_config)
    console.print(f"exported {model} ({fmt}) to {target}")
    for note in manifest["vllm"]["notes"]:
        console.print(f"[yellow]note[/yellow] {note}")
    console.print(f"serve it with vLLM: {manifest['vllm']['command']}", soft_wrap=True)


def _exit_after_drain(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


@keys_app.command("create")
def keys_create(project: str, name: str = "", admin: bool = False) -> None:
    """Create an API key for a project (created if new); the key is printed once."""
    from pydantic import ValidationError

    from app.core.db import session_scope
    from app.schemas.admin import ApiKeyCreate
    from app.services.projects import create_api_key

    # The rules of POST /v1/admin/keys: a project name the API refuses must not be made here either.
    try:
        ApiKeyCreate(project=project, name=name, is_admin=admin)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise typer.BadParameter(first["msg"], param_hint="PROJECT" if first["loc"] == ("project",)
                                 else "--name") from None
    with session_scope() as session:
        row, key = create_api_key(session, project_name=project, name=name, is_admin=admin)
        key_id = row.id
    typer.echo(json.dumps({"id": key_id, "project": project, "key": key}))


@keys_app.command("list")
def keys_list() -> None:
    """List API keys (ids and prefixes, never the keys)."""
    from app.core.db import session_scope
    from app.services.projects import list_api_keys

    with session_scope() as session:
        for key, project in list_api_keys(session):
            typer.echo(f"{key.id}\t{project.name}\t{key.key_prefix}...\t"
                       f"{'revoked' if key.revoked_at else 'active'}\t{'admin' if key.is_admin else ''}")


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke an API key by id."""
    from app.core.db import session_scope
    from app.services.projects import revoke_api_key

    with session_scope() as session:
        if not revoke_api_key(session, key_id=key_id):
            raise typer.BadParameter(f"no key with id {key_id}")
    typer.echo(f"revoked {key_id}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
