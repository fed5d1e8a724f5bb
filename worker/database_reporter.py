"""The training recipe's Reporter, backed by the database with every write fenced by attempt."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.exc import InterfaceError, OperationalError

from app.core.config import Settings
from app.core.db import session_scope
from app.core.leases import StaleAttempt
from app.core.storage import Storage
from app.services import attempts
from app.services.artifacts import prune_checkpoints
from worker.archive import file_chunks, tar_directory
from worker.training import dpo
from worker.training.checkpoint import best_step_to_keep

logger = logging.getLogger("tuneforge.reporter")

# What a checkpoint object carries: OpenAI's metrics, and a DPO job's preference figures.
METRIC_KEYS = ("step", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
               "full_valid_loss", "full_valid_mean_token_accuracy", *dpo.TRAIN_METRICS,
               *(f"{prefix}{name}" for prefix in ("valid_", "full_valid_") for name in dpo.VALID_METRICS))


class DatabaseReporter:
    """Events, metrics, checkpoints and control for one attempt of one job."""

    def __init__(self, *, job_pk: int, job_id: str, attempt: int, storage: Storage, settings: Settings,
                 scratch: Path) -> None:
        self.job_pk, self.job_id, self.attempt = job_pk, job_id, attempt
        self.storage, self.settings, self.scratch = storage, settings, scratch
        self.started = time.time()
        self._last_control, self._last_answer = 0.0, "continue"
        # Time-based checkpoints count from the start of the attempt, then from each saved checkpoint.
        self._last_checkpoint = time.monotonic()

    def _guard(self, write: Any, **kwargs: Any) -> Any:
        """Run a fenced write; ride out a database restart (up to the lease), never a lost lease."""
        deadline = time.monotonic() + self.settings.lease_seconds
        while True:
            try:
                with session_scope() as session:
                    return write(session, job_pk=self.job_pk, attempt=self.attempt, **kwargs)
            except (OperationalError, InterfaceError):
                if time.monotonic() > deadline:
                    raise
                logger.warning("job %s: database unavailable; retrying the write", self.job_id)
                time.sleep(1.0)

    def event(self, message: str, *, level: Literal["info", "warn", "error"] = "info",
              data: dict[str, Any] | None = None) -> None:
        self._guard(attempts.record_event, message=message, level=level, data=data)

    def metrics(self, data: dict[str, Any]) -> None:
        step, total = int(data["step"]), int(data.get("total_steps") or 0)
        elapsed = time.time() - self.started
        estimated = int(time.time() + elapsed / step * (total - step)) if step and total else None
        loss = data.get("train_loss")
        message = f"Step {step}/{total}: training loss={loss:.4f}" if isinstance(loss, float) else f"Step {step}"
        # The attempt that measured the step: who reads the events can check that no stale attempt wrote one.
        self._guard(attempts.record_event, message=message, type_="metrics", data={**data, "attempt": self.attempt},
                    step=step, total_steps=total or None, estimated_finish=estimated)

    def checkpoint_saved(self, *, step: int, path: Path, metrics: dict[str, Any]) -> None:
        archive = tar_directory(path, self.scratch / f"checkpoint-step-{step}.tar")
        key = f"checkpoints/{self.job_id}/step-{step}-attempt-{self.attempt}.tar"
        stored = self.storage.write(key, file_chunks(archive))
        archive.unlink()
        wire = {k: metrics[k] for k in METRIC_KEYS if metrics.get(k) is not None}
        wire.setdefault("step", step)
        try:
            self._guard(attempts.register_checkpoint, step=step, metrics=wire, blob_key=key,
                        sha256=stored.sha256, size=stored.bytes)
        except StaleAttempt:
            self.storage.delete(key)
            raise
        self._last_checkpoint = time.monotonic()
        # Retention while the job runs: the latest few (a resume needs only the latest) and the best by valid_loss,
        # and for load_best_at_end the best by the run's own rule (its tracked metric, early_stopping_threshold),
        # which a resumed run ends on.
        with session_scope() as session:
            prune_checkpoints(session, storage=self.storage, job_pk=self.job_pk,
                              keep=self.settings.checkpoints_kept_after_finish, keep_step=best_step_to_keep(path))

    def control(self) -> Literal["continue", "cancel", "pause", "checkpoint"]:
        # One small read a second at most: cancel still lands within the 10-second promise.
        now = time.monotonic()
        if now - self._last_control >= 1.0:
            self._last_answer = self._guard(attempts.requested_action)
            self._last_control = now
        # A user's cancel or pause wins; otherwise checkpoint when the interval has passed, so a crash
        # loses at most about checkpoint_interval_seconds of training (plus one step and the save).
        if self._last_answer == "continue" and now - self._last_checkpoint >= self.settings.checkpoint_interval_seconds:
            logger.info("job %s: %.0f s since the last checkpoint; asking for one", self.job_id,
                        now - self._last_checkpoint)
            return "checkpoint"
        return self._last_answer  # type: ignore[return-value]
