"""Answer reports asked for after training: a fine-tuned model (or checkpoint) and its base answer a file's
examples, scored against the references (as the report a job ends with)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.schemas.common import ListPage
from app.schemas.training import AnswerBudget


class EvaluationCreate(AnswerBudget):
    """max_examples and max_new_tokens as a job's `evaluation` block."""

    file_id: str = Field(min_length=1, description="A fine-tune file of this project: chat examples (the last "
                                                   "assistant turn is the reference), prompt-completion examples "
                                                   "(the completion) or preference pairs (the preferred answer); "
                                                   "not text examples, which have no answer to compare with.")
    model: str | None = Field(default=None, description="The job's fine-tuned model (default) or one of its "
                                                        "checkpoints (ft:...:ckpt-step-N).")


class EvaluationPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.evaluation"] = "fine_tuning.job.evaluation"
    fine_tuning_job_id: str
    model: str
    file_id: str
    max_examples: int
    max_new_tokens: int | None
    status: Literal["queued", "running", "succeeded", "failed"]
    # The headline (as a job's `evaluation`): examples, base, tuned, tuned_minus_base, tuned_worse_than_base.
    report: dict[str, Any] | None
    # eval_report.json and eval_samples.jsonl, as files (GET /v1/files/{id}/content).
    result_files: list[str]
    error: dict[str, Any] | None
    created_at: int
    finished_at: int | None


class EvaluationList(ListPage[EvaluationPublic]):
    pass
