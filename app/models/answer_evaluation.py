from __future__ import annotations

from typing import Any

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, BigIntKey, JSONType, KeyedMixin, now_seconds

# queued (sent to an inference worker) -> running -> succeeded | failed
EVALUATION_STATUSES = ("queued", "running", "succeeded", "failed")


class AnswerEvaluation(KeyedMixin, Base):
    """A base-vs-tuned answer report asked for after training, on any file (POST .../evaluations).

    Owned by app/services/evaluations.py; run by an inference worker (worker/inference/server.py), which writes
    the status, the report and its two result files.
    """

    __tablename__ = "answer_evaluations"

    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_pk: Mapped[int] = mapped_column(BigIntKey, ForeignKey("fine_tuning_jobs.pk", ondelete="CASCADE"), index=True)
    project_pk: Mapped[int] = mapped_column(BigIntKey, ForeignKey("projects.pk", ondelete="CASCADE"))
    # The fine-tuned model or checkpoint id evaluated, and the file whose examples it answered.
    model: Mapped[str] = mapped_column(String(255))
    file_id: Mapped[str] = mapped_column(String(64))
    max_examples: Mapped[int] = mapped_column(Integer)
    max_new_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # What the inference worker loads: {"base", "weights_key", "full"} and the file's storage key.
    target: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    # The inference worker it was sent to (its row in inference_servers while it lives).
    server: Mapped[str | None] = mapped_column(String(255), nullable=True)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    result_files: Mapped[list[Any]] = mapped_column(JSONType, default=list)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now_seconds)
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
