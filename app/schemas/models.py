from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from app.schemas.common import ListPage


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # Extensions: the catalogue base model and the job that produced a fine-tuned model.
    root: str | None = None
    fine_tuning_job: str | None = None


class ModelList(ListPage[ModelPublic]):
    has_more: bool = False


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True
