"""One attempt of one job, run in its own process: `python -m worker.attempt JOB_ID ATTEMPT`.

The supervisor (worker/supervisor.py) starts this process fresh (spawned, never forked: CUDA does not
survive fork), renews the lease while it runs and kills it when the job is cancelled or the lease is
lost. Everything here writes through fenced updates, so a stale attempt changes nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError

from app.core.config import Settings, get_settings
from app.core.db import get_engine, session_scope
from app.core.logging import configure_logging, set_job_context
from app.core.storage import Storage, get_storage
from app.models import File, FineTuningJob, JobStatus, Project, RegisteredModel
from app.schemas.training import TrainingConfig
from app.services import attempts
from app.services.artifacts import find_fine_tuned_model, weights_artifact
from app.services.base_models import registered_again, revision_of
from app.services.dispatch import dispatch_job
from app.services.files import build_result_file
from app.services.intake import token_report
from app.services.jobs import fine_tuned_model_name
from worker.archive import extract_tar, file_chunks, tar_directory
from worker.database_reporter import DatabaseReporter
from worker.exits import EXIT_DATABASE, EXIT_OK, EXIT_STALE
from worker.model_cache import ModelRef, RegistryLog, local_model
from worker.training import distributed, stopping
from worker.training.distributed import ProcessGroup
from worker.workdirs import remove_attempt_dir

logger = logging.getLogger("tuneforge.attempt")



def _download(storage: Storage, *, file_id: str, project_pk: int, target: Path) -> Path:
    with session_scope() as session:
        row = session.scalar(select(File).where(File.id == file_id, File.project_pk == project_pk))
        if row is None:
            raise FileNotFoundError(f"file {file_id} was deleted while the job waited")
        key = row.blob_key
    with open(target, "wb") as out:
        for chunk in storage.read(key):
            out.write(chunk)
    return target


def _resume_point(storage: Storage, *, job_pk: int, workdir: Path) -> tuple[Path | None, int]:
    """The last registered checkpoint, downloaded and verified against its manifest, and its step ((None, 0) when
    there is none); and, for load_best_at_end, the best one so far where the training writes its checkpoints, which
    the final weights are read from (an attempt starts in a fresh directory)."""
    from worker.training.checkpoint import best_step_to_keep
    from worker.training.recipe import checkpoint_dir

    with session_scope() as session:
        checkpoint = attempts.latest_checkpoint(session, job_pk=job_pk)
        if checkpoint is None:
            return None, 0
        key, step = checkpoint.blob_key, checkpoint.step_number
    target = _fetch_checkpoint(storage, key=key, step=step, target=workdir / "resume" / f"step-{step}")
    best = best_step_to_keep(target)
    if best is not None and best != step:
        with session_scope() as session:
            kept = attempts.checkpoint_at(session, job_pk=job_pk, step=best)
            best_key = kept.blob_key if kept is not None else None
        if best_key is not None:  # retention keeps the run's best step (database_reporter.checkpoint_saved)
            _fetch_checkpoint(storage, key=best_key, step=best, target=checkpoint_dir(workdir / "output", best))
    return target, step


def _fetch_checkpoint(storage: Storage, *, key: str, step: int, target: Path) -> Path:
    from worker.training.checkpoint import verify_checkpoint

    extract_tar(storage.read(key), target)
    if not verify_checkpoint(target):
        raise RuntimeError(f"registered checkpoint at step {step} does not match its manifest")
    return target


def download_init_adapter(storage: Storage, *, parent_job_id: str, step: int | None, project_pk: int,
                          target: Path) -> Path:
    """Fetch the adapter a continued-training job starts from: the parent's final adapter, or its checkpoint at
    `step`, extracted into `target` (a PEFT adapter directory for train(..., init_adapter=...))."""
    from app.core.errors import NotFound
    from app.services.artifacts import get_artifact

    name = "adapter" if step is None else f"checkpoint-step-{step}"
    with session_scope() as session:
        parent = session.scalar(select(FineTuningJob).where(FineTuningJob.id == parent_job_id,
                                                            FineTuningJob.project_pk == project_pk))
        if parent is None:
            raise FileNotFoundError(f"the fine-tuned model's job {parent_job_id} was deleted while the job waited")
        try:
            key = get_artifact(session, job=parent, name=name).blob_key
        except NotFound as exc:
            raise FileNotFoundError(f"job {parent_job_id} has no {name} to continue training from; it may have "
                                    "been deleted or pruned") from exc
    extract_tar(storage.read(key), target)
    if not (target / "adapter_config.json").is_file():
        raise ValueError(f"the {name} of job {parent_job_id} holds no PEFT adapter (adapter_config.json is missing)")
    return target


def answer_report(config: TrainingConfig, *, model_path: Path, final_dir: Path, valid_path: Path, workdir: Path,
                  reporter: DatabaseReporter, trust_remote_code: bool) -> tuple[dict[str, Any], Path, Path] | None:
    """The base-vs-tuned answer report (eval_report.json, eval_samples.jsonl) and its headline, said in an event.
    A report that cannot be made is said in a warning and the job still succeeds: its weights are trained."""
    import gc

    import torch

    from worker.training.answer_report import evaluate_answers
    from worker.training.model import pick_device

    gc.collect()  # the training's model and optimizer go before two models are loaded for the answers
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    reporter.event(f"Comparing the tuned model's answers with the base model's on up to "
                   f"{config.evaluation.max_examples} validation examples (greedy).")
    try:
        report, samples = evaluate_answers(config.evaluation, full=config.adapter.type == "full",
                                           model_path=model_path, final_dir=final_dir, validation_file=valid_path,
                                           device=pick_device(), trust_remote_code=trust_remote_code)
    except Exception as exc:
        logger.exception("answer report failed")
        reporter.event(f"The answer report could not be made: {type(exc).__name__}: {exc}", level="warn")
        return None
    report_path, samples_path = workdir / "eval_report.json", workdir / "eval_samples.jsonl"
    report_path.write_text(json.dumps(report, indent=2))
    samples_path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    base, tuned = report["base"], report["tuned"]
    reporter.event(f"Answer report on {report['examples']} validation examples, base -> tuned: exact match "
                   f"{base['exact_match']:.2f} -> {tuned['exact_match']:.2f}, token F1 {base['f1']:.2f} -> "
                   f"{tuned['f1']:.2f}, ROUGE-L {base['rouge_l']:.2f} -> {tuned['rouge_l']:.2f}; tuned worse than "
                   f"base on {report['tuned_worse_than_base']}.", data=report)
    if tuned["hit_max_tokens"] > 0.5:
        reporter.event(f"The tuned model ran into the {report['max_new_tokens']}-token limit without stopping on "
                       f"{tuned['hit_max_tokens']:.0%} of the answers: it may not have learned to end its turn "
                       "(check that the training data's answers end as the chat template ends them).", level="warn")
    return report, report_path, samples_path


def without_server_paths(message: str, replacements: dict[str, str]) -> str:
    """A failure message fit for clients: the server's directories named by role (the worker log keeps them);
    longest first, so a directory inside another is named as itself."""
    for path in sorted(replacements, key=len, reverse=True):
        message = message.replace(path, replacements[path])
    return message


class _Followers:
    """The other processes of a multi-process attempt: they wait for rank 0 to say what to train on."""

    def __init__(self, procs: ProcessGroup) -> None:
        self.procs, self.told = procs, False

    def tell(self, inputs: dict[str, Any] | None) -> None:
        """Send the training inputs (None: there will be no training) once."""
        if self.procs.enabled and not self.told:
            self.told = True
            distributed.broadcast(self.procs, inputs)


def run_attempt(job_id: str, attempt: int, *, settings: Settings, procs: ProcessGroup | None = None) -> int:
    """Train one attempt end to end and record the outcome; returns the process exit code.

    In a multi-process attempt this is rank 0: it alone downloads, reports and uploads.
    """
    followers = _Followers(procs or ProcessGroup())
    try:
        return _run(job_id, attempt, settings=settings, followers=followers)
    finally:
        followers.tell(None)  # never leave the other processes waiting for inputs that will not come
        # Its outputs are in storage (or it ended without any): nothing here is needed again.
        remove_attempt_dir(settings, job_id=job_id, attempt=attempt)


def _run(job_id: str, attempt: int, *, settings: Settings, followers: _Followers) -> int:
    from worker.training.recipe import train
    from worker.training.reporting import TrainingCancelled, TrainingPaused, TrainingReleased

    storage = get_storage()
    with session_scope() as session:
        job = session.scalar(select(FineTuningJob).where(FineTuningJob.id == job_id))
        if job is None or job.attempt != attempt or job.status != JobStatus.RUNNING:
            return EXIT_STALE
        project = session.get(Project, job.project_pk)
        assert project is not None
        job_pk, project_pk, organization, worker = job.pk, job.project_pk, project.name, job.lease_owner or "?"
        config = TrainingConfig.model_validate(job.config)
        base_model, training_file, validation_file = job.base_model, job.training_file, job.validation_file
        base_revision = job.base_revision
        integrations = (job.integrations or {}).get("items") or []
        model_name = fine_tuned_model_name(job, organization=organization)
        # Continued training: `model` names a fine-tuned model (or checkpoint) trained on base_model.
        parent_model = job.model if job.model != job.base_model else None

    workdir = settings.attempt_work_dir(job_id, attempt)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    reporter = DatabaseReporter(job_pk=job_pk, job_id=job_id, attempt=attempt, storage=storage,
                                settings=settings, scratch=workdir)
    model_paths: list[str] = []
    try:
        with session_scope() as session:
            registered = session.scalar(select(RegisteredModel).where(RegisteredModel.name == base_model))
            if registered is None:
                raise ValueError(f"base model {base_model!r} is no longer registered")
            if registered_again(base_revision, registered):
                # the weights the job was checked against (and its parent trained on) are not the name's any more
                raise ValueError(f"base model {base_model!r} was registered again after the job was created (it was "
                                 f"{base_revision}, it is {revision_of(registered)}); create the job again")
            base = ModelRef.of(registered)
        # Normally held already (the job waited queued while its model downloaded, worker/supervisor.py); the
        # hashes are checked again here, and a file that fails is fetched anew.
        model_path = local_model(base, settings=settings, progress=reporter.event,
                                 log=RegistryLog(base, worker=worker))
        model_paths += [str(model_path), str(model_path.resolve())]
        train_path = _download(storage, file_id=training_file, project_pk=project_pk, target=workdir / "train.jsonl")
        valid_path = (_download(storage, file_id=validation_file, project_pk=project_pk,
                                target=workdir / "validation.jsonl") if validation_file else None)
        if attempt == 1:  # what the job's data is in its model's tokens (once per job)
            with session_scope() as session:
                job_row = session.get(FineTuningJob, job_pk)
                assert job_row is not None
                for level, message, data in token_report(session, job_row, settings=settings):
                    reporter.event(message, level=level, data=data)
        resume_from, resumed_step = _resume_point(storage, job_pk=job_pk, workdir=workdir)
        if resume_from is not None:
            reporter.event(f"Resuming from the checkpoint at {resume_from.name}.")
        if attempt > 1:
            with session_scope() as session:
                attempts.train_again_after(session, job_pk=job_pk, attempt=attempt, step=resumed_step)
        init_adapter = None
        if parent_model is not None and resume_from is None:
            with session_scope() as session:
                project_row = session.get(Project, project_pk)
                assert project_row is not None
                parent, step = find_fine_tuned_model(session, project=project_row, model_id=parent_model)
                parent_id = parent.id
            init_adapter = download_init_adapter(storage, parent_job_id=parent_id, step=step, project_pk=project_pk,
                                                 target=workdir / "init-adapter")
            reporter.event(f"Continuing training from {parent_model}.", data={"parent_job": parent_id, "step": step})
        wandb = next((i["wandb"] for i in integrations if i.get("type") == "wandb"), None)
        if wandb is not None:  # what W&B reads, from the service's settings
            os.environ["WANDB_MODE"] = settings.wandb_mode
            if settings.wandb_api_key is not None:
                os.environ["WANDB_API_KEY"] = settings.wandb_api_key.get_secret_value()
        # What every process of the attempt trains on (one process, or torchrun's ranks on this host).
        inputs: dict[str, Any] = {
            "model_path": model_path, "train_file": train_path, "validation_file": valid_path,
            "output_dir": workdir / "output", "resume_from": resume_from, "init_adapter": init_adapter,
            "trust_remote_code": base.trust_remote_code,
        }  # fmt: skip
        followers.tell({**inputs, "config": config.model_dump()})
        result = train(config, reporter=reporter, wandb=wandb, **inputs)
        # The exact weights trained on, so the run can be reproduced: the hub commit (or the local folder).
        record = result.final_dir / "training_config.json"
        record.write_text(json.dumps({**json.loads(record.read_text()), "base_model": {
            "name": base.name, "source": base.source, "commit_sha": base.commit_sha}}, indent=2))
        adapter_name = weights_artifact(config.adapter.type)
        outputs = [
            (adapter_name, adapter_name, tar_directory(result.final_dir, workdir / f"{adapter_name}.tar"),
             f"{job_id}-{adapter_name}.tar"),
            ("metrics", "metrics", result.metrics_csv, f"{job_id}-metrics.csv"),
            ("config", "config", result.final_dir / "training_config.json", f"{job_id}-training_config.json"),
        ]
        if config.merge:
            from worker.training.merge import merge_adapter

            reporter.event("Merging the adapter into the base model's weights.")
            merged = merge_adapter(config, model_path=model_path, adapter_dir=result.final_dir,
                                   output_dir=workdir / "merged")
            outputs.append(("merged", "merged", tar_directory(merged, workdir / "merged.tar"), f"{job_id}-merged.tar"))
        headline = None
        if valid_path is not None and config.evaluation.generate:
            made = answer_report(config, model_path=model_path, final_dir=result.final_dir, valid_path=valid_path,
                                 workdir=workdir, reporter=reporter, trust_remote_code=base.trust_remote_code)
            if made is not None:
                headline, report_path, samples_path = made
                outputs += [("eval_report", "eval_report", report_path, f"{job_id}-eval_report.json"),
                            ("eval_samples", "eval_samples", samples_path, f"{job_id}-eval_samples.jsonl")]
        files = []
        for name, kind, path, filename in outputs:
            stored = storage.write(f"artifacts/{job_id}/{name}-attempt-{attempt}", file_chunks(path))
            row = build_result_file(project_pk=project_pk, filename=filename, blob_key=stored.key,
                                         size=stored.bytes, sha256=stored.sha256)
            files.append((name, kind, row))
        with session_scope() as session:
            attempts.finish_job(session, job_pk=job_pk, attempt=attempt, fine_tuned_model=model_name,
                                trained_tokens=result.trained_tokens, artifacts=files, evaluation=headline,
                                weights_step=result.weights_step)
        return EXIT_OK
    except TrainingCancelled:
        return EXIT_OK  # the job row already says cancelled (or another attempt owns it)
    except TrainingPaused as stop:
        with session_scope() as session:
            if isinstance(stop, TrainingReleased):  # this process was told to stop: hand the job on
                attempts.request_release(session, job_pk=job_pk, attempt=attempt)
            outcome = attempts.stop_after_checkpoint(session, job_pk=job_pk, attempt=attempt)
        if outcome == "queued":
            with session_scope() as session:
                dispatch_job(session, job_id=job_id)
        return EXIT_OK
    except attempts.StaleAttempt:
        logger.warning("attempt %s of %s lost its lease; stopping", attempt, job_id)
        return EXIT_STALE
    except (OperationalError, InterfaceError):
        # A connection cut or a database restart outside the reporter's retries (downloads, the resume point,
        # the final registration): the job is fine, this attempt is not; the supervisor queues the job again.
        logger.warning("attempt %s of %s lost the database:\n%s", attempt, job_id, traceback.format_exc())
        return EXIT_DATABASE
    except Exception as exc:
        logger.error("attempt %s of %s failed:\n%s", attempt, job_id, traceback.format_exc())
        message = str(exc) if isinstance(exc, ValueError | FileNotFoundError) else \
            f"Training failed with {type(exc).__name__}: {exc}"
        message = without_server_paths(message, {str(workdir): "<job work dir>", str(settings.data_dir.resolve()):
                                                 "<data dir>", **{p: f"<model {base_model}>" for p in model_paths}})
        try:
            with session_scope() as session:
                attempts.fail_job(session, job_pk=job_pk, attempt=attempt,
                                  code="training_error" if not isinstance(exc, ValueError) else "invalid_training",
                                  message=message)
        except attempts.StaleAttempt:
            return EXIT_STALE
        return EXIT_OK


def follow_attempt(procs: ProcessGroup) -> int:
    """Ranks 1..N-1 of a multi-process attempt: train on what rank 0 prepared, silently; rank 0 records the
    outcome. An error here also stops rank 0 (its next collective fails) and torchrun ends the attempt."""
    from worker.training.recipe import train
    from worker.training.reporting import SilentReporter, TrainingCancelled, TrainingPaused

    inputs = distributed.broadcast(procs, None)
    if inputs is None:
        return EXIT_OK  # rank 0 recorded why there is nothing to train
    config = TrainingConfig.model_validate(inputs.pop("config"))
    with contextlib.suppress(TrainingCancelled, TrainingPaused):  # rank 0 records either
        train(config, reporter=SilentReporter(), **inputs)
    return EXIT_OK


def _die_with_torchrun() -> None:
    """A rank gets SIGKILL when torchrun (its parent) dies, like the single process does with the supervisor."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job_id, attempt = sys.argv[1], int(sys.argv[2])
    stopping.install_handlers()  # SIGTERM / SIGINT: checkpoint, hand the job back, exit 0
    configure_logging(get_settings().log_format)
    set_job_context(job_id, attempt)
    procs = distributed.from_environment()
    if procs.enabled:  # started by torchrun: join the others before anything else
        from worker.training.model import pick_device

        _die_with_torchrun()
        distributed.start(procs, pick_device(procs.local_rank))
        if not procs.is_main:
            _exit(follow_attempt(procs))
    _exit(run_attempt(job_id, attempt, settings=get_settings(), procs=procs))


def _exit(code: int) -> None:
    """End the process once the attempt is recorded. Everything that matters is committed or closed by now,
    so skip the interpreter's teardown of torch and friends (a second or more that the next job on this
    worker would wait for) - unless W&B ran: its exit hooks stop its service process."""
    get_engine().dispose()  # close the database connections cleanly rather than drop them
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if "wandb" in sys.modules:
        sys.exit(code)
    ctypes.CDLL(None).fflush(None)  # C-level stdio too (native libraries' lines in the attempt log)
    os._exit(code)


if __name__ == "__main__":
    main()
