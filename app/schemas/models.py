from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, StrictBool

from app.models.registered_model import DOWNLOAD_HEARTBEAT_SECONDS, ModelStatus
from app.schemas.common import REQUEST_MODEL, ListPage


class ModelDetails(BaseModel):
    """What was read from a base model when it was registered (null where the model does not say)."""

    architecture: str | None = None
    parameters: int | None = None
    hidden_size: int | None = None
    layers: int | None = None
    vocab_size: int | None = None
    context_length: int | None = None
    intermediate_size: int | None = None
    attention_heads: int | None = None
    kv_heads: int | None = None
    torch_dtype: str | None = None
    bytes: int | None = None
    has_chat_template: bool | None = None
    license: str | None = None
    # The names adapter.target_modules may give: each module holding a weight matrix (from the safetensors headers).
    modules: list[str] | None = None


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # Extensions: the base model (`parent`, vLLM's name for an adapter's base; `root` too, as before) and the job
    # that produced a fine-tuned model; a base model's source, the commit it is pinned to and what was read from it.
    root: str | None = None
    parent: str | None = None
    fine_tuning_job: str | None = None
    source: str | None = None
    commit_sha: str | None = None
    details: ModelDetails | None = None


class ModelRegister(BaseModel):
    """Register a base model: a Hub repository (pinned to the commit `revision` resolves to) or a local folder."""

    model_config = REQUEST_MODEL

    name: str = Field(min_length=1, max_length=255, description="What jobs say in `model`.")
    source: str = Field(min_length=1, max_length=1024, description="hf:ORG/NAME (or ORG/NAME), or path:/folder.")
    revision: str | None = Field(default=None, min_length=1, max_length=255,
                                 description="Tag, branch or commit of a hub source (default: its main branch).")
    trust_remote_code: StrictBool = False
    allow_pickle: StrictBool = False


class ModelDownload(BaseModel):
    """A download in progress on one worker host."""

    worker: str
    done_bytes: int
    total_bytes: int
    updated_at: float = Field(description="When that host last said how far it is (every "
                              f"{DOWNLOAD_HEARTBEAT_SECONDS:.0f} s while it downloads).")


class RegisteredModelPublic(BaseModel):
    id: str
    object: Literal["registered_model"] = "registered_model"
    source: str
    revision: str | None
    commit_sha: str | None
    trust_remote_code: bool
    allow_pickle: bool
    status: ModelStatus = Field(description="registered (no worker host holds the weights yet), downloading, ready "
                                "(a worker host holds a verified copy) or error (see error).")
    error: str | None
    download: ModelDownload | None = Field(description="The download in progress, while status is downloading.")
    hosts: list[str] = Field(description="The workers whose host cache holds a verified copy.")
    details: ModelDetails
    files: int
    created_at: int


class RegisteredModelList(ListPage[RegisteredModelPublic]):
    has_more: bool = False


class ModelList(ListPage[ModelPublic]):
    has_more: bool = False


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class ModelPull(BaseModel):
    model_config = REQUEST_MODEL

    worker: str | None = Field(default=None, min_length=1, max_length=255,
                               description="Only this worker (default: every live worker).")


class ModelPullSent(BaseModel):
    object: Literal["model_pull"] = "model_pull"
    model: str
    workers: list[str]
