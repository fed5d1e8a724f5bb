from __future__ import annotations

from typing import Any, Literal, get_args

from sqlalchemy import Boolean, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, JSONType, KeyedMixin, now_seconds

# Column lengths of a registration's source and commit; a job keeps the pair as "source@commit" (base_revision).
SOURCE_LENGTH, COMMIT_SHA_LENGTH = 1024, 64
BASE_REVISION_LENGTH = SOURCE_LENGTH + 1 + COMMIT_SHA_LENGTH

# A model's life: registered (read, no worker host holds its weights yet) -> downloading (a host is fetching
# it; `download` says which and how far) -> ready (a host holds a verified copy), or error (with its message:
# the Hub refused it, its weights are pickle only, a disk filled up, its files fail their hashes). A local
# folder (path:) is ready once read. A pull asked for by an operator takes a model in error back to registered.
ModelStatus = Literal["registered", "downloading", "ready", "error"]
MODEL_STATUSES: tuple[ModelStatus, ...] = get_args(ModelStatus)
# Jobs, token statistics and inference may name a model in these: a worker host fetches what it lacks.
USABLE_STATUSES: tuple[ModelStatus, ...] = ("registered", "downloading", "ready")
# A download in progress says how far it is this often; one silent for DOWNLOAD_STALE_SECONDS died with its
# process, and another host may take it over.
DOWNLOAD_HEARTBEAT_SECONDS = 10.0
DOWNLOAD_STALE_SECONDS = 3 * DOWNLOAD_HEARTBEAT_SECONDS


class RegisteredModel(KeyedMixin, Base):
    """A base model jobs may name: a Hugging Face Hub repository pinned to a commit, or a local folder.

    Owned by app/services/base_models.py. Workers fetch the weights of hub models into their own cache
    (worker/model_cache.py); the API host keeps only what it reads here (metadata and tokenizer files).
    """

    __tablename__ = "registered_models"

    # What jobs say in `model`.
    name: Mapped[str] = mapped_column(String(255), unique=True)
    # "hf:ORG/NAME" or "path:/absolute/folder".
    source: Mapped[str] = mapped_column(String(SOURCE_LENGTH))
    # The revision asked for (tag, branch or commit); None means the repository's default branch.
    revision: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # The commit the revision resolved to when registered: every worker downloads exactly this.
    commit_sha: Mapped[str | None] = mapped_column(String(COMMIT_SHA_LENGTH), nullable=True)
    trust_remote_code: Mapped[bool] = mapped_column(Boolean, default=False)
    # Pickle weights (.bin/.pt) run code when loaded: fetched only when the operator allowed it.
    allow_pickle: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16), default="registered")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Read from the model: architecture, parameters, hidden_size, layers, vocab_size, context_length,
    # torch_dtype, bytes, has_chat_template, license.
    info: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    # What a worker fetches and verifies: [{"name", "size", "sha256" (LFS files) or "git_sha1"}].
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    # The tokenizer files' text by name: the API counts tokens at upload time without the weights.
    tokenizer: Mapped[dict[str, str]] = mapped_column(JSONType, default=dict)
    # The download in progress: {"worker", "done_bytes", "total_bytes", "updated_at"}; None when none is.
    download: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True, default=None)
    # The workers whose host cache holds a verified copy (by worker name), as they reported it.
    hosts: Mapped[list[str]] = mapped_column(JSONType, default=list, server_default="[]")
    owned_by: Mapped[str] = mapped_column(String(255), default="tuneforge")
    created_at: Mapped[int] = mapped_column(Integer, default=now_seconds)

    @property
    def hub_repo(self) -> str | None:
        return self.source.removeprefix("hf:") if self.source.startswith("hf:") else None

    @property
    def local_path(self) -> str | None:
        return self.source.removeprefix("path:") if self.source.startswith("path:") else None
